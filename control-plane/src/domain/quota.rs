//! Quotas, the control plane's side: what each proxy may admit of a token's quota in the
//! current period. The exchange rides on `POST /v1/fleet` (see `tokengate_wire::fleet`).
//!
//! Each holder (a proxy and one of the token's secrets) has a row per period: what it spent
//! (as it reported), the ceiling it said it enforces (`held`) and the ceiling last granted
//! to it. A holder counts at its reservation, `carried + max(granted, held, spent)`: a grant
//! may have reached it or been lost, and it enforces one or the other until it reports
//! again. A live proxy without a row for the token's current secret counts at the fallback,
//! `limit / proxies` rounded up: what it enforces before its first grant of a period. The
//! grants keep the reservations and the fallbacks within the limit.
//!
//! When a proxy reports, its rows are updated and its new ceilings computed: the room not
//! spent yet (less the fallbacks) is water-filled by demand among the live holders, a
//! holder's demand being [`GRANT_INTERVALS`] report intervals of its recent spending, and at
//! least [`floor`]; the reporting proxy gets its part, cut to what the others' reservations
//! leave. A proxy that spends gets ahead of its traffic; an idle one is lowered toward the
//! floor, which is safe because it counts at what it holds until it confirms the lower
//! ceiling.
//!
//! All of this is pure: [`decide`] takes one token's rows and returns the reporting proxy's
//! rows; the store runs it inside a transaction that holds the token locked.

use crate::store::{QuotaHolder, QuotaSpent};
use std::collections::{BTreeMap, BTreeSet};
use tokengate_wire::fleet::QuotaHeld;
use tokengate_wire::quota::{Quota, MAX_LIMIT};

/// A spending holder is granted this many of its report intervals at its recent rate.
pub const GRANT_INTERVALS: u64 = 4;
/// The floor of a holder is an equal share divided by this (at least 1 request).
pub const FLOOR_DIVISOR: u64 = 100;
/// A report's counts are cut to this: no proxy counts more than the largest limit.
pub const MAX_COUNT: u64 = MAX_LIMIT;

/// The least a live holder is granted room for (when there is room): one hundredth of an
/// equal share, at least one request, so that a client that turns up at an idle proxy is
/// admitted at once while the proxy reports it.
pub fn floor(limit: u64, live: usize) -> u64 {
    (limit / (live.max(1) as u64).saturating_mul(FLOOR_DIVISOR)).max(1)
}

/// What a proxy enforces for a secret before its first grant of a period: `limit /
/// proxies`, counted rounded up.
pub fn fallback(limit: u64, live: usize) -> u64 {
    limit.div_ceil(live.max(1) as u64)
}

/// One token's state in the current period, as a report finds it.
#[derive(Debug, Clone)]
pub struct TokenInput<'a> {
    pub token_id: &'a str,
    pub limit: u64,
    /// `[period_start, period_end)`, Unix seconds.
    pub period: (i64, i64),
    /// The secret a new client uses.
    pub current_hash: &'a str,
    /// Secrets the token still honours (the current one and retired ones in their grace).
    pub valid_hashes: &'a BTreeSet<String>,
    /// Holder rows of the period (other periods' are left out by the caller).
    pub holders: &'a [QuotaHolder],
    /// Live proxies and their report intervals, the reporting one included.
    pub live: &'a BTreeMap<String, u32>,
    /// The reporting proxy, its interval, and what it reported of this token's secrets for
    /// this period (one entry per secret).
    pub proxy: &'a str,
    pub interval_ms: u32,
    pub reported: &'a [QuotaHeld],
    pub now_ms: i64,
}

/// The reporting proxy's rows after the exchange, and what the period looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOutcome {
    /// The proxy's rows, with their new `granted`: one per secret it holds and the current
    /// secret.
    pub rows: Vec<QuotaHolder>,
    /// Spent by every holder in the period.
    pub used: u64,
    /// The quota is used up: the holders spent the limit, or the proxy spent all it may and
    /// nothing is free to give it.
    pub exhausted: bool,
}

