//! Token format: `tg_` + 32 random base62 characters + 6 base62 characters of the CRC32 of
//! everything before them. The checksum lets the filter refuse typos and garbage without a
//! lookup, and lets secret scanners match `tg_[0-9A-Za-z]{38}` with few false positives.

pub const PREFIX: &str = "tg_";
pub const RANDOM_LEN: usize = 32;
pub const CHECKSUM_LEN: usize = 6;
/// Total length of a well-formed token.
pub const TOKEN_LEN: usize = PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;

pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The 6-character base62 checksum of `body` (`tg_` + the random part), zero-padded.
pub fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(body);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Builds a token from 32 base62 characters of randomness. Returns `None` when `random` is
/// not exactly 32 base62 characters.
pub fn compose(random: &str) -> Option<String> {
    if random.len() != RANDOM_LEN || !random.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let mut token = String::with_capacity(TOKEN_LEN);
    token.push_str(PREFIX);
    token.push_str(random);
    let sum = checksum(token.as_bytes());
    token.extend(sum.iter().map(|&b| b as char));
    Some(token)
}

/// True when `candidate` has the token shape and a matching checksum.
pub fn is_well_formed(candidate: &[u8]) -> bool {
    if candidate.len() != TOKEN_LEN || !candidate.starts_with(PREFIX.as_bytes()) {
        return false;
    }
    let rest = &candidate[PREFIX.len()..];
    if !rest.iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    let (body, sum) = candidate.split_at(PREFIX.len() + RANDOM_LEN);
    checksum(body) == sum
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANDOM: &str = "abcdefghijklmnopqrstuvwxyzABCDEF";

    #[test]
    fn composed_tokens_are_well_formed() {
        let t = compose(RANDOM).unwrap();
        assert_eq!(t.len(), TOKEN_LEN);
        assert!(t.starts_with("tg_abcdef"));
        assert!(is_well_formed(t.as_bytes()));
    }

    #[test]
    fn checksum_is_crc32_in_base62() {
        // CRC32("tg_" + RANDOM) written in base62, most significant digit first.
        let body = format!("tg_{RANDOM}");
        let mut n = crc32fast::hash(body.as_bytes()) as u64;
        let mut digits = Vec::new();
        for _ in 0..6 {
            digits.push(BASE62[(n % 62) as usize]);
            n /= 62;
        }
        digits.reverse();
        assert_eq!(checksum(body.as_bytes()).to_vec(), digits);
    }

    #[test]
    fn any_changed_character_breaks_the_checksum() {
        let t = compose(RANDOM).unwrap();
        for i in PREFIX.len()..TOKEN_LEN {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == b'x' { b'y' } else { b'x' };
            assert!(!is_well_formed(&b), "position {i}");
        }
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let t = compose(RANDOM).unwrap();
        assert!(!is_well_formed(b""));
        assert!(!is_well_formed(&t.as_bytes()[..TOKEN_LEN - 1]));
        assert!(!is_well_formed(format!("{t}x").as_bytes()));
        assert!(!is_well_formed(t.replace("tg_", "tk_").as_bytes()));
        let mut non_ascii = t.clone().into_bytes();
        non_ascii[10] = 0xff;
        assert!(!is_well_formed(&non_ascii));
        assert!(compose("short").is_none());
        assert!(compose("abcdefghijklmnopqrstuvwxyzABCDE-").is_none());
    }
}
