//! Several replicas on one PostgreSQL (the real server, a throwaway cluster): each replica is
//! the whole application, built as `tokengate serve` builds it, on its own socket. Anything
//! one replica accepts, any other one honours.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokengate::app::Database;
use tokengate::domain::housekeeping::{tick, Jobs};
use tokengate::policy::Policy;
use tokengate::webhook::Webhook;
use tokengate_pgtest::proxy::{Cut, TcpProxy};

fn replica(url: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 100, Policy::default());
    config.database = Database::Postgres(url.to_string());
    config.postgres.timeout = Duration::from_secs(2);
    spawn(config, dir)
}

fn replicas(n: usize) -> Vec<TestApp> {
    let url = tokengate_pgtest::shared().fresh_database();
    (0..n).map(|_| replica(&url)).collect()
}

fn known_version(app: &TestApp) -> u64 {
    let m = app.request("GET", "/metrics", &[], None).text;
    m.lines()
        .find_map(|l| l.strip_prefix("tokengate_sync_version ")?.parse().ok())
        .unwrap()
}

/// A replica whose connections to PostgreSQL go through a proxy that stops forwarding:
/// it says it is not ready, the other replica carries on, and no poller is ever handed a
/// version older than one it already holds.
#[test]
fn a_replica_cut_off_from_postgres_is_not_ready_and_never_steps_a_poller_back() {
    let cluster = tokengate_pgtest::shared();
    let url = cluster.fresh_database();
    let proxy = TcpProxy::start(([127, 0, 0, 1], cluster.port()).into());
    let a = replica(&url);
    let b = replica(&proxy.url(&url, cluster.port()));
    let store_id = a.sync("since=0")["store_id"].as_str().unwrap().to_string();
    a.create(r#"{"name":"one"}"#);
    let start = Instant::now();
    while known_version(&b) < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "b never heard of version 1"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    proxy.set(Cut::Blackhole);
    a.create(r#"{"name":"two"}"#);
    let held = a.sync(&format!("since=0&store_id={store_id}"));
    assert_eq!(held["version"], 2, "a poller now holds version 2");
    // Asked by that poller, the cut-off replica must not answer with what it last knew.
    let r = b.request(
        "GET",
        &format!("/v1/sync?since=2&store_id={store_id}&wait=1"),
        &[("authorization", &format!("Bearer {SYNC}"))],
        None,
    );
    assert_eq!(r.status, 503, "answered {}: {}", r.status, r.text);
    assert_eq!(r.json["error"], "store_unavailable");
    let ready = b.request("GET", "/readyz", &[], None);
    assert_eq!(
        (ready.status, ready.json["error"].as_str()),
        (503, Some("store_unavailable"))
    );
    assert_eq!(a.request("GET", "/readyz", &[], None).status, 200);
    let (s, _) = b.admin("POST", "/v1/tokens", Some(r#"{"name":"refused"}"#));
    assert_eq!(s, 503);
    a.create(r#"{"name":"three"}"#);

    proxy.set(Cut::Open);
    let start = Instant::now();
    while b.request("GET", "/readyz", &[], None).status != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "b never ready again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let caught_up = b.sync(&format!("since=2&store_id={store_id}&wait=1"));
    assert_eq!(caught_up["version"], 3, "{caught_up}");
    assert_eq!(caught_up["snapshot"], false);
    // And it hears of changes again (its listener reconnected).
    a.create(r#"{"name":"four"}"#);
    let start = Instant::now();
    while known_version(&b) < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "b never heard of version 4"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_console_session_opened_on_one_replica_works_on_the_others() {
    let r = replicas(2);
    let session = r[0].sign_in(ADMIN);
    let who = r[1].in_session(&session, false, "GET", "/v1/session", None);
    assert_eq!(who.status, 200, "{}", who.text);
    assert_eq!(who.json["csrf_token"].as_str(), Some(session.csrf.as_str()));
    let created = r[1].in_session(
        &session,
        true,
        "POST",
        "/v1/tokens",
        Some(r#"{"name":"made-on-replica-2"}"#),
    );
    assert_eq!(created.status, 201, "{}", created.text);
    // Without the CSRF token the other replica refuses a change too.
    let refused = r[1].in_session(
        &session,
        false,
        "POST",
        "/v1/tokens",
        Some(r#"{"name":"x"}"#),
    );
    assert_eq!(refused.status, 403);
    // Signing out on one replica ends the session everywhere.
    let out = r[1].in_session(&session, true, "DELETE", "/v1/session", None);
    assert_eq!(out.status, 204);
    let gone = r[0].in_session(&session, false, "GET", "/v1/session", None);
    assert_eq!(gone.status, 401);
}

/// A poll held by a replica that is then cut off from PostgreSQL: the replica can no longer
/// hear of changes made through the others, so it lets the poll go (within its listener's
/// recheck and timeout, not at the end of the poll's wait), and the filter polls again,
/// through a replica that hears.
#[test]
fn a_poll_held_by_a_replica_that_goes_deaf_is_let_go() {
    let cluster = tokengate_pgtest::shared();
    let url = cluster.fresh_database();
    let proxy = TcpProxy::start(([127, 0, 0, 1], cluster.port()).into());
    let a = replica(&url);
    // Polls held for up to a minute here (the tests' replicas let them go after 5 s).
    let b = {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), 100, Policy::default());
        config.database = Database::Postgres(proxy.url(&url, cluster.port()));
        config.postgres.timeout = Duration::from_secs(2);
        config.sync_max_wait = Duration::from_secs(60);
        spawn(config, dir)
    };
    let store_id = a.sync("since=0")["store_id"].as_str().unwrap().to_string();
    let held = |app: &TestApp| {
        app.request("GET", "/metrics", &[], None)
            .text
            .contains("tokengate_sync_polls_held 1")
    };
    let poll_url = format!("{}/v1/sync?since=0&store_id={store_id}&wait=60", b.url);
    let poll = std::thread::spawn(move || {
        let t = Instant::now();
        let status = match ureq::get(&poll_url)
            .set("authorization", &format!("Bearer {SYNC}"))
            .call()
        {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("poll: {e}"),
        };
        (t.elapsed(), status)
    });
    let start = Instant::now();
    while !held(&b) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the poll was never held"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    proxy.set(Cut::Blackhole);
    let cut = Instant::now();
    // Changes made through `a` now would not reach `b`: whether there are any, `b` cannot
    // know, so the poll must not wait for them.
    let (took, status) = poll.join().unwrap();
    // Held to the end of its 60 s wait, the poll would have kept the filter from the
    // change for a minute.
    assert!(
        took < Duration::from_secs(40),
        "the deaf replica held the poll {took:?} (cut {:?} ago)",
        cut.elapsed()
    );
    println!("released after {took:?} with {status}");
    assert_eq!(
        status, 503,
        "nothing to answer from: the database is out of reach"
    );
    // (That it hears and holds polls again once the partition heals is the test above.)
    proxy.set(Cut::Open);
}

#[test]
fn a_change_through_one_replica_wakes_polls_held_by_another_and_reads_back_everywhere() {
    let r = replicas(2);
    let store_id = r[1].sync("since=0")["store_id"]
        .as_str()
        .unwrap()
        .to_string();
    let poll = r[1].poll_in_background(&format!("since=0&store_id={store_id}&wait=60"));
    // The poll is held before the change is made.
    let start = Instant::now();
    while !r[1]
        .request("GET", "/metrics", &[], None)
        .text
        .contains("tokengate_sync_polls_held 1")
    {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = r[0].create(r#"{"name":"from-replica-1"}"#);
    let (_, answer) = poll.join().unwrap();
    assert_eq!(answer["changes"][0]["id"], t["id"]);
    // Read-after-write on the other replica, and the same store for the filters.
    let id = t["id"].as_str().unwrap();
    let (s, got) = r[1].admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!((s, got["name"].as_str()), (200, Some("from-replica-1")));
    assert_eq!(r[0].sync("since=0")["store_id"], store_id.as_str());
}

#[test]
fn usage_reported_to_any_replica_adds_up() {
    let r = replicas(2);
    let t = r[0].create(r#"{"name":"counted"}"#);
    let id = t["id"].as_str().unwrap();
    let report = |app: &TestApp, allowed: u64| {
        let body = serde_json::json!({
            "proxy_id": "p",
            "entries": [{"id": id, "allowed": allowed, "denied": 1, "last_used_at": 1_700_000_000}],
        })
        .to_string();
        let (s, v) = app.call("POST", "/v1/usage", Some(SYNC), Some(&body));
        assert_eq!(s, 204, "{v}");
    };
    let reporters: Vec<_> = (0..20)
        .map(|i| {
            let (a, b) = (r[0].url.clone(), r[1].url.clone());
            let id = id.to_string();
            std::thread::spawn(move || {
                let url = if i % 2 == 0 { a } else { b };
                let body = serde_json::json!({
                    "proxy_id": "p",
                    "entries": [{"id": id, "allowed": 10, "denied": 0, "last_used_at": 1_700_000_000}],
                })
                .to_string();
                let r = ureq::post(&format!("{url}/v1/usage"))
                    .set("authorization", &format!("Bearer {SYNC}"))
                    .set("content-type", "application/json")
                    .send_string(&body)
                    .unwrap();
                assert_eq!(r.status(), 204);
            })
        })
        .collect();
    for t in reporters {
        t.join().unwrap();
    }
    report(&r[0], 3);
    report(&r[1], 4);
    let (_, got) = r[0].admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!(got["requests_allowed"], 200 + 3 + 4);
    assert_eq!(got["requests_denied"], 2);
}

/// Three replicas run their housekeeping rounds at the same moments, period after period:
/// each period runs on exactly one of them, each warning is issued once, and each webhook
/// event is delivered once.
#[test]
fn housekeeping_runs_once_per_period_across_three_replicas() {
    let r = replicas(3);
    let day = 86_400;
    for i in 0..5 {
        r[0].create(&format!(
            r#"{{"name":"expiring-{i}","expires_in_seconds":{}}}"#,
            day / 2 + i * 60
        ));
    }
    let delivered: Arc<Mutex<Vec<String>>> = Arc::default();
    let hook = {
        use axum::routing::post;
        let (tx, rx) = std::sync::mpsc::channel();
        let got = delivered.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new().route(
                    "/hook",
                    post(move |headers: axum::http::HeaderMap| {
                        let got = got.clone();
                        async move {
                            let id = headers["x-tokengate-delivery"]
                                .to_str()
                                .unwrap()
                                .to_string();
                            got.lock().unwrap().push(id);
                            axum::http::StatusCode::NO_CONTENT
                        }
                    }),
                );
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                axum::serve(l, app).await.unwrap();
            });
        });
        format!("http://{}/hook", rx.recv().unwrap())
    };
    let jobs = Jobs {
        warning_leads: vec![day],
        retention: Some(30 * day),
        purge_interval: 3600,
        webhook: Some(Webhook {
            url: hook,
            secret: "webhook-secret-0123456789".into(),
            max_attempts: 3,
            timeout: Duration::from_secs(10),
        }),
    };
    let interval = 10;
    let t0 = chrono::Utc::now().timestamp();
    let (mut jobs_runs, mut purge_runs) = (0, 0);
    for period in 0..6 {
        let now = t0 + period * interval;
        let rounds: Vec<_> = r
            .iter()
            .map(|app| {
                let (store, jobs) = (app.store.clone(), jobs.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(tick(store.as_ref(), &jobs, interval, now))
                        .unwrap()
                })
            })
            .collect();
        let rounds: Vec<_> = rounds.into_iter().map(|t| t.join().unwrap()).collect();
        let ran = rounds.iter().filter(|r| r.jobs).count();
        assert_eq!(ran, 1, "period {period}: {rounds:?}");
        jobs_runs += ran;
        purge_runs += rounds.iter().filter(|r| r.purge).count();
    }
    assert_eq!(jobs_runs, 6);
    assert_eq!(purge_runs, 1, "one purge period (an hour) in a minute");
    assert_eq!(
        r[0].block_on(r[0].store.period_runs("jobs")).unwrap(),
        6,
        "counted in the database too"
    );
    let (_, audit) = r[2].admin("GET", "/v1/audit?action=token.expiry_warning", None);
    assert_eq!(audit["entries"].as_array().unwrap().len(), 5);
    let got = delivered.lock().unwrap().clone();
    let unique: BTreeSet<_> = got.iter().collect();
    assert_eq!((got.len(), unique.len()), (5, 5), "{got:?}");
}
