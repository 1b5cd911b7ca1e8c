//! The per-request decision: which credential, which record, which outcome. No proxy-wasm
//! types here; the glue feeds header bytes in and acts on the `Outcome`.

use crate::config::Config;
use crate::gcra::{self, Decision, Limit};
use crate::record::{self, STATE_KEY};
use crate::store::{SharedStore, StoreError};
use sha2::{Digest, Sha256};
use tokengate_wire::{token, Kind, SyncStatus};

/// Returns the token carried by `Authorization: Bearer <token>`, if that is its scheme.
/// The scheme with nothing after it is an empty (so invalid) token, as an empty
/// `X-API-Token` is: the client meant to present one.
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    if value.len() < 6 || !value[..6].eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    match value.get(6) {
        None => Some(&[]),
        Some(b' ') => Some(value[7..].trim_ascii()),
        Some(_) => None,
    }
}

/// The credential a request presents: the first configured token header that is present,
/// else a Bearer authorization. `None`: the request carries no token at all.
pub fn extract(cfg: &Config, mut header: impl FnMut(&str) -> Option<Vec<u8>>) -> Option<Vec<u8>> {
    for name in &cfg.token_headers {
        if let Some(v) = header(name) {
            return Some(v.trim_ascii().to_vec());
        }
    }
    if cfg.bearer {
        if let Some(v) = header("authorization") {
            return bearer_token(&v).map(<[u8]>::to_vec);
        }
    }
    None
}

pub fn hash_hex(token: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(token);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: Vec<u8>,
    pub name: Vec<u8>,
    pub owner: Vec<u8>,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    MissingToken,
    InvalidToken,
    TokenExpired,
    TokenSuspended,
    RateLimited {
        retry_after_secs: u64,
        max_rps: u32,
        burst: u32,
    },
    StateUnavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allow(Identity),
    Deny(Denial),
}

/// A known token's facts, for usage counting and the expiry header, whatever the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub id: Vec<u8>,
    /// Unix seconds.
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    /// Set when the credential matched a live record (not for unknown or revoked tokens).
    pub seen: Option<Seen>,
}

/// Decides a request that presented `credential` (see [`extract`]) at `now_nanos`.
pub fn authorize(
    cfg: &Config,
    store: &dyn SharedStore,
    credential: Option<&[u8]>,
    now_nanos: u64,
) -> Outcome {
    judge(cfg, store, credential, now_nanos).outcome
}

/// [`authorize`], also telling which token it was.
pub fn judge(
    cfg: &Config,
    store: &dyn SharedStore,
    credential: Option<&[u8]>,
    now_nanos: u64,
) -> Verdict {
    let deny = |d| Verdict {
        outcome: Outcome::Deny(d),
        seen: None,
    };
    let Some(credential) = credential else {
        return deny(Denial::MissingToken);
    };
    if !token::is_well_formed(credential) {
        return deny(Denial::InvalidToken);
    }
    // Until a full snapshot is loaded no answer is trustworthy: fail closed.
    let generation = match store.get(STATE_KEY) {
        Ok((Some(v), _)) => match record::state_generation(&v) {
            Some(g) => g,
            None => return deny(Denial::StateUnavailable),
        },
        _ => return deny(Denial::StateUnavailable),
    };
    let hash = hash_hex(credential);
    let value = match store.get(&record::token_key(&hash)) {
        Ok((Some(v), _)) => v,
        Ok((None, _)) => return deny(Denial::InvalidToken),
        Err(_) => return deny(Denial::StateUnavailable),
    };
    let Some(rec) = record::decode_token(&value) else {
        return deny(Denial::InvalidToken);
    };
    // Written before the latest full snapshot and not in it: the token is gone.
    if rec.generation < generation || rec.status == SyncStatus::Revoked {
        return deny(Denial::InvalidToken);
    }
    let seen = Some(Seen {
        id: rec.id.to_vec(),
        expires_at: rec.expires_at,
    });
    let refuse = |d| Verdict {
        outcome: Outcome::Deny(d),
        seen: seen.clone(),
    };
    if let Some(exp) = rec.expires_at {
        if (now_nanos / 1_000_000_000) as i64 >= exp {
            return refuse(Denial::TokenExpired);
        }
    }
    if rec.status == SyncStatus::Suspended {
        return refuse(Denial::TokenSuspended);
    }
    if let Some(limit) = Limit::new(rec.max_rps, rec.burst) {
        if let Err(d) = take(cfg, store, &record::rate_key(&hash), limit, now_nanos) {
            return refuse(d);
        }
    }
    Verdict {
        outcome: Outcome::Allow(Identity {
            id: rec.id.to_vec(),
            name: rec.name.to_vec(),
            owner: rec.owner.to_vec(),
            kind: rec.kind,
        }),
        seen,
    }
}

