//! The store contract: every test here runs against both backends (SQLite in a temporary
//! file, PostgreSQL in a throwaway cluster of the real server), so that the two cannot
//! drift apart.

use super::*;
use std::sync::Arc;
use tokengate_wire::{Kind, UsageEntry};

/// A store under test, and how to open it again on the same data.
pub struct Fixture {
    store: Option<Arc<dyn Store>>,
    open: Box<dyn Fn() -> Arc<dyn Store>>,
    /// Whether the backend supports several processes on one database.
    replicas: bool,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    pub fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let open =
            Box::new(move || -> Arc<dyn Store> { Arc::new(SqliteStore::open(&path).unwrap()) });
        Fixture {
            store: Some(open()),
            open,
            replicas: false,
            _dir: Some(dir),
        }
    }

    pub fn postgres() -> Fixture {
        let url = tokengate_pgtest::shared().fresh_database();
        let open = Box::new(move || -> Arc<dyn Store> {
            Arc::new(PostgresStore::open(&url, PgSettings::default()).unwrap())
        });
        Fixture {
            store: Some(open()),
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
    pub fn replica(&self) -> Arc<dyn Store> {
        if self.replicas {
            (self.open)()
        } else {
            self.store.clone().unwrap()
        }
    }

    /// Closes the store and opens it again, as a restart would.
    pub fn reopen(&mut self) {
        self.store = None;
        self.store = Some((self.open)());
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
        created_at: 1,
        updated_at: 1,
        expires_at: None,
        last_used_at: None,
        version: 0,
        requests_allowed: 0,
        requests_denied: 0,
        rotated_at: None,
        retired: vec![],
    }
}

const ADMIN: Change<'static> = Change {
    actor: "admin",
    action: "token.updated",
};

fn set_status(s: &dyn Store, id: &str, to: Status) -> Result<TokenRow, StoreError> {
    s.update(id, 2, ADMIN, &move |r: &mut TokenRow| {
        let changed = r.status != to;
        r.status = to;
        Ok(changed)
    })
}

fn every_change_takes_the_next_version_and_signals_it(f: &mut Fixture) {
    let s = f.store();
    let rx = s.subscribe();
    assert_eq!(s.version().unwrap(), 0);
    assert_eq!(s.create(row("tok_1"), ADMIN).unwrap().version, 1);
    assert_eq!(s.create(row("tok_2"), ADMIN).unwrap().version, 2);
    assert_eq!(
        set_status(s, "tok_1", Status::Suspended).unwrap().version,
        3
    );
    // No change, no version.
    assert_eq!(
        set_status(s, "tok_1", Status::Suspended).unwrap().version,
        3
    );
    assert_eq!(s.version().unwrap(), 3);
    assert_eq!(*rx.borrow(), 3);
    let ids: Vec<_> = s
        .changes_since(1, 10)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, vec!["tok_2", "tok_1"]);
}

fn revoked_rows_are_tombstones_for_sync_but_gone_for_the_api(f: &mut Fixture) {
    let s = f.store();
    s.create(row("tok_1"), ADMIN).unwrap();
    s.create(row("tok_2"), ADMIN).unwrap();
    set_status(s, "tok_1", Status::Revoked).unwrap();
    assert_eq!(s.get("tok_1"), Err(StoreError::NotFound));
    assert_eq!(
        set_status(s, "tok_1", Status::Active),
        Err(StoreError::NotFound)
    );
    assert_eq!(
        s.list(&ListQuery {
            limit: 10,
            ..Default::default()
        })
        .unwrap()
        .len(),
        1
    );
    assert_eq!(s.live_count().unwrap(), 1);
    let changes = s.changes_since(2, 10).unwrap();
    assert_eq!(
        (changes[0].id.as_str(), changes[0].status),
        ("tok_1", Status::Revoked)
    );
    assert_eq!(s.snapshot_page(None, 10).unwrap().len(), 2);
}

