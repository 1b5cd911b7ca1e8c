//! `--expires-in` values: `45s`, `90m`, `12h`, `30d`, or `never`.

/// Seconds, or `None` for `never`.
pub fn parse(s: &str) -> Result<Option<u64>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    let bad = || {
        format!(
            "`{s}` is not a duration: use a number with s, m, h or d (e.g. 12h, 30d) or `never`"
        )
    };
    let split = s.len().checked_sub(1).ok_or_else(bad)?;
    let (number, unit) = s.split_at(split);
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(format!("`{s}` is not a positive duration"));
    }
    n.checked_mul(unit).map(Some).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn units_and_never() {
        assert_eq!(parse("30d"), Ok(Some(2_592_000)));
        assert_eq!(parse("12h"), Ok(Some(43_200)));
        assert_eq!(parse("90m"), Ok(Some(5_400)));
        assert_eq!(parse("45s"), Ok(Some(45)));
        assert_eq!(parse("never"), Ok(None));
        assert_eq!(parse("NEVER"), Ok(None));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "d",
            "0d",
            "-1d",
            "10x",
            "1.5h",
            "30",
            "99999999999999999999d",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
