//! Fleet-wide limits, the proxy's side: a fleet-limited token's rate state carries this
//! proxy's share of the limit next to the GCRA's TAT, so that the request path reads the
//! share with the value it already reads and writes; the leader reports the workers' demand
//! to `POST /v1/fleet` once per interval and writes the shares that come back.
//!
//! Which bucket a request meets ([`pace`]): the token's whole limit for `"proxy"` scope; for
//! `"fleet"` scope the share while it holds (not expired, computed for the token's current
//! limit), else `max_rps / proxies` with the proxies the control plane last counted. Never
//! the whole limit when other proxies are known, never unlimited, never zero.
//!
//! Quotas ride on the same value and the same report: a token's rate state also holds this
//! proxy's quota state for the period ([`QuotaState`], decided by [`quota_now`]), the report
//! carries it and the answer's grants set its ceiling ([`apply_grant`]).

use crate::callout::{Backoff, Callout};
use crate::config::Config;
use crate::gcra::{Limit, Pace};
use crate::record;
use crate::store::{compare_and_swap, CasError, SharedStore, Step};
use crate::usage::Tally;
use std::collections::BTreeSet;
use tokengate_wire::fleet::{
    FleetAnswer, FleetReport, QuotaGrant, QuotaHeld, TokenDemand, MAX_TOKENS,
};
use tokengate_wire::{LimitScope, Quota};

/// This proxy's share of a token's limit, as stored in its rate state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub rate_milli: u64,
    pub burst: u32,
    /// Unix milliseconds; the share no longer holds from then on.
    pub expires_ms: u64,
    /// The token's limit (`max_rps`, burst) the share was computed from.
    pub max_rps: u32,
    pub limit_burst: u32,
}

/// This proxy's quota state for one secret, as stored in its rate state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaState {
    /// Unix seconds: the start of the period the counts are for ([`tokengate_wire::Period::window`]).
    pub period_start: i64,
    /// Requests this proxy admitted with the secret in the period.
    pub spent: u64,
    /// The ceiling of `spent` on this proxy: `limit / proxies` at the period's start, then
    /// what the control plane grants. Never above `limit`.
    pub allowed: u64,
    /// The token's quota limit the ceiling is for.
    pub limit: u64,
}

/// A token's rate state: the GCRA's TAT, this proxy's share of a fleet limit and its quota
/// state. One value, so that a request reads and writes all three with the one
/// compare-and-swap it already does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateState {
    pub tat: u64,
    pub share: Option<Share>,
    pub quota: Option<QuotaState>,
}

const TAT_LEN: usize = 8;
const SHARE_LEN: usize = 8 + 4 + 8 + 4 + 4;
const QUOTA_LEN: usize = 8 + 8 + 8 + 8;
/// The longest rate state: the TAT, a share and a quota state. Which parts a value holds
/// follows from its length (8, 36, 40 or 68 bytes): the first two are what filters before
/// quotas wrote, so their values still read.
pub const RATE_STATE_LEN: usize = TAT_LEN + SHARE_LEN + QUOTA_LEN;

/// A rate state as stored. On the stack, so that the request path allocates nothing.
pub struct Encoded {
    buf: [u8; RATE_STATE_LEN],
    len: usize,
}

