//! What a token's name and owner may hold. They are shown in the console, the CLI's tables
//! and the audit trail, and sent upstream in identity headers, so nothing in them may break
//! a line or make one name read as another (`al\u{200b}ice` looking like `alice`).

/// Longest `name` and `owner`, in characters (Unicode scalar values).
pub const MAX_CHARS: usize = 128;

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

fn within(c: char, ranges: &[(char, char)]) -> bool {
    ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c))
}

/// A character that would let text break a table row or a log line, or read as something
/// it is not.
fn refused(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}')
        || within(c, FORMAT)
        || within(c, INVISIBLE)
        // Private use: shows as whatever a font makes of it, or nothing.
        || matches!(c, '\u{e000}'..='\u{f8ff}' | '\u{f0000}'..='\u{10ffff}')
        // Noncharacters.
        || matches!(c, '\u{fdd0}'..='\u{fdef}')
        || (c as u32) & 0xfffe == 0xfffe
}

/// Checks a name or owner; the error is a phrase to follow the field's name
/// ("must be 1 to 128 characters").
pub fn check(v: &str) -> Result<(), String> {
    let n = v.chars().count();
    if n == 0 || n > MAX_CHARS {
        return Err(format!("must be 1 to {MAX_CHARS} characters"));
    }
    if let Some((i, c)) = v.chars().enumerate().find(|(_, c)| refused(*c)) {
        return Err(format!(
            "must not contain control, format or invisible characters \
             (U+{:04X} at character {})",
            c as u32,
            i + 1
        ));
    }
    if v.starts_with(char::is_whitespace) || v.ends_with(char::is_whitespace) {
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
    fn length_and_edges() {
        assert!(check("").is_err());
        assert!(check(&"é".repeat(MAX_CHARS)).is_ok());
        assert!(check(&"é".repeat(MAX_CHARS + 1)).is_err());
        assert!(check(" alice").unwrap_err().contains("whitespace"));
        assert!(check("alice\u{a0}").unwrap_err().contains("whitespace"));
    }
}
