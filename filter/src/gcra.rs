//! GCRA (generic cell rate algorithm): one number per token, the theoretical arrival time
//! (TAT), so the state fits one small shared-data value updated with compare-and-swap.
//! A denied request leaves the TAT untouched: refusals consume nothing.

const NANOS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub rate_per_sec: u32,
    /// Requests that may arrive at once after an idle period; at least 1.
    pub burst: u32,
}

impl Limit {
    /// `burst == 0` means the default: one second's worth.
    pub fn new(rate_per_sec: u32, burst: u32) -> Option<Limit> {
        if rate_per_sec == 0 {
            return None;
        }
        let burst = if burst == 0 { rate_per_sec } else { burst };
        Some(Limit {
            rate_per_sec,
            burst,
        })
    }

    /// The bucket that enforces this limit whole.
    pub fn pace(self) -> Pace {
        Pace::of(u64::from(self.rate_per_sec) * 1_000, self.burst)
    }
}

/// The bucket a proxy runs: requests spaced `interval` apart, `tolerance` ahead of now at
/// most. A whole limit, or a proxy's share of a fleet limit (fractions of a request per
/// second included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    interval: u64,
    tolerance: u64,
}

impl Pace {
    /// How far ahead of now the TAT may be for a request to pass.
    pub fn tolerance(self) -> u64 {
        self.tolerance
    }