impl AsRef<[u8]> for Encoded {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

pub fn encode(state: &RateState) -> Encoded {
    let mut buf = [0u8; RATE_STATE_LEN];
    buf[..TAT_LEN].copy_from_slice(&state.tat.to_le_bytes());
    let mut len = TAT_LEN;
    if let Some(s) = state.share {
        let b = &mut buf[len..len + SHARE_LEN];
        b[0..8].copy_from_slice(&s.rate_milli.to_le_bytes());
        b[8..12].copy_from_slice(&s.burst.to_le_bytes());
        b[12..20].copy_from_slice(&s.expires_ms.to_le_bytes());
        b[20..24].copy_from_slice(&s.max_rps.to_le_bytes());
        b[24..28].copy_from_slice(&s.limit_burst.to_le_bytes());
        len += SHARE_LEN;
    }
    if let Some(q) = state.quota {
        let b = &mut buf[len..len + QUOTA_LEN];
        b[0..8].copy_from_slice(&q.period_start.to_le_bytes());
        b[8..16].copy_from_slice(&q.spent.to_le_bytes());
        b[16..24].copy_from_slice(&q.allowed.to_le_bytes());
        b[24..32].copy_from_slice(&q.limit.to_le_bytes());
        len += QUOTA_LEN;
    }
    Encoded { buf, len }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The rate state a stored value holds; a missing value is an idle bucket with neither share
/// nor quota state. `None`: the value is damaged (no length a filter writes, or a quota
/// state no filter writes); the caller fails closed (see [`quota_now`]).
pub fn decode(value: Option<&[u8]>) -> Option<RateState> {
    let Some(b) = value else {
        return Some(RateState::default());
    };
    let (share, quota) = match b.len() {
        TAT_LEN => (false, false),
        n if n == TAT_LEN + SHARE_LEN => (true, false),
        n if n == TAT_LEN + QUOTA_LEN => (false, true),
        RATE_STATE_LEN => (true, true),
        _ => return None,
    };
    let share = share.then(|| Share {
        rate_milli: u64_at(b, 8),
        burst: u32_at(b, 16),
        expires_ms: u64_at(b, 20),
        max_rps: u32_at(b, 28),
        limit_burst: u32_at(b, 32),
    });
    let quota = match quota {
        false => None,
        true => {
            let at = if share.is_some() {
                TAT_LEN + SHARE_LEN
            } else {
                TAT_LEN
            };
            let q = QuotaState {
                period_start: u64_at(b, at) as i64,
                spent: u64_at(b, at + 8),
                allowed: u64_at(b, at + 16),
                limit: u64_at(b, at + 24),
            };
            if q.limit == 0 || q.allowed > q.limit {
                return None;
            }
            Some(q)
        }
    };
    Some(RateState {
        tat: u64_at(b, 0),
        share,
        quota,
    })
}

/// The ceiling a proxy starts a period at before it hears from the control plane: its even
/// part of the quota, `limit / proxies` rounded down, so that the proxies the control plane
/// counts stay within the quota together. With no count heard (0) the proxy is taken to be
/// alone, as [`fallback`] takes it for rates: a state is only loaded from a control plane,
/// and one that counts no other proxy leaves this one the whole quota.
pub fn first_ceiling(limit: u64, proxies: u32) -> u64 {
    limit / u64::from(proxies.max(1))
}

/// The quota state a request at `now_s` meets, from what is stored (`stored`: `None` when
/// the rate state is damaged) and the token's `quota`; `true` with it when it differs from
/// what is stored (it must be written even if the request is refused, so that the leader
/// reports it).
///
/// A new period (or no state yet) starts at spent 0 and [`first_ceiling`]. A quota whose
/// limit changed keeps what was spent and starts over from the first ceiling of the new
/// limit until the control plane grants another. A damaged state fails closed: this proxy's
/// ceiling for the period counts as spent (the control plane may raise it; the next period
/// starts afresh).
pub fn quota_now(
    stored: Option<Option<QuotaState>>,
    quota: Quota,
    now_s: i64,
    proxies: u32,
) -> (QuotaState, bool) {
    let (start, _) = quota.period.window(now_s);
    let ceiling = first_ceiling(quota.limit, proxies);
    let fresh = |spent| QuotaState {
        period_start: start,
        spent,
        allowed: ceiling,
        limit: quota.limit,
    };
    match stored {
        // A state of a later period than now's is the clock stepping back: it is still the
        // current one, never a reset.
        Some(Some(q)) if q.period_start >= start && q.limit == quota.limit => (q, false),
        Some(Some(q)) if q.period_start >= start => (
            QuotaState {
                period_start: q.period_start,
                ..fresh(q.spent)
            },
            true,
        ),
        Some(_) => (fresh(0), true),
        None => (fresh(ceiling), true),
    }
}

/// The bucket a request of a token limited to `limit` meets on this proxy at `now_ms`.
pub fn pace(
    limit: Limit,
    scope: LimitScope,
    share: Option<Share>,
    proxies: u32,
    now_ms: u64,
) -> Pace {
    if scope == LimitScope::Proxy {
        return limit.pace();
    }
    match share {
        Some(s) if holds(s, limit, now_ms) => Pace::of(s.rate_milli, s.burst),
        _ => fallback(limit, proxies),
    }
}

/// Whether a stored share is this token's current one at `now_ms`.
pub fn holds(s: Share, limit: Limit, now_ms: u64) -> bool {
    now_ms < s.expires_ms && s.max_rps == limit.rate_per_sec && s.limit_burst == limit.burst
}

/// The TAT to run a bucket of a new pace from: at most a full tolerance ahead of now. A
/// TAT pushed far ahead by a slow pace (an idle proxy's floor: one request every few
/// seconds) would otherwise hold the proxy back that long after its share grew. No credit
/// is given: the bucket starts as drained as the new pace allows.
pub fn rebase(tat: u64, pace: Pace, now_nanos: u64) -> u64 {
    tat.min(now_nanos.saturating_add(pace.tolerance()))
}

/// `max_rps / proxies` (and the burst likewise, at least 1), for a proxy holding no share:
/// the proxies together stay within the limit and its burst.
pub fn fallback(limit: Limit, proxies: u32) -> Pace {
    let n = proxies.max(1);
    let rate_milli = (u64::from(limit.rate_per_sec) * 1_000 / u64::from(n)).max(1);
    Pace::of(rate_milli, (limit.burst / n).max(1))
}

/// Why an answer was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerFailure {
    Malformed,
    Store,
}

/// Writes an answer's shares into the rate states of tokens this proxy holds (a share for
/// a hash it does not hold is skipped: it creates no key), its quota grants (see
/// [`apply_grant`]) and the proxy count into the state. Returns the proxies counted. The
/// whole answer is checked before anything is written.
pub fn apply<S: SharedStore + ?Sized>(
    store: &S,
    body: &[u8],
    now_ms: u64,
) -> Result<FleetAnswer, AnswerFailure> {
    let answer: FleetAnswer = serde_json::from_slice(body).map_err(|_| AnswerFailure::Malformed)?;
    let sane = answer.shares.len() <= 2 * MAX_TOKENS
        && answer.quotas.len() <= 2 * MAX_TOKENS
        && answer.proxies >= 1
        && answer
            .shares
            .iter()
            .all(|s| is_hash(&s.hash) && s.max_rps >= 1 && s.rate_milli >= 1 && s.share_burst >= 1)
        && answer
            .quotas
            .iter()
            .all(|q| is_hash(&q.hash) && q.limit >= 1);
    if !sane {
        return Err(AnswerFailure::Malformed);
    }
    let expires_ms = now_ms.saturating_add(u64::from(answer.ttl_ms));
    for s in &answer.shares {
        let share = Share {
            // A share is never more than the token's whole limit.
            rate_milli: s.rate_milli.min(u64::from(s.max_rps) * 1_000),
            burst: s.share_burst.min(s.burst.max(1)),
            expires_ms,
            max_rps: s.max_rps,
            limit_burst: s.burst,
        };
        let key = record::rate_key(&s.hash);
        let written = compare_and_swap(store, &key, WRITE_RETRIES, |value| match value {
            None => Step::Keep(()),
            Some(v) => {
                let mut state = decode(Some(v)).unwrap_or_default();
                state.tat = rebase(
                    state.tat,
                    Pace::of(share.rate_milli, share.burst),
                    now_ms * 1_000_000,
                );
                state.share = Some(share);
                Step::Write(encode(&state), ())
            }
        });
        match written {
            Ok(()) => {}
            Err(CasError::Exhausted) => continue,
            Err(CasError::Host) => return Err(AnswerFailure::Store),
        }
    }
    let now_s = (now_ms / 1_000) as i64;
    for g in &answer.quotas {
        match apply_grant(store, g, now_s) {
            Ok(_) | Err(CasError::Exhausted) => {}
            Err(CasError::Host) => return Err(AnswerFailure::Store),
        }
    }
    set_proxies(store, answer.proxies).map_err(|_| AnswerFailure::Store)?;
    Ok(answer)
}

/// The quota of a live token this proxy holds, read from its record.
fn quota_of<S: SharedStore + ?Sized>(store: &S, hash: &str) -> Result<Option<Quota>, CasError> {
    let (value, _) = store
        .get(&record::token_key(hash))
        .map_err(|_| CasError::Host)?;
    Ok(value
        .as_ref()
        .and_then(|v| record::decode_token(v.as_ref()))
        .filter(|t| t.status != tokengate_wire::SyncStatus::Revoked)
        .and_then(|t| t.quota))
}

/// Sets the ceiling of one secret's quota state to a grant's, when the grant is for the
/// current period and the token's current limit (else it is stale: ignored). What was spent
/// stays; a grant may lower the ceiling below it. A secret with no state for the period gets
/// one (spent 0). A damaged state is left to the request path, which fails it closed.
/// Returns whether the grant was applied.
pub fn apply_grant<S: SharedStore + ?Sized>(
    store: &S,
    grant: &QuotaGrant,
    now_s: i64,
) -> Result<bool, CasError> {
    let Some(quota) = quota_of(store, &grant.hash)? else {
        return Ok(false);
    };
    if quota.limit != grant.limit || quota.period.window(now_s).0 != grant.period_start {
        return Ok(false);
    }
    let allowed = grant.allowed.min(quota.limit);
    compare_and_swap(
        store,
        &record::rate_key(&grant.hash),
        WRITE_RETRIES,
        |value| {
            let Some(mut state) = decode(value) else {
                return Step::Keep(false);
            };
            let spent = match state.quota {
                Some(q) if q.period_start == grant.period_start => q.spent,
                _ => 0,
            };
            state.quota = Some(QuotaState {
                period_start: grant.period_start,
                spent,
                allowed,
                limit: quota.limit,
            });
            Step::Write(encode(&state), true)
        },
    )
}

/// What the proxy reports of one secret's quota: its state for the current period, as a
/// request would find it now. `None` when the token has no quota (any more) or no state in
/// the period.
pub fn held<S: SharedStore + ?Sized>(
    store: &S,
    hash: &str,
    now_s: i64,
    proxies: u32,
) -> Result<Option<QuotaHeld>, CasError> {
    let Some(quota) = quota_of(store, hash)? else {
        return Ok(None);
    };
    let (value, _) = store
        .get(&record::rate_key(hash))
        .map_err(|_| CasError::Host)?;
    let stored = decode(value.as_ref().map(AsRef::as_ref)).map(|s| s.quota);
    if matches!(stored, Some(None)) {
        return Ok(None);
    }
    let (q, _) = quota_now(stored, quota, now_s, proxies);
    let current = stored.flatten().map(|s| s.period_start) == Some(q.period_start);
    Ok(current.then(|| QuotaHeld {
        hash: hash.to_string(),
        period_start: q.period_start,
        spent: q.spent,
        allowed: q.allowed,
    }))
}

const WRITE_RETRIES: u32 = 16;

/// Records the proxy count in the state, when a state is loaded (the sync client writes the
/// first one with the count it was given).
fn set_proxies<S: SharedStore + ?Sized>(store: &S, proxies: u32) -> Result<(), CasError> {
    compare_and_swap(store, record::STATE_KEY, WRITE_RETRIES, |value| match value
        .and_then(record::decode_state)
    {
        Some(mut state) if state.proxies != proxies => {
            state.proxies = proxies;
            Step::Write(record::encode_state(&state), ())
        }
        _ => Step::Keep(()),
    })
}

fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The `message` of a control plane's JSON refusal, cut short, for the log.
pub fn refusal(body: Option<&[u8]>) -> String {
    #[derive(serde::Deserialize)]
    struct Refusal {
        message: String,
    }
    body.and_then(|b| serde_json::from_slice::<Refusal>(b).ok())
        .map(|r| r.message.chars().take(200).collect())
        .unwrap_or_default()
}

/// A body this large is no fleet answer (10,000 shares are about 2 MB).
pub const MAX_ANSWER_BYTES: usize = 8 << 20;

/// The leader's fleet cycle: every `fleet_report_ms` it reports the demand gathered since
/// the last report (an empty report when there was none: it keeps the proxy live) and
/// applies the shares that come back. A failed report loses its counts (demand is a rate,
/// stale by the next interval) and is retried at the next interval.
///
/// Quota states are read from shared data when the report is made, for the secrets whose
/// requests the workers counted (under [`quota_tally_key`]) since the last answered report
/// and those the last answer named: a failed report loses no quota state, the next one
/// carries it as it is then.
#[derive(Debug, Default)]
pub struct Reporter {
    call: Callout,
    /// When the counts now in the window began.
    window_start_ms: u64,
    next_due_ms: u64,
    /// Secrets with quota traffic not yet in an answered report.
    quota_due: BTreeSet<String>,
    /// Secrets the last answer granted a ceiling to.
    granted: BTreeSet<String>,
}

/// Where a worker counts a request that met a quota: its secret's hash behind a prefix no
/// token id has (`tok_...`), so that the fleet tally carries both and the leader tells them
/// apart. On the stack.
pub fn quota_tally_key(hash: &str) -> [u8; QUOTA_TALLY_KEY_LEN] {
    let mut key = [0u8; QUOTA_TALLY_KEY_LEN];
    key[..QUOTA_TALLY_PREFIX.len()].copy_from_slice(QUOTA_TALLY_PREFIX.as_bytes());
    let n = hash.len().min(64);
    key[QUOTA_TALLY_PREFIX.len()..QUOTA_TALLY_PREFIX.len() + n]
        .copy_from_slice(&hash.as_bytes()[..n]);
    key
}

const QUOTA_TALLY_PREFIX: &str = "q:";
pub const QUOTA_TALLY_KEY_LEN: usize = 2 + 64;

impl Reporter {
    pub fn new() -> Reporter {
        Reporter::default()
    }

