//! What a token's name and owner may hold. They are shown in the console, the CLI's tables
//! and the audit trail, and sent upstream in identity headers, so nothing in them may break
//! a line or make one name read as another (`al\u{200b}ice` looking like `alice`).

/// Longest `name` and `owner`, in characters (Unicode scalar values).
pub const MAX_CHARS: usize = 128;

/// Control characters (general category Cc): C0, DEL and C1, NEL among them.
const CONTROL: &[(char, char)] = &[('\u{0}', '\u{1f}'), ('\u{7f}', '\u{9f}')];

/// The line and paragraph separators, which break a line without being control characters.
const SEPARATORS: &[(char, char)] = &[('\u{2028}', '\u{2029}')];

/// Unicode's format characters (general category Cf, Unicode 15.1): zero-width spaces and
/// joiners, bidirectional marks, embeddings, overrides and isolates, the soft hyphen, the
/// byte-order mark, invisible operators, tags and the like. None of them shows as itself.
const FORMAT: &[(char, char)] = &[
    ('\u{00ad}', '\u{00ad}'),
    ('\u{0600}', '\u{0605}'),
    ('\u{061c}', '\u{061c}'),
    ('\u{06dd}', '\u{06dd}'),
    ('\u{070f}', '\u{070f}'),
    ('\u{0890}', '\u{0891}'),
    ('\u{08e2}', '\u{08e2}'),
    ('\u{180e}', '\u{180e}'),
    ('\u{200b}', '\u{200f}'),
    ('\u{202a}', '\u{202e}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206f}'),
    ('\u{feff}', '\u{feff}'),
    ('\u{fff9}', '\u{fffb}'),
    ('\u{110bd}', '\u{110bd}'),
    ('\u{110cd}', '\u{110cd}'),
    ('\u{13430}', '\u{1343f}'),
    ('\u{1bca0}', '\u{1bca3}'),
    ('\u{1d173}', '\u{1d17a}'),
    ('\u{e0001}', '\u{e0001}'),
    ('\u{e0020}', '\u{e007f}'),
];

/// Letters and marks that draw nothing although they are not format characters: the Hangul
/// fillers, the combining grapheme joiner and the Khmer inherent vowels.
const INVISIBLE: &[(char, char)] = &[
    ('\u{034f}', '\u{034f}'),
    ('\u{115f}', '\u{1160}'),
    ('\u{17b4}', '\u{17b5}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{ffa0}', '\u{ffa0}'),
];

/// Private use: shows as whatever a font makes of it, or nothing.
const PRIVATE_USE: &[(char, char)] = &[('\u{e000}', '\u{f8ff}'), ('\u{f0000}', '\u{10ffff}')];

/// Noncharacters: U+FDD0..U+FDEF and the last two code points of every plane.
const NONCHARACTERS: &[(char, char)] = &[
    ('\u{fdd0}', '\u{fdef}'),
    ('\u{fffe}', '\u{ffff}'),
    ('\u{1fffe}', '\u{1ffff}'),
    ('\u{2fffe}', '\u{2ffff}'),
    ('\u{3fffe}', '\u{3ffff}'),
    ('\u{4fffe}', '\u{4ffff}'),
    ('\u{5fffe}', '\u{5ffff}'),
    ('\u{6fffe}', '\u{6ffff}'),
    ('\u{7fffe}', '\u{7ffff}'),
    ('\u{8fffe}', '\u{8ffff}'),
    ('\u{9fffe}', '\u{9ffff}'),
    ('\u{afffe}', '\u{affff}'),
    ('\u{bfffe}', '\u{bffff}'),
    ('\u{cfffe}', '\u{cffff}'),
    ('\u{dfffe}', '\u{dffff}'),
    ('\u{efffe}', '\u{effff}'),
    ('\u{ffffe}', '\u{fffff}'),
    ('\u{10fffe}', '\u{10ffff}'),
];

/// Every character that would let text break a table row or a log line, or read as
/// something it is not.
const REFUSED: &[&[(char, char)]] = &[
    CONTROL,
    SEPARATORS,
    FORMAT,
    INVISIBLE,
    PRIVATE_USE,
    NONCHARACTERS,
];

/// Unicode's White_Space characters (what `str::trim` removes): refused at either end.
pub const WHITESPACE: &[(char, char)] = &[
    ('\u{9}', '\u{d}'),
    (' ', ' '),
    ('\u{85}', '\u{85}'),
    ('\u{a0}', '\u{a0}'),
    ('\u{1680}', '\u{1680}'),
    ('\u{2000}', '\u{200a}'),
    ('\u{2028}', '\u{2029}'),
    ('\u{202f}', '\u{202f}'),
    ('\u{205f}', '\u{205f}'),
    ('\u{3000}', '\u{3000}'),
];

fn within(c: char, ranges: &[(char, char)]) -> bool {
    ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c))
}

fn refused(c: char) -> bool {
    REFUSED.iter().any(|group| within(c, group))
}

pub fn is_whitespace(c: char) -> bool {
    within(c, WHITESPACE)
}

