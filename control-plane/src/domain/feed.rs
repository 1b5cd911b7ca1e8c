//! The change feed behind `/v1/sync`: one database read answers every poll that asks for the
//! changes after the same version, however many there are.
//!
//! When a change is published, every poll held at the previous version wakes at once. Each
//! asks the feed for "changes after `since`, as of version `seen`" (the version it woke on).
//! The first one reads; the others wait for that read and share its answer, including its
//! rendered form (the API serialises it once). A read is only shared with polls that woke on
//! a version no newer than the one its reader woke on, so no poll gets an answer older than
//! what woke it. A failed read is shared for a moment too, so that a database outage costs
//! one failing read per version, not one per poll.

use super::DomainError;
use crate::store::{Changes, Store};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// How long a failed read is handed to other polls before one tries again.
const ERROR_REUSE: Duration = Duration::from_millis(500);
/// Past this many distinct `since` values held, older entries are dropped.
const MAX_ENTRIES: usize = 1024;

/// One read's result, shared by every poll it answers.
#[derive(Debug)]
pub struct Answer {
    pub since: u64,
    pub changes: Changes,
    /// The version the answer brings its client to: its last token change's, or the last
    /// scope change's when that is newer and the answer holds every token change after
    /// `since` (a full page may not: its client must ask again from its last row).
    pub version: u64,
    /// Filled once by whoever renders the answer first (the API's JSON body).
    pub rendered: OnceLock<Arc<[u8]>>,
}

type Shared = Result<Arc<Answer>, (DomainError, Instant)>;

struct Slot {
    seen: u64,
    cell: Arc<OnceCell<Shared>>,
}

pub struct Feed {
    store: Arc<dyn Store>,
    page_size: u32,
    slots: Mutex<HashMap<u64, Slot>>,
    reads: AtomicU64,
}

impl Feed {
    pub fn new(store: Arc<dyn Store>, page_size: u32) -> Feed {
        Feed {
            store,
            page_size,
            slots: Mutex::new(HashMap::new()),
            reads: AtomicU64::new(0),
        }
    }

    /// How many reads the feed made: one per distinct (`since`, version woken on).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The changes after `since`, read after version `seen` was published.
    pub async fn changes(&self, since: u64, seen: u64) -> Result<Arc<Answer>, DomainError> {
        let cell = {
            // A poisoned lock only means a panic elsewhere mid-update of a plain map.
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let stale = |s: &Slot| {
                s.seen < seen
                    || s.cell.get().is_some_and(|r| {
                        r.as_ref().is_err_and(|(_, at)| at.elapsed() > ERROR_REUSE)
                    })
            };
            if slots.get(&since).is_none_or(stale) {
                if slots.len() >= MAX_ENTRIES {
                    let newest = slots.values().map(|s| s.seen).max().unwrap_or(seen);
                    slots.retain(|_, s| s.seen >= newest);
                }
                slots.insert(
                    since,
                    Slot {
                        seen,
                        cell: Arc::new(OnceCell::new()),
                    },
                );
            }
            slots
                .get(&since)
                .map(|s| s.cell.clone())
                .unwrap_or_default()
        };
        let shared = cell
            .get_or_init(|| async {
                self.reads.fetch_add(1, Ordering::Relaxed);
                match self.store.changes_since(since, self.page_size).await {
                    Ok(changes) => Ok(Arc::new(Answer {
                        since,
                        version: answer_version(since, &changes, self.page_size),
                        changes,
                        rendered: OnceLock::new(),
                    })),
                    Err(e) => Err((e.into(), Instant::now())),
                }
            })
            .await;
        match shared {
            Ok(answer) => Ok(answer.clone()),
            Err((e, _)) => Err(e.clone()),
        }
    }
}

fn answer_version(since: u64, changes: &Changes, page_size: u32) -> u64 {
    let last = changes.rows.last().map_or(since, |r| r.version);
    match &changes.scopes {
        Some(s) if changes.rows.len() < page_size as usize => last.max(s.version),
        _ => last,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AuditRecord, SqliteStore, Status, TokenRow};

    fn row(id: &str) -> TokenRow {
        TokenRow {
            id: id.into(),
            hash: format!("{:0>64}", id.len()),
            name: id.into(),
            kind: tokengate_wire::Kind::User,
            owner: "o".into(),
            status: Status::Active,
            max_rps: None,
            burst: None,
            limit_scope: Default::default(),
            created_at: 1,
            updated_at: 1,
            expires_at: None,
            last_used_at: None,
            version: 0,
            requests_allowed: 0,
            requests_denied: 0,
            rotated_at: None,
            retired: vec![],
            scopes: None,
            quota: None,
        }
    }

    fn audit(r: &TokenRow) -> AuditRecord {
        AuditRecord {
            at: 1,
            actor: "a".into(),
            action: "token.created",
            token_id: r.id.clone(),
            token_name: r.name.clone(),
            before: None,
            after: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn polls_woken_by_one_version_share_one_read_and_a_newer_version_reads_again() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
        let feed = Arc::new(Feed::new(store.clone(), 100));
        let r = row("tok_1");
        store.insert(r.clone(), &audit(&r)).await.unwrap();
        let polls: Vec<_> = (0..500)
            .map(|_| {
                let feed = feed.clone();
                tokio::spawn(async move { feed.changes(0, 1).await.unwrap() })
            })
            .collect();
        for p in polls {
            let a = p.await.unwrap();
            assert_eq!(a.changes.rows.len(), 1);
        }
        assert_eq!(feed.reads(), 1, "500 polls, one read");
        // A newer version is never answered from the older read.
        let r = row("tok_22");
        store.insert(r.clone(), &audit(&r)).await.unwrap();
        assert_eq!(feed.changes(0, 2).await.unwrap().changes.rows.len(), 2);
        assert_eq!(feed.reads(), 2);
        // A poll that woke on an older version may share the newer read.
        assert_eq!(feed.changes(0, 1).await.unwrap().changes.rows.len(), 2);
        assert_eq!(feed.reads(), 2);
    }
}