    pub fn sent(&mut self, call: u64) {
        self.call.sent(call);
    }

    pub fn is_current(&self, call: u64) -> bool {
        self.call.is_current(call)
    }

    /// On the leader's tick, with the demand gathered so far: the body of a report to send
    /// now, if one is due. Reads the quota states to report from `store`; `proxies` is the
    /// count the control plane last gave.
    pub fn on_tick<S: SharedStore + ?Sized>(
        &mut self,
        cfg: &Config,
        store: &S,
        window: &mut Tally,
        proxy_id: &str,
        proxies: u32,
        now_ms: u64,
    ) -> Option<Vec<u8>> {
        if self
            .call
            .overdue(now_ms, report_timeout_ms(cfg).saturating_add(5_000))
        {
            self.on_result(cfg, false, now_ms);
        }
        if self.window_start_ms == 0 {
            self.window_start_ms = now_ms;
        }
        if now_ms < self.next_due_ms || !self.call.ready(now_ms) {
            return None;
        }
        let interval_ms = now_ms.saturating_sub(self.window_start_ms).clamp(
            u64::from(tokengate_wire::fleet::MIN_INTERVAL_MS),
            u64::from(tokengate_wire::fleet::MAX_INTERVAL_MS),
        ) as u32;
        let mut tokens: Vec<TokenDemand> = Vec::new();
        for e in window.drain() {
            if let Some(hash) = e.id.strip_prefix(QUOTA_TALLY_PREFIX) {
                if is_hash(hash) && self.quota_due.len() < MAX_TOKENS {
                    self.quota_due.insert(hash.to_string());
                }
                continue;
            }
            tokens.push(TokenDemand {
                id: e.id,
                admitted: e.allowed,
                refused: e.denied,
            });
        }
        tokens.truncate(MAX_TOKENS);
        let now_s = (now_ms / 1_000) as i64;
        let mut quotas = Vec::new();
        for hash in self.quota_due.union(&self.granted) {
            if quotas.len() >= MAX_TOKENS {
                break;
            }
            // A secret whose state cannot be read now is reported next time.
            if let Ok(Some(h)) = held(store, hash, now_s, proxies) {
                quotas.push(h);
            }
        }
        self.window_start_ms = now_ms;
        self.next_due_ms = now_ms.saturating_add(u64::from(cfg.fleet_report_ms));
        let body = serde_json::to_vec(&FleetReport {
            proxy_id: proxy_id.to_string(),
            interval_ms,
            tokens,
            quotas,
        })
        .ok()?;
        self.call.begin(now_ms);
        Some(body)
    }