fn reservation(h: &QuotaHolder, valid: &BTreeSet<String>) -> u64 {
    let kept = if valid.contains(&h.hash) {
        h.granted.max(h.held).max(h.spent)
    } else {
        // A secret the token no longer honours admits nothing more.
        h.spent
    };
    h.carried.saturating_add(kept)
}

/// Splits `pool` among `wants`: nobody gets more than it wants while another wants more.
pub fn water_fill(pool: u64, wants: &[u64]) -> Vec<u64> {
    let mut order: Vec<usize> = (0..wants.len()).collect();
    order.sort_by_key(|&i| (wants[i], i));
    let mut give = vec![0; wants.len()];
    let mut rest = pool;
    for (k, &i) in order.iter().enumerate() {
        let left = (wants.len() - k) as u64;
        give[i] = wants[i].min(rest / left);
        rest -= give[i];
    }
    give
}

/// The row `reported` makes of the proxy's previous one (or of none).
fn updated(
    input: &TokenInput<'_>,
    previous: Option<&QuotaHolder>,
    reported: &QuotaHeld,
) -> QuotaHolder {
    let spent = reported.spent.min(MAX_COUNT);
    let held = reported.allowed.min(MAX_COUNT);
    let period_start_ms = input.period.0.saturating_mul(1_000);
    let interval = i64::from(input.interval_ms.max(1));
    let (base, carried, old_rate, since) = match previous {
        // The proxy's count went back: it started over (a restart). What it spent before
        // still counts, and its new count starts from zero.
        Some(p) if spent < p.spent => (
            0,
            p.carried.saturating_add(p.spent).min(MAX_COUNT),
            p.rate_milli,
            p.seen_at_ms,
        ),
        Some(p) => (p.spent, p.carried, p.rate_milli, p.seen_at_ms),
        // First heard of: what it spent, it spent since the period began, within an interval
        // or so (counting it over one interval at most rates it generously).
        None => (
            0,
            0,
            0,
            input.now_ms - interval.min(input.now_ms - period_start_ms),
        ),
    };
    let elapsed = (input.now_ms - since).clamp(1, 10 * interval);
    let now_rate = u128::from(spent - base) * 1_000_000 / elapsed as u128;
    let rate_milli = u64::try_from(now_rate)
        .unwrap_or(u64::MAX)
        .max(old_rate / 2);
    QuotaHolder {
        token_id: input.token_id.to_string(),
        proxy_id: input.proxy.to_string(),
        hash: reported.hash.clone(),
        period_start: input.period.0,
        period_end: input.period.1,
        spent,
        carried,
        held,
        granted: previous.map_or(0, |p| p.granted),
        rate_milli,
        seen_at_ms: input.now_ms,
    }
}

