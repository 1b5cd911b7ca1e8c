//! The proxy-wasm ABI's encodings, in plain Rust so they are tested natively: host status
//! codes and the serialized header map. The SDK decodes both with `unwrap` and `panic!`;
//! here every malformed input is an `Err` or `None`, because a panic traps the VM.

/// Host status codes the filter tells apart; every other code is a failure.
pub const STATUS_OK: u32 = 0;
pub const STATUS_NOT_FOUND: u32 = 1;
pub const STATUS_CAS_MISMATCH: u32 = 8;

/// A host call's status as a `Result`: `Ok` for `STATUS_OK`, else the raw code.
pub fn checked(status: u32) -> Result<(), u32> {
    if status == STATUS_OK {
        Ok(())
    } else {
        Err(status)
    }
}

use std::borrow::Cow;

fn u32_at(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Decodes a serialized header map: a little-endian u32 count, then (name length, value
/// length) u32 pairs, then each name and value followed by a NUL. `None` when the bytes
/// do not hold what they announce.
pub fn decode_pairs(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = u32_at(bytes, 0)?;
    let sizes_end = count.checked_mul(8)?.checked_add(4)?;
    if sizes_end > bytes.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    let mut p = sizes_end;
    let mut take = |len: usize| -> Option<&[u8]> {
        let end = p.checked_add(len)?;
        let field = bytes.get(p..end)?;
        p = end.checked_add(1)?;
        Some(field)
    };
    for i in 0..count {
        let name_len = u32_at(bytes, 4 + i * 8)?;
        let value_len = u32_at(bytes, 8 + i * 8)?;
        let name = take(name_len)?;
        let value = take(value_len)?;
        pairs.push((name, value));
    }
    Some(pairs)
}

/// Encodes a header map the way the host reads one (see [`decode_pairs`]).
pub fn encode_pairs(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(n, v)| 10 + n.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

/// The value of header `name` in a decoded map: `Some(empty)` for a header sent empty;
/// every copy of a repeated header joined with `,` (as Envoy's `request.headers` attribute
/// joins them), which no token contains, so that no single copy passes for the credential.
/// Names compare case-insensitively; Envoy hands them over in lower case anyway.
pub fn header_value<'a>(pairs: &[(&'a [u8], &'a [u8])], name: &str) -> Option<Cow<'a, [u8]>> {
    let mut copies = pairs
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| *v);
    let first = copies.next()?;
    let Some(second) = copies.next() else {
        return Some(Cow::Borrowed(first));
    };
    let mut joined = [first, second].join(&b","[..]);
    for more in copies {
        joined.push(b',');
        joined.extend_from_slice(more);
    }
    Some(Cow::Owned(joined))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_header_value_joins_every_copy() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b":path", b"/"),
            (b"x-api-token", b"tg_a"),
            (b"empty", b""),
            (b"X-Dup", b"1"),
            (b"x-dup", b"2"),
            (b"x-dup", b"3"),
        ];
        assert_eq!(
            header_value(&pairs, "x-api-token").as_deref(),
            Some(&b"tg_a"[..])
        );
        assert_eq!(
            header_value(&pairs, "X-API-TOKEN").as_deref(),
            Some(&b"tg_a"[..])
        );
        assert_eq!(header_value(&pairs, "empty").as_deref(), Some(&b""[..]));
        assert_eq!(
            header_value(&pairs, "x-dup").as_deref(),
            Some(&b"1,2,3"[..])
        );
        assert_eq!(header_value(&pairs, "absent"), None);
        assert_eq!(header_value(&[], "x-api-token"), None);
    }

    #[test]
    fn only_ok_is_ok() {
        assert_eq!(checked(STATUS_OK), Ok(()));
        for code in [1, 2, 3, 7, 8, 10, 12, 99, u32::MAX] {
            assert_eq!(checked(code), Err(code));
        }
    }

    #[test]
    fn round_trip() {
        let pairs: [(&str, &[u8]); 3] = [
            (":path", b"/hello"),
            ("x_tokengate_token_id", b"tok_SPOOF"),
            ("empty", b""),
        ];
        let bytes = encode_pairs(&pairs);
        let decoded = decode_pairs(&bytes).unwrap();
        let expected: Vec<(&[u8], &[u8])> = pairs.iter().map(|(n, v)| (n.as_bytes(), *v)).collect();
        assert_eq!(decoded, expected);
        assert_eq!(decode_pairs(&[]), Some(Vec::new()));
        assert_eq!(decode_pairs(&encode_pairs(&[])), Some(Vec::new()));
    }

    #[test]
    fn a_map_that_announces_more_than_it_holds_is_refused() {
        let bytes = encode_pairs(&[("name", b"value")]);
        for cut in 1..bytes.len() - 1 {
            assert_eq!(decode_pairs(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_pairs(&huge), None);
        let mut long_name = bytes;
        long_name[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_pairs(&long_name), None);
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_pairs(&bytes);
        }

        #[test]
        fn encoded_maps_decode_to_themselves(
            pairs in proptest::collection::vec(("[a-z_:-]{0,12}", proptest::collection::vec(any::<u8>(), 0..16)), 0..8)
        ) {
            let borrowed: Vec<(&str, &[u8])> = pairs.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
            let bytes = encode_pairs(&borrowed);
            let decoded = decode_pairs(&bytes).unwrap();
            let expected: Vec<(&[u8], &[u8])> = pairs.iter().map(|(n, v)| (n.as_bytes(), v.as_slice())).collect();
            prop_assert_eq!(decoded, expected);
        }
    }
}
