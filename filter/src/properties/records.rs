//! The binary values in shared data: every decoder takes any bytes without panicking, reads
//! back exactly what the encoder wrote, and refuses anything cut short or padded.

use crate::fleet::{
    decode as decode_rate, encode as encode_rate, QuotaState, RateState, Share, RATE_STATE_LEN,
};
use crate::gcra::{decode_tat, encode_tat};
use crate::record::{
    decode_lease, decode_state, decode_token, encode_lease, encode_state, encode_token,
    state_generation, Lease, State, TokenView,
};
use crate::usage::{decode_batch, encode_batch};
use proptest::prelude::*;
use tokengate_wire::quota::MAX_LIMIT;
use tokengate_wire::{Kind, Period, Quota, SyncRecord, SyncStatus, UsageEntry};

pub(super) fn status() -> impl Strategy<Value = SyncStatus> + Clone {
    prop_oneof![
        Just(SyncStatus::Active),
        Just(SyncStatus::Suspended),
        Just(SyncStatus::Revoked)
    ]
}

pub(super) fn kind() -> impl Strategy<Value = Kind> + Clone {
    prop_oneof![Just(Kind::User), Just(Kind::Service)]
}

/// A record as the control plane might send it, with a well-formed hash.
pub(super) fn sync_record() -> impl Strategy<Value = SyncRecord> {
    (
        "[0-9a-f]{64}",
        "\\PC{0,24}",
        "\\PC{0,24}",
        "\\PC{0,24}",
        kind(),
        status(),
        prop::option::of(1..=u32::MAX),
        prop::option::of(1..=u32::MAX),
        prop::option::of(any::<i64>()),
        any::<u64>(),
        prop::option::of(quota()),
    )
        .prop_map(
            |(hash, id, name, owner, kind, status, max_rps, burst, expires_at, version, quota)| {
                SyncRecord {
                    scopes: None,
                    quota,
                    hash,
                    id,
                    name,
                    owner,
                    kind,
                    status,
                    max_rps,
                    burst,
                    limit_scope: Default::default(),
                    expires_at,
                    version,
                }
            },
        )
}

pub(super) fn period() -> impl Strategy<Value = Period> + Clone {
    prop_oneof![
        Just(Period::Hour),
        Just(Period::Day),
        Just(Period::Month),
        (1..=u32::MAX).prop_map(Period::Seconds),
    ]
}

pub(super) fn quota() -> impl Strategy<Value = Quota> + Clone {
    (prop_oneof![1..=10u64, 1..=MAX_LIMIT], period())
        .prop_map(|(limit, period)| Quota { limit, period })
}

/// A rate state as a filter writes it: a TAT, maybe a share, maybe a quota state.
fn rate_state() -> impl Strategy<Value = RateState> {
    let share = (
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(rate_milli, burst, expires_ms, max_rps, limit_burst)| Share {
                rate_milli,
                burst,
                expires_ms,
                max_rps,
                limit_burst,
            },
        );
    let quota = (any::<i64>(), any::<u64>(), 1..=u64::MAX, any::<u64>()).prop_map(
        |(period_start, spent, limit, allowed)| QuotaState {
            period_start,
            spent,
            // At most the limit, as every filter writes it.
            allowed: allowed % limit.saturating_add(1),
            limit,
        },
    );
    (
        any::<u64>(),
        prop::option::of(share),
        prop::option::of(quota),
    )
        .prop_map(|(tat, share, quota)| RateState { tat, share, quota })
}

fn state() -> impl Strategy<Value = State> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        "\\PC{0,40}",
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(version, generation, proxies, store_id, token_count, scopes_version)| State {
                version,
                generation,
                proxies,
                store_id,
                token_count,
                scopes_version,
            },
        )
}

/// The encoder's input that would produce `v`, when there is one.
fn record_of(v: &TokenView<'_>) -> Option<SyncRecord> {
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
    Some(SyncRecord {
        scopes: None,
        quota: v.quota,
        hash: String::new(),
        id: text(v.id)?,
        name: text(v.name)?,
        owner: text(v.owner)?,
        kind: v.kind,
        status: v.status,
        max_rps: (v.max_rps != 0).then_some(v.max_rps),
        burst: (v.burst != 0).then_some(v.burst),
        limit_scope: v.limit_scope,
        expires_at: v.expires_at,
        version: v.version,
    })
}