/// When the response should carry the token's expiry: inside the warning window.
pub fn expiry_to_announce(cfg: &Config, seen: Option<&Seen>, now_nanos: u64) -> Option<i64> {
    let exp = seen?.expires_at?;
    let now = (now_nanos / 1_000_000_000) as i64;
    // A window of 0 s (announcing off) holds no expiry that is still ahead.
    (exp > now && exp - now <= i64::from(cfg.expiry_warning_seconds)).then_some(exp)
}

/// One GCRA admission with compare-and-swap. Out of retries means refused, never admitted.
fn take(
    cfg: &Config,
    store: &dyn SharedStore,
    key: &str,
    limit: Limit,
    now: u64,
) -> Result<(), Denial> {
    let limited = |retry_after_secs| Denial::RateLimited {
        retry_after_secs,
        max_rps: limit.rate_per_sec,
        burst: limit.burst,
    };
    for _ in 0..cfg.cas_retries {
        let (value, cas) = store.get(key).map_err(|_| Denial::StateUnavailable)?;
        match gcra::decide(limit, gcra::decode_tat(value.as_deref()), now) {
            Decision::Deny { retry_after_nanos } => {
                return Err(limited(gcra::retry_after_secs(retry_after_nanos)));
            }
            Decision::Allow { new_tat, .. } => {
                match store.set(key, &gcra::encode_tat(new_tat), cas) {
                    Ok(()) => return Ok(()),
                    Err(StoreError::CasMismatch) => continue,
                    Err(StoreError::Host) => return Err(Denial::StateUnavailable),
                }
            }
        }
    }
    Err(limited(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{encode_state, encode_token, State};
    use crate::store::fake::MemStore;
    use tokengate_wire::SyncRecord;

    const NOW: u64 = 1_800_000_000 * 1_000_000_000;

    fn cfg() -> Config {
        Config::parse(br#"{"control_plane_cluster":"cp","sync_token":"x"}"#).unwrap()
    }

    fn secret(c: char) -> String {
        token::compose(&c.to_string().repeat(32)).unwrap()
    }

    fn loaded(generation: u32) -> MemStore {
        let s = MemStore::default();
        let state = State {
            version: 1,
            generation,
            store_id: "s".into(),
            token_count: 0,
        };
        s.set(STATE_KEY, &encode_state(&state), 0).unwrap();
        s
    }

    fn put(s: &MemStore, secret: &str, generation: u32, edit: impl FnOnce(&mut SyncRecord)) {
        let mut r = SyncRecord {
            hash: hash_hex(secret.as_bytes()),
            id: "tok_1".into(),
            name: "reporting".into(),
            owner: "alice".into(),
            kind: Kind::User,
            status: SyncStatus::Active,
            max_rps: None,
            burst: None,
            expires_at: None,
            version: 1,
        };
        edit(&mut r);
        s.set(
            &record::token_key(&r.hash),
            &encode_token(&r, generation),
            0,
        )
        .unwrap();
    }

    fn decide(s: &MemStore, t: &str) -> Outcome {
        authorize(&cfg(), s, Some(t.as_bytes()), NOW)
    }

    #[test]
    fn known_tokens_are_seen_whatever_the_outcome() {
        let s = loaded(1);
        let (ok, sus) = (secret('a'), secret('b'));
        put(&s, &ok, 1, |r| r.expires_at = Some(1_800_003_600));
        put(&s, &sus, 1, |r| {
            r.status = SyncStatus::Suspended;
            r.id = "tok_2".into();
        });
        let v = judge(&cfg(), &s, Some(ok.as_bytes()), NOW);
        assert!(matches!(v.outcome, Outcome::Allow(_)));
        let seen = v.seen.unwrap();
        assert_eq!(
            (seen.id.as_slice(), seen.expires_at),
            (&b"tok_1"[..], Some(1_800_003_600))
        );
        let v = judge(&cfg(), &s, Some(sus.as_bytes()), NOW);
        assert_eq!(v.outcome, Outcome::Deny(Denial::TokenSuspended));
        assert_eq!(v.seen.unwrap().id, b"tok_2");
        let unknown = judge(&cfg(), &s, Some(secret('z').as_bytes()), NOW);
        assert_eq!(
            (unknown.outcome, unknown.seen),
            (Outcome::Deny(Denial::InvalidToken), None)
        );
    }

    #[test]
    fn expiry_is_announced_inside_the_window_only() {
        let c = cfg();
        let now_s = (NOW / 1_000_000_000) as i64;
        let seen = |exp: Option<i64>| Seen {
            id: b"tok_1".to_vec(),
            expires_at: exp,
        };
        let in_an_hour = seen(Some(now_s + 3_600));
        assert_eq!(
            expiry_to_announce(&c, Some(&in_an_hour), NOW),
            Some(now_s + 3_600)
        );
        assert_eq!(
            expiry_to_announce(&c, Some(&seen(Some(now_s + 8 * 86_400))), NOW),
            None
        );
        assert_eq!(expiry_to_announce(&c, Some(&seen(None)), NOW), None);
        assert_eq!(expiry_to_announce(&c, None, NOW), None);
        let off = Config::parse(
            br#"{"control_plane_cluster":"cp","sync_token":"x","expiry_warning_seconds":0}"#,
        )
        .unwrap();
        assert_eq!(expiry_to_announce(&off, Some(&in_an_hour), NOW), None);
        // The window's ends: seven days ahead is inside; expiring now has nothing to say.
        let week = now_s + 7 * 86_400;
        assert_eq!(
            expiry_to_announce(&c, Some(&seen(Some(week))), NOW),
            Some(week)
        );
        assert_eq!(
            expiry_to_announce(&c, Some(&seen(Some(week + 1))), NOW),
            None
        );
        assert_eq!(expiry_to_announce(&c, Some(&seen(Some(now_s))), NOW), None);
    }

    #[test]
    fn extract_prefers_the_token_header_then_bearer() {
        let c = cfg();
        let both = |n: &str| match n {
            "x-api-token" => Some(b" tg_a ".to_vec()),
            "authorization" => Some(b"Bearer tg_b".to_vec()),
            _ => None,
        };
        assert_eq!(extract(&c, both), Some(b"tg_a".to_vec()));
        let bearer = |n: &str| (n == "authorization").then(|| b"bearer   tg_b ".to_vec());
        assert_eq!(extract(&c, bearer), Some(b"tg_b".to_vec()));
        let basic = |n: &str| (n == "authorization").then(|| b"Basic dXNlcg==".to_vec());
        assert_eq!(extract(&c, basic), None);
        assert_eq!(extract(&c, |_| None), None);
        let mut no_bearer = cfg();
        no_bearer.bearer = false;
        assert_eq!(extract(&no_bearer, bearer), None);
    }

    #[test]
    fn bearer_parsing_is_strict_about_the_scheme() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b"Bearer"), Some(&b""[..]));
        assert_eq!(bearer_token(b"Bearer    "), Some(&b""[..]));
        assert_eq!(bearer_token(b"Token abc"), None);
        assert_eq!(bearer_token(&[0xff, 0xfe]), None);
    }

    #[test]
    fn hash_is_lower_hex_sha256() {
        assert_eq!(
            hash_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn every_denial_reason() {
        let s = loaded(1);
        let t = secret('a');
        assert_eq!(
            authorize(&cfg(), &s, None, NOW),
            Outcome::Deny(Denial::MissingToken)
        );
        assert_eq!(decide(&s, "tg_short"), Outcome::Deny(Denial::InvalidToken));
        assert_eq!(
            decide(&s, &t),
            Outcome::Deny(Denial::InvalidToken),
            "unknown"
        );
        put(&s, &t, 1, |r| r.status = SyncStatus::Revoked);
        assert_eq!(
            decide(&s, &t),
            Outcome::Deny(Denial::InvalidToken),
            "revoked"
        );
        put(&s, &t, 1, |r| {
            r.expires_at = Some((NOW / 1_000_000_000) as i64)
        });
        assert_eq!(decide(&s, &t), Outcome::Deny(Denial::TokenExpired));
        put(&s, &t, 1, |r| r.status = SyncStatus::Suspended);
        assert_eq!(decide(&s, &t), Outcome::Deny(Denial::TokenSuspended));
        let unloaded = MemStore::default();
        assert_eq!(
            decide(&unloaded, &t),
            Outcome::Deny(Denial::StateUnavailable)
        );
    }

    #[test]
    fn records_from_before_the_last_snapshot_are_gone() {
        let s = loaded(2);
        let t = secret('b');
        put(&s, &t, 1, |_| {});
        assert_eq!(decide(&s, &t), Outcome::Deny(Denial::InvalidToken));
        put(&s, &t, 2, |_| {});
        assert!(matches!(decide(&s, &t), Outcome::Allow(_)));
        // A snapshot being written (generation ahead of the state) is already trusted.
        put(&s, &t, 3, |_| {});
        assert!(matches!(decide(&s, &t), Outcome::Allow(_)));
    }

    #[test]
    fn allowed_requests_carry_the_identity() {
        let s = loaded(1);
        let t = secret('c');
        put(&s, &t, 1, |r| {
            r.kind = Kind::Service;
            r.expires_at = Some((NOW / 1_000_000_000) as i64 + 1);
        });
        assert_eq!(
            decide(&s, &t),
            Outcome::Allow(Identity {
                id: b"tok_1".to_vec(),
                name: b"reporting".to_vec(),
                owner: b"alice".to_vec(),
                kind: Kind::Service,
            })
        );
    }

    #[test]
    fn rate_limit_admits_the_burst_then_refuses_with_retry_after() {
        let s = loaded(1);
        let t = secret('d');
        put(&s, &t, 1, |r| r.max_rps = Some(3));
        let outcomes: Vec<_> = (0..5).map(|_| decide(&s, &t)).collect();
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Allow(_)))
                .count(),
            3
        );
        assert_eq!(
            outcomes[4],
            Outcome::Deny(Denial::RateLimited {
                retry_after_secs: 1,
                max_rps: 3,
                burst: 3
            })
        );
    }

    #[test]
    fn cas_conflicts_are_retried_and_exhaustion_refuses() {
        let s = loaded(1);
        let t = secret('e');
        put(&s, &t, 1, |r| r.max_rps = Some(100));
        assert!(
            matches!(decide(&s, &t), Outcome::Allow(_)),
            "creates the rate key"
        );
        s.fail_cas.set(3);
        assert!(
            matches!(decide(&s, &t), Outcome::Allow(_)),
            "three conflicts, then success"
        );
        s.fail_cas.set(1_000);
        assert!(matches!(
            decide(&s, &t),
            Outcome::Deny(Denial::RateLimited {
                retry_after_secs: 1,
                ..
            })
        ));
    }

    #[test]
    fn garbage_records_fail_closed() {
        let s = loaded(1);
        let t = secret('f');
        s.set(
            &record::token_key(&hash_hex(t.as_bytes())),
            b"\x01garbage",
            0,
        )
        .unwrap();
        assert_eq!(decide(&s, &t), Outcome::Deny(Denial::InvalidToken));
        let bad_state = MemStore::default();
        bad_state.set(STATE_KEY, b"x", 0).unwrap();
        assert_eq!(
            decide(&bad_state, &t),
            Outcome::Deny(Denial::StateUnavailable)
        );
    }
}
