//! Web console sessions: an admin credential exchanged for a random session id (kept by the
//! browser in an HttpOnly cookie) and a CSRF token (kept by the page in memory).
//!
//! Only `sha256(session id)` is held, so a memory dump or a debug print cannot be replayed.
//! Sessions live in memory: a restart signs everyone out, which is the safe direction.

use crate::secrets::{same_secret, sha256_hex};
use rand::distributions::{Alphanumeric, DistString};
use rand::rngs::OsRng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most sessions held at once; past it the least recently used one is dropped.
pub const MAX_SESSIONS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A session unused for this long ends.
    pub idle: Duration,
    /// A session ends this long after sign-in, used or not.
    pub absolute: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            idle: Duration::from_secs(30 * 60),
            absolute: Duration::from_secs(12 * 3600),
        }
    }
}

/// What a valid session stands for.
#[derive(Debug, Clone)]
pub struct Session {
    /// The admin credential's name: the audit trail's actor.
    pub actor: Arc<str>,
    pub csrf: String,
    pub started: Instant,
    pub last_used: Instant,
}

impl Session {
    pub fn csrf_matches(&self, presented: &[u8]) -> bool {
        same_secret(presented, self.csrf.as_bytes())
    }
}

/// A new session's id (for the cookie) and CSRF token (for the page).
pub struct Issued {
    pub id: String,
    pub csrf: String,
}

pub struct Sessions {
    limits: Limits,
    by_hash: Mutex<HashMap<String, Session>>,
}

fn random() -> String {
    Alphanumeric.sample_string(&mut OsRng, 43)
}

impl Sessions {
    pub fn new(limits: Limits) -> Sessions {
        Sessions {
            limits,
            by_hash: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A poisoned lock only means another request panicked mid-update of a plain map.
        self.by_hash.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn alive(&self, s: &Session, now: Instant) -> bool {
        now.saturating_duration_since(s.last_used) < self.limits.idle
            && now.saturating_duration_since(s.started) < self.limits.absolute
    }

    pub fn start(&self, actor: Arc<str>, now: Instant) -> Issued {
        let issued = Issued {
            id: random(),
            csrf: random(),
        };
        let mut map = self.map();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| self.alive(s, now));
        }
        if map.len() >= MAX_SESSIONS {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                map.remove(&k);
            }
        }
        map.insert(
            sha256_hex(issued.id.as_bytes()),
            Session {
                actor,
                csrf: issued.csrf.clone(),
                started: now,
                last_used: now,
            },
        );
        issued
    }

    /// The live session for a cookie value, marked as used now; an ended one is removed.
    pub fn touch(&self, id: &[u8], now: Instant) -> Option<Session> {
        let key = sha256_hex(id);
        let mut map = self.map();
        let s = map.get_mut(&key)?;
        if !self.alive(s, now) {
            map.remove(&key);
            return None;
        }
        s.last_used = now;
        Some(s.clone())
    }

    pub fn end(&self, id: &[u8]) {
        self.map().remove(&sha256_hex(id));
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(Limits {
            idle: Duration::from_secs(60),
            absolute: Duration::from_secs(300),
        })
    }

    #[test]
    fn a_session_names_its_actor_and_checks_its_csrf_token() {
        let s = sessions();
        let t0 = Instant::now();
        let issued = s.start("alice".into(), t0);
        let got = s.touch(issued.id.as_bytes(), t0).unwrap();
        assert_eq!(&*got.actor, "alice");
        assert!(got.csrf_matches(issued.csrf.as_bytes()));
        assert!(!got.csrf_matches(b"other"));
        assert!(!got.csrf_matches(b""));
        assert!(s.touch(b"not-a-session", t0).is_none());
        assert_ne!(issued.id, issued.csrf);
    }

    #[test]
    fn sessions_end_when_idle_at_their_absolute_limit_or_on_sign_out() {
        let s = sessions();
        let t0 = Instant::now();
        let a = s.start("a".into(), t0);
        // Used every 50 s: stays alive past the idle limit, until the absolute one.
        let mut t = t0;
        for _ in 0..5 {
            t += Duration::from_secs(50);
            assert!(s.touch(a.id.as_bytes(), t).is_some(), "{:?}", t - t0);
        }
        assert!(s
            .touch(a.id.as_bytes(), t0 + Duration::from_secs(300))
            .is_none());
        assert!(s.is_empty(), "an ended session is dropped");

        let b = s.start("b".into(), t0);
        assert!(s
            .touch(b.id.as_bytes(), t0 + Duration::from_secs(61))
            .is_none());

        let c = s.start("c".into(), t0);
        s.end(c.id.as_bytes());
        assert!(s.touch(c.id.as_bytes(), t0).is_none());
    }

    #[test]
    fn the_number_of_sessions_is_bounded() {
        let s = Sessions::new(Limits::default());
        let t0 = Instant::now();
        let first = s.start("x".into(), t0);
        for i in 0..MAX_SESSIONS {
            s.start("x".into(), t0 + Duration::from_millis(i as u64 + 1));
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(
            s.touch(first.id.as_bytes(), t0).is_none(),
            "the oldest went"
        );
    }
}