    /// `rate_milli` thousandths of a request per second (at least 1), `burst` requests at
    /// once (at least 1).
    pub fn of(rate_milli: u64, burst: u32) -> Pace {
        // Rounded up: rounding down would admit a little more than the rate, up to twice it
        // for rates near the nanosecond resolution.
        let interval = (NANOS_PER_SEC * 1_000).div_ceil(rate_milli.max(1)).max(1);
        Pace {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst.max(1))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Store `new_tat`; `remaining` more requests would be admitted right now.
    Allow { new_tat: u64, remaining: u32 },
    /// Store nothing; the next request can pass in `retry_after_nanos`.
    Deny { retry_after_nanos: u64 },
}

/// Decides one request arriving at `now` (nanoseconds) against the stored `tat`.
pub fn decide(limit: Limit, tat: u64, now: u64) -> Decision {
    decide_paced(limit.pace(), tat, now)
}

/// [`decide`] for a bucket of any pace.
pub fn decide_paced(pace: Pace, tat: u64, now: u64) -> Decision {
    let t = pace.interval;
    let tau = pace.tolerance;
    // A clock that went backwards is treated as "no time passed", never as credit.
    let new_tat = tat.max(now).saturating_add(t);
    let ahead = new_tat - now;
    if ahead <= tau {
        let remaining = ((tau - ahead) / t).min(u64::from(u32::MAX)) as u32;
        Decision::Allow { new_tat, remaining }
    } else {
        Decision::Deny {
            retry_after_nanos: ahead - tau,
        }
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
pub fn retry_after_secs(nanos: u64) -> u64 {
    nanos.div_ceil(NANOS_PER_SEC).max(1)
}

pub fn encode_tat(tat: u64) -> [u8; 8] {
    tat.to_le_bytes()
}

/// A missing or malformed value reads as "idle" (TAT 0): the bucket starts full.
pub fn decode_tat(buf: Option<&[u8]>) -> u64 {
    buf.and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_SEC;
    const T0: u64 = 1_700_000_000 * S;

    /// Runs `n` requests at `now`, storing only what is allowed; returns the admitted count.
    fn burst(limit: Limit, tat: &mut u64, now: u64, n: u32) -> u32 {
        let mut admitted = 0;
        for _ in 0..n {
            if let Decision::Allow { new_tat, .. } = decide(limit, *tat, now) {
                *tat = new_tat;
                admitted += 1;
            }
        }
        admitted
    }

    #[test]
    fn default_burst_is_one_seconds_worth() {
        let l = Limit::new(5, 0).unwrap();
        assert_eq!(l.burst, 5);
        let mut tat = 0;
        assert_eq!(burst(l, &mut tat, T0, 20), 5);
    }

    #[test]
    fn explicit_burst_admits_that_many_at_once() {
        let l = Limit::new(10, 3).unwrap();
        let mut tat = 0;
        assert_eq!(burst(l, &mut tat, T0, 10), 3);
    }

    #[test]
    fn zero_rate_is_unlimited_not_a_limit() {
        assert_eq!(Limit::new(0, 5), None);
    }

    #[test]
    fn denied_requests_consume_nothing() {
        let l = Limit::new(2, 1).unwrap();
        let mut tat = 0;
        assert_eq!(burst(l, &mut tat, T0, 1), 1);
        let before = tat;
        // Hammering while denied must not push the next admission further out.
        assert_eq!(burst(l, &mut tat, T0 + S / 4, 1000), 0);
        assert_eq!(tat, before);
        assert_eq!(burst(l, &mut tat, T0 + S / 2, 1), 1);
    }

    #[test]
    fn sustained_rate_matches_the_limit() {
        let l = Limit::new(100, 0).unwrap();
        let mut tat = 0;
        let mut admitted = 0;
        // 10 seconds of a request every millisecond: burst of 100 plus 100/s thereafter.
        for ms in 0..10_000u64 {
            admitted += burst(l, &mut tat, T0 + ms * 1_000_000, 1);
        }
        assert!((1_090..=1_101).contains(&admitted), "{admitted}");
    }

    #[test]
    fn retry_after_points_at_the_next_admission() {
        let l = Limit::new(1, 1).unwrap();
        let mut tat = 0;
        assert_eq!(burst(l, &mut tat, T0, 1), 1);
        match decide(l, tat, T0 + S / 10) {
            Decision::Deny { retry_after_nanos } => {
                assert_eq!(retry_after_nanos, S - S / 10);
                assert_eq!(retry_after_secs(retry_after_nanos), 1);
            }
            d => panic!("expected deny, got {d:?}"),
        }
        assert!(matches!(decide(l, tat, T0 + S), Decision::Allow { .. }));
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(S + 1), 2);
    }

    #[test]
    fn remaining_counts_down() {
        let l = Limit::new(10, 3).unwrap();
        let mut tat = 0;
        let mut seen = vec![];
        for _ in 0..3 {
            if let Decision::Allow { new_tat, remaining } = decide(l, tat, T0) {
                tat = new_tat;
                seen.push(remaining);
            }
        }
        assert_eq!(seen, vec![2, 1, 0]);
    }

    #[test]
    fn clock_edges_neither_crash_nor_grant_credit() {
        let l = Limit::new(10, 1).unwrap();
        // Clock moved backwards after an admission: still denied until the TAT is reached.
        let mut tat = 0;
        assert_eq!(burst(l, &mut tat, T0, 1), 1);
        assert_eq!(burst(l, &mut tat, T0 - 5 * S, 1), 0);
        // Time zero and the far end of u64 do not overflow.
        assert!(matches!(decide(l, 0, 0), Decision::Allow { .. }));
        let _ = decide(l, u64::MAX, u64::MAX);
        let _ = decide(l, u64::MAX, 0);
        // Huge limits keep a non-zero interval.
        let fast = Limit::new(u32::MAX, 0).unwrap();
        assert!(matches!(decide(fast, 0, T0), Decision::Allow { .. }));
    }

    #[test]
    fn rates_that_do_not_divide_a_second_are_not_exceeded() {
        // Found by the property tests: 372440/s has an interval of 2684.99 ns, and rounding
        // it down to 2684 let two requests through 2684 ns apart with a burst of 1.
        let l = Limit::new(372_440, 1).unwrap();
        let mut tat = 0;
        assert_eq!(burst(l, &mut tat, T0, 1), 1);
        assert_eq!(burst(l, &mut tat, T0 + 2_684, 1), 0);
        assert_eq!(burst(l, &mut tat, T0 + 2_685, 1), 1);
        // Near the resolution: 600M/s must not become 1G/s.
        let fast = Limit::new(600_000_000, 1).unwrap();
        let mut tat = 0;
        let admitted: u32 = (0..100).map(|ns| burst(fast, &mut tat, T0 + ns, 1)).sum();
        assert!(admitted <= 61, "{admitted}");
    }

    #[test]
    fn a_fractional_pace_spaces_requests_by_its_rate() {
        // A third of a request per second, burst 1: one admission every three seconds.
        let p = Pace::of(333, 1);
        let mut tat = 0;
        let mut admitted = 0;
        for ms in (0..30_000u64).step_by(10) {
            if let Decision::Allow { new_tat, .. } = decide_paced(p, tat, T0 + ms * 1_000_000) {
                tat = new_tat;
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10);
        assert_eq!(Limit::new(7, 3).unwrap().pace(), Pace::of(7_000, 3));
        // A zero rate or burst is read as the least there is, never as unlimited.
        assert_eq!(Pace::of(0, 0), Pace::of(1, 1));
    }

    #[test]
    fn tat_encoding_round_trips_and_defaults_to_idle() {
        assert_eq!(decode_tat(Some(&encode_tat(123)[..])), 123);
        assert_eq!(decode_tat(None), 0);
        assert_eq!(decode_tat(Some(&[1, 2, 3][..])), 0);
    }
}
