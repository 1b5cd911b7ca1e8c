//! The one state machine behind every call the filter makes to the control plane (the sync
//! long-poll and the usage report): idle; in flight, with the host's call id and the time it
//! left; or backing off after a failure, with exponential delays and optional jitter.
//!
//! The host answers every callout, at worst with its timeout, so the in-flight guard only
//! protects against a lost callback: past its limit the call is abandoned, and its answer, if
//! it ever comes, no longer matches the call in flight and is ignored.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// `call` is set once the host accepted the request and named it.
    InFlight {
        since_ms: u64,
        call: Option<u64>,
    },
    Backoff {
        until_ms: u64,
    },
}

/// How long to wait after the n-th failure in a row: `initial_ms` doubled per failure, at most
/// `max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    /// Seed of a jitter that spreads a fleet's retries after an outage (each proxy its own);
    /// `None`: exact delays.
    pub spread: Option<u64>,
}

impl Backoff {
    /// The delay after `failures` failures in a row (at least one).
    pub fn delay_ms(&self, failures: u32) -> u64 {
        let exp = failures.saturating_sub(1).min(20);
        let base = self.initial_ms.saturating_mul(1u64 << exp).min(self.max_ms);
        match self.spread {
            None => base,
            Some(seed) => {
                let jitter = (seed ^ u64::from(failures).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    % (base / 4 + 1);
                base - base / 8 + jitter / 2
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    phase: Phase,
    failures: u32,
}

impl Default for Callout {
    fn default() -> Self {
        Callout::new()
    }
}

impl Callout {
    pub fn new() -> Callout {
        Callout {
            phase: Phase::Idle,
            failures: 0,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Failures in a row since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a new call may start at `now_ms`: idle, or the backoff is over (which makes the
    /// machine idle).
    pub fn ready(&mut self, now_ms: u64) -> bool {
        match self.phase {
            Phase::Idle => true,
            Phase::Backoff { until_ms } if now_ms >= until_ms => {
                self.phase = Phase::Idle;
                true
            }
            _ => false,
        }
    }

    /// True when a call has been in flight for longer than `limit_ms`: its callback was lost.
    pub fn overdue(&self, now_ms: u64, limit_ms: u64) -> bool {
        matches!(self.phase, Phase::InFlight { since_ms, .. } if now_ms.saturating_sub(since_ms) > limit_ms)
    }

    /// A call starts at `now_ms`.
    pub fn begin(&mut self, now_ms: u64) {
        self.phase = Phase::InFlight {
            since_ms: now_ms,
            call: None,
        };
    }

    /// The host accepted the call that began and named it `call`.
    pub fn sent(&mut self, call: u64) {
        if let Phase::InFlight { since_ms, .. } = self.phase {
            self.phase = Phase::InFlight {
                since_ms,
                call: Some(call),
            };
        }
    }

    /// Whether an answer to `call` is the answer to the call in flight (and not a late one to
    /// a call that was abandoned).
    pub fn is_current(&self, call: u64) -> bool {
        matches!(self.phase, Phase::InFlight { call: Some(c), .. } if c == call)
    }

    /// When the call in flight began.
    pub fn in_flight_since(&self) -> Option<u64> {
        match self.phase {
            Phase::InFlight { since_ms, .. } => Some(since_ms),
            _ => None,
        }
    }

    /// The call succeeded: the failure count starts over.
    pub fn succeed(&mut self) {
        self.failures = 0;
        self.phase = Phase::Idle;
    }

    /// The call failed (or was never sent, or was abandoned): back off.
    pub fn fail(&mut self, backoff: &Backoff, now_ms: u64) {
        self.failures = self.failures.saturating_add(1);
        self.phase = Phase::Backoff {
            until_ms: now_ms.saturating_add(backoff.delay_ms(self.failures)),
        };
    }

    /// Wait until `until_ms` before the next call, without counting a failure.
    pub fn pause_until(&mut self, until_ms: u64) {
        self.failures = 0;
        self.phase = Phase::Backoff { until_ms };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXACT: Backoff = Backoff {
        initial_ms: 100,
        max_ms: 1_000,
        spread: None,
    };

    #[test]
    fn a_call_goes_idle_in_flight_idle() {
        let mut c = Callout::new();
        assert!(c.ready(0));
        c.begin(10);
        assert!(!c.ready(20), "one call at a time");
        assert!(!c.is_current(1), "not yet named");
        c.sent(1);
        assert_eq!(
            c.phase(),
            Phase::InFlight {
                since_ms: 10,
                call: Some(1)
            }
        );
        assert!(c.is_current(1) && !c.is_current(2));
        assert_eq!(c.in_flight_since(), Some(10));
        c.succeed();
        assert_eq!(c.phase(), Phase::Idle);
        assert!(!c.is_current(1), "an answer that came already is stale");
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap() {
        let mut c = Callout::new();
        let mut delays = vec![];
        let mut now = 0;
        for _ in 0..6 {
            c.begin(now);
            c.fail(&EXACT, now);
            let Phase::Backoff { until_ms } = c.phase() else {
                panic!("expected a backoff")
            };
            assert!(!c.ready(until_ms - 1));
            assert!(c.ready(until_ms));
            delays.push(until_ms - now);
            now = until_ms;
        }
        assert_eq!(delays, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(c.failures(), 6);
        c.succeed();
        assert_eq!(c.failures(), 0);
        c.fail(&EXACT, 0);
        assert_eq!(c.phase(), Phase::Backoff { until_ms: 100 });
    }

    #[test]
    fn jitter_stays_within_a_quarter_and_differs_between_proxies() {
        let spread = |seed| Backoff {
            spread: Some(seed),
            ..EXACT
        };
        for failures in 1..30 {
            let base = EXACT.delay_ms(failures);
            for seed in [0, 1, 7, u64::MAX] {
                let d = spread(seed).delay_ms(failures);
                assert!(
                    d >= base - base / 8 && d <= base + base / 8,
                    "{d} vs {base}"
                );
            }
        }
        let distinct: std::collections::BTreeSet<u64> =
            (0..50).map(|seed| spread(seed).delay_ms(5)).collect();
        assert!(distinct.len() > 10, "{distinct:?}");
    }

    #[test]
    fn a_lost_callback_is_overdue_and_its_late_answer_stale() {
        let mut c = Callout::new();
        c.begin(0);
        c.sent(9);
        assert!(!c.overdue(1_000, 1_000));
        assert!(c.overdue(1_001, 1_000));
        c.fail(&EXACT, 1_001);
        assert!(!c.is_current(9));
        assert!(!c.overdue(100_000, 1_000), "nothing in flight");
    }

    #[test]
    fn pausing_is_not_a_failure() {
        let mut c = Callout::new();
        c.begin(0);
        c.fail(&EXACT, 0);
        c.pause_until(500);
        assert_eq!(
            (c.phase(), c.failures()),
            (Phase::Backoff { until_ms: 500 }, 0)
        );
        assert!(!c.ready(499) && c.ready(500));
    }
}
