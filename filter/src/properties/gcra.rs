//! GCRA: no more than the limit is admitted over any span, refusals consume nothing, and no
//! rate or time is too large for the arithmetic.

use super::{cfg, secret};
use crate::authorize::{authorize, hash_hex, Denial, Outcome};
use crate::fleet::{decode, first_ceiling};
use crate::gcra::{decide, Decision, Limit};
use crate::record::{encode_state, encode_token, rate_key, token_key, State, STATE_KEY};
use crate::store::fake::MemStore;
use crate::store::SharedStore;
use proptest::prelude::*;
use tokengate_wire::{Kind, LimitScope, Period, Quota, SyncRecord, SyncStatus};

const S: u64 = 1_000_000_000;

fn rate() -> impl Strategy<Value = u32> {
    prop_oneof![
        1..=1_000u32,
        1..=1_000_000u32,
        any::<u32>().prop_map(|r| r.max(1)),
        Just(u32::MAX)
    ]
}

fn burst() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), 1..=8u32, any::<u32>()]
}

fn time() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        1_700_000_000 * S..1_900_000_000 * S,
        u64::MAX - 1_000 * S..=u64::MAX,
        any::<u64>(),
    ]
}

/// Runs requests at `start` plus the gaps (in multiples of a fraction of the interval so
/// that fast and slow limits are both stressed); returns the admission times.
fn admissions(limit: Limit, start: u64, gaps: &[u64]) -> Vec<u64> {
    let interval = (S / u64::from(limit.rate_per_sec)).max(1);
    let mut tat = 0;
    let mut now = start;
    let mut admitted = Vec::new();
    for g in gaps {
        now = now.saturating_add(g * interval / 4);
        if let Decision::Allow { new_tat, .. } = decide(limit, tat, now) {
            tat = new_tat;
            admitted.push(now);
        }
    }
    admitted
}

