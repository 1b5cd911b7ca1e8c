//! Per-token request counts: counted in each worker's memory, handed to the sync leader
//! through a shared queue, and reported by the leader to `POST /v1/usage` in batches. Every
//! buffer is bounded; a lost report loses its counts, never a request.

use crate::callout::{self, Backoff, Callout};
use crate::config::Config;
use std::collections::HashMap;
use tokengate_wire::{UsageEntry, UsageReport};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    allowed: u64,
    denied: u64,
    last_used_at: i64,
}

impl Counts {
    fn is_zero(&self) -> bool {
        self.allowed == 0 && self.denied == 0
    }
}

/// Counts by token id, holding at most `cap` ids; what does not fit is dropped, and the
/// requests it counted are added up in `dropped`.
///
/// A drained id keeps its (zeroed) entry for one more interval, so that counting a token that
/// is in steady use allocates nothing; an id idle for a whole interval is forgotten.
#[derive(Debug, Default)]
pub struct Tally {
    counts: HashMap<Vec<u8>, Counts>,
    cap: usize,
    dropped: u64,
    /// Ids with counts since the last drain.
    active: usize,
}

impl Tally {
    pub fn new(cap: u32) -> Tally {
        Tally {
            counts: HashMap::new(),
            cap: cap as usize,
            dropped: 0,
            active: 0,
        }
    }

    fn add(&mut self, id: &[u8], allowed: u64, denied: u64, last_used_at: i64) {
        // Looked up by slice first so that counting a known id allocates nothing.
        let c = match self.counts.get_mut(id) {
            Some(c) => c,
            None => {
                if self.counts.len() >= self.cap {
                    // Only ids with counts use the bound: idle ones make room.
                    self.counts.retain(|_, c| !c.is_zero());
                }
                if self.counts.len() >= self.cap {
                    // In requests, whether one request or a worker's whole entry is
                    // dropped, so that the stat says how much usage never reached the
                    // control plane.
                    self.dropped = self.dropped.saturating_add(allowed.saturating_add(denied));
                    return;
                }
                self.counts.entry(id.to_vec()).or_default()
            }
        };
        if c.is_zero() && allowed.saturating_add(denied) > 0 {
            self.active += 1;
        }
        c.allowed = c.allowed.saturating_add(allowed);
        c.denied = c.denied.saturating_add(denied);
        c.last_used_at = c.last_used_at.max(last_used_at);
    }

    /// One request by token `id` at Unix second `now`.
    pub fn count(&mut self, id: &[u8], allowed: bool, now: i64) {
        self.add(id, u64::from(allowed), u64::from(!allowed), now);
    }

    pub fn merge(&mut self, entries: Vec<UsageEntry>) {
        for e in entries {
            self.add(e.id.as_bytes(), e.allowed, e.denied, e.last_used_at);
        }
    }

    /// Moves every count into `into` (a worker's counts into the leader's), leaving this
    /// tally drained.
    pub fn move_into(&mut self, into: &mut Tally) {
        into.dropped = into
            .dropped
            .saturating_add(std::mem::take(&mut self.dropped));
        self.drain_with(|id, c| into.add(id, c.allowed, c.denied, c.last_used_at));
    }

    pub fn is_empty(&self) -> bool {
        self.active == 0
    }

    /// Requests whose counts were lost to the bound since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Hands every id with counts to `out` and zeroes it; forgets ids that had none.
    fn drain_with(&mut self, mut out: impl FnMut(&[u8], Counts)) {
        self.counts.retain(|id, c| {
            if c.is_zero() {
                return false;
            }
            out(id, *c);
            *c = Counts::default();
            true
        });
        self.active = 0;
    }

    /// Empties the tally into report entries.
    pub fn drain(&mut self) -> Vec<UsageEntry> {
        let mut entries = Vec::with_capacity(self.active);
        self.drain_with(|id, c| {
            entries.push(UsageEntry {
                id: String::from_utf8_lossy(id).into_owned(),
                allowed: c.allowed,
                denied: c.denied,
                last_used_at: c.last_used_at,
            })
        });
        entries
    }
}