fn list_filters_and_pages_by_id(f: &mut Fixture) {
    let s = f.store();
    for i in 1..=5 {
        let mut r = row(&format!("tok_{i}"));
        if i % 2 == 0 {
            r.kind = Kind::Service;
            r.owner = "team".into();
        }
        s.create(r, ADMIN).unwrap();
    }
    set_status(s, "tok_3", Status::Suspended).unwrap();
    let ids = |q: ListQuery| {
        s.list(&q)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(ListQuery {
            limit: 2,
            ..Default::default()
        }),
        ["tok_1", "tok_2"]
    );
    assert_eq!(
        ids(ListQuery {
            limit: 2,
            after: Some("tok_2".into()),
            ..Default::default()
        }),
        ["tok_3", "tok_4"]
    );
    assert_eq!(
        ids(ListQuery {
            limit: 9,
            kind: Some(Kind::Service),
            ..Default::default()
        }),
        ["tok_2", "tok_4"]
    );
    assert_eq!(
        ids(ListQuery {
            limit: 9,
            owner: Some("team".into()),
            ..Default::default()
        }),
        ["tok_2", "tok_4"]
    );
    assert_eq!(
        ids(ListQuery {
            limit: 9,
            status: Some(Status::Suspended),
            ..Default::default()
        }),
        ["tok_3"]
    );
    assert_eq!(
        ids(ListQuery {
            limit: 9,
            name_contains: Some("NAME-TOK_5".into()),
            ..Default::default()
        }),
        ["tok_5"]
    );
    assert_eq!(
        ids(ListQuery {
            limit: 2,
            newest_first: true,
            before: Some("tok_4".into()),
            ..Default::default()
        }),
        ["tok_3", "tok_2"],
        "in creation order, newest first"
    );
    assert_eq!(
        ids(ListQuery {
            limit: 9,
            name_contains: Some("%".into()),
            ..Default::default()
        }),
        Vec::<String>::new(),
        "no pattern characters"
    );
}

fn snapshot_pages_cover_every_row_once(f: &mut Fixture) {
    let s = f.store();
    for i in 1..=7 {
        s.create(row(&format!("tok_{i}")), ADMIN).unwrap();
    }
    let mut seen = vec![];
    let mut after: Option<String> = None;
    loop {
        let page = s.snapshot_page(after.as_deref(), 3).unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|r| r.id.clone());
        seen.extend(page.into_iter().map(|r| r.id));
    }
    assert_eq!(seen.len(), 7);
}

fn edits_can_refuse_and_state_survives_reopening(f: &mut Fixture) {
    let store_id;
    {
        let s = f.store();
        store_id = s.store_id().to_string();
        s.create(row("tok_1"), ADMIN).unwrap();
        let refused = s.update("tok_1", 3, ADMIN, &|_r: &mut TokenRow| {
            Err(StoreError::Invalid {
                field: "burst",
                message: "no".into(),
            })
        });
        assert!(matches!(
            refused,
            Err(StoreError::Invalid { field: "burst", .. })
        ));
        assert_eq!(s.version().unwrap(), 1);
    }
    f.reopen();
    let s = f.store();
    assert_eq!(s.store_id(), store_id);
    assert_eq!(s.version().unwrap(), 1);
    assert_eq!(*s.subscribe().borrow(), 1);
    assert_eq!(s.get("tok_1").unwrap().name, "name-tok_1");
}

fn duplicate_hash_is_a_conflict(f: &mut Fixture) {
    let s = f.store();
    s.create(row("tok_1"), ADMIN).unwrap();
    let mut dup = row("tok_2");
    dup.hash = row("tok_1").hash;
    assert!(matches!(s.create(dup, ADMIN), Err(StoreError::Conflict(_))));
}

fn all_audit(s: &dyn Store) -> Vec<AuditEntry> {
    s.audit(&AuditQuery {
        limit: 100,
        ..Default::default()
    })
    .unwrap()
}