/// A regular-expression character class of `ranges` (negated with `not`), in the syntax
/// that ECMA-262 (with the `u` flag), Python and Rust all read alike: `\uXXXX` within the
/// Basic Multilingual Plane, the character itself beyond it.
pub fn class(not: bool, ranges: &[&[(char, char)]]) -> String {
    let one = |c: char| {
        if u32::from(c) <= 0xffff {
            format!("\\u{:04X}", u32::from(c))
        } else {
            c.to_string()
        }
    };
    let mut out = String::from(if not { "[^" } else { "[" });
    for (lo, hi) in ranges.iter().flat_map(|g| g.iter()) {
        out.push_str(&one(*lo));
        if hi != lo {
            out.push('-');
            out.push_str(&one(*hi));
        }
    }
    out.push(']');
    out
}

/// What `check` accepts, as a JSON Schema `pattern` (with `minLength` 1 and `maxLength`
/// `MAX_CHARS` beside it): no refused character anywhere, none and no whitespace at either
/// end.
pub fn pattern() -> String {
    let edge = [REFUSED, &[WHITESPACE]].concat();
    let (edge, inner) = (class(true, &edge), class(true, REFUSED));
    format!("^{edge}(?:{inner}*{edge})?$")
}

/// `pattern`, or the empty string: what `check_optional` accepts.
pub fn optional_pattern() -> String {
    let edge = [REFUSED, &[WHITESPACE]].concat();
    let (edge, inner) = (class(true, &edge), class(true, REFUSED));
    format!("^(?:{edge}(?:{inner}*{edge})?)?$")
}

/// Checks optional text of at most `max` characters (a scope's description): empty, or what
/// `check` accepts but for the length.
pub fn check_optional(v: &str, max: usize) -> Result<(), String> {
    if v.chars().count() > max {
        return Err(format!("must be at most {max} characters"));
    }
    if v.is_empty() {
        return Ok(());
    }
    check_chars(v)
}

/// Checks a name or owner; the error is a phrase to follow the field's name
/// ("must be 1 to 128 characters").
pub fn check(v: &str) -> Result<(), String> {
    let n = v.chars().count();
    if n == 0 || n > MAX_CHARS {
        return Err(format!("must be 1 to {MAX_CHARS} characters"));
    }
    check_chars(v)
}

fn check_chars(v: &str) -> Result<(), String> {
    if let Some((i, c)) = v.chars().enumerate().find(|(_, c)| refused(*c)) {
        return Err(format!(
            "must not contain control, format or invisible characters \
             (U+{:04X} at character {})",
            c as u32,
            i + 1
        ));
    }
    if v.starts_with(is_whitespace) || v.ends_with(is_whitespace) {
        return Err("must not begin or end with whitespace".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_text_passes() {
        for ok in [
            "alice",
            "nightly export",
            "données-équipe",
            "東京チーム",
            "❤\u{fe0f} team",
            "a\u{301}",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn hidden_characters_are_named() {
        for (bad, code) in [
            ("al\u{200b}ice", "U+200B at character 3"),
            ("\u{feff}alice", "U+FEFF at character 1"),
            ("ali\u{ad}ce", "U+00AD"),
            ("a\u{61c}b", "U+061C"),
            ("a\u{200d}b", "U+200D"),
            ("a\u{2067}b", "U+2067"),
            ("a\u{e0041}b", "U+E0041"),
            ("a\u{3164}b", "U+3164"),
            ("a\u{e000}b", "U+E000"),
            ("a\u{fffe}b", "U+FFFE"),
            ("a\u{1b}[31mb", "U+001B"),
            ("a\u{85}b", "U+0085"),
            ("a\u{2028}b", "U+2028"),
        ] {
            let e = check(bad).unwrap_err();
            assert!(e.contains(code), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_tables_are_unicode_s() {
        for c in (0..=0x10_ffff).filter_map(char::from_u32) {
            assert_eq!(within(c, CONTROL), c.is_control(), "{c:?}");
            assert_eq!(is_whitespace(c), c.is_whitespace(), "{c:?}");
            let n = u32::from(c);
            let nonchar = (0xfdd0..=0xfdef).contains(&n) || n & 0xfffe == 0xfffe;
            assert_eq!(within(c, NONCHARACTERS), nonchar, "{c:?}");
        }
    }

    /// The document's pattern (with the length bounds beside it) and `check` agree on every
    /// character at the edges of the tables, alone, at either end and inside.
    #[test]
    fn the_pattern_says_what_check_does() {
        let re = regex::Regex::new(&pattern()).unwrap();
        let edges = REFUSED
            .iter()
            .copied()
            .chain([WHITESPACE])
            .flat_map(|g| g.iter())
            .flat_map(|(lo, hi)| [u32::from(*lo), u32::from(*hi)])
            .flat_map(|n| [n.saturating_sub(1), n, n + 1])
            .filter_map(char::from_u32)
            .chain("aé東❤\u{fe0f}\u{301}\u{1f600}".chars());
        let mut tried = 0;
        for c in edges {
            for s in [
                c.to_string(),
                format!("{c}ab"),
                format!("ab{c}"),
                format!("a{c}b"),
            ] {
                let fits = (1..=MAX_CHARS).contains(&s.chars().count());
                assert_eq!(fits && re.is_match(&s), check(&s).is_ok(), "{s:?}");
                tried += 1;
            }
        }
        assert!(tried > 500, "{tried}");
    }

    #[test]
    fn length_and_edges() {
        assert!(check("").is_err());
        assert!(check(&"é".repeat(MAX_CHARS)).is_ok());
        assert!(check(&"é".repeat(MAX_CHARS + 1)).is_err());
        assert!(check(" alice").unwrap_err().contains("whitespace"));
        assert!(check("alice\u{a0}").unwrap_err().contains("whitespace"));
    }
}