/// The requests a batch of entries counts.
pub fn requests(entries: &[UsageEntry]) -> u64 {
    entries.iter().fold(0u64, |n, e| {
        n.saturating_add(e.allowed).saturating_add(e.denied)
    })
}

/// A worker's batch on the shared queue.
pub fn encode_batch(entries: &[UsageEntry]) -> Vec<u8> {
    serde_json::to_vec(entries).unwrap_or_default()
}

pub fn decode_batch(bytes: &[u8]) -> Option<Vec<UsageEntry>> {
    serde_json::from_slice(bytes).ok()
}

/// Where the reporter is, as its callout machine says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Sending { since_ms: u64 },
    Backoff { until_ms: u64 },
}

/// The leader's report cycle: Idle → (due, something to say) → Sending → Idle, or Backoff
/// after a failure, whose counts go back into the tally.
#[derive(Debug)]
pub struct Reporter {
    report: Callout,
    next_due_ms: u64,
    in_flight: Vec<UsageEntry>,
}

impl Default for Reporter {
    fn default() -> Self {
        Reporter::new()
    }
}

impl Reporter {
    pub fn new() -> Reporter {
        Reporter {
            report: Callout::new(),
            next_due_ms: 0,
            in_flight: vec![],
        }
    }

    pub fn phase(&self) -> Phase {
        match self.report.phase() {
            callout::Phase::Idle => Phase::Idle,
            callout::Phase::InFlight { since_ms, .. } => Phase::Sending { since_ms },
            callout::Phase::Backoff { until_ms } => Phase::Backoff { until_ms },
        }
    }

    /// The host accepted the report that began and named it `call`.
    pub fn sent(&mut self, call: u64) {
        self.report.sent(call);
    }

    /// Whether an answer to `call` answers the report in flight.
    pub fn is_current(&self, call: u64) -> bool {
        self.report.is_current(call)
    }

    /// Called on the leader's tick. Returns the body of a report to send now.
    pub fn on_tick(
        &mut self,
        cfg: &Config,
        pending: &mut Tally,
        proxy_id: &str,
        now_ms: u64,
    ) -> Option<Vec<u8>> {
        // The host answers every callout, at worst with its timeout; this only guards
        // against a lost callback.
        if self.report.overdue(now_ms, report_timeout_ms(cfg) + 5_000) {
            self.on_result(cfg, pending, false, now_ms);
            return None;
        }
        if !self.report.ready(now_ms) || now_ms < self.next_due_ms || pending.is_empty() {
            return None;
        }
        let report = UsageReport {
            proxy_id: proxy_id.to_string(),
            entries: pending.drain(),
        };
        let body = serde_json::to_vec(&report).ok()?;
        // Kept so that a failed report can put its counts back.
        self.in_flight = report.entries;
        self.report.begin(now_ms);
        Some(body)
    }

    /// The report was answered (`ok`: a 2xx) or failed.
    pub fn on_result(&mut self, cfg: &Config, pending: &mut Tally, ok: bool, now_ms: u64) {
        let entries = std::mem::take(&mut self.in_flight);
        self.next_due_ms = now_ms.saturating_add(u64::from(cfg.usage_report_ms));
        if ok {
            self.report.succeed();
            return;
        }
        pending.merge(entries);
        let interval = u64::from(cfg.usage_report_ms);
        let backoff = Backoff {
            initial_ms: interval,
            max_ms: u64::from(cfg.backoff_max_ms).max(interval),
            spread: None,
        };
        self.report.fail(&backoff, now_ms);
    }
}

