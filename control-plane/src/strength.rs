//! How guessable a configured credential is, estimated at start so that `aaaaaaaaaaaaaaaa`
//! or `password12345678` is refused before it guards anything. The estimate is deliberately
//! simple: the text is cut into pieces (a single character, a run such as `aaaa` or `1234`,
//! or a repeat of something earlier), and each piece counts as one draw from the character
//! classes the text uses. Random credentials pass easily; repetitive ones do not.

/// Least estimated strength of an admin or sync credential, in bits.
pub const MIN_BITS: u32 = 64;

/// How to make a credential that passes.
pub const HOW_TO_GENERATE: &str =
    "generate one with `openssl rand -hex 32` (or `head -c 32 /dev/urandom | base64`)";

/// Size of the alphabet a text draws from: lower case, upper case, digits, other ASCII
/// printable characters and anything beyond, each class counted whole once used.
fn pool(s: &[char]) -> u32 {
    let has = |f: fn(&char) -> bool| s.iter().any(f);
    let mut n = 0;
    if has(char::is_ascii_lowercase) {
        n += 26;
    }
    if has(char::is_ascii_uppercase) {
        n += 26;
    }
    if has(char::is_ascii_digit) {
        n += 10;
    }
    if has(char::is_ascii_punctuation) || has(|c| *c == ' ') {
        n += 33;
    }
    if has(|c| !c.is_ascii()) {
        n += 100;
    }
    n.max(1)
}

/// Length of the run of constant step (-1, 0 or +1) starting at `i`.
fn run(s: &[char], i: usize) -> usize {
    if i + 1 >= s.len() {
        return 1;
    }
    let step = s[i + 1] as i64 - s[i] as i64;
    if step.abs() > 1 {
        return 1;
    }
    let mut n = 2;
    while i + n < s.len() && s[i + n] as i64 - s[i + n - 1] as i64 == step {
        n += 1;
    }
    n
}

/// Length of the longest earlier copy of the text starting at `i` (copies may overlap).
fn repeat(s: &[char], i: usize) -> usize {
    (0..i)
        .map(|j| {
            (0..s.len() - i)
                .take_while(|k| s[j + k] == s[i + k])
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Estimated strength in bits. Only the first 256 characters count (the estimate is
/// quadratic, and they are plenty for any credential that passes).
pub fn bits(secret: &str) -> u32 {
    let s: Vec<char> = secret.chars().take(256).collect();
    let mut pieces = 0u32;
    let mut i = 0;
    while i < s.len() {
        let (r, c) = (run(&s, i), repeat(&s, i));
        i += if r >= 3 || c >= 3 { r.max(c) } else { 1 };
        pieces += 1;
    }
    (f64::from(pieces) * f64::from(pool(&s)).log2()) as u32
}

/// `Err` with a sentence saying why and how to make a better one.
pub fn check(what: &str, secret: &str) -> Result<(), String> {
    let bits = bits(secret);
    if bits < MIN_BITS {
        return Err(format!(
            "{what} is too easy to guess (about {bits} bits of entropy, at least {MIN_BITS} \
             needed): {HOW_TO_GENERATE}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_credentials_score_low() {
        for weak in [
            "aaaaaaaaaaaaaaaa",
            "abcdefghijklmnop",
            "0123456789012345",
            "password12345678",
            "Admin123Admin123",
            "changeme-changeme-changeme",
            "qwertyqwertyqwerty",
        ] {
            assert!(bits(weak) < MIN_BITS, "{weak}: {}", bits(weak));
            assert!(check("--admin-token", weak)
                .unwrap_err()
                .contains("openssl rand"));
        }
    }

    #[test]
    fn random_credentials_pass() {
        for strong in [
            "3f9c1e7a0b5d4c2e8f6a1b3c5d7e9f01",
            "q8ZtK2vW9xLmN4pR7sT1uY6",
            "admin-credential-0123456789",
            "sync-4b1f9e2a7c3d5e8f",
        ] {
            assert!(bits(strong) >= MIN_BITS, "{strong}: {}", bits(strong));
        }
    }

    #[test]
    fn runs_and_repeats_count_once() {
        assert_eq!(run(&"abcdx".chars().collect::<Vec<_>>(), 0), 4);
        assert_eq!(run(&"zzz".chars().collect::<Vec<_>>(), 0), 3);
        assert_eq!(repeat(&"xyzxyzxyz".chars().collect::<Vec<_>>(), 3), 6);
    }
}
