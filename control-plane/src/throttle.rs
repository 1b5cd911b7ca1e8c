//! Credential guessing, slowed per client address. Each address may fail `burst` credential
//! checks at once and one more every `interval` after that; beyond it, every credential it
//! presents is answered 429 with `Retry-After`, before the credential is even compared, so
//! a guess that happens to be right is not told apart either. Other addresses are not
//! affected. IPv6 clients are counted per /64, the block one host usually holds.
//!
//! Admin credentials (Bearer or console sign-in) and the sync credential have separate
//! allowances, so that someone guessing admin credentials from a host cannot stop the
//! filters on that host from syncing, and a proxy left with an old sync credential cannot
//! lock the admins out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Failures an address may make at once.
    pub burst: u32,
    /// One more failure is allowed this long after the last.
    pub interval: Duration,
}

/// Which allowance a refused credential counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pool {
    Admin,
    Sync,
}

/// Addresses tracked at once; beyond this the least throttled one is forgotten.
const CAPACITY: usize = 100_000;

pub struct Throttle {
    settings: Settings,
    /// Per address: when its failure allowance is whole again (a GCRA theoretical arrival
    /// time). An address whose time has passed is as good as absent.
    full_at: Mutex<HashMap<(IpAddr, Pool), Instant>>,
}

/// The address failures are counted under.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

/// Whole seconds to wait, at least one (what `Retry-After` carries).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

impl Throttle {
    pub fn new(settings: Settings) -> Throttle {
        Throttle {
            settings,
            full_at: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// How far ahead of `now` an allowance time may run before the address is throttled.
    fn slack(&self) -> Duration {
        self.settings.interval * self.settings.burst.saturating_sub(1)
    }

    /// Before a credential is compared: `Err(wait)` while `ip` is throttled.
    pub fn check(&self, ip: IpAddr, pool: Pool, now: Instant) -> Result<(), Duration> {
        let map = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&(key(ip), pool)) {
            Some(t) if t.saturating_duration_since(now) > self.slack() => {
                Err(t.saturating_duration_since(now) - self.slack())
            }
            _ => Ok(()),
        }
    }

    /// After a credential from `ip` was refused. `Some(wait)` when this failure used up the
    /// allowance: the address is throttled from now on, for `wait`.
    pub fn failed(&self, ip: IpAddr, pool: Pool, now: Instant) -> Option<Duration> {
        let mut map = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= CAPACITY {
            map.retain(|_, t| *t > now);
            if map.len() >= CAPACITY {
                if let Some(k) = map.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) {
                    map.remove(&k);
                }
            }
        }
        let t = map.entry((key(ip), pool)).or_insert(now);
        *t = (*t).max(now) + self.settings.interval;
        let ahead = t.saturating_duration_since(now);
        (ahead > self.slack()).then(|| ahead - self.slack())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_of_failures_then_one_per_interval() {
        let th = Throttle::new(Settings {
            burst: 3,
            interval: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..2 {
            assert_eq!(th.check(a, Pool::Admin, t0), Ok(()));
            assert_eq!(th.failed(a, Pool::Admin, t0), None);
        }
        assert_eq!(th.check(a, Pool::Admin, t0), Ok(()));
        assert_eq!(th.failed(a, Pool::Admin, t0), Some(Duration::from_secs(10)));
        assert_eq!(th.check(a, Pool::Admin, t0), Err(Duration::from_secs(10)));
        assert_eq!(
            th.check(a, Pool::Admin, t0 + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
        // Another address is not affected.
        assert_eq!(th.check(ip("192.0.2.2"), Pool::Admin, t0), Ok(()));
        // Nor is the other allowance of the same address.
        assert_eq!(th.check(a, Pool::Sync, t0), Ok(()));
        // After one interval, one more try; failing it throttles again.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(th.check(a, Pool::Admin, t1), Ok(()));
        assert_eq!(th.failed(a, Pool::Admin, t1), Some(Duration::from_secs(10)));
        // After a quiet spell the whole burst is back.
        let t2 = t1 + Duration::from_secs(30);
        assert_eq!(th.failed(a, Pool::Admin, t2), None);
        assert_eq!(th.failed(a, Pool::Admin, t2), None);
    }

    #[test]
    fn ipv6_hosts_count_per_64_and_mapped_ipv4_as_ipv4() {
        let th = Throttle::new(Settings {
            burst: 1,
            interval: Duration::from_secs(60),
        });
        let t0 = Instant::now();
        let p = Pool::Sync;
        assert!(th.failed(ip("2001:db8:1:2::1"), p, t0).is_some());
        assert!(th.check(ip("2001:db8:1:2:ffff::9"), p, t0).is_err());
        assert!(th.check(ip("2001:db8:1:3::1"), p, t0).is_ok());
        assert!(th.failed(ip("::ffff:192.0.2.7"), p, t0).is_some());
        assert!(th.check(ip("192.0.2.7"), p, t0).is_err());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(6)), 6);
        assert_eq!(retry_after_secs(Duration::from_millis(6001)), 7);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