    /// The report was answered with `answer`, whose shares and grants were applied.
    pub fn on_answer(&mut self, cfg: &Config, answer: &FleetAnswer, now_ms: u64) {
        self.quota_due.clear();
        self.granted = answer.quotas.iter().map(|g| g.hash.clone()).collect();
        self.on_result(cfg, true, now_ms);
    }

    /// The report was answered (`ok`: a 2xx whose shares were applied) or failed.
    pub fn on_result(&mut self, cfg: &Config, ok: bool, now_ms: u64) {
        if ok {
            self.call.succeed();
            return;
        }
        let interval = u64::from(cfg.fleet_report_ms);
        self.call.fail(
            &Backoff {
                initial_ms: interval,
                max_ms: interval.max(u64::from(cfg.backoff_max_ms).min(5_000)),
                spread: None,
            },
            now_ms,
        );
    }
}

/// The callout timeout for a fleet report.
pub fn report_timeout_ms(cfg: &Config) -> u64 {
    u64::from(cfg.fleet_report_ms).clamp(1_000, 10_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{encode_state, rate_key, State, STATE_KEY};
    use crate::store::fake::MemStore;
    use tokengate_wire::fleet::Share as WireShare;

    const NOW_MS: u64 = 1_800_000_000_000;

    fn limit(rps: u32, burst: u32) -> Limit {
        Limit::new(rps, burst).unwrap()
    }

    fn share(rate_milli: u64, burst: u32, limit: Limit) -> Share {
        Share {
            rate_milli,
            burst,
            expires_ms: NOW_MS + 3_000,
            max_rps: limit.rate_per_sec,
            limit_burst: limit.burst,
        }
    }

    #[test]
    fn the_rate_state_round_trips_with_and_without_a_share() {
        let s = share(33_333, 4, limit(100, 10));
        let q = QuotaState {
            period_start: 1_800_000_000,
            spent: 7,
            allowed: 9,
            limit: 30,
        };
        for (share, quota) in [
            (None, None),
            (Some(s), None),
            (None, Some(q)),
            (Some(s), Some(q)),
        ] {
            let state = RateState {
                tat: 77,
                share,
                quota,
            };
            let enc = encode(&state);
            assert!(enc.as_ref().len() <= RATE_STATE_LEN);
            assert_eq!(decode(Some(enc.as_ref())), Some(state));
        }
        // What the sync client writes for a new token: the TAT alone.
        let tat_only = decode(Some(&crate::gcra::encode_tat(5)[..])).unwrap();
        assert_eq!(
            (tat_only.tat, tat_only.share, tat_only.quota),
            (5, None, None)
        );
        assert_eq!(decode(None), Some(RateState::default()));
    }

    #[test]
    fn damaged_rate_states_are_refused() {
        let full = RateState {
            tat: 1,
            share: Some(share(1_000, 1, limit(1, 1))),
            quota: Some(QuotaState {
                period_start: 0,
                spent: 1,
                allowed: 2,
                limit: 3,
            }),
        };
        let enc = encode(&full);
        let bytes = enc.as_ref();
        for n in 0..bytes.len() {
            let ok = [0, TAT_LEN, TAT_LEN + SHARE_LEN, TAT_LEN + QUOTA_LEN].contains(&n);
            // A prefix of another format's length reads as that format; every other is
            // refused.
            if !ok {
                assert_eq!(decode(Some(&bytes[..n])), None, "{n} bytes");
            }
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(decode(Some(&longer)), None);
        // A quota state no filter writes: a ceiling above the limit, a limit of 0.
        let mut over = full;
        over.quota = Some(QuotaState {
            allowed: 4,
            ..full.quota.unwrap()
        });
        assert_eq!(decode(Some(encode(&over).as_ref())), None);
        over.quota = Some(QuotaState {
            period_start: 0,
            spent: 0,
            allowed: 0,
            limit: 0,
        });
        assert_eq!(decode(Some(encode(&over).as_ref())), None);
    }

    const HOUR: Quota = Quota {
        limit: 100,
        period: tokengate_wire::Period::Hour,
    };
    /// 1_800_000_000 is 08:00:00Z: the start of an hour.
    const NOW_S: i64 = 1_800_000_000;

    #[test]
    fn a_period_starts_at_an_even_part_of_the_quota_and_rolls_over() {
        // No state: the period's start, spent 0, a third of the quota (rounded down).
        let (q, fresh) = quota_now(Some(None), HOUR, NOW_S + 5, 3);
        assert!(fresh);
        assert_eq!(
            q,
            QuotaState {
                period_start: NOW_S,
                spent: 0,
                allowed: 33,
                limit: 100
            }
        );
        // The same period: as stored.
        let mid = QuotaState { spent: 20, ..q };
        assert_eq!(
            quota_now(Some(Some(mid)), HOUR, NOW_S + 3_599, 5),
            (mid, false)
        );
        // The next period: spent 0 again, at the count now known.
        let (next, fresh) = quota_now(Some(Some(mid)), HOUR, NOW_S + 3_600, 4);
        assert!(fresh);
        assert_eq!(
            (next.period_start, next.spent, next.allowed),
            (NOW_S + 3_600, 0, 25)
        );
        // A clock stepped back into the previous period resets nothing.
        assert_eq!(
            quota_now(Some(Some(next)), HOUR, NOW_S + 10, 4),
            (next, false)
        );
        // No count heard: this proxy alone, the whole quota; never more.
        assert_eq!(first_ceiling(100, 0), 100);
        assert_eq!(first_ceiling(100, 1), 100);
        // More proxies than the quota: nothing until the control plane grants some.
        assert_eq!(first_ceiling(2, 3), 0);
    }

    #[test]
    fn a_changed_limit_keeps_what_was_spent_and_a_damaged_state_counts_as_spent() {
        let stored = QuotaState {
            period_start: NOW_S,
            spent: 40,
            allowed: 50,
            limit: 100,
        };
        let lowered = Quota { limit: 60, ..HOUR };
        let (q, fresh) = quota_now(Some(Some(stored)), lowered, NOW_S + 1, 2);
        assert!(fresh);
        assert_eq!((q.spent, q.allowed, q.limit), (40, 30, 60));
        // Damaged: this proxy's ceiling for the period counts as spent.
        let (q, fresh) = quota_now(None, HOUR, NOW_S + 1, 2);
        assert!(fresh);
        assert_eq!((q.spent, q.allowed), (50, 50));
    }

    #[test]
    fn a_fleet_token_runs_at_its_share_while_it_holds_then_falls_back() {
        let l = limit(100, 100);
        let s = share(20_000, 20, l);
        assert_eq!(
            pace(l, LimitScope::Fleet, Some(s), 3, NOW_MS),
            Pace::of(20_000, 20)
        );
        // Expired: max_rps / the proxies last counted, burst likewise (rounded down: the
        // bursts add up to no more than the token's).
        assert_eq!(
            pace(l, LimitScope::Fleet, Some(s), 3, NOW_MS + 3_000),
            Pace::of(33_333, 33)
        );
        // Computed for another limit (the token changed since): not this token's share.
        let other = share(20_000, 20, limit(50, 50));
        assert_eq!(
            pace(l, LimitScope::Fleet, Some(other), 4, NOW_MS),
            Pace::of(25_000, 25)
        );
        // No share yet.
        assert_eq!(
            pace(l, LimitScope::Fleet, None, 2, NOW_MS),
            Pace::of(50_000, 50)
        );
    }

    #[test]
    fn proxy_scope_is_the_whole_limit_whatever_is_stored() {
        let l = limit(10, 3);
        let s = share(1_000, 1, l);
        assert_eq!(pace(l, LimitScope::Proxy, Some(s), 5, NOW_MS), l.pace());
        assert_eq!(pace(l, LimitScope::Proxy, None, 5, NOW_MS), l.pace());
    }

    #[test]
    fn the_fallback_is_never_unlimited_nor_zero_nor_the_whole_limit_among_several() {
        let l = limit(1, 1);
        // Unknown count: the whole limit, the most one proxy may take.
        assert_eq!(fallback(l, 0), l.pace());
        // More proxies than requests per second: a slow bucket, not a closed one.
        assert_eq!(fallback(l, 1_000), Pace::of(1, 1));
        assert_ne!(fallback(limit(100, 100), 2), limit(100, 100).pace());
    }

    fn loaded() -> MemStore {
        let s = MemStore::default();
        let state = State {
            version: 1,
            generation: 1,
            proxies: 0,
            store_id: "s".into(),
            token_count: 1,
            scopes_version: 0,
        };
        s.set(STATE_KEY, &encode_state(&state), 0).unwrap();
        s
    }

    fn answer(shares: Vec<WireShare>, proxies: u32) -> Vec<u8> {
        serde_json::to_vec(&FleetAnswer {
            quotas: vec![],
            proxies,
            ttl_ms: 3_000,
            shares,
        })
        .unwrap()
    }

    fn quota_answer(g: QuotaGrant) -> Vec<u8> {
        serde_json::to_vec(&FleetAnswer {
            quotas: vec![g],
            proxies: 1,
            ttl_ms: 3_000,
            shares: vec![],
        })
        .unwrap()
    }

    fn wire_share(hash: &str, rate_milli: u64) -> WireShare {
        WireShare {
            hash: hash.into(),
            max_rps: 100,
            burst: 100,
            rate_milli,
            share_burst: 30,
        }
    }

    #[test]
    fn an_answer_writes_shares_keeping_the_tat_and_skips_unknown_tokens() {
        let s = loaded();
        let (held, unknown) = ("a".repeat(64), "b".repeat(64));
        s.set(&rate_key(&held), &crate::gcra::encode_tat(42), 0)
            .unwrap();
        let body = answer(
            vec![wire_share(&held, 30_000), wire_share(&unknown, 10_000)],
            3,
        );
        assert!(apply(&s, &body, NOW_MS).is_ok());
        let (v, _) = s.get(&rate_key(&held)).unwrap();
        let got = decode(v.as_deref()).unwrap();
        assert_eq!(got.tat, 42);
        assert_eq!(
            got.share,
            Some(Share {
                rate_milli: 30_000,
                burst: 30,
                expires_ms: NOW_MS + 3_000,
                max_rps: 100,
                limit_burst: 100,
            })
        );
        assert_eq!(s.get(&rate_key(&unknown)).unwrap().0, None);
        let (state, _) = s.get(STATE_KEY).unwrap();
        assert_eq!(record::state_proxies(&state.unwrap()), 3);
    }

    #[test]
    fn a_grown_share_is_not_held_back_by_a_slow_pace_before_it() {
        let s = loaded();
        let held = "a".repeat(64);
        // An idle floor of one request every 40 s admitted a request just now: its TAT is
        // 40 s ahead.
        let now_ns = NOW_MS * 1_000_000;
        s.set(
            &rate_key(&held),
            &crate::gcra::encode_tat(now_ns + 40_000_000_000),
            0,
        )
        .unwrap();
        // The share grows to 30/s, burst 30: the bucket runs from at most one tolerance
        // ahead, so the next request passes within a thirtieth of a second, not in 40 s.
        apply(&s, &answer(vec![wire_share(&held, 30_000)], 3), NOW_MS).unwrap();
        let (v, _) = s.get(&rate_key(&held)).unwrap();
        let tat = decode(v.as_deref()).unwrap().tat;
        assert_eq!(tat, now_ns + Pace::of(30_000, 30).tolerance());
        // A TAT within reach is kept as it is: no credit.
        assert_eq!(rebase(now_ns + 5, Pace::of(30_000, 30), now_ns), now_ns + 5);
    }

    #[test]
    fn a_hostile_answer_changes_nothing() {
        let s = loaded();
        let held = "a".repeat(64);
        s.set(&rate_key(&held), &crate::gcra::encode_tat(42), 0)
            .unwrap();
        let before = s.map.borrow().clone();
        let mut zero_rate = wire_share(&held, 0);
        zero_rate.rate_milli = 0;
        for body in [
            b"not json".to_vec(),
            answer(vec![wire_share("../../etc", 1_000)], 3),
            answer(vec![wire_share(&held, 1_000)], 0),
            answer(vec![zero_rate], 3),
            answer(vec![wire_share(&held, 1_000); 2 * MAX_TOKENS + 1], 3),
            quota_answer(QuotaGrant {
                hash: "../x".into(),
                period_start: 0,
                limit: 1,
                allowed: 1,
            }),
            quota_answer(QuotaGrant {
                hash: held.clone(),
                period_start: 0,
                limit: 0,
                allowed: 0,
            }),
        ] {
            assert_eq!(
                apply(&s, &body, NOW_MS).err(),
                Some(AnswerFailure::Malformed)
            );
        }
        assert_eq!(*s.map.borrow(), before);
        // A share above the whole limit is cut to the limit.
        let body = answer(vec![wire_share(&held, 5_000_000)], 1);
        apply(&s, &body, NOW_MS).unwrap();
        let (v, _) = s.get(&rate_key(&held)).unwrap();
        assert_eq!(
            decode(v.as_deref()).unwrap().share.unwrap().rate_milli,
            100_000
        );
    }

    fn cfg() -> Config {
        Config::parse(br#"{"control_plane_cluster":"cp","sync_token":"x"}"#).unwrap()
    }

    #[test]
    fn the_reporter_reports_every_interval_even_with_nothing_to_say() {
        let c = cfg();
        let mut r = Reporter::new();
        let store = loaded();
        let mut window = Tally::new(10);
        let first = r
            .on_tick(&c, &store, &mut window, "envoy-1", 1, NOW_MS)
            .unwrap();
        let report: FleetReport = serde_json::from_slice(&first).unwrap();
        assert_eq!(report.proxy_id, "envoy-1");
        assert!(report.tokens.is_empty());
        r.sent(1);
        r.on_result(&c, true, NOW_MS + 10);
        window.count(b"tok_1", true, 1);
        window.count(b"tok_1", false, 1);
        window.count(b"tok_1", true, 1);
        assert!(r
            .on_tick(&c, &store, &mut window, "envoy-1", 1, NOW_MS + 500)
            .is_none());
        let next = r
            .on_tick(&c, &store, &mut window, "envoy-1", 1, NOW_MS + 1_000)
            .unwrap();
        let report: FleetReport = serde_json::from_slice(&next).unwrap();
        assert_eq!(report.interval_ms, 1_000);
        assert_eq!(
            report.tokens,
            [TokenDemand {
                id: "tok_1".into(),
                admitted: 2,
                refused: 1
            }]
        );
        // In flight: nothing more until it is answered.
        assert!(r
            .on_tick(&c, &store, &mut window, "envoy-1", 1, NOW_MS + 2_000)
            .is_none());
        r.sent(2);
        assert!(r.is_current(2));
        r.on_result(&c, false, NOW_MS + 2_000);
        assert!(r
            .on_tick(&c, &store, &mut window, "envoy-1", 1, NOW_MS + 2_500)
            .is_none());
        assert!(r
            .on_tick(&c, &store, &mut window, "envoy-1", 1, NOW_MS + 3_000)
            .is_some());
    }
}
