//! Web console sessions: an admin credential exchanged for a random session id (kept by the
//! browser in an HttpOnly cookie) and a CSRF token (kept by the page in memory).
//!
//! Sessions live in the database, so that any replica accepts them and a restart signs no
//! one out. Only `sha256(session id)` is stored, so a database dump cannot be replayed; the
//! CSRF token is derived from the session id (another hash of it, under its own label), so
//! it is not stored at all and cannot be derived from what is.

use super::DomainError;
use crate::secrets::{same_secret, sha256_hex};
use crate::store::{SessionRow, Store};
use rand::distributions::{Alphanumeric, DistString};
use rand::rngs::OsRng;
use std::sync::Arc;
use std::time::Duration;

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

fn csrf_for(id: &[u8]) -> String {
    let mut labelled = b"tokengate console csrf\0".to_vec();
    labelled.extend_from_slice(id);
    sha256_hex(&labelled)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub struct Sessions {
    store: Arc<dyn Store>,
    limits: Limits,
}

impl Sessions {
    pub fn new(store: Arc<dyn Store>, limits: Limits) -> Sessions {
        Sessions { store, limits }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// `now` in Unix milliseconds (wall clock: replicas share sessions).
    pub async fn start(&self, actor: &str, now: i64) -> Result<Issued, DomainError> {
        let id = Alphanumeric.sample_string(&mut OsRng, 43);
        let row = SessionRow {
            key: sha256_hex(id.as_bytes()),
            actor: actor.to_string(),
            started_at: now,
            last_used_at: now,
        };
        self.store.insert_session(&row, MAX_SESSIONS).await?;
        let csrf = csrf_for(id.as_bytes());
        Ok(Issued { id, csrf })
    }

    /// The live session for a cookie value, marked as used now; an ended one is removed.
    pub async fn touch(&self, id: &[u8], now: i64) -> Result<Option<Session>, DomainError> {
        let key = sha256_hex(id);
        let idle_after = now.saturating_sub(millis(self.limits.idle));
        let started_after = now.saturating_sub(millis(self.limits.absolute));
        let found = self
            .store
            .touch_session(&key, now, idle_after, started_after)
            .await?;
        Ok(found.map(|s| Session {
            actor: s.actor.into(),
            csrf: csrf_for(id),
        }))
    }

    pub async fn end(&self, id: &[u8]) -> Result<(), DomainError> {
        Ok(self.store.delete_session(&sha256_hex(id)).await?)
    }

    pub async fn count(&self) -> Result<u64, DomainError> {
        Ok(self.store.session_count().await?)
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn sessions(dir: &tempfile::TempDir) -> Sessions {
        let store = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
        Sessions::new(
            store,
            Limits {
                idle: Duration::from_secs(60),
                absolute: Duration::from_secs(300),
            },
        )
    }

    const S: i64 = 1000;

    #[tokio::test]
    async fn a_session_names_its_actor_and_checks_its_csrf_token() {
        let dir = tempfile::tempdir().unwrap();
        let s = sessions(&dir);
        let t0 = 1_000_000;
        let issued = s.start("alice", t0).await.unwrap();
        let got = s.touch(issued.id.as_bytes(), t0).await.unwrap().unwrap();
        assert_eq!(&*got.actor, "alice");
        assert!(got.csrf_matches(issued.csrf.as_bytes()));
        assert!(!got.csrf_matches(b"other"));
        assert!(!got.csrf_matches(b""));
        assert!(s.touch(b"not-a-session", t0).await.unwrap().is_none());
        assert_ne!(issued.id, issued.csrf);
        let other = s.start("alice", t0).await.unwrap();
        assert_ne!(
            other.csrf, issued.csrf,
            "each session has its own CSRF token"
        );
    }

    #[tokio::test]
    async fn sessions_end_when_idle_at_their_absolute_limit_or_on_sign_out() {
        let dir = tempfile::tempdir().unwrap();
        let s = sessions(&dir);
        let t0 = 1_000_000;
        let a = s.start("a", t0).await.unwrap();
        // Used every 50 s: stays alive past the idle limit, until the absolute one.
        let mut t = t0;
        for _ in 0..5 {
            t += 50 * S;
            assert!(
                s.touch(a.id.as_bytes(), t).await.unwrap().is_some(),
                "{}",
                t - t0
            );
        }
        assert!(s
            .touch(a.id.as_bytes(), t0 + 300 * S)
            .await
            .unwrap()
            .is_none());
        assert_eq!(s.count().await.unwrap(), 0, "an ended session is dropped");

        let b = s.start("b", t0).await.unwrap();
        assert!(s
            .touch(b.id.as_bytes(), t0 + 61 * S)
            .await
            .unwrap()
            .is_none());

        let c = s.start("c", t0).await.unwrap();
        s.end(c.id.as_bytes()).await.unwrap();
        assert!(s.touch(c.id.as_bytes(), t0).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_number_of_sessions_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
        let t0 = 1_000_000;
        let first = SessionRow {
            key: "first".into(),
            actor: "x".into(),
            started_at: t0,
            last_used_at: t0,
        };
        store.insert_session(&first, 3).await.unwrap();
        for i in 1..=3 {
            let row = SessionRow {
                key: format!("k{i}"),
                last_used_at: t0 + i,
                ..first.clone()
            };
            store.insert_session(&row, 3).await.unwrap();
        }
        assert_eq!(store.session_count().await.unwrap(), 3);
        assert!(
            store
                .touch_session("first", t0 + 10, 0, 0)
                .await
                .unwrap()
                .is_none(),
            "the least recently used went"
        );
    }
}
