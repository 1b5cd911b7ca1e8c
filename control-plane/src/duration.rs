//! Durations as people write them: `45s`, `90m`, `12h`, `30d`, or `never`. Used by the CLI's
//! `--expires-in`, the API's `expiring_within` and the `serve` policy options.

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
    // The unit is the last character, which may not be ASCII in what a user typed.
    let split = s.char_indices().next_back().ok_or_else(bad)?.0;
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

/// The shortest exact spelling: 7776000 -> `90d`, 5400 -> `90m`.
pub fn format(secs: u64) -> String {
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs >= n && secs.is_multiple_of(n) {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
mod tests {
    use super::{format, parse};

    #[test]
    fn formats_exactly() {
        assert_eq!(format(7_776_000), "90d");
        assert_eq!(format(5_400), "90m");
        assert_eq!(format(3_601), "3601s");
        assert_eq!(format(7_200), "2h");
    }

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
            "5é",
            "é",
            "5\u{1F600}",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