fn every_change_is_audited_with_the_fields_that_moved(f: &mut Fixture) {
    let s = f.store();
    s.create(row("tok_1"), ADMIN).unwrap();
    set_status(s, "tok_1", Status::Suspended).unwrap();
    // No change, no entry.
    set_status(s, "tok_1", Status::Suspended).unwrap();
    let trail = all_audit(s);
    assert_eq!(trail.len(), 2);
    let (newest, created) = (&trail[0], &trail[1]);
    assert!(newest.seq > created.seq);
    assert_eq!(newest.before, Some(serde_json::json!({"status": "active"})));
    assert_eq!(
        newest.after,
        Some(serde_json::json!({"status": "suspended"}))
    );
    assert_eq!(created.before, None);
    assert_eq!(created.after.as_ref().unwrap()["name"], "name-tok_1");
    assert!(!format!("{trail:?}").contains(&row("tok_1").hash));
    let by_actor = s
        .audit(&AuditQuery {
            actor: Some("nobody".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert!(by_actor.is_empty());
    let paged = s
        .audit(&AuditQuery {
            before_seq: Some(newest.seq),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(paged, vec![created.clone()]);
}

fn usage_adds_up_without_a_new_version(f: &mut Fixture) {
    let s = f.store();
    s.create(row("tok_1"), ADMIN).unwrap();
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
    assert_eq!(s.record_usage(100, &[entry(3, 50), unknown]).unwrap(), 1);
    // An older report never moves last use back; a future one is clamped to now.
    s.record_usage(100, &[entry(2, 40)]).unwrap();
    let r = s.get("tok_1").unwrap();
    assert_eq!((r.requests_allowed, r.requests_denied), (5, 2));
    assert_eq!(r.last_used_at, Some(50));
    s.record_usage(100, &[entry(0, 500)]).unwrap();
    assert_eq!(s.get("tok_1").unwrap().last_used_at, Some(100));
    assert_eq!(s.version().unwrap(), 1);
    // An edit keeps the counters.
    set_status(s, "tok_1", Status::Suspended).unwrap();
    assert_eq!(s.get("tok_1").unwrap().requests_allowed, 5);
}

fn purge_removes_old_revoked_and_expired_tokens_and_raises_the_horizon(f: &mut Fixture) {
    let s = f.store();
    let mut expired = row("tok_1");
    expired.expires_at = Some(10);
    s.create(expired, ADMIN).unwrap();
    s.create(row("tok_2"), ADMIN).unwrap();
    s.create(row("tok_3"), ADMIN).unwrap();
    set_status(s, "tok_2", Status::Revoked).unwrap(); // updated_at = 2, version 4
    let mut fresh = row("tok_4");
    fresh.expires_at = Some(1_000);
    s.create(fresh, ADMIN).unwrap();
    assert!(s.purge(50, 1).unwrap().is_empty());
    let purged: Vec<_> = s.purge(50, 20).unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(purged, ["tok_1", "tok_2"]);
    assert_eq!(s.horizon().unwrap(), 4);
    let left: Vec<_> = s
        .snapshot_page(None, 10)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(left, ["tok_3", "tok_4"]);
    let purges = s
        .audit(&AuditQuery {
            action: Some("token.purged".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(purges.len(), 2);
    assert_eq!(purges[0].actor, "system");
    assert!(purges[0].after.is_none());
}

fn expiry_warnings_are_issued_once_per_lead_even_across_reopening(f: &mut Fixture) {
    let day = 86_400;
    let leads = [7 * day, day];
    let event = |w: &Warning| {
        (
            format!("evt_{}_{}", w.token.id, w.lead_seconds),
            "token.expiring".to_string(),
            "{}".to_string(),
        )
    };
    {
        let s = f.store();
        let mut far = row("tok_far");
        far.expires_at = Some(10 * day);
        s.create(far, ADMIN).unwrap();
        let mut near = row("tok_near");
        near.expires_at = Some(3_600);
        s.create(near, ADMIN).unwrap();
        let mut none = row("tok_none");
        none.expires_at = None;
        s.create(none, ADMIN).unwrap();
        let w = s.warn_expiring(0, &leads, Some(&event)).unwrap();
        // The near one gets only its tightest lead.
        assert_eq!(
            w.iter()
                .map(|w| (w.token.id.as_str(), w.lead_seconds))
                .collect::<Vec<_>>(),
            [("tok_near", day)]
        );
        assert!(s
            .warn_expiring(10, &leads, Some(&event))
            .unwrap()
            .is_empty());
        let w = s.warn_expiring(3 * day, &leads, Some(&event)).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].lead_seconds, 7 * day);
    }
    f.reopen();
    let s = f.store();
    assert!(s
        .warn_expiring(4 * day, &leads, Some(&event))
        .unwrap()
        .is_empty());
    let w = s.warn_expiring(9 * day + 1, &leads, Some(&event)).unwrap();
    assert_eq!(
        (w[0].token.id.as_str(), w[0].lead_seconds),
        ("tok_far", day)
    );
    // A new expiry time warns again.
    s.update("tok_far", 9 * day + 2, ADMIN, &|r: &mut TokenRow| {
        r.expires_at = Some(9 * day + 3_600);
        Ok(true)
    })
    .unwrap();
    assert_eq!(s.warn_expiring(9 * day + 3, &leads, None).unwrap().len(), 1);
    let warned = s
        .audit(&AuditQuery {
            action: Some("token.expiry_warning".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(warned.len(), 4);
    // Only the three issued with a webhook builder are queued.
    assert_eq!(s.due_deliveries(i64::MAX, 10).unwrap().len(), 3);
}

fn deliveries_retry_then_finish(f: &mut Fixture) {
    let s = f.store();
    let mut near = row("tok_1");
    near.expires_at = Some(100);
    s.create(near, ADMIN).unwrap();
    let event = |_: &Warning| {
        (
            "evt_1".to_string(),
            "token.expiring".to_string(),
            "{}".to_string(),
        )
    };
    s.warn_expiring(50, &[86_400], Some(&event)).unwrap();
    let due = s.due_deliveries(50, 10).unwrap();
    assert_eq!((due.len(), due[0].attempts), (1, 0));
    s.delivery_result(
        due[0].id,
        &DeliveryOutcome::Retry {
            next_attempt_at: 60,
            error: "HTTP 500".into(),
        },
    )
    .unwrap();
    assert!(s.due_deliveries(59, 10).unwrap().is_empty());
    let due = s.due_deliveries(60, 10).unwrap();
    assert_eq!(due[0].attempts, 1);
    s.delivery_result(due[0].id, &DeliveryOutcome::Delivered { at: 61 })
        .unwrap();
    assert!(s.due_deliveries(i64::MAX, 10).unwrap().is_empty());
}

/// Writers on two replicas and a poller that reads "changes after the last version I saw",
/// as a filter does: the poller never sees a version go backwards and ends with exactly the
/// database's state. A version taken from a non-transactional counter would let it skip a
/// change committed late under a smaller version.
fn no_poller_misses_a_change_made_through_any_replica(f: &mut Fixture) {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    let replicas = [f.replica(), f.replica()];
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let store = f.replica();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen: BTreeMap<String, (u64, Status)> = BTreeMap::new();
            let mut since = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                loop {
                    let batch = store.changes_since(since, 50).unwrap();
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
            }
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = replicas[w % 2].clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    let id = format!("tok_{w}x{i:02}");
                    let mut r = row(&id);
                    r.hash = format!("{w:0>32}{i:0>32}");
                    store.create(r, ADMIN).unwrap();
                    if i % 3 == 0 {
                        set_status(store.as_ref(), &id, Status::Suspended).unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let seen = poller.join().unwrap();
    let mut truth = BTreeMap::new();
    let mut after = None::<String>;
    loop {
        let page = f.store().snapshot_page(after.as_deref(), 100).unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for r in page {
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
    assert_eq!(f.store().version().unwrap(), 160 + 4 * 14);
}

/// What only a backend for several replicas does: migrations, schema checks and the change
/// signal across processes.
mod fleet {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_for(rx: &tokio::sync::watch::Receiver<u64>, version: u64) {
        let start = Instant::now();
        while *rx.borrow() < version {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "version {version} never signalled (at {})",
                *rx.borrow()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_change_through_one_replica_wakes_the_other_even_after_its_listener_reconnects() {
        let cluster = tokengate_pgtest::shared();
        let url = cluster.fresh_database();
        let db = url.rsplit('/').next().unwrap().to_string();
        let a = PostgresStore::open(&url, PgSettings::default()).unwrap();
        // No periodic re-read in this test: only notifications and reconnections count.
        let b = PostgresStore::open(
            &url,
            PgSettings {
                recheck: Duration::from_secs(3600),
                ..PgSettings::default()
            },
        )
        .unwrap();
        let rx = b.subscribe();
        a.create(row("tok_1"), ADMIN).unwrap();
        wait_for(&rx, 1);
        // Cut every listening connection, then change: the notification is lost, and the
        // listener must re-read the version when it reconnects.
        let cut = cluster.psql(
            "postgres",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = '{db}' AND query LIKE 'LISTEN%'"
            ),
        );
        assert_eq!(cut, "2", "both replicas' listeners were connected");
        a.create(row("tok_2"), ADMIN).unwrap();
        wait_for(&rx, 2);
        a.create(row("tok_3"), ADMIN).unwrap();
        wait_for(&rx, 3);
    }

    #[test]
    fn a_stopped_database_is_unavailable_and_every_replica_recovers_when_it_is_back() {
        // Its own cluster: stopping the shared one would fail the other tests.
        let cluster = tokengate_pgtest::PgCluster::start();
        let settings = PgSettings {
            timeout: Duration::from_secs(2),
            recheck: Duration::from_secs(3600),
            ..PgSettings::default()
        };
        let a = PostgresStore::open(&cluster.url(), settings).unwrap();
        let b = PostgresStore::open(&cluster.url(), settings).unwrap();
        a.create(row("tok_1"), ADMIN).unwrap();
        cluster.stop();
        for e in [
            a.get("tok_1").err(),
            a.version().err(),
            a.create(row("tok_2"), ADMIN).err(),
            b.changes_since(0, 10).err(),
        ] {
            assert!(matches!(e, Some(StoreError::Unavailable(_))), "{e:?}");
        }
        cluster.start_again();
        let start = Instant::now();
        while a.get("tok_1").is_err() || b.get("tok_1").is_err() {
            assert!(start.elapsed() < Duration::from_secs(60), "no recovery");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The listeners reconnected too: a change through one wakes the other.
        let rx = b.subscribe();
        let v = a.create(row("tok_2"), ADMIN).unwrap().version;
        wait_for(&rx, v);
    }

    #[test]
    fn sqlite_refuses_a_newer_schema() {
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

    #[test]
    fn postgres_refuses_a_newer_schema() {
        let cluster = tokengate_pgtest::shared();
        let url = cluster.fresh_database();
        PostgresStore::open(&url, PgSettings::default()).unwrap();
        let db = url.rsplit('/').next().unwrap();
        cluster.psql(db, "UPDATE tokengate_schema SET version = 99");
        let e = PostgresStore::open(&url, PgSettings::default())
            .err()
            .expect("refused");
        let known = format!("up to version {}", super::super::postgres::SCHEMA_VERSION);
        assert!(e.to_string().contains("version 99"), "{e}");
        assert!(e.to_string().contains(&known), "{e}");
    }

    #[test]
    fn replicas_racing_the_first_migration_all_come_up_on_one_store() {
        let url = tokengate_pgtest::shared().fresh_database();
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let (url, barrier) = (url.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let s = PostgresStore::open(&url, PgSettings::default()).unwrap();
                    s.store_id().to_string()
                })
            })
            .collect();
        let ids: Vec<String> = opened.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name(&mut super::Fixture::sqlite());
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                super::$name(&mut super::Fixture::postgres());
            })*
        }
    };
}

contract!(
    every_change_takes_the_next_version_and_signals_it,
    revoked_rows_are_tombstones_for_sync_but_gone_for_the_api,
    list_filters_and_pages_by_id,
    snapshot_pages_cover_every_row_once,
    edits_can_refuse_and_state_survives_reopening,
    duplicate_hash_is_a_conflict,
    every_change_is_audited_with_the_fields_that_moved,
    usage_adds_up_without_a_new_version,
    purge_removes_old_revoked_and_expired_tokens_and_raises_the_horizon,
    expiry_warnings_are_issued_once_per_lead_even_across_reopening,
    deliveries_retry_then_finish,
    no_poller_misses_a_change_made_through_any_replica,
);