/// The reporting proxy's new rows and ceilings (see the module's documentation).
pub fn decide(input: &TokenInput<'_>) -> TokenOutcome {
    let limit = input.limit;
    let live_count = input.live.len().max(1);
    let fallback = fallback(limit, live_count);
    let floor = floor(limit, live_count);
    let valid = input.valid_hashes;
    let mine = |h: &QuotaHolder| h.proxy_id == input.proxy;

    // The proxy's rows: as reported, the ones it did not report as they were, and one for
    // the current secret (counted at the fallback until it confirms a ceiling).
    let mut own: BTreeMap<String, QuotaHolder> = input
        .holders
        .iter()
        .filter(|h| mine(h))
        .map(|h| (h.hash.clone(), h.clone()))
        .collect();
    for r in input.reported {
        let row = updated(input, own.get(&r.hash), r);
        own.insert(r.hash.clone(), row);
    }
    own.entry(input.current_hash.to_string())
        .or_insert_with(|| QuotaHolder {
            token_id: input.token_id.to_string(),
            proxy_id: input.proxy.to_string(),
            hash: input.current_hash.to_string(),
            period_start: input.period.0,
            period_end: input.period.1,
            spent: 0,
            carried: 0,
            held: fallback,
            granted: 0,
            rate_milli: 0,
            seen_at_ms: input.now_ms,
        });
    let others: Vec<&QuotaHolder> = input.holders.iter().filter(|h| !mine(h)).collect();

    // Live proxies (but this one) that hold no row for the current secret run at the
    // fallback.
    let with_current: BTreeSet<&str> = others
        .iter()
        .filter(|h| h.hash == input.current_hash)
        .map(|h| h.proxy_id.as_str())
        .collect();
    let missing = input
        .live
        .keys()
        .filter(|p| *p != input.proxy && !with_current.contains(p.as_str()))
        .count() as u64;
    let fallbacks = missing.saturating_mul(fallback);

    let used: u64 = others
        .iter()
        .copied()
        .chain(own.values())
        .map(|h| h.carried.saturating_add(h.spent))
        .fold(0, u64::saturating_add);

    // The room not spent yet, less the fallbacks and what holders that cannot be granted
    // anything (proxies not live, secrets no longer honoured) hold beyond their spending,
    // water-filled by demand among the live holders.
    let participates =
        |h: &QuotaHolder| valid.contains(&h.hash) && input.live.contains_key(&h.proxy_id);
    let mut pool = limit.saturating_sub(used).saturating_sub(fallbacks);
    let mut wants = vec![];
    let mut mine_at = vec![];
    for h in others.iter().copied().chain(own.values()) {
        if participates(h) || mine(h) && valid.contains(&h.hash) {
            let interval = input
                .live
                .get(&h.proxy_id)
                .copied()
                .unwrap_or(input.interval_ms)
                .max(1);
            let ahead =
                u128::from(h.rate_milli) * u128::from(interval) * u128::from(GRANT_INTERVALS)
                    / 1_000_000;
            if mine(h) {
                mine_at.push((h.hash.clone(), wants.len()));
            }
            wants.push(u64::try_from(ahead).unwrap_or(u64::MAX).max(floor));
        } else {
            let beyond = reservation(h, valid) - h.carried.saturating_add(h.spent);
            pool = pool.saturating_sub(beyond);
        }
    }
    let parts = water_fill(pool, &wants);

    // Cut to what the others' reservations and the fallbacks leave this proxy.
    let others_reserved = others
        .iter()
        .map(|h| reservation(h, valid))
        .fold(0, u64::saturating_add);
    let carried: u64 = own.values().map(|h| h.carried).fold(0, u64::saturating_add);
    let cap = limit
        .saturating_sub(others_reserved)
        .saturating_sub(fallbacks)
        .saturating_sub(carried);
    let lowest: u64 = own
        .values()
        .map(|h| {
            if valid.contains(&h.hash) {
                h.held.max(h.spent)
            } else {
                h.spent
            }
        })
        .fold(0, u64::saturating_add);
    let mut rest = cap.saturating_sub(lowest);
    let mut exhausted = used >= limit;
    let mut rows: Vec<QuotaHolder> = own.into_values().collect();
    // The current secret first: new clients use it.
    rows.sort_by_key(|h| (h.hash != input.current_hash, h.hash.clone()));
    for h in &mut rows {
        if !valid.contains(&h.hash) {
            h.granted = h.spent;
            continue;
        }
        let part = mine_at
            .iter()
            .find(|(hash, _)| *hash == h.hash)
            .map_or(0, |(_, i)| parts[*i]);
        let lowest = h.held.max(h.spent);
        let target = h.spent.saturating_add(part);
        let granted = target.min(lowest.saturating_add(rest)).max(h.spent);
        rest -= granted.saturating_sub(lowest);
        if h.hash == input.current_hash && h.spent >= h.held && granted <= h.spent {
            exhausted = true;
        }
        h.granted = granted;
    }
    TokenOutcome {
        rows,
        used,
        exhausted,
    }
}

/// A token's quota in the current period, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub used: u64,
    pub remaining: u64,
    /// Unix seconds: the end of the period.
    pub resets_at: i64,
}

/// What `token_id`'s holders spent of `quota` in the period holding `now` (Unix seconds).
pub fn usage(token_id: &str, quota: Quota, spent: &[QuotaSpent], now: i64) -> Usage {
    let (start, end) = quota.period.window(now);
    let used = spent
        .iter()
        .filter(|s| s.token_id == token_id && s.period_start == start)
        .map(|s| s.spent)
        .fold(0, u64::saturating_add);
    Usage {
        used,
        remaining: quota.limit.saturating_sub(used),
        resets_at: end,
    }
}

#[cfg(test)]
mod tests;
