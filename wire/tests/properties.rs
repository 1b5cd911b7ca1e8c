//! Property tests of the token format, run by `make test` with proptest's default case count
//! and by `make fuzz` with many more (`PROPTEST_CASES`).

use proptest::prelude::*;
use tokengate_wire::token::{self, CHECKSUM_LEN, PREFIX, RANDOM_LEN, TOKEN_LEN};

/// The 32 random characters of a token.
fn random_part() -> impl Strategy<Value = String> + Clone {
    "[0-9A-Za-z]{32}"
}

/// The published shape, `tg_[0-9A-Za-z]{38}`, written out rather than borrowed from the crate.
fn has_token_shape(b: &[u8]) -> bool {
    b.len() == 41 && b.starts_with(b"tg_") && b[3..].iter().all(u8::is_ascii_alphanumeric)
}

fn base62_value(digit: u8) -> u64 {
    match digit {
        b'0'..=b'9' => u64::from(digit - b'0'),
        b'A'..=b'Z' => u64::from(digit - b'A') + 10,
        b'a'..=b'z' => u64::from(digit - b'a') + 36,
        _ => unreachable!("shape checked first"),
    }
}

/// The format's definition read the other way round: the last six characters, as a base62
/// number, are the CRC32 of everything before them.
fn meets_the_spec(b: &[u8]) -> bool {
    if !has_token_shape(b) {
        return false;
    }
    let (body, sum) = b.split_at(TOKEN_LEN - CHECKSUM_LEN);
    let n = sum.iter().fold(0u64, |n, &d| n * 62 + base62_value(d));
    n == u64::from(crc32fast::hash(body))
}

/// Bytes that are, or are close to, a token: a real one, or one with a byte edited,
/// inserted or removed, or cut short, or the shape with an arbitrary checksum.
fn near_tokens() -> impl Strategy<Value = Vec<u8>> {
    let real = random_part().prop_map(|r| token::compose(&r).unwrap().into_bytes());
    prop_oneof![
        real.clone(),
        (real.clone(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut t, i, b)| {
            let i = i.index(t.len());
            t[i] = b;
            t
        }),
        (real.clone(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut t, i, b)| {
            t.insert(i.index(t.len() + 1), b);
            t
        }),
        (real.clone(), any::<prop::sample::Index>()).prop_map(|(mut t, i)| {
            t.remove(i.index(t.len()));
            t
        }),
        (real, 0..TOKEN_LEN).prop_map(|(t, n)| t[..n].to_vec()),
        "tg_[0-9A-Za-z]{38}".prop_map(String::into_bytes),
    ]
}

/// Bytes that miss the shape `tg_[0-9A-Za-z]{38}` in one way or another, some by very little.
fn off_shape() -> impl Strategy<Value = Vec<u8>> {
    let real = random_part().prop_map(|r| token::compose(&r).unwrap().into_bytes());
    let not_alnum = any::<u8>().prop_map(|b| if b.is_ascii_alphanumeric() { b'-' } else { b });
    prop_oneof![
        // Far off: text and bytes of any length but the token's.
        "\\PC{0,40}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 42..128),
        // One character too many or too few.
        (real.clone(), any::<prop::sample::Index>(), "[0-9A-Za-z]").prop_map(|(mut t, i, c)| {
            t.insert(i.index(t.len() + 1), c.as_bytes()[0]);
            t
        }),
        (real.clone(), any::<prop::sample::Index>()).prop_map(|(mut t, i)| {
            t.remove(i.index(t.len()));
            t
        }),
        // Right length, one character outside the alphabet.
        (real.clone(), PREFIX.len()..TOKEN_LEN, not_alnum).prop_map(|(mut t, i, b)| {
            t[i] = b;
            t
        }),
        // Right length and alphabet, wrong prefix (case included).
        (real, "[0-9A-Za-z_]{3}").prop_filter_map("the real prefix", |(mut t, p)| {
            (p != PREFIX).then(|| {
                t[..3].copy_from_slice(p.as_bytes());
                t
            })
        }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_are_judged_exactly_by_the_spec(
        b in prop_oneof![prop::collection::vec(any::<u8>(), 0..96), near_tokens()]
    ) {
        prop_assert_eq!(token::is_well_formed(&b), meets_the_spec(&b));
    }

    #[test]
    fn composed_tokens_are_well_formed_and_match_the_scanner_pattern(random in random_part()) {
        let t = token::compose(&random).unwrap();
        prop_assert!(has_token_shape(t.as_bytes()), "{}", t);
        prop_assert_eq!(&t[..PREFIX.len() + RANDOM_LEN], format!("tg_{random}"));
        prop_assert!(token::is_well_formed(t.as_bytes()));
        prop_assert!(meets_the_spec(t.as_bytes()));
    }

    #[test]
    fn compose_refuses_anything_but_32_base62_characters(
        random in prop_oneof![
            any::<String>(),
            "[0-9A-Za-z]{0,31}",
            "[0-9A-Za-z]{33,64}",
            ("[0-9A-Za-z]{31}", any::<prop::sample::Index>(), any::<char>())
                .prop_map(|(s, i, c)| { let mut s = s; s.insert(i.index(32), c); s }),
        ]
    ) {
        let fits = random.len() == RANDOM_LEN && random.bytes().all(|b| b.is_ascii_alphanumeric());
        prop_assert_eq!(token::compose(&random).is_some(), fits);
    }

    /// CRC32 detects every error burst of up to 32 bits, so a single changed byte in the body
    /// is always caught; a changed checksum character no longer spells the body's checksum.
    #[test]
    fn every_single_byte_substitution_is_rejected(
        random in random_part(),
        pos in 0..TOKEN_LEN,
        delta in 1..=255u8,
    ) {
        let mut t = token::compose(&random).unwrap().into_bytes();
        t[pos] = t[pos].wrapping_add(delta);
        prop_assert!(!token::is_well_formed(&t), "{:?}", String::from_utf8_lossy(&t));
    }

    /// Swapping two neighbours is an error burst of at most 16 bits, so the CRC catches it
    /// inside the random part, and the checksum is no longer the same string inside the
    /// checksum part. The pair that straddles the two (positions 34 and 35) changes the body
    /// and the checksum at once, which the CRC does not promise to catch, so it is left out.
    #[test]
    fn every_swap_of_two_different_neighbours_is_rejected(
        random in random_part(),
        in_checksum in any::<bool>(),
        start in any::<prop::sample::Index>(),
    ) {
        let t = token::compose(&random).unwrap().into_bytes();
        let range = if in_checksum {
            TOKEN_LEN - CHECKSUM_LEN..TOKEN_LEN - 1
        } else {
            PREFIX.len()..TOKEN_LEN - CHECKSUM_LEN - 1
        };
        // Swapping equal neighbours changes nothing: take the next pair that differs.
        let n = range.len();
        let first = start.index(n);
        let Some(pos) = (0..n)
            .map(|k| range.start + (first + k) % n)
            .find(|&p| t[p] != t[p + 1])
        else {
            return Ok(());
        };
        let mut swapped = t.clone();
        swapped.swap(pos, pos + 1);
        prop_assert!(!token::is_well_formed(&swapped), "{:?}", String::from_utf8_lossy(&swapped));
    }

    #[test]
    fn strings_without_the_token_shape_are_rejected(s in off_shape()) {
        prop_assert!(!has_token_shape(&s), "the generator made a token shape: {:?}", s);
        prop_assert!(!token::is_well_formed(&s));
    }
}