proptest! {
    /// Over every span between two admissions, at most `rate * span + burst` got through.
    #[test]
    fn never_admits_more_than_rate_times_span_plus_burst(
        rate in rate(),
        burst in prop_oneof![1..=4u32, 0..=64u32],
        // The TAT saturates at the end of the u64 clock (the year 2554), where the limit
        // stops holding; the span tested here stays clear of it.
        start in prop_oneof![Just(0u64), 1_700_000_000 * S..1_900_000_000 * S, 0..u64::MAX - (1 << 50)],
        gaps in prop::collection::vec(prop_oneof![Just(0u64), 0..8u64], 1..160),
    ) {
        let limit = Limit::new(rate, burst).unwrap();
        let times = admissions(limit, start, &gaps);
        for i in 0..times.len() {
            for j in i..times.len() {
                let count = (j - i + 1) as u128;
                let span = u128::from(times[j] - times[i]);
                // count <= rate * span / 1e9 + burst, without rounding.
                prop_assert!(
                    count.saturating_sub(u128::from(limit.burst)) * u128::from(S)
                        <= u128::from(limit.rate_per_sec) * span,
                    "{} admitted within {} ns at {}/s, burst {}", count, span, rate, limit.burst
                );
            }
        }
    }

    #[test]
    fn decisions_never_overflow_and_a_refusal_says_when_to_come_back(
        rate in rate(),
        burst in burst(),
        tat in time(),
        now in time(),
    ) {
        let limit = Limit::new(rate, burst).unwrap();
        match decide(limit, tat, now) {
            Decision::Allow { new_tat, .. } => {
                prop_assert!(new_tat >= tat.max(now));
                prop_assert!(new_tat > tat.max(now) || new_tat == u64::MAX);
            }
            Decision::Deny { retry_after_nanos } => {
                prop_assert!(retry_after_nanos > 0);
                let later = now.saturating_add(retry_after_nanos);
                prop_assert!(
                    matches!(decide(limit, tat, later), Decision::Allow { .. }),
                    "still refused at {} after retry_after {}", later, retry_after_nanos
                );
            }
        }
    }

    /// Through `authorize` and shared data: a rate-limited request leaves the rate state as
    /// it found it, so hammering a limited token does not push its next admission out.
    #[test]
    fn refused_requests_leave_the_rate_state_alone(
        token in secret(),
        rate in 1..=50u32,
        burst in 0..=5u32,
        gaps in prop::collection::vec(0..200_000_000u64, 1..64),
    ) {
        let store = MemStore::default();
        let state = State { version: 1, generation: 1, proxies: 0, store_id: "s".into(), token_count: 1, scopes_version: 0 };
        store.set(STATE_KEY, &encode_state(&state), 0).unwrap();
        let hash = hash_hex(token.as_bytes());
        let rec = SyncRecord { scopes: None, quota: None,
            hash: hash.clone(),
            id: "tok_1".into(),
            name: "n".into(),
            owner: "o".into(),
            kind: Kind::User,
            status: SyncStatus::Active,
            max_rps: Some(rate),
            burst: Some(burst).filter(|b| *b > 0),
            limit_scope: Default::default(),
            expires_at: None,
            version: 1,
        };
        store.set(&token_key(&hash), &encode_token(&rec, 1), 0).unwrap();
        let c = cfg();
        let mut now = 1_800_000_000 * S;
        let mut allowed = 0u64;
        for g in &gaps {
            now += g;
            let before = store.map.borrow().get(rate_key(&hash).as_str()).map(|v| v.0.clone());
            match authorize(&c, &store, Some(token.as_bytes()), now) {
                Outcome::Allow => allowed += 1,
                Outcome::Deny(Denial::RateLimited { retry_after_secs, .. }) => {
                    prop_assert!(retry_after_secs >= 1);
                    let after = store.map.borrow().get(rate_key(&hash).as_str()).map(|v| v.0.clone());
                    prop_assert_eq!(before, after);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        let span = now - 1_800_000_000 * S;
        let b = if burst == 0 { rate } else { burst };
        prop_assert!(u128::from(allowed.saturating_sub(u64::from(b))) * u128::from(S) <= u128::from(rate) * u128::from(span));
    }

    /// Through `authorize` with a quota beside the rate: within a period no more than this
    /// proxy's ceiling is admitted, whatever the timing; a request refused by either leaves
    /// what the other counts alone; each period starts over.
    #[test]
    fn a_quota_is_never_exceeded_and_refusals_consume_nothing(
        token in secret(),
        rate in prop::option::of(1..=50u32),
        limit in 1..=40u64,
        proxies in 0..=4u32,
        seconds in 1..=5u32,
        gaps in prop::collection::vec(0..400_000_000u64, 1..96),
    ) {
        let store = MemStore::default();
        let state = State { version: 1, generation: 1, proxies, store_id: "s".into(), token_count: 1, scopes_version: 0 };
        store.set(STATE_KEY, &encode_state(&state), 0).unwrap();
        let hash = hash_hex(token.as_bytes());
        let quota = Quota { limit, period: Period::Seconds(seconds) };
        let rec = SyncRecord { scopes: None, quota: Some(quota),
            hash: hash.clone(),
            id: "tok_1".into(),
            name: "n".into(),
            owner: "o".into(),
            kind: Kind::User,
            status: SyncStatus::Active,
            max_rps: rate,
            burst: None,
            limit_scope: LimitScope::Proxy,
            expires_at: None,
            version: 1,
        };
        store.set(&token_key(&hash), &encode_token(&rec, 1), 0).unwrap();
        let c = cfg();
        let ceiling = first_ceiling(limit, proxies);
        let mut now = 1_800_000_000 * S;
        let mut per_period: std::collections::BTreeMap<i64, u64> = Default::default();
        for g in &gaps {
            now += g;
            let read = |store: &MemStore| {
                let v = store.map.borrow().get(rate_key(&hash).as_str()).map(|v| v.0.clone());
                decode(v.as_deref()).unwrap()
            };
            let before = read(&store);
            let (start, _) = quota.period.window((now / S) as i64);
            match authorize(&c, &store, Some(token.as_bytes()), now) {
                Outcome::Allow => *per_period.entry(start).or_default() += 1,
                Outcome::Deny(Denial::RateLimited { .. }) => {
                    let after = read(&store);
                    prop_assert_eq!(after.tat, before.tat);
                    // Only a new period's state may have been written.
                    let q = after.quota.unwrap();
                    prop_assert!(before.quota == Some(q) || q.spent == 0);
                }
                Outcome::Deny(Denial::QuotaExceeded { retry_after_secs, limit: l, .. }) => {
                    prop_assert_eq!(l, limit);
                    prop_assert!(retry_after_secs >= 1 && retry_after_secs <= u64::from(seconds));
                    let after = read(&store);
                    prop_assert_eq!(after.tat, before.tat);
                    let q = after.quota.unwrap();
                    prop_assert!(before.quota == Some(q) || q.spent == 0);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        for (start, n) in per_period {
            prop_assert!(n <= ceiling, "{} admitted in the period at {}, ceiling {}", n, start, ceiling);
        }
    }
}