/// Valid encodings with a few bytes changed, cut short or extended: the inputs most likely to
/// reach deep into a decoder.
fn damaged(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = valid.len();
    prop_oneof![
        Just(valid.clone()),
        (0..n).prop_map({
            let v = valid.clone();
            move |k| v[..k].to_vec()
        }),
        prop::collection::vec(any::<u8>(), 1..8).prop_map({
            let v = valid.clone();
            move |tail| [v.clone(), tail].concat()
        }),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4).prop_map(
            move |edits| {
                let mut v = valid.clone();
                for (i, b) in edits {
                    let i = i.index(v.len());
                    v[i] = b;
                }
                v
            }
        ),
    ]
}

fn any_encoding() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..96),
        (sync_record(), any::<u32>()).prop_flat_map(|(r, g)| damaged(encode_token(&r, g))),
        state().prop_flat_map(|s| damaged(encode_state(&s))),
        rate_state().prop_flat_map(|r| damaged(encode_rate(&r).as_ref().to_vec())),
        (any::<u64>(), any::<u64>()).prop_flat_map(|(holder, expires_ms)| {
            damaged(encode_lease(Lease { holder, expires_ms }).to_vec())
        }),
    ]
}

proptest! {
    /// Whatever shared data holds, decoding neither panics nor reads something the encoder
    /// would not have written.
    #[test]
    fn decoders_take_any_bytes(b in any_encoding()) {
        if let Some(v) = decode_token(&b) {
            let revoked_with_text = v.status == SyncStatus::Revoked
                && !(v.id.is_empty() && v.name.is_empty() && v.owner.is_empty());
            if let (Some(r), false) = (record_of(&v), revoked_with_text) {
                prop_assert_eq!(encode_token(&r, v.generation), b.clone());
            }
        }
        // The request path reads the generation in place; it must agree with the full decode.
        if let Some(s) = decode_state(&b) {
            prop_assert_eq!(state_generation(&b), Some(s.generation));
        }
        if let Some(l) = decode_lease(&b) {
            prop_assert_eq!(&encode_lease(l)[..], &b[..16]);
        }
        let tat = decode_tat(Some(&b));
        prop_assert_eq!(tat, if b.len() == 8 { u64::from_le_bytes(b[..].try_into().unwrap()) } else { 0 });
        let _ = decode_batch(&b);
        // A rate state that reads is exactly what the encoder writes for it; one that does
        // not is damaged, and a quota's request fails closed on it.
        if let Some(r) = decode_rate(Some(&b)) {
            prop_assert_eq!(encode_rate(&r).as_ref().to_vec(), b.clone());
            if let Some(q) = r.quota {
                prop_assert!(q.limit >= 1 && q.allowed <= q.limit);
            }
        }
    }

    #[test]
    fn rate_states_round_trip_and_are_refused_when_cut_short(
        r in rate_state(),
        cut in any::<prop::sample::Index>(),
    ) {
        let enc = encode_rate(&r);
        prop_assert!(enc.as_ref().len() <= RATE_STATE_LEN);
        prop_assert_eq!(decode_rate(Some(enc.as_ref())), Some(r));
        let short = &enc.as_ref()[..cut.index(enc.as_ref().len())];
        // A prefix reads, if at all, as the shorter format it happens to match.
        if let Some(read) = decode_rate(Some(short)) {
            prop_assert_eq!(read.tat, r.tat);
            prop_assert_eq!(encode_rate(&read).as_ref().to_vec(), short.to_vec());
        }
    }

    #[test]
    fn token_records_round_trip(r in sync_record(), generation in any::<u32>()) {
        let enc = encode_token(&r, generation);
        let v = decode_token(&enc).unwrap();
        prop_assert_eq!(v.generation, generation);
        prop_assert_eq!(v.version, r.version);
        prop_assert_eq!(v.status, r.status);
        prop_assert_eq!(v.kind, r.kind);
        prop_assert_eq!(v.max_rps, r.max_rps.unwrap_or(0));
        prop_assert_eq!(v.burst, r.burst.unwrap_or(0));
        prop_assert_eq!(v.expires_at, r.expires_at);
        prop_assert_eq!(v.quota, r.quota.filter(|_| r.status != SyncStatus::Revoked));
        // Revoked tokens are tombstones: nothing about them is kept.
        let keep = |s: &str| if r.status == SyncStatus::Revoked { String::new() } else { s.to_string() };
        prop_assert_eq!(v.id.to_vec(), keep(&r.id).into_bytes());
        prop_assert_eq!(v.name.to_vec(), keep(&r.name).into_bytes());
        prop_assert_eq!(v.owner.to_vec(), keep(&r.owner).into_bytes());
    }

    #[test]
    fn token_records_cut_short_or_padded_are_refused(
        r in sync_record(),
        generation in any::<u32>(),
        cut in any::<prop::sample::Index>(),
        pad in prop::collection::vec(any::<u8>(), 1..16),
    ) {
        let enc = encode_token(&r, generation);
        prop_assert_eq!(decode_token(&enc[..cut.index(enc.len())]), None);
        let padded = [&enc[..], &pad[..]].concat();
        prop_assert_eq!(decode_token(&padded), None);
    }

    /// Names longer than a length prefix can say are clamped, never a panic or a misread.
    #[test]
    fn over_long_names_are_clamped(extra in 0..4usize, wide in "\\PC") {
        let mut r = SyncRecord { scopes: None, quota: None,
            hash: "0".repeat(64),
            id: "tok_1".into(),
            name: "n".repeat(usize::from(u16::MAX) - 1 - extra) + &wide.repeat(3),
            owner: "o".into(),
            kind: Kind::User,
            status: SyncStatus::Active,
            max_rps: None,
            burst: None,
            limit_scope: Default::default(),
            expires_at: None,
            version: 1,
        };
        let enc = encode_token(&r, 1);
        let v = decode_token(&enc).unwrap();
        let limit = r.name.len().min(usize::from(u16::MAX));
        prop_assert_eq!(v.name, &r.name.as_bytes()[..limit]);
        prop_assert_eq!(v.owner, b"o");
        r.status = SyncStatus::Revoked;
        prop_assert!(decode_token(&encode_token(&r, 1)).unwrap().name.is_empty());
    }

    #[test]
    fn states_round_trip_and_are_refused_when_cut_short(
        s in state(),
        cut in any::<prop::sample::Index>(),
        pad in prop::collection::vec(any::<u8>(), 1..16),
    ) {
        let enc = encode_state(&s);
        prop_assert_eq!(decode_state(&enc), Some(s.clone()));
        prop_assert_eq!(state_generation(&enc), Some(s.generation));
        prop_assert_eq!(decode_state(&enc[..cut.index(enc.len())]), None);
        // Trailing bytes are ignored, never misread.
        let padded = [&enc[..], &pad[..]].concat();
        let read = decode_state(&padded);
        prop_assert!(read.is_none() || read == Some(s.clone()));
        prop_assert_eq!(state_generation(&padded), Some(s.generation));
    }

    #[test]
    fn leases_and_tats_round_trip(
        holder in any::<u64>(),
        expires_ms in any::<u64>(),
        tat in any::<u64>(),
        cut in 0..16usize,
    ) {
        let l = Lease { holder, expires_ms };
        let enc = encode_lease(l);
        prop_assert_eq!(decode_lease(&enc), Some(l));
        prop_assert_eq!(decode_lease(&enc[..cut]), None);
        prop_assert_eq!(decode_tat(Some(&encode_tat(tat))), tat);
        // A damaged rate state reads as idle, which is what a fresh token gets anyway.
        prop_assert_eq!(decode_tat(Some(&encode_tat(tat)[..cut.min(7)])), 0);
    }

    #[test]
    fn usage_batches_round_trip(
        entries in prop::collection::vec(
            ("\\PC{0,24}", any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(id, allowed, denied, last_used_at)| UsageEntry { id, allowed, denied, last_used_at },
            ),
            0..8,
        ),
    ) {
        prop_assert_eq!(decode_batch(&encode_batch(&entries)), Some(entries));
    }
}