/// The callout timeout for a report.
pub fn report_timeout_ms(cfg: &Config) -> u64 {
    u64::from(cfg.usage_report_ms).clamp(1_000, 10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(
            br#"{"control_plane_cluster":"cp","sync_token":"x","usage_report_ms":1000,"usage_max_tokens":2}"#,
        )
        .unwrap()
    }

    fn sorted(mut v: Vec<UsageEntry>) -> Vec<UsageEntry> {
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    fn entry(id: &str, allowed: u64, denied: u64, last_used_at: i64) -> UsageEntry {
        UsageEntry {
            id: id.into(),
            allowed,
            denied,
            last_used_at,
        }
    }

    #[test]
    fn tally_counts_merges_and_stays_bounded() {
        let mut t = Tally::new(2);
        t.count(b"tok_a", true, 10);
        t.count(b"tok_a", false, 12);
        t.count(b"tok_b", true, 11);
        t.count(b"tok_c", true, 11);
        assert_eq!(t.take_dropped(), 1);
        assert_eq!(t.take_dropped(), 0);
        t.merge(vec![entry("tok_a", 5, 0, 9), entry("tok_z", 1, 0, 9)]);
        assert_eq!(t.take_dropped(), 1);
        assert_eq!(
            sorted(t.drain()),
            [entry("tok_a", 6, 1, 12), entry("tok_b", 1, 0, 11)]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn drained_ids_stay_for_an_interval_and_leave_when_idle() {
        let mut t = Tally::new(2);
        t.count(b"tok_a", true, 10);
        t.count(b"tok_b", true, 10);
        assert_eq!(t.drain().len(), 2);
        assert!(t.is_empty());
        assert_eq!(t.counts.len(), 2, "kept, zeroed, for the next interval");
        t.count(b"tok_a", false, 11);
        assert!(!t.is_empty());
        // A new id finds the bound taken only by ids with counts: idle `tok_b` makes room.
        t.count(b"tok_c", true, 12);
        assert_eq!(t.take_dropped(), 0);
        assert_eq!(
            sorted(t.drain()),
            [entry("tok_a", 0, 1, 11), entry("tok_c", 1, 0, 12)]
        );
        assert_eq!(t.drain(), []);
        assert!(t.counts.is_empty(), "idle for a whole interval: forgotten");
    }

    #[test]
    fn a_worker_tally_moves_into_the_leaders() {
        let mut worker = Tally::new(1);
        worker.count(b"tok_a", true, 5);
        worker.count(b"tok_b", true, 5);
        let mut leader = Tally::new(10);
        leader.count(b"tok_a", false, 4);
        worker.move_into(&mut leader);
        assert!(worker.is_empty());
        assert_eq!(
            leader.take_dropped(),
            1,
            "the worker's drop travels with its counts"
        );
        assert_eq!(sorted(leader.drain()), [entry("tok_a", 1, 1, 5)]);
    }

    #[test]
    fn what_does_not_fit_is_dropped_in_requests() {
        let mut t = Tally::new(1);
        t.count(b"tok_a", true, 1);
        t.count(b"tok_b", false, 1);
        assert_eq!(t.take_dropped(), 1);
        // A worker's entry that does not fit loses every request it counted.
        t.merge(vec![entry("tok_c", 5, 2, 1), entry("tok_a", 1, 1, 2)]);
        assert_eq!(t.take_dropped(), 7);
        assert_eq!(t.drain(), [entry("tok_a", 2, 1, 2)]);
        assert_eq!(
            requests(&[entry("tok_a", 5, 2, 1), entry("tok_b", 0, 3, 1)]),
            10
        );
        assert_eq!(requests(&[entry("tok_a", u64::MAX, 1, 1)]), u64::MAX);
        assert_eq!(requests(&[]), 0);
    }

    #[test]
    fn batches_round_trip() {
        let batch = vec![entry("tok_a", 1, 2, 3)];
        assert_eq!(decode_batch(&encode_batch(&batch)), Some(batch));
        assert_eq!(decode_batch(b"garbage"), None);
    }

    #[test]
    fn reports_when_due_and_puts_counts_back_after_a_failure() {
        let c = cfg();
        let mut r = Reporter::new();
        let mut pending = Tally::new(c.usage_max_tokens);
        // Nothing to say: no report.
        assert_eq!(r.on_tick(&c, &mut pending, "p", 0), None);
        pending.count(b"tok_a", true, 100);
        let body = r.on_tick(&c, &mut pending, "p", 0).unwrap();
        let report: UsageReport = serde_json::from_slice(&body).unwrap();
        assert_eq!(report.proxy_id, "p");
        assert_eq!(report.entries, [entry("tok_a", 1, 0, 100)]);
        assert!(matches!(r.phase(), Phase::Sending { .. }));
        // While one is in flight, no second one; new counts wait.
        pending.count(b"tok_a", true, 101);
        assert_eq!(r.on_tick(&c, &mut pending, "p", 10), None);
        r.on_result(&c, &mut pending, false, 20);
        assert!(matches!(r.phase(), Phase::Backoff { until_ms: 1_020 }));
        assert_eq!(r.on_tick(&c, &mut pending, "p", 500), None);
        let body = r.on_tick(&c, &mut pending, "p", 1_020).unwrap();
        let report: UsageReport = serde_json::from_slice(&body).unwrap();
        assert_eq!(report.entries, [entry("tok_a", 2, 0, 101)]);
        r.on_result(&c, &mut pending, true, 1_030);
        assert_eq!(r.phase(), Phase::Idle);
        pending.count(b"tok_b", false, 102);
        // The next report waits for the interval.
        assert_eq!(r.on_tick(&c, &mut pending, "p", 1_500), None);
        assert!(r.on_tick(&c, &mut pending, "p", 2_030).is_some());
    }

    /// Fails `n` reports in a row from `now`; the waits the reporter chose.
    fn backoffs(c: &Config, n: usize) -> Vec<u64> {
        let mut r = Reporter::new();
        let mut pending = Tally::new(10);
        let mut now = 0;
        let mut waits = vec![];
        for _ in 0..n {
            pending.count(b"tok_a", true, 1);
            assert!(r.on_tick(c, &mut pending, "p", now).is_some(), "at {now}");
            r.on_result(c, &mut pending, false, now);
            let Phase::Backoff { until_ms } = r.phase() else {
                panic!("expected backoff, got {:?}", r.phase())
            };
            waits.push(until_ms - now);
            // Nothing before the wait is over, even once the usual interval has passed.
            assert_eq!(r.on_tick(c, &mut pending, "p", until_ms - 1), None);
            assert!(matches!(r.phase(), Phase::Backoff { .. }));
            now = until_ms;
        }
        waits
    }

    #[test]
    fn failed_reports_back_off_exponentially_to_a_cap() {
        // `usage_report_ms` 1 s doubling up to `backoff_max_ms` (10 s by default).
        assert_eq!(
            backoffs(&cfg(), 6),
            [1_000, 2_000, 4_000, 8_000, 10_000, 10_000]
        );
        // A cap below the report interval leaves the interval as the floor.
        let slow = Config::parse(
            br#"{"control_plane_cluster":"cp","sync_token":"x","usage_report_ms":20000,"backoff_max_ms":5000}"#,
        )
        .unwrap();
        assert_eq!(backoffs(&slow, 2), [20_000, 20_000]);
    }

    #[test]
    fn the_report_timeout_is_the_interval_within_one_and_ten_seconds() {
        let with = |ms: u32| {
            report_timeout_ms(
                &Config::parse(
                    format!(
                        r#"{{"control_plane_cluster":"cp","sync_token":"x","usage_report_ms":{ms}}}"#
                    )
                    .as_bytes(),
                )
                .unwrap(),
            )
        };
        assert_eq!(
            [with(100), with(5_000), with(600_000)],
            [1_000, 5_000, 10_000]
        );
    }

    #[test]
    fn a_report_is_given_up_just_after_its_timeout_and_five_seconds() {
        let c = cfg();
        let mut r = Reporter::new();
        let mut pending = Tally::new(10);
        pending.count(b"tok_a", true, 1);
        assert!(r.on_tick(&c, &mut pending, "p", 0).is_some());
        let limit = report_timeout_ms(&c) + 5_000;
        assert_eq!(r.on_tick(&c, &mut pending, "p", limit), None);
        assert_eq!(r.phase(), Phase::Sending { since_ms: 0 });
        r.on_tick(&c, &mut pending, "p", limit + 1);
        assert!(matches!(r.phase(), Phase::Backoff { .. }));
    }

    #[test]
    fn a_lost_callback_counts_as_a_failure() {
        let c = cfg();
        let mut r = Reporter::new();
        let mut pending = Tally::new(10);
        pending.count(b"tok_a", true, 1);
        assert!(r.on_tick(&c, &mut pending, "p", 0).is_some());
        assert_eq!(r.on_tick(&c, &mut pending, "p", 60_000), None);
        assert!(matches!(r.phase(), Phase::Backoff { .. }));
        assert!(!pending.is_empty());
    }
}
