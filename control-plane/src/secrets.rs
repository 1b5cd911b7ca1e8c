//! Secrets: generation, hashing and comparison. Only hashes are ever stored or logged.

use rand::distributions::{Alphanumeric, DistString};
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use tokengate_wire::token;

/// A new token secret in the tokengate format.
pub fn new_token() -> String {
    let random = Alphanumeric.sample_string(&mut OsRng, token::RANDOM_LEN);
    // `Alphanumeric` draws from exactly the base62 alphabet, so `compose` accepts it.
    token::compose(&random).unwrap_or_default()
}

pub fn new_id() -> String {
    format!("tok_{}", Alphanumeric.sample_string(&mut OsRng, 16))
}

pub fn sha256_hex(secret: &[u8]) -> String {
    Sha256::digest(secret)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares two credentials in time independent of where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_tokens_are_well_formed_and_distinct() {
        let (a, b) = (new_token(), new_token());
        assert!(token::is_well_formed(a.as_bytes()), "{a}");
        assert_ne!(a, b);
        assert!(new_id().starts_with("tok_"));
    }

    #[test]
    fn comparison_and_hashing() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert_eq!(sha256_hex(b"abc").len(), 64);
    }
}
