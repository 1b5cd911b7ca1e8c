//! The store contract: every test here runs against both backends (SQLite in a temporary
//! file, PostgreSQL in a throwaway cluster of the real server), so that the two cannot
//! drift apart. The `fleet` tests are what only a backend for several replicas does.

use super::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokengate_wire::{Kind, LimitScope, UsageEntry};

type Opener = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn Store>> + Send>> + Send>;

/// A store under test, and how to open it again on the same data.
pub struct Fixture {
    store: Option<Arc<dyn Store>>,
    open: Opener,
    /// Whether the backend supports several processes on one database.
    replicas: bool,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    pub async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let open: Opener = Box::new(move || {
            let path = path.clone();
            Box::pin(async move { Arc::new(SqliteStore::open(&path).unwrap()) as Arc<dyn Store> })
        });
        Fixture {
            store: Some(open().await),
            open,
            replicas: false,
            _dir: Some(dir),
        }
    }

    pub async fn postgres() -> Fixture {
        let url = tokio::task::spawn_blocking(|| tokengate_pgtest::shared().fresh_database())
            .await
            .unwrap();
        let open: Opener = Box::new(move || {
            let url = url.clone();
            Box::pin(async move {
                Arc::new(
                    PostgresStore::open(&url, PgSettings::default())
                        .await
                        .unwrap(),
                ) as Arc<dyn Store>
            })
        });
        Fixture {
            store: Some(open().await),
            open,
            replicas: true,
            _dir: None,
        }
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_deref().unwrap()
    }

    /// A replica's handle on the same data: its own for a backend that supports replicas,
    /// else the one process's store.
    pub async fn replica(&self) -> Arc<dyn Store> {
        if self.replicas {
            (self.open)().await
        } else {
            self.store.clone().unwrap()
        }
    }

    /// Closes the store and opens it again, as a restart would.
    pub async fn reopen(&mut self) {
        if let Some(s) = self.store.take() {
            s.close().await;
        }
        self.store = Some((self.open)().await);
    }
}

