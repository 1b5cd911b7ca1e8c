//! Fleet-wide limits, the proxy's side: a fleet-limited token's rate state carries this
//! proxy's share of the limit next to the GCRA's TAT, so that the request path reads the
//! share with the value it already reads and writes; the leader reports the workers' demand
//! to `POST /v1/fleet` once per interval and writes the shares that come back.
//!
//! Which bucket a request meets ([`pace`]): the token's whole limit for `"proxy"` scope; for
//! `"fleet"` scope the share while it holds (not expired, computed for the token's current
//! limit), else `max_rps / proxies` with the proxies the control plane last counted. Never
//! the whole limit when other proxies are known, never unlimited, never zero.

use crate::callout::{Backoff, Callout};
use crate::config::Config;
use crate::gcra::{Limit, Pace};
use crate::record;
use crate::store::{compare_and_swap, CasError, SharedStore, Step};
use crate::usage::Tally;
use tokengate_wire::fleet::{FleetAnswer, FleetReport, TokenDemand, MAX_TOKENS};
use tokengate_wire::LimitScope;

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

const TAT_LEN: usize = 8;
/// A rate state with a share: the TAT, then the share.
pub const RATE_STATE_LEN: usize = TAT_LEN + 8 + 4 + 8 + 4 + 4;

/// A rate state as stored: the TAT alone (no share yet) or with a share. On the stack, so
/// that the request path allocates nothing.
pub struct Encoded {
    buf: [u8; RATE_STATE_LEN],
    len: usize,
}

impl AsRef<[u8]> for Encoded {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

pub fn encode(tat: u64, share: Option<Share>) -> Encoded {
    let mut buf = [0u8; RATE_STATE_LEN];
    buf[..TAT_LEN].copy_from_slice(&tat.to_le_bytes());
    let Some(s) = share else {
        return Encoded { buf, len: TAT_LEN };
    };
    buf[8..16].copy_from_slice(&s.rate_milli.to_le_bytes());
    buf[16..20].copy_from_slice(&s.burst.to_le_bytes());
    buf[20..28].copy_from_slice(&s.expires_ms.to_le_bytes());
    buf[28..32].copy_from_slice(&s.max_rps.to_le_bytes());
    buf[32..36].copy_from_slice(&s.limit_burst.to_le_bytes());
    Encoded {
        buf,
        len: RATE_STATE_LEN,
    }
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

/// The TAT and the share of a stored rate state. Missing or malformed reads as idle with no
/// share: the bucket starts full at the fallback pace, never unlimited.
pub fn decode(value: Option<&[u8]>) -> (u64, Option<Share>) {
    match value {
        Some(b) if b.len() == TAT_LEN => (u64_at(b, 0), None),
        Some(b) if b.len() == RATE_STATE_LEN => (
            u64_at(b, 0),
            Some(Share {
                rate_milli: u64_at(b, 8),
                burst: u32_at(b, 16),
                expires_ms: u64_at(b, 20),
                max_rps: u32_at(b, 28),
                limit_burst: u32_at(b, 32),
            }),
        ),
        _ => (0, None),
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
/// a hash it does not hold is skipped: it creates no key) and the proxy count into the
/// state. Returns the proxies counted. The whole answer is checked before anything is
/// written.
pub fn apply<S: SharedStore + ?Sized>(
    store: &S,
    body: &[u8],
    now_ms: u64,
) -> Result<FleetAnswer, AnswerFailure> {
    let answer: FleetAnswer = serde_json::from_slice(body).map_err(|_| AnswerFailure::Malformed)?;
    let sane = answer.shares.len() <= 2 * MAX_TOKENS
        && answer.proxies >= 1
        && answer
            .shares
            .iter()
            .all(|s| is_hash(&s.hash) && s.max_rps >= 1 && s.rate_milli >= 1 && s.share_burst >= 1);
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
                let (tat, _) = decode(Some(v));
                let tat = rebase(
                    tat,
                    Pace::of(share.rate_milli, share.burst),
                    now_ms * 1_000_000,
                );
                Step::Write(encode(tat, Some(share)), ())
            }
        });
        match written {
            Ok(()) => {}
            Err(CasError::Exhausted) => continue,
            Err(CasError::Host) => return Err(AnswerFailure::Store),
        }
    }
    set_proxies(store, answer.proxies).map_err(|_| AnswerFailure::Store)?;
    Ok(answer)
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
#[derive(Debug, Default)]
pub struct Reporter {
    call: Callout,
    /// When the counts now in the window began.
    window_start_ms: u64,
    next_due_ms: u64,
}

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
    /// now, if one is due.
    pub fn on_tick(
        &mut self,
        cfg: &Config,
        window: &mut Tally,
        proxy_id: &str,
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
        let mut tokens: Vec<TokenDemand> = window
            .drain()
            .into_iter()
            .map(|e| TokenDemand {
                id: e.id,
                admitted: e.allowed,
                refused: e.denied,
            })
            .collect();
        tokens.truncate(MAX_TOKENS);
        self.window_start_ms = now_ms;
        self.next_due_ms = now_ms.saturating_add(u64::from(cfg.fleet_report_ms));
        let body = serde_json::to_vec(&FleetReport {
            proxy_id: proxy_id.to_string(),
            interval_ms,
            tokens,
            quotas: vec![],
        })
        .ok()?;
        self.call.begin(now_ms);
        Some(body)
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
        assert_eq!(decode(Some(encode(77, Some(s)).as_ref())), (77, Some(s)));
        assert_eq!(decode(Some(encode(77, None).as_ref())), (77, None));
        // What the sync client writes for a new token: the TAT alone.
        assert_eq!(decode(Some(&crate::gcra::encode_tat(5)[..])), (5, None));
        assert_eq!(decode(Some(&[1, 2, 3][..])), (0, None));
        assert_eq!(decode(None), (0, None));
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
        let (tat, got) = decode(v.as_deref());
        assert_eq!(tat, 42);
        assert_eq!(
            got,
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
        let (tat, _) = decode(v.as_deref());
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
        assert_eq!(decode(v.as_deref()).1.unwrap().rate_milli, 100_000);
    }

    fn cfg() -> Config {
        Config::parse(br#"{"control_plane_cluster":"cp","sync_token":"x"}"#).unwrap()
    }

    #[test]
    fn the_reporter_reports_every_interval_even_with_nothing_to_say() {
        let c = cfg();
        let mut r = Reporter::new();
        let mut window = Tally::new(10);
        let first = r.on_tick(&c, &mut window, "envoy-1", NOW_MS).unwrap();
        let report: FleetReport = serde_json::from_slice(&first).unwrap();
        assert_eq!(report.proxy_id, "envoy-1");
        assert!(report.tokens.is_empty());
        r.sent(1);
        r.on_result(&c, true, NOW_MS + 10);
        window.count(b"tok_1", true, 1);
        window.count(b"tok_1", false, 1);
        window.count(b"tok_1", true, 1);
        assert!(r
            .on_tick(&c, &mut window, "envoy-1", NOW_MS + 500)
            .is_none());
        let next = r
            .on_tick(&c, &mut window, "envoy-1", NOW_MS + 1_000)
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
            .on_tick(&c, &mut window, "envoy-1", NOW_MS + 2_000)
            .is_none());
        r.sent(2);
        assert!(r.is_current(2));
        r.on_result(&c, false, NOW_MS + 2_000);
        assert!(r
            .on_tick(&c, &mut window, "envoy-1", NOW_MS + 2_500)
            .is_none());
        assert!(r
            .on_tick(&c, &mut window, "envoy-1", NOW_MS + 3_000)
            .is_some());
    }
}