fn row(id: &str) -> TokenRow {
    TokenRow {
        id: id.into(),
        hash: format!("{:0>64}", id.trim_start_matches("tok_")),
        name: format!("name-{id}"),
        kind: Kind::User,
        owner: "alice".into(),
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

fn entry(action: &'static str, r: &TokenRow) -> AuditRecord {
    AuditRecord {
        at: 2,
        actor: "admin".into(),
        action,
        token_id: r.id.clone(),
        token_name: r.name.clone(),
        before: Some(json!({"x": 1})),
        after: Some(json!({"x": 2})),
    }
}

async fn insert(s: &dyn Store, r: TokenRow) -> TokenRow {
    let e = entry("token.created", &r);
    s.insert(r, &e).await.unwrap()
}

/// Sets the status on the stored token, as the domain would.
async fn set_status(s: &dyn Store, id: &str, to: Status) -> Result<TokenRow, StoreError> {
    let before = s.token(id).await?.ok_or(StoreError::NotFound)?;
    let mut after = before.clone();
    after.status = to;
    after.updated_at = 2;
    let e = entry("token.updated", &after);
    s.replace(after, before.version, &e, false).await
}

async fn ids(s: &dyn Store, q: ListQuery) -> Vec<String> {
    s.list(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect()
}

async fn every_change_takes_the_next_version_and_signals_it(f: &mut Fixture) {
    let s = f.store();
    let rx = s.subscribe();
    assert_eq!(s.version().await.unwrap(), 0);
    assert_eq!(insert(s, row("tok_1")).await.version, 1);
    assert_eq!(insert(s, row("tok_2")).await.version, 2);
    assert_eq!(
        set_status(s, "tok_1", Status::Suspended)
            .await
            .unwrap()
            .version,
        3
    );
    assert_eq!(s.version().await.unwrap(), 3);
    assert_eq!(*rx.borrow(), 3);
    let changes = s.changes_since(1, 10).await.unwrap();
    let ids: Vec<_> = changes.rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["tok_2", "tok_1"]);
    assert_eq!((changes.horizon, changes.live), (0, 2));
    assert!(s.changes_since(3, 10).await.unwrap().rows.is_empty());
}

async fn a_replace_needs_the_version_it_read_and_keeps_usage(f: &mut Fixture) {
    let s = f.store();
    let created = insert(s, row("tok_1")).await;
    s.record_usage(
        100,
        &[UsageEntry {
            id: "tok_1".into(),
            allowed: 5,
            denied: 1,
            last_used_at: 90,
        }],
    )
    .await
    .unwrap();
    let mut edited = created.clone();
    edited.name = "renamed".into();
    let e = entry("token.updated", &edited);
    let written = s
        .replace(edited.clone(), created.version, &e, false)
        .await
        .unwrap();
    assert_eq!(written.version, 2);
    assert_eq!(
        (written.requests_allowed, written.last_used_at),
        (5, Some(90)),
        "usage is kept"
    );
    // Another writer read version 1 too: its change must be decided again.
    assert_eq!(
        s.replace(edited.clone(), created.version, &e, false).await,
        Err(StoreError::Stale)
    );
    let mut ghost = row("tok_9");
    ghost.version = 1;
    assert_eq!(
        s.replace(ghost, 1, &e, false).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        s.version().await.unwrap(),
        2,
        "refused writes take no version"
    );
    let stored = s.token("tok_1").await.unwrap().unwrap();
    assert_eq!((stored.name.as_str(), stored.version), ("renamed", 2));
    assert_eq!(s.changes_since(0, 10).await.unwrap().horizon, 0);
    // A change that drops a secret raises the horizon to the version it replaces.
    let mut rotated = stored.clone();
    rotated.hash = format!("{:0>64}", "f");
    s.replace(rotated, 2, &e, true).await.unwrap();
    assert_eq!(s.changes_since(0, 10).await.unwrap().horizon, 2);
}

async fn revoked_rows_are_tombstones_for_sync_but_gone_from_lists(f: &mut Fixture) {
    let s = f.store();
    insert(s, row("tok_1")).await;
    insert(s, row("tok_2")).await;
    set_status(s, "tok_1", Status::Revoked).await.unwrap();
    assert_eq!(
        s.token("tok_1").await.unwrap().unwrap().status,
        Status::Revoked
    );
    assert_eq!(
        ids(
            s,
            ListQuery {
                limit: 10,
                ..Default::default()
            }
        )
        .await,
        ["tok_2"]
    );
    let changes = s.changes_since(2, 10).await.unwrap();
    assert_eq!(
        (changes.rows[0].id.as_str(), changes.rows[0].status),
        ("tok_1", Status::Revoked)
    );
    assert_eq!(changes.live, 1);
    let page = s.snapshot_page(None, 10).await.unwrap();
    assert_eq!((page.rows.len(), page.live), (2, 1));
}

async fn list_filters_and_pages_by_id(f: &mut Fixture) {
    let s = f.store();
    for i in 1..=5 {
        let mut r = row(&format!("tok_{i}"));
        if i % 2 == 0 {
            r.kind = Kind::Service;
            r.owner = "team".into();
        }
        if i == 5 {
            r.expires_at = Some(500);
        }
        insert(s, r).await;
    }
    set_status(s, "tok_3", Status::Suspended).await.unwrap();
    let q = |f: fn(&mut ListQuery)| {
        let mut q = ListQuery {
            limit: 9,
            ..Default::default()
        };
        f(&mut q);
        q
    };
    assert_eq!(ids(s, q(|q| q.limit = 2)).await, ["tok_1", "tok_2"]);
    assert_eq!(
        ids(
            s,
            q(|q| {
                q.limit = 2;
                q.after = Some("tok_2".into());
            })
        )
        .await,
        ["tok_3", "tok_4"]
    );
    assert_eq!(
        ids(s, q(|q| q.kind = Some(Kind::Service))).await,
        ["tok_2", "tok_4"]
    );
    assert_eq!(
        ids(s, q(|q| q.owner = Some("team".into()))).await,
        ["tok_2", "tok_4"]
    );
    assert_eq!(
        ids(s, q(|q| q.status = Some(Status::Suspended))).await,
        ["tok_3"]
    );
    assert_eq!(
        ids(s, q(|q| q.name_contains = Some("NAME-TOK_5".into()))).await,
        ["tok_5"]
    );
    assert_eq!(
        ids(s, q(|q| q.expiring = Some((100, 500)))).await,
        ["tok_5"]
    );
    assert!(ids(s, q(|q| q.expiring = Some((500, 900))))
        .await
        .is_empty());
    assert_eq!(
        ids(
            s,
            q(|q| {
                q.limit = 2;
                q.newest_first = true;
                q.before = Some("tok_4".into());
            })
        )
        .await,
        ["tok_3", "tok_2"],
        "in creation order, newest first"
    );
    assert!(
        ids(s, q(|q| q.name_contains = Some("%".into())))
            .await
            .is_empty(),
        "no pattern characters"
    );
}

async fn snapshot_pages_cover_every_row_once(f: &mut Fixture) {
    let s = f.store();
    for i in 1..=7 {
        insert(s, row(&format!("tok_{i}"))).await;
    }
    let mut seen = vec![];
    let mut after: Option<String> = None;
    loop {
        let page = s.snapshot_page(after.as_deref(), 3).await.unwrap();
        assert_eq!(page.live, 7);
        let Some(last) = page.rows.last() else { break };
        after = Some(last.id.clone());
        seen.extend(page.rows.into_iter().map(|r| r.id));
    }
    assert_eq!(seen.len(), 7);
}

async fn state_survives_reopening(f: &mut Fixture) {
    let store_id = f.store().store_id().to_string();
    insert(f.store(), row("tok_1")).await;
    f.reopen().await;
    let s = f.store();
    assert_eq!(s.store_id(), store_id);
    assert_eq!(s.version().await.unwrap(), 1);
    assert_eq!(*s.subscribe().borrow(), 1);
    assert_eq!(s.token("tok_1").await.unwrap().unwrap().name, "name-tok_1");
}

async fn a_taken_id_or_hash_is_a_conflict(f: &mut Fixture) {
    let s = f.store();
    insert(s, row("tok_1")).await;
    let mut dup = row("tok_2");
    dup.hash = row("tok_1").hash;
    let e = entry("token.created", &dup);
    assert!(matches!(
        s.insert(dup, &e).await,
        Err(StoreError::Conflict(_))
    ));
    let mut same_id = row("tok_1");
    same_id.hash = row("tok_3").hash;
    assert!(matches!(
        s.insert(same_id, &e).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.version().await.unwrap(), 1);
    assert_eq!(
        s.audit(&AuditQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .len(),
        1,
        "a refused write leaves no audit entry"
    );
}

async fn audit_entries_are_kept_newest_first_and_filtered(f: &mut Fixture) {
    let s = f.store();
    insert(s, row("tok_1")).await;
    set_status(s, "tok_1", Status::Suspended).await.unwrap();
    let all = s
        .audit(&AuditQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    let (newest, created) = (&all[0], &all[1]);
    assert!(newest.seq > created.seq);
    assert_eq!(
        (newest.action.as_str(), created.action.as_str()),
        ("token.updated", "token.created")
    );
    assert_eq!(newest.before, Some(json!({"x": 1})));
    assert_eq!(newest.after, Some(json!({"x": 2})));
    assert!(s
        .audit(&AuditQuery {
            actor: Some("nobody".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty());
    let paged = s
        .audit(&AuditQuery {
            before_seq: Some(newest.seq),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(paged, vec![created.clone()]);
    let by_action = s
        .audit(&AuditQuery {
            action: Some("token.created".into()),
            token_id: Some("tok_1".into()),
            since: Some(2),
            until: Some(3),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_action, vec![created.clone()]);
}

async fn usage_adds_up_without_a_new_version(f: &mut Fixture) {
    let s = f.store();
    insert(s, row("tok_1")).await;
    let entry = |allowed, last_used_at| UsageEntry {
        id: "tok_1".into(),
        allowed,
        denied: 1,
        last_used_at,
    };
    let unknown = UsageEntry {
        id: "tok_x".into(),
        ..entry(1, 1)
    };
    assert_eq!(
        s.record_usage(100, &[entry(3, 50), unknown]).await.unwrap(),
        1
    );
    // An older report never moves last use back; a future one is capped at now.
    s.record_usage(100, &[entry(2, 40)]).await.unwrap();
    let r = s.token("tok_1").await.unwrap().unwrap();
    assert_eq!((r.requests_allowed, r.requests_denied), (5, 2));
    assert_eq!(r.last_used_at, Some(50));
    s.record_usage(100, &[entry(0, 500)]).await.unwrap();
    assert_eq!(
        s.token("tok_1").await.unwrap().unwrap().last_used_at,
        Some(100)
    );
    // Counters saturate rather than overflow; one report may name a token twice.
    s.record_usage(100, &[entry(u64::MAX, 1), entry(u64::MAX, 1)])
        .await
        .unwrap();
    let r = s.token("tok_1").await.unwrap().unwrap();
    assert_eq!(r.requests_allowed, i64::MAX as u64);
    assert_eq!(r.requests_denied, 5);
    assert_eq!(s.version().await.unwrap(), 1);
}

async fn purge_deletes_unchanged_rows_and_raises_the_horizon(f: &mut Fixture) {
    let s = f.store();
    let mut expired = row("tok_1");
    expired.expires_at = Some(10);
    insert(s, expired).await;
    insert(s, row("tok_2")).await;
    insert(s, row("tok_3")).await;
    set_status(s, "tok_2", Status::Revoked).await.unwrap(); // updated_at 2, version 4
    let mut fresh = row("tok_4");
    fresh.expires_at = Some(1_000);
    insert(s, fresh).await;
    assert!(s.purgeable(1, 10).await.unwrap().is_empty());
    let due = s.purgeable(20, 10).await.unwrap();
    let due_ids: Vec<_> = due.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(due_ids, ["tok_1", "tok_2"]);
    let audit = |r: &TokenRow| AuditRecord {
        action: "token.purged",
        after: None,
        ..entry("token.purged", r)
    };
    assert!(s.purge(&due[1], &audit(&due[1])).await.unwrap());
    // A row that changed since it was read is not purged.
    let mut moved = due[0].clone();
    moved.version += 100;
    assert!(!s.purge(&moved, &audit(&moved)).await.unwrap());
    assert!(s.purge(&due[0], &audit(&due[0])).await.unwrap());
    assert!(!s.purge(&due[0], &audit(&due[0])).await.unwrap(), "gone");
    let changes = s.changes_since(0, 10).await.unwrap();
    assert_eq!(changes.horizon, 4);
    let left: Vec<_> = changes.rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(left, ["tok_3", "tok_4"]);
    let purges = s
        .audit(&AuditQuery {
            action: Some("token.purged".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(purges.len(), 2);
}

async fn a_warning_is_recorded_once_with_its_event(f: &mut Fixture) {
    let s = f.store();
    let mut near = row("tok_1");
    near.expires_at = Some(3_600);
    insert(s, near).await;
    let mut far = row("tok_2");
    far.expires_at = Some(90_000);
    insert(s, far).await;
    let listed = s.expiring(0, 86_400).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].token.id.as_str(), listed[0].warned_lead),
        ("tok_1", None)
    );
    let w = |lead| WarningRecord {
        token_id: "tok_1".into(),
        expires_at: 3_600,
        lead,
        at: 5,
    };
    let event = Event {
        id: "evt_1".into(),
        kind: "token.expiring".into(),
        payload: "{}".into(),
        at: 5,
    };
    let e = entry("token.expiry_warning", &listed[0].token);
    assert!(s
        .record_warning(&w(86_400), &e, Some(&event))
        .await
        .unwrap());
    assert!(
        !s.record_warning(&w(86_400), &e, Some(&event))
            .await
            .unwrap(),
        "recorded once"
    );
    assert!(s.record_warning(&w(3_600), &e, None).await.unwrap());
    assert_eq!(
        s.expiring(0, 86_400).await.unwrap()[0].warned_lead,
        Some(3_600),
        "the tightest lead issued"
    );
    let trail = s
        .audit(&AuditQuery {
            action: Some("token.expiry_warning".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(trail.len(), 2);
    let due = s.claim_deliveries(5, 100, 10).await.unwrap();
    assert_eq!(due.len(), 1, "only the warning with an event is queued");
    assert_eq!((due[0].event_id.as_str(), due[0].attempts), ("evt_1", 0));
}

async fn deliveries_are_leased_retried_and_finished(f: &mut Fixture) {
    let s = f.store();
    let t = insert(s, row("tok_1")).await;
    let e = entry("token.expiry_warning", &t);
    for (i, lead) in [(1, 10), (2, 20)] {
        let w = WarningRecord {
            token_id: "tok_1".into(),
            expires_at: 100,
            lead,
            at: 50,
        };
        let ev = Event {
            id: format!("evt_{i}"),
            kind: "token.expiring".into(),
            payload: "{}".into(),
            at: 50,
        };
        assert!(s.record_warning(&w, &e, Some(&ev)).await.unwrap());
    }
    let due = s.claim_deliveries(50, 80, 1).await.unwrap();
    assert_eq!(due.len(), 1);
    // Leased: another round before the lease ends gets only the other one.
    let other = s.claim_deliveries(50, 80, 10).await.unwrap();
    assert_eq!(other.len(), 1);
    assert_ne!(other[0].id, due[0].id);
    assert!(s.claim_deliveries(79, 90, 10).await.unwrap().is_empty());
    s.delivery_result(
        due[0].id,
        &DeliveryOutcome::Retry {
            next_attempt_at: 60,
            error: "HTTP 500".into(),
        },
    )
    .await
    .unwrap();
    s.delivery_result(other[0].id, &DeliveryOutcome::Delivered { at: 51 })
        .await
        .unwrap();
    assert!(s.claim_deliveries(59, 90, 10).await.unwrap().is_empty());
    let again = s.claim_deliveries(60, 90, 10).await.unwrap();
    assert_eq!((again.len(), again[0].attempts), (1, 1));
    s.delivery_result(again[0].id, &DeliveryOutcome::GaveUp { error: "x".into() })
        .await
        .unwrap();
    assert!(s
        .claim_deliveries(i64::MAX, i64::MAX, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.prune_outbox(100).await.unwrap(), 2);
}

async fn a_period_is_claimed_by_one_replica(f: &mut Fixture) {
    let s = f.store();
    assert!(s.claim_period("jobs", 100, 10).await.unwrap());
    assert!(!s.claim_period("jobs", 105, 10).await.unwrap());
    assert!(s.claim_period("purge", 105, 3600).await.unwrap(), "per job");
    assert!(s.claim_period("jobs", 110, 10).await.unwrap());
    // Replicas claiming the same period at once: one wins.
    let replicas = [f.replica().await, f.replica().await, f.replica().await];
    let claims: Vec<_> = replicas
        .iter()
        .map(|r| {
            let r = r.clone();
            tokio::spawn(async move { r.claim_period("jobs", 120, 10).await.unwrap() })
        })
        .collect();
    let mut won = 0;
    for c in claims {
        won += usize::from(c.await.unwrap());
    }
    assert_eq!(won, 1);
    assert_eq!(f.store().period_runs("jobs").await.unwrap(), 3);
    assert_eq!(f.store().period_runs("never").await.unwrap(), 0);
}

async fn sessions_are_touched_ended_and_bounded(f: &mut Fixture) {
    let s = f.store();
    let session = |key: &str, t| SessionRow {
        key: key.into(),
        actor: "alice".into(),
        started_at: t,
        last_used_at: t,
    };
    s.insert_session(&session("a", 1_000), 2).await.unwrap();
    let got = s.touch_session("a", 1_500, 900, 0).await.unwrap().unwrap();
    assert_eq!((got.actor.as_str(), got.last_used_at), ("alice", 1_500));
    // Idle since 1500: ended and removed.
    assert!(s
        .touch_session("a", 3_000, 1_500, 0)
        .await
        .unwrap()
        .is_none());
    assert_eq!(s.session_count().await.unwrap(), 0);
    s.insert_session(&session("b", 2_000), 2).await.unwrap();
    assert!(
        s.touch_session("b", 2_100, 0, 2_000)
            .await
            .unwrap()
            .is_none(),
        "past its absolute limit"
    );
    for (i, key) in ["c", "d", "e"].iter().enumerate() {
        s.insert_session(&session(key, 3_000 + i as i64), 2)
            .await
            .unwrap();
    }
    assert_eq!(s.session_count().await.unwrap(), 2);
    assert!(
        s.touch_session("c", 4_000, 0, 0).await.unwrap().is_none(),
        "the least recently used went"
    );
    s.delete_session("d").await.unwrap();
    assert!(s.touch_session("d", 4_000, 0, 0).await.unwrap().is_none());
    assert!(s.touch_session("e", 4_000, 0, 0).await.unwrap().is_some());
}

/// Writers on two replicas and a poller that reads "changes after the last version I saw",
/// as a filter does: the poller never sees a version go backwards and ends with exactly the
/// database's state. A version taken from a non-transactional counter would let it skip a
/// change committed late under a smaller version.
async fn no_poller_misses_a_change_made_through_any_replica(f: &mut Fixture) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let replicas = [f.replica().await, f.replica().await];
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let store = f.replica().await;
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen: BTreeMap<String, (u64, Status)> = BTreeMap::new();
            let mut since = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                loop {
                    let batch = store.changes_since(since, 50).await.unwrap().rows;
                    let Some(last) = batch.last() else { break };
                    assert!(last.version > since, "a version went backwards");
                    for r in &batch {
                        assert!(r.version > since);
                        seen.insert(r.id.clone(), (r.version, r.status));
                    }
                    since = last.version;
                }
                if finished {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = replicas[w % 2].clone();
            tokio::spawn(async move {
                for i in 0..40 {
                    let id = format!("tok_{w}x{i:02}");
                    let mut r = row(&id);
                    r.hash = format!("{w:0>32}{i:0>32}");
                    insert(store.as_ref(), r).await;
                    if i % 3 == 0 {
                        set_status(store.as_ref(), &id, Status::Suspended)
                            .await
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let seen = poller.await.unwrap();
    let mut truth = BTreeMap::new();
    let mut after = None::<String>;
    loop {
        let page = f
            .store()
            .snapshot_page(after.as_deref(), 100)
            .await
            .unwrap();
        let Some(last) = page.rows.last() else { break };
        after = Some(last.id.clone());
        for r in page.rows {
            truth.insert(r.id, (r.version, r.status));
        }
    }
    assert_eq!(truth.len(), 160);
    let missed: Vec<_> = truth
        .iter()
        .filter(|(id, v)| seen.get(*id) != Some(v))
        .collect();
    assert!(
        missed.is_empty(),
        "the poller missed {} changes: {missed:?}",
        missed.len()
    );
    assert_eq!(f.store().version().await.unwrap(), 160 + 4 * 14);
}

fn scope_row(name: &str) -> ScopeRow {
    ScopeRow {
        name: name.into(),
        description: format!("about {name}"),
        rules: vec![tokengate_wire::Rule {
            methods: Some(vec!["GET".into()]),
            path: format!("/{}/**", name.replace(':', "-")),
        }],
        created_at: 1,
        updated_at: 1,
        version: 0,
    }
}

fn scope_entry(action: &'static str, name: &str) -> AuditRecord {
    AuditRecord {
        at: 2,
        actor: "admin".into(),
        action,
        token_id: String::new(),
        token_name: name.into(),
        before: None,
        after: Some(json!({"x": 1})),
    }
}

async fn insert_scope(s: &dyn Store, r: ScopeRow) -> ScopeRow {
    let e = scope_entry("scope.created", &r.name);
    s.insert_scope(r, &e).await.unwrap()
}

fn scoped(id: &str, scopes: &[&str]) -> TokenRow {
    let mut r = row(id);
    r.scopes = Some(scopes.iter().map(|s| s.to_string()).collect());
    r
}

/// Scope changes take versions from the tokens' sequence and signal them; the last scope
/// change's version (deletions included) tells a change read whether to carry the set.
async fn scopes_share_the_version_sequence_and_ride_with_changes(f: &mut Fixture) {
    let s = f.store();
    let rx = s.subscribe();
    assert_eq!(s.scopes().await.unwrap(), ScopeSet::default());
    let a = insert_scope(s, scope_row("a")).await;
    assert_eq!(a.version, 1);
    assert_eq!(*rx.borrow(), 1);
    assert!(matches!(
        s.insert_scope(scope_row("a"), &scope_entry("scope.created", "a"))
            .await,
        Err(StoreError::Conflict(_))
    ));
    insert_scope(s, scope_row("b")).await;
    let t = insert(s, scoped("tok_1", &["a", "b"])).await;
    assert_eq!(t.version, 3);
    assert_eq!(
        s.token("tok_1").await.unwrap().unwrap().scopes,
        Some(vec!["a".to_string(), "b".to_string()])
    );
    let empty = insert(s, scoped("tok_2", &[])).await;
    assert_eq!(
        s.token(&empty.id).await.unwrap().unwrap().scopes,
        Some(vec![])
    );
    assert_eq!(s.token("tok_2").await.unwrap().unwrap().version, 4);
    // A scope that is not there cannot be named, by an insert or an edit.
    assert!(matches!(
        s.insert(
            scoped("tok_3", &["a", "nope"]),
            &entry("token.created", &row("tok_3"))
        )
        .await,
        Err(StoreError::Conflict(_))
    ));
    let mut edited = t.clone();
    edited.scopes = Some(vec!["nope".into()]);
    assert!(matches!(
        s.replace(edited, t.version, &entry("token.updated", &t), false)
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.version().await.unwrap(), 4, "refusals take no version");

    let set = s.scopes().await.unwrap();
    assert_eq!(set.version, 2);
    assert_eq!(
        set.scopes
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(set.scopes[0], a);
    assert_eq!(s.scope("a").await.unwrap(), Some(a.clone()));
    assert_eq!(s.scope("zz").await.unwrap(), None);
    assert_eq!(
        s.changes_since(0, 10).await.unwrap().scopes,
        Some(set.clone())
    );
    assert_eq!(s.changes_since(2, 10).await.unwrap().scopes, None);
    assert_eq!(s.snapshot_page(None, 1).await.unwrap().scopes, set);

    // An edit needs the version it read.
    let mut changed = a.clone();
    changed.rules[0].path = "/a".into();
    changed.updated_at = 5;
    let e = scope_entry("scope.updated", "a");
    assert_eq!(
        s.replace_scope(changed.clone(), 99, &e).await,
        Err(StoreError::Stale)
    );
    let mut ghost = changed.clone();
    ghost.name = "ghost".into();
    assert_eq!(
        s.replace_scope(ghost, 1, &e).await,
        Err(StoreError::NotFound)
    );
    let written = s.replace_scope(changed.clone(), 1, &e).await.unwrap();
    assert_eq!(written.version, 5);
    assert_eq!(*rx.borrow(), 5);
    let c = s.changes_since(4, 10).await.unwrap();
    assert!(c.rows.is_empty());
    let carried = c.scopes.expect("the set, after a scope change alone");
    assert_eq!(carried.version, 5);
    assert_eq!(carried.scopes[0].rules[0].path, "/a");

    // A deletion: refused while a live token names the scope, counted; a revoked one does
    // not count.
    let d = scope_entry("scope.deleted", "a");
    assert_eq!(
        s.delete_scope("a", 5, &d).await.unwrap(),
        ScopeDeletion::InUse(1)
    );
    assert_eq!(s.delete_scope("a", 1, &d).await, Err(StoreError::Stale));
    assert_eq!(s.delete_scope("zz", 1, &d).await, Err(StoreError::NotFound));
    set_status(s, "tok_1", Status::Revoked).await.unwrap();
    assert_eq!(
        s.delete_scope("a", 5, &d).await.unwrap(),
        ScopeDeletion::Deleted(7)
    );
    assert_eq!(*rx.borrow(), 7);
    assert_eq!(s.scope("a").await.unwrap(), None);
    let c = s.changes_since(6, 10).await.unwrap();
    assert!(c.rows.is_empty());
    assert_eq!(c.scopes.map(|s| (s.version, s.scopes.len())), Some((7, 1)));
    // The audit trail has each, under the scope's name.
    let trail = s
        .audit(&AuditQuery {
            action: Some("scope.deleted".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(trail.len(), 1);
    assert_eq!(trail[0].token_name, "a");
    f.reopen().await;
    let s = f.store();
    assert_eq!(s.scopes().await.unwrap().version, 7);
    assert_eq!(s.version().await.unwrap(), 7);
}

/// A token written naming a scope while another writer deletes that scope: one of the two
/// is refused, whichever replica each runs on, so that no live token names a deleted scope.
async fn a_scope_deletion_and_a_token_naming_it_never_both_succeed(f: &mut Fixture) {
    let (one, two) = (f.replica().await, f.replica().await);
    for i in 0..20 {
        let name = format!("s{i}");
        let created = insert_scope(f.store(), scope_row(&name)).await;
        let (del, ins) = {
            let (one, two, name) = (one.clone(), two.clone(), name.clone());
            let d = tokio::spawn(async move {
                one.delete_scope(&name, created.version, &scope_entry("scope.deleted", &name))
                    .await
            });
            let id = format!("tok_{i}");
            let r = scoped(&id, &[&format!("s{i}")]);
            let e = entry("token.created", &r);
            let t = tokio::spawn(async move { two.insert(r, &e).await });
            (d.await.unwrap(), t.await.unwrap())
        };
        match (del, ins) {
            (Ok(ScopeDeletion::Deleted(_)), Err(StoreError::Conflict(_))) => {}
            (Ok(ScopeDeletion::InUse(1)), Ok(_)) => {}
            other => panic!("{name}: {other:?}"),
        }
    }
}

/// Fills a store with one of everything a dump carries.
async fn populate(s: &dyn Store) {
    for i in 1..=3 {
        let mut r = row(&format!("tok_{i}"));
        r.expires_at = Some(1_000 * i);
        insert(s, r).await;
    }
    set_status(s, "tok_2", Status::Suspended).await.unwrap();
    set_status(s, "tok_3", Status::Revoked).await.unwrap();
    s.record_usage(
        50,
        &[UsageEntry {
            id: "tok_1".into(),
            allowed: 7,
            denied: 2,
            last_used_at: 40,
        }],
    )
    .await
    .unwrap();
    let warned = s.token("tok_1").await.unwrap().unwrap();
    let w = WarningRecord {
        token_id: "tok_1".into(),
        expires_at: 1_000,
        lead: 3_600,
        at: 5,
    };
    let ev = Event {
        id: "evt_1".into(),
        kind: "token.expiring".into(),
        payload: "{\"a\":1}".into(),
        at: 5,
    };
    s.record_warning(&w, &entry("token.expiry_warning", &warned), Some(&ev))
        .await
        .unwrap();
    s.claim_period("jobs", 10, 10).await.unwrap();
    let gone = s.token("tok_3").await.unwrap().unwrap();
    assert!(s.purge(&gone, &entry("token.purged", &gone)).await.unwrap());
    insert_scope(s, scope_row("orders:read")).await;
    let mut scoped = row("tok_4");
    scoped.scopes = Some(vec!["orders:read".into()]);
    insert(s, scoped).await;
}

/// Everything moves, the target takes the store id and the versions, and a second import
/// into it is refused.
async fn a_dump_moves_into_an_empty_store(from: &mut Fixture, to: &mut Fixture) {
    populate(from.store()).await;
    let dump = from.store().export().await.unwrap();
    assert_eq!((dump.tokens.len(), dump.version, dump.horizon), (3, 7, 5));
    assert_eq!((dump.scopes.scopes.len(), dump.scopes.version), (1, 6));
    to.store().import(&dump).await.unwrap();
    to.reopen().await;
    let t = to.store();
    assert_eq!(t.export().await.unwrap(), dump);
    assert_eq!(t.store_id(), from.store().store_id());
    assert_eq!(t.version().await.unwrap(), 7);
    assert_eq!(
        t.scopes().await.unwrap(),
        from.store().scopes().await.unwrap()
    );
    assert_eq!(
        t.changes_since(0, 10).await.unwrap(),
        from.store().changes_since(0, 10).await.unwrap()
    );
    // Both go on from the same point: the next version and the next audit entry.
    assert_eq!(insert(t, row("tok_9")).await.version, 8);
    let trail = t
        .audit(&AuditQuery {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(trail[0].seq > dump.audit.last().unwrap().seq);
    assert!(matches!(
        t.import(&dump).await,
        Err(StoreError::Conflict(_))
    ));
}

mod fleet {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sqlite_store_moves_to_postgres() {
        a_dump_moves_into_an_empty_store(
            &mut Fixture::sqlite().await,
            &mut Fixture::postgres().await,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_postgres_store_moves_to_sqlite() {
        a_dump_moves_into_an_empty_store(
            &mut Fixture::postgres().await,
            &mut Fixture::sqlite().await,
        )
        .await;
    }

    use std::time::{Duration, Instant};

    async fn wait_for(rx: &tokio::sync::watch::Receiver<u64>, version: u64) {
        let start = Instant::now();
        while *rx.borrow() < version {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "version {version} never signalled (at {})",
                *rx.borrow()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn psql(db: &str, sql: &str) -> String {
        let (db, sql) = (db.to_string(), sql.to_string());
        tokio::task::spawn_blocking(move || tokengate_pgtest::shared().psql(&db, &sql))
            .await
            .unwrap()
    }

    async fn fresh() -> String {
        tokio::task::spawn_blocking(|| tokengate_pgtest::shared().fresh_database())
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_through_one_replica_wakes_the_other_even_after_its_listener_reconnects() {
        let url = fresh().await;
        let db = url.rsplit('/').next().unwrap().to_string();
        let a = PostgresStore::open(&url, PgSettings::default())
            .await
            .unwrap();
        // No periodic re-read in this test: only notifications and reconnections count.
        let b = PostgresStore::open(
            &url,
            PgSettings {
                recheck: Duration::from_secs(3600),
                ..PgSettings::default()
            },
        )
        .await
        .unwrap();
        let rx = b.subscribe();
        insert(&a, row("tok_1")).await;
        wait_for(&rx, 1).await;
        // Cut every listening connection, then change: the notification is lost, and the
        // listener must re-read the version when it reconnects.
        let cut = psql(
            "postgres",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = '{db}' AND application_name = 'tokengate listener'"
            ),
        )
        .await;
        assert_eq!(cut, "2", "both replicas' listeners were connected");
        insert(&a, row("tok_2")).await;
        wait_for(&rx, 2).await;
        insert(&a, row("tok_3")).await;
        wait_for(&rx, 3).await;
        a.close().await;
        b.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_database_is_unavailable_and_every_replica_recovers_when_it_is_back() {
        // Its own cluster: stopping the shared one would fail the other tests.
        let cluster = Arc::new(
            tokio::task::spawn_blocking(tokengate_pgtest::PgCluster::start)
                .await
                .unwrap(),
        );
        let settings = PgSettings {
            timeout: Duration::from_secs(2),
            recheck: Duration::from_secs(3600),
            ..PgSettings::default()
        };
        let a = PostgresStore::open(&cluster.url(), settings).await.unwrap();
        let b = PostgresStore::open(&cluster.url(), settings).await.unwrap();
        insert(&a, row("tok_1")).await;
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.stop()).await.unwrap();
        for e in [
            a.token("tok_1").await.err(),
            a.version().await.err(),
            a.insert(row("tok_2"), &entry("token.created", &row("tok_2")))
                .await
                .err(),
            b.changes_since(0, 10).await.err(),
            b.ping().await.err(),
        ] {
            assert!(matches!(e, Some(StoreError::Unavailable(_))), "{e:?}");
        }
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.start_again())
            .await
            .unwrap();
        let start = Instant::now();
        while a.token("tok_1").await.is_err() || b.ping().await.is_err() {
            assert!(start.elapsed() < Duration::from_secs(60), "no recovery");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The listeners reconnected too: a change through one wakes the other.
        let rx = b.subscribe();
        let v = insert(&a, row("tok_2")).await.version;
        wait_for(&rx, v).await;
        a.close().await;
        b.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        SqliteStore::open(&path).unwrap();
        rusqlite::Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let e = SqliteStore::open(&path).err().expect("refused");
        let known = format!("up to version {}", super::super::sqlite::SCHEMA_VERSION);
        assert!(e.to_string().contains("version 99"), "{e}");
        assert!(e.to_string().contains(&known), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_refuses_a_newer_schema() {
        let url = fresh().await;
        PostgresStore::open(&url, PgSettings::default())
            .await
            .unwrap()
            .close()
            .await;
        let db = url.rsplit('/').next().unwrap();
        psql(db, "UPDATE tokengate_schema SET version = 99").await;
        let e = PostgresStore::open(&url, PgSettings::default())
            .await
            .err()
            .expect("refused");
        let known = format!("up to version {}", super::super::postgres::SCHEMA_VERSION);
        assert!(e.to_string().contains("version 99"), "{e}");
        assert!(e.to_string().contains(&known), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_racing_the_first_migration_all_come_up_on_one_store() {
        let url = fresh().await;
        let barrier = Arc::new(tokio::sync::Barrier::new(4));
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let (url, barrier) = (url.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let s = PostgresStore::open(&url, PgSettings::default())
                        .await
                        .unwrap();
                    let id = s.store_id().to_string();
                    s.close().await;
                    id
                })
            })
            .collect();
        let mut ids = vec![];
        for o in opened {
            ids.push(o.await.unwrap());
        }
        assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
    }
}

fn demand(id: &str, admitted: u64, refused: u64) -> tokengate_wire::TokenDemand {
    tokengate_wire::TokenDemand {
        id: id.into(),
        admitted,
        refused,
    }
}

async fn a_token_keeps_its_limit_scope(f: &mut Fixture) {
    let s = f.store();
    let mut r = row("tok_scope");
    r.max_rps = Some(10);
    r.limit_scope = LimitScope::Proxy;
    let stored = insert(s, r).await;
    assert_eq!(
        s.token("tok_scope").await.unwrap().unwrap().limit_scope,
        LimitScope::Proxy
    );
    let mut fleet = stored.clone();
    fleet.limit_scope = LimitScope::Fleet;
    let e = entry("token.updated", &fleet);
    s.replace(fleet, stored.version, &e, false).await.unwrap();
    assert_eq!(
        s.token("tok_scope").await.unwrap().unwrap().limit_scope,
        LimitScope::Fleet
    );
    f.reopen().await;
    let s = f.store();
    let changes = s.changes_since(0, 10).await.unwrap();
    assert_eq!(changes.rows[0].limit_scope, LimitScope::Fleet);
    insert(s, row("tok_other")).await;
    let found = s
        .tokens_by_id(&["tok_other".into(), "tok_none".into(), "tok_scope".into()])
        .await
        .unwrap();
    assert_eq!(
        found.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["tok_other", "tok_scope"]
    );
    assert!(s.tokens_by_id(&[]).await.unwrap().is_empty());
}

async fn fleet_reports_are_shared_and_forgotten(f: &mut Fixture) {
    let (a, b) = (f.replica().await, f.replica().await);
    a.fleet_report(
        "envoy-a",
        1_000,
        10_000,
        0,
        &[demand("tok_1", 5, 1), demand("tok_2", 3, 0)],
    )
    .await
    .unwrap();
    b.fleet_report("envoy-b", 500, 10_200, 0, &[demand("tok_1", 2, 0)])
        .await
        .unwrap();
    // A heartbeat: seen, with no demand.
    b.fleet_report("envoy-c", 1_000, 10_300, 0, &[])
        .await
        .unwrap();
    let proxies = a.fleet_proxies(0).await.unwrap();
    assert_eq!(
        proxies,
        [
            ProxySeen {
                proxy_id: "envoy-a".into(),
                interval_ms: 1_000,
                seen_at_ms: 10_000
            },
            ProxySeen {
                proxy_id: "envoy-b".into(),
                interval_ms: 500,
                seen_at_ms: 10_200
            },
            ProxySeen {
                proxy_id: "envoy-c".into(),
                interval_ms: 1_000,
                seen_at_ms: 10_300
            },
        ]
    );
    assert_eq!(a.fleet_proxies(10_100).await.unwrap().len(), 2);
    let row = |t: &str, p: &str, admitted, refused, interval_ms, seen_at_ms| DemandRow {
        token_id: t.into(),
        proxy_id: p.into(),
        admitted,
        refused,
        interval_ms,
        seen_at_ms,
    };
    // Every proxy's demand for one token.
    assert_eq!(
        b.fleet_demand(DemandOf::Token("tok_1"), 0).await.unwrap(),
        [
            row("tok_1", "envoy-a", 5, 1, 1_000, 10_000),
            row("tok_1", "envoy-b", 2, 0, 500, 10_200)
        ]
    );
    assert_eq!(
        a.fleet_demand(DemandOf::Token("tok_2"), 0).await.unwrap(),
        [row("tok_2", "envoy-a", 3, 0, 1_000, 10_000)]
    );
    assert!(a
        .fleet_demand(DemandOf::Token("tok_none"), 0)
        .await
        .unwrap()
        .is_empty());
    // A newer report replaces the proxy's counts; an older one (a slow replica) does not.
    a.fleet_report("envoy-a", 1_000, 11_000, 0, &[demand("tok_1", 9, 9)])
        .await
        .unwrap();
    b.fleet_report("envoy-a", 1_000, 10_500, 0, &[demand("tok_1", 1, 1)])
        .await
        .unwrap();
    assert_eq!(
        a.fleet_demand(DemandOf::Token("tok_1"), 10_900)
            .await
            .unwrap(),
        [row("tok_1", "envoy-a", 9, 9, 1_000, 11_000)]
    );
    // Counts beyond i64 are kept at its largest.
    a.fleet_report("envoy-a", 1_000, 11_500, 0, &[demand("tok_3", u64::MAX, 0)])
        .await
        .unwrap();
    assert_eq!(
        a.fleet_demand(DemandOf::Token("tok_3"), 0).await.unwrap()[0].admitted,
        i64::MAX as u64
    );
    // Whatever was last seen before the cut-off is forgotten.
    b.fleet_report("envoy-b", 500, 20_000, 11_200, &[])
        .await
        .unwrap();
    assert_eq!(
        a.fleet_proxies(0)
            .await
            .unwrap()
            .iter()
            .map(|p| p.proxy_id.as_str())
            .collect::<Vec<_>>(),
        ["envoy-a", "envoy-b"]
    );
    assert_eq!(
        a.fleet_demand(DemandOf::Token("tok_1"), 0).await.unwrap(),
        []
    );
    assert_eq!(
        a.fleet_demand(DemandOf::Token("tok_3"), 0)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn quota_exchanges_are_serialised_and_record_exhaustion_once(f: &mut Fixture) {
    use tokengate_wire::quota::{Period, Quota};
    let s = f.store();
    let now_s = 1_800_000_100;
    let period = Period::Hour.window(now_s);
    let mut q = row("tok_q");
    q.quota = Some(Quota {
        limit: 10,
        period: Period::Hour,
    });
    q.retired = vec![RetiredSecret {
        hash: "old".into(),
        until: now_s + 60,
    }];
    insert(s, q.clone()).await;
    insert(s, row("tok_plain")).await;
    s.fleet_report("p", 1_000, now_s * 1_000, 0, &[])
        .await
        .unwrap();
    let holder = |spent: u64| QuotaHolder {
        token_id: "tok_q".into(),
        proxy_id: "p".into(),
        hash: "old".into(),
        period_start: period.0,
        period_end: period.1,
        spent,
        carried: 0,
        held: 10,
        granted: 10,
        rate_milli: 0,
        seen_at_ms: now_s * 1_000,
    };
    let exhaustion = Exhaustion {
        token_id: "tok_q".into(),
        period_start: period.0,
        period_end: period.1,
        audit: entry("token.quota_exhausted", &q),
        event: Some(Event {
            id: "evt_q".into(),
            kind: "token.quota_exhausted".into(),
            payload: "{}".into(),
            at: now_s,
        }),
    };
    // A retired secret finds its token; the tokens without a quota are left out.
    let (ex, h) = (exhaustion.clone(), holder(10));
    let written = s
        .quota_exchange(
            &["old".into(), "tok_plain".into()],
            now_s,
            0,
            100,
            Arc::new(move |state: &QuotaState| {
                assert_eq!(state.tokens.len(), 1);
                assert_eq!(
                    state.tokens[0].quota,
                    Some(Quota {
                        limit: 10,
                        period: Period::Hour
                    })
                );
                assert!(state.holders.is_empty());
                assert_eq!(state.proxies.len(), 1);
                QuotaWrite {
                    holders: vec![h.clone()],
                    exhausted: vec![ex.clone()],
                }
            }),
        )
        .await
        .unwrap();
    assert_eq!((written.holders.len(), written.exhausted.len()), (1, 1));
    // Named by no secret, the token is still in use this period; exhaustion is told once.
    let ex = exhaustion.clone();
    let written = s
        .quota_exchange(
            &[],
            now_s,
            0,
            100,
            Arc::new(move |state: &QuotaState| {
                assert_eq!(state.tokens.len(), 1);
                assert_eq!(state.holders.len(), 1);
                QuotaWrite {
                    holders: vec![],
                    exhausted: vec![ex.clone()],
                }
            }),
        )
        .await
        .unwrap();
    assert!(written.exhausted.is_empty());
    assert_eq!(
        s.quota_spent(&["tok_q".into()], now_s).await.unwrap(),
        [QuotaSpent {
            token_id: "tok_q".into(),
            period_start: period.0,
            spent: 10,
        }]
    );
    let trail = s
        .audit(&AuditQuery {
            action: Some("token.quota_exhausted".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(trail.len(), 1);
    let dump = s.export().await.unwrap();
    assert_eq!(dump.outbox.len(), 1);
    // Concurrent exchanges on one token take turns: none loses another's write.
    let shared = f.store.clone().unwrap();
    let bump = || {
        let s = shared.clone();
        async move {
            for _ in 0..10 {
                s.quota_exchange(
                    &["old".into()],
                    now_s,
                    0,
                    100,
                    Arc::new(|state: &QuotaState| {
                        let mut h = state.holders[0].clone();
                        h.spent += 1;
                        QuotaWrite {
                            holders: vec![h],
                            exhausted: vec![],
                        }
                    }),
                )
                .await
                .unwrap();
            }
        }
    };
    let (a, b) = (tokio::spawn(bump()), tokio::spawn(bump()));
    a.await.unwrap();
    b.await.unwrap();
    assert_eq!(
        s.quota_spent(&["tok_q".into()], now_s).await.unwrap()[0].spent,
        30
    );
    // The period ends: its rows are forgotten, and the quota stays with the token.
    assert_eq!(s.forget_quotas(period.1).await.unwrap(), 1);
    assert!(s
        .quota_spent(&["tok_q".into()], period.0)
        .await
        .unwrap()
        .is_empty());
    f.reopen().await;
    assert_eq!(
        f.store().token("tok_q").await.unwrap().unwrap().quota,
        q.quota
    );
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(&mut super::Fixture::sqlite().await).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let mut f = super::Fixture::postgres().await;
                super::$name(&mut f).await;
                f.store().close().await;
            })*
        }
    };
}

contract!(
    every_change_takes_the_next_version_and_signals_it,
    a_replace_needs_the_version_it_read_and_keeps_usage,
    revoked_rows_are_tombstones_for_sync_but_gone_from_lists,
    list_filters_and_pages_by_id,
    snapshot_pages_cover_every_row_once,
    state_survives_reopening,
    a_taken_id_or_hash_is_a_conflict,
    audit_entries_are_kept_newest_first_and_filtered,
    usage_adds_up_without_a_new_version,
    purge_deletes_unchanged_rows_and_raises_the_horizon,
    a_warning_is_recorded_once_with_its_event,
    deliveries_are_leased_retried_and_finished,
    a_period_is_claimed_by_one_replica,
    sessions_are_touched_ended_and_bounded,
    no_poller_misses_a_change_made_through_any_replica,
    a_token_keeps_its_limit_scope,
    fleet_reports_are_shared_and_forgotten,
    scopes_share_the_version_sequence_and_ride_with_changes,
    a_scope_deletion_and_a_token_naming_it_never_both_succeed,
    quota_exchanges_are_serialised_and_record_exhaustion_once,
);
