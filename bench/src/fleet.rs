//! Control plane fleet: several `tokengate serve` replicas on one PostgreSQL (the real
//! server, a throwaway cluster of Debian's `postgresql`).
//!
//! - **Writes through a kill**: writes split across two replicas, `kill -9` of one in the
//!   middle; a poller that syncs as a filter does (from either replica, moving to the other
//!   when one fails). Every acknowledged write must be in the database, and the poller's
//!   final state must equal the database's, token by token.
//! - **Across replicas**: a suspend sent to replica 1, timed to the first 403 through an
//!   Envoy whose control-plane cluster lists replica 2 only (and back with a reactivate).
//! - **Many polls**: long-polls held on one replica; one change made through the other
//!   reaches all of them; the replica's memory per held poll, and its database reads.
//! - **Creates per second** on PostgreSQL (one and two replicas) beside SQLite.
//! - **Housekeeping**: three replicas with a 1 s jobs period and a 2 s purge period for a
//!   while: runs counted per replica and in the database, warnings, webhook deliveries and
//!   purges counted once each.

use crate::procstat::rss_kib;
use crate::report::{command_output, met};
use crate::scale::open_file_limit;
use crate::{median, percentile, Depth};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokengate_e2e::{http, random_hex, Options, Response, Stack};
use tokengate_pgtest::PgCluster;

const PROPAGATION_TARGET_MS: f64 = 100.0;
const FANOUT_TARGET_MS: f64 = 1_000.0;
const POLL_MEMORY_TARGET_KIB: f64 = 20.0;
const CREATE_CLIENTS: usize = 16;
/// Far beyond anything a working fleet takes.
const DEADLINE: Duration = Duration::from_secs(60);

struct Plan {
    writes: usize,
    trials: usize,
    polls: usize,
    creates: usize,
    housekeeping: Duration,
}

fn plan(depth: Depth) -> Plan {
    match depth {
        Depth::Full => Plan {
            writes: 1_000,
            trials: 100,
            polls: 10_000,
            creates: 4_000,
            housekeeping: Duration::from_secs(60),
        },
        Depth::Quick => Plan {
            writes: 200,
            trials: 20,
            polls: 2_000,
            creates: 800,
            housekeeping: Duration::from_secs(12),
        },
    }
}

fn auth(stack: &Stack) -> String {
    format!("Bearer {}", stack.admin_token)
}

fn call(
    addr: SocketAddr,
    auth: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<Response> {
    http(addr, method, path, &[("Authorization", auth)], body)
}

/// A token's state as a filter would hold it: version and status.
type State = BTreeMap<String, (u64, String)>;

/// Syncs like a filter: a snapshot (paged), then changes after its version, long-polling,
/// from `replicas` in turn, moving on when one fails. Keeps the newest record per token.
struct Poller {
    state: Arc<Mutex<(State, u64)>>,
    stop: Arc<AtomicBool>,
    failovers: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn apply(state: &mut State, body: &Value) {
    for r in body["changes"].as_array().into_iter().flatten() {
        let (Some(id), Some(v)) = (r["id"].as_str(), r["version"].as_u64()) else {
            continue;
        };
        let status = r["status"].as_str().unwrap_or_default().to_string();
        let entry = state.entry(id.to_string()).or_insert((0, String::new()));
        // A token with a rotated-out secret has several records; all carry its version.
        if v >= entry.0 {
            *entry = (v, status);
        }
    }
}

impl Poller {
    fn start(replicas: Vec<SocketAddr>, sync_token: String) -> Poller {
        let state: Arc<Mutex<(State, u64)>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let failovers = Arc::new(AtomicUsize::new(0));
        let (st, sp, fo) = (state.clone(), stop.clone(), failovers.clone());
        let thread = std::thread::spawn(move || {
            let auth = format!("Bearer {sync_token}");
            let mut at = 0usize;
            let mut store_id: Option<String> = None;
            let mut cursor: Option<String> = None;
            while !sp.load(Ordering::SeqCst) {
                let since = st.lock().unwrap().1;
                let mut q = format!("/v1/sync?since={since}&wait=1");
                if let Some(id) = &store_id {
                    q.push_str(&format!("&store_id={id}"));
                }
                if let Some(c) = &cursor {
                    q.push_str(&format!("&cursor={c}"));
                }
                let r = http(replicas[at], "GET", &q, &[("Authorization", &auth)], None);
                let body = match r {
                    Ok(r) if r.status == 200 => r.json(),
                    _ => {
                        at = (at + 1) % replicas.len();
                        fo.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                let mut s = st.lock().unwrap();
                if body["snapshot"] == true && cursor.is_none() {
                    s.0.clear();
                }
                apply(&mut s.0, &body);
                store_id = body["store_id"].as_str().map(str::to_string);
                cursor = body["next_cursor"].as_str().map(str::to_string);
                if cursor.is_none() {
                    let v = body["version"].as_u64().unwrap_or(since);
                    assert!(v >= since, "the poller's version went back: {since} to {v}");
                    s.1 = v;
                }
            }
        });
        Poller {
            state,
            stop,
            failovers,
            thread: Some(thread),
        }
    }

    fn version(&self) -> u64 {
        self.state.lock().unwrap().1
    }

    fn finish(mut self) -> (State, usize) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("the poller failed");
        }
        let state = self.state.lock().unwrap().0.clone();
        (state, self.failovers.load(Ordering::SeqCst))
    }
}

/// Every token in the store (tombstones included), from a full snapshot.
fn database_state(stack: &Stack, replica: usize) -> (State, u64) {
    let auth = format!("Bearer {}", stack.sync_token);
    let mut state = State::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            None => "/v1/sync?since=0".to_string(),
            Some(c) => format!("/v1/sync?since=0&cursor={c}"),
        };
        let r = http(
            stack.replica_addr(replica),
            "GET",
            &q,
            &[("Authorization", &auth)],
            None,
        )
        .expect("a snapshot");
        let body = r.json();
        apply(&mut state, &body);
        cursor = body["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            return (state, body["version"].as_u64().unwrap_or(0));
        }
    }
}

fn writes_through_a_kill(cluster: &PgCluster, plan: &Plan) -> Value {
    let mut stack = Stack::start_fleet(&cluster.fresh_database(), 2, false);
    let replicas = vec![stack.replica_addr(0), stack.replica_addr(1)];
    let poller = Poller::start(replicas.clone(), stack.sync_token.clone());
    let acked: Arc<Mutex<Vec<(String, &'static str)>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    const WRITERS: usize = 4;
    let per_writer = plan.writes / WRITERS;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (acked, done, refused, replicas) = (
                acked.clone(),
                done.clone(),
                refused.clone(),
                replicas.clone(),
            );
            let auth = auth(&stack);
            std::thread::spawn(move || {
                let mut at = w % 2;
                let mut last: Option<String> = None;
                let mut n = 0;
                while n < per_writer {
                    // Every other write suspends the token created just before.
                    let (path, body) = match (&last, n % 2) {
                        (Some(id), 1) => (format!("/v1/tokens/{id}/suspend"), None),
                        _ => (
                            "/v1/tokens".to_string(),
                            Some(json!({"name": format!("w{w}-{n}")}).to_string()),
                        ),
                    };
                    match call(replicas[at], &auth, "POST", &path, body.as_deref()) {
                        Ok(r) if r.status == 201 => {
                            let id = r.json()["id"].as_str().unwrap().to_string();
                            acked.lock().unwrap().push((id.clone(), "active"));
                            last = Some(id);
                        }
                        Ok(r) if r.status == 200 => {
                            acked
                                .lock()
                                .unwrap()
                                .push((last.clone().unwrap(), "suspended"));
                        }
                        // Not acknowledged: the write may or may not have happened; it is
                        // tried again on the other replica.
                        _ => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            at = 1 - at;
                            continue;
                        }
                    }
                    n += 1;
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let start = Instant::now();
    while done.load(Ordering::SeqCst) < plan.writes / 2 {
        assert!(start.elapsed() < DEADLINE * 5, "writes stalled");
        std::thread::sleep(Duration::from_millis(2));
    }
    let killed_after = done.load(Ordering::SeqCst);
    stack.kill_replica(0);
    for w in writers {
        w.join().expect("a writer failed");
    }
    let seconds = start.elapsed().as_secs_f64();
    let (truth, version) = database_state(&stack, 1);
    let start = Instant::now();
    while poller.version() < version {
        assert!(start.elapsed() < DEADLINE, "the poller never caught up");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (seen, failovers) = poller.finish();
    let acked = acked.lock().unwrap().clone();
    let mut expected: BTreeMap<String, &str> = BTreeMap::new();
    for (id, status) in &acked {
        expected.insert(id.clone(), status);
    }
    let lost = expected
        .iter()
        .filter(|(id, status)| truth.get(*id).map(|t| t.1.as_str()) != Some(**status))
        .count();
    let missed = truth
        .iter()
        .filter(|(id, t)| seen.get(*id) != Some(t))
        .count();
    eprintln!(
        "fleet: {} writes acknowledged ({} tokens), {lost} lost; the poller missed {missed} of {} tokens' changes",
        acked.len(),
        expected.len(),
        truth.len()
    );
    json!({
        "writes_acknowledged": acked.len(),
        "tokens": expected.len(),
        "killed_after_writes": killed_after,
        "unacknowledged_attempts": refused.load(Ordering::SeqCst),
        "seconds": seconds,
        "lost": lost,
        "database_tokens": truth.len(),
        "database_version": version,
        "poller_missed": missed,
        "poller_failovers": failovers,
    })
}

/// Suspend on replica 1, first 403 through an Envoy that syncs from replica 2; then
/// reactivate and first 200.
fn across_replicas(cluster: &PgCluster, plan: &Plan) -> Value {
    let mut stack = Stack::start_fleet(&cluster.fresh_database(), 2, false);
    stack.envoy_control_plane_port = Some(stack.replica_port(1));
    stack.start_envoy();
    let created = call(
        stack.replica_addr(0),
        &auth(&stack),
        "POST",
        "/v1/tokens",
        Some(r#"{"name":"across"}"#),
    )
    .expect("create");
    assert_eq!(created.status, 201);
    let v = created.json();
    let (id, token) = (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    );
    stack.wait_for_status(&token, 200, DEADLINE);
    let first = |want: u16| -> f64 {
        let acked = Instant::now();
        loop {
            if stack.call_with_token(&token).status == want {
                return acked.elapsed().as_secs_f64() * 1e3;
            }
            assert!(acked.elapsed() < DEADLINE, "never {want}");
        }
    };
    let (mut suspend, mut reactivate) = (vec![], vec![]);
    for trial in 0..plan.trials {
        for (action, want, into) in [
            ("suspend", 403, &mut suspend),
            ("reactivate", 200, &mut reactivate),
        ] {
            let r = call(
                stack.replica_addr(0),
                &auth(&stack),
                "POST",
                &format!("/v1/tokens/{id}/{action}"),
                None,
            )
            .expect(action);
            assert_eq!(r.status, 200, "{action}");
            into.push(first(want));
        }
        std::thread::sleep(Duration::from_millis(20 + (trial as u64 * 13) % 40));
    }
    let stats = |v: &mut Vec<f64>| {
        json!({
            "median": median(v),
            "p99": percentile(v, 0.99),
            "max": v.iter().copied().fold(0.0, f64::max),
        })
    };
    json!({
        "trials": plan.trials,
        "suspend_ms": stats(&mut suspend),
        "reactivate_ms": stats(&mut reactivate),
    })
}

/// `n` long-polls at `since` on `addr`, answered when they complete; each answer's time
/// and whether it named `id`.
async fn hold_polls(
    addr: SocketAddr,
    request: Arc<String>,
    id: Arc<String>,
    n: usize,
    sent: Arc<AtomicUsize>,
) -> Vec<Option<(Instant, bool)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (request, id, sent, gate) =
                (request.clone(), id.clone(), sent.clone(), gate.clone());
            tokio::spawn(async move {
                let mut stream = {
                    // Connects a few hundred at a time, so that the listen backlog holds.
                    let _permit = gate.acquire().await.ok()?;
                    let mut tries = 0;
                    loop {
                        match tokio::net::TcpStream::connect(addr).await {
                            Ok(s) => break s,
                            Err(_) if tries < 50 => {
                                tries += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(_) => return None,
                        }
                    }
                };
                stream.write_all(request.as_bytes()).await.ok()?;
                sent.fetch_add(1, Ordering::SeqCst);
                let mut raw = Vec::with_capacity(1024);
                stream.read_to_end(&mut raw).await.ok()?;
                let at = Instant::now();
                let text = String::from_utf8_lossy(&raw);
                Some((
                    at,
                    text.starts_with("HTTP/1.1 200") && text.contains(id.as_str()),
                ))
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.ok().flatten());
    }
    out
}

fn many_polls(cluster: &PgCluster, plan: &Plan) -> Value {
    // A socket per poll in this process and one in the replica's (which has the same
    // limit, as its child), and some to spare.
    let limit = open_file_limit().unwrap_or(1024) as usize;
    let polls = plan.polls.min(limit.saturating_sub(512));
    let stack = Stack::start_fleet(&cluster.fresh_database(), 2, false);
    let auth = auth(&stack);
    let created = call(
        stack.replica_addr(1),
        &auth,
        "POST",
        "/v1/tokens",
        Some(r#"{"name":"fan-out"}"#),
    )
    .expect("create");
    let id = created.json()["id"].as_str().unwrap().to_string();
    let created_version = created.json()["version"].as_f64().unwrap();
    // The polls go to replica 1 (index 0 here) at the version it knows, once it knows it.
    let start = Instant::now();
    while stack
        .replica_metric(0, "tokengate_sync_version")
        .unwrap_or(0.0)
        < created_version
    {
        assert!(
            start.elapsed() < DEADLINE,
            "the other replica never heard of the token"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (store_id, version) = {
        let r = http(
            stack.replica_addr(0),
            "GET",
            "/v1/sync?since=0",
            &[("Authorization", &format!("Bearer {}", stack.sync_token))],
            None,
        )
        .expect("sync");
        let v = r.json();
        (
            v["store_id"].as_str().unwrap().to_string(),
            v["version"].as_u64().unwrap(),
        )
    };
    let pid = replica_pid(&stack, 0);
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss_kib(pid);
    let reads_before = stack
        .replica_metric(0, "tokengate_sync_reads_total")
        .unwrap_or(0.0);
    let request = Arc::new(format!(
        "GET /v1/sync?since={version}&store_id={store_id}&wait=120 HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
        stack.sync_token
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let sent = Arc::new(AtomicUsize::new(0));
    let answers = rt.spawn(hold_polls(
        stack.replica_addr(0),
        request,
        Arc::new(id.clone()),
        polls,
        sent.clone(),
    ));
    let start = Instant::now();
    let mut held = 0.0;
    while held < polls as f64 {
        held = stack
            .replica_metric(0, "tokengate_sync_polls_held")
            .unwrap_or(0.0);
        assert!(
            start.elapsed() < DEADLINE * 2,
            "only {held} of {polls} polls held"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let open_seconds = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let rss_held = rss_kib(pid);
    let requested = Instant::now();
    let r = call(
        stack.replica_addr(1),
        &auth,
        "POST",
        &format!("/v1/tokens/{id}/suspend"),
        None,
    )
    .expect("suspend");
    let acked = Instant::now();
    assert_eq!(r.status, 200);
    let answers = rt.block_on(answers).expect("the polls");
    let mut from_ack: Vec<f64> = answers
        .iter()
        .flatten()
        .filter(|(_, named)| *named)
        .map(|(at, _)| at.saturating_duration_since(acked).as_secs_f64() * 1e3)
        .collect();
    let answered = from_ack.len();
    let reads = stack
        .replica_metric(0, "tokengate_sync_reads_total")
        .unwrap_or(0.0)
        - reads_before;
    let per_poll = (rss_held.saturating_sub(rss_before)) as f64 / polls as f64;
    eprintln!(
        "fleet: {answered} of {polls} polls answered with the change; p99 {:.0} ms; {per_poll:.1} KiB per poll; {reads} reads",
        percentile(&mut from_ack.clone(), 0.99)
    );
    json!({
        "polls": polls,
        "polls_wanted": plan.polls,
        "open_file_limit": limit,
        "open_seconds": open_seconds,
        "answered_with_change": answered,
        "api_ms": acked.duration_since(requested).as_secs_f64() * 1e3,
        "fanout_from_ack_ms": {
            "median": median(&mut from_ack),
            "p99": percentile(&mut from_ack, 0.99),
            "max": from_ack.iter().copied().fold(0.0, f64::max),
        },
        "rss_before_kib": rss_before,
        "rss_held_kib": rss_held,
        "kib_per_poll": per_poll,
        "database_reads": reads,
    })
}

/// The pid of replica `i` (its process listens on the replica's port).
pub(crate) fn replica_pid(stack: &Stack, i: usize) -> u32 {
    let port = stack.replica_port(i).to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "serve")
            && args.iter().any(|a| a == &format!("127.0.0.1:{port}"))
        {
            return pid;
        }
    }
    panic!("no process for replica {i}");
}

/// Creates per second through `addrs` (clients spread over them).
fn create_rate(addrs: &[SocketAddr], auth: &str, count: usize, label: &str) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    std::thread::scope(|s| {
        for c in 0..CREATE_CLIENTS {
            let (next, failed) = (next.clone(), failed.clone());
            let addr = addrs[c % addrs.len()];
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let body = format!(r#"{{"name":"{label}-{i}"}}"#);
                match call(addr, auth, "POST", "/v1/tokens", Some(&body)) {
                    Ok(r) if r.status == 201 => {}
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "{label}: creates failed");
    count as f64 / seconds
}

fn creates(cluster: &PgCluster, plan: &Plan) -> Value {
    let sqlite = Stack::start_with(Options {
        control_plane: true,
        envoy: false,
        ..Options::default()
    });
    let sqlite_rate = create_rate(
        &[sqlite.replica_addr(0)],
        &auth(&sqlite),
        plan.creates,
        "sqlite",
    );
    drop(sqlite);
    let one = Stack::start_fleet(&cluster.fresh_database(), 1, false);
    let pg_one = create_rate(&[one.replica_addr(0)], &auth(&one), plan.creates, "pg-1");
    drop(one);
    let two = Stack::start_fleet(&cluster.fresh_database(), 2, false);
    let pg_two = create_rate(
        &[two.replica_addr(0), two.replica_addr(1)],
        &auth(&two),
        plan.creates,
        "pg-2",
    );
    eprintln!(
        "fleet: creates/s: SQLite {sqlite_rate:.0}, PostgreSQL one replica {pg_one:.0}, two {pg_two:.0}"
    );
    json!({
        "clients": CREATE_CLIENTS,
        "count": plan.creates,
        "sqlite_per_second": sqlite_rate,
        "postgres_one_replica_per_second": pg_one,
        "postgres_two_replicas_per_second": pg_two,
    })
}

/// A webhook receiver on a free port; the delivery ids it received.
fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    use axum::routing::post;
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let g = got.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/hook",
                post(move |headers: axum::http::HeaderMap| {
                    let g = g.clone();
                    async move {
                        let id = headers
                            .get("x-tokengate-delivery")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        g.lock().unwrap().push(id);
                        axum::http::StatusCode::NO_CONTENT
                    }
                }),
            );
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(l.local_addr().expect("addr")).expect("send");
            axum::serve(l, app).await.expect("serve");
        });
    });
    let addr = rx.recv().expect("the receiver's address");
    (format!("http://{addr}/hook"), got)
}

fn housekeeping(cluster: &PgCluster, plan: &Plan) -> Value {
    const EXPIRING: usize = 20;
    const REVOKED: usize = 20;
    let db = cluster.fresh_database();
    let (hook, delivered) = receiver();
    let stack = Stack::start_fleet_with(&db, 3, false, |s| {
        for (k, v) in [
            ("TOKENGATE_JOBS_INTERVAL", "1s".to_string()),
            ("TOKENGATE_PURGE_INTERVAL", "2s".to_string()),
            ("TOKENGATE_RETENTION", "1s".to_string()),
            ("TOKENGATE_EXPIRY_WARNINGS", "1d".to_string()),
            ("TOKENGATE_WEBHOOK_URL", hook.clone()),
            ("TOKENGATE_WEBHOOK_SECRET", random_hex(32)),
        ] {
            s.control_plane_env.push((k.into(), v));
        }
    });
    let auth = auth(&stack);
    for i in 0..EXPIRING {
        let body = json!({"name": format!("expiring-{i}"), "expires_in_seconds": 3600});
        let r = call(
            stack.replica_addr(i % 3),
            &auth,
            "POST",
            "/v1/tokens",
            Some(&body.to_string()),
        )
        .expect("create");
        assert_eq!(r.status, 201);
    }
    for i in 0..REVOKED {
        let r = call(
            stack.replica_addr(i % 3),
            &auth,
            "POST",
            "/v1/tokens",
            Some(&json!({ "name": format!("revoked-{i}") }).to_string()),
        )
        .expect("create");
        let id = r.json()["id"].as_str().unwrap().to_string();
        let r = call(
            stack.replica_addr((i + 1) % 3),
            &auth,
            "DELETE",
            &format!("/v1/tokens/{id}"),
            None,
        )
        .expect("revoke");
        assert_eq!(r.status, 204);
    }
    let runs = |job: &str| -> Vec<u64> {
        (0..3)
            .map(|i| {
                stack
                    .replica_metric(i, &format!("tokengate_job_runs_total{{job=\"{job}\"}}"))
                    .unwrap_or(0.0) as u64
            })
            .collect()
    };
    let db_runs = |job: &str| -> u64 {
        let name = db.rsplit('/').next().unwrap().to_string();
        cluster
            .psql(
                &name,
                &format!("SELECT coalesce(max(runs), 0) FROM job_runs WHERE name = '{job}'"),
            )
            .parse()
            .unwrap_or(0)
    };
    let (jobs0, purge0) = (db_runs("jobs"), db_runs("purge"));
    let start = Instant::now();
    std::thread::sleep(plan.housekeeping);
    let window = start.elapsed().as_secs_f64();
    let (jobs1, purge1) = (db_runs("jobs"), db_runs("purge"));
    let (jobs_per_replica, purge_per_replica) = (runs("jobs"), runs("purge"));
    let audit_count = |action: &str| -> usize {
        let mut n = 0;
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                None => format!("/v1/audit?action={action}&limit=1000"),
                Some(c) => format!("/v1/audit?action={action}&limit=1000&cursor={c}"),
            };
            let v = call(stack.replica_addr(0), &auth, "GET", &path, None)
                .expect("audit")
                .json();
            n += v["entries"].as_array().map_or(0, Vec::len);
            cursor = v["next_cursor"].as_str().map(str::to_string);
            if cursor.is_none() {
                return n;
            }
        }
    };
    let warnings = audit_count("token.expiry_warning");
    let purged = audit_count("token.purged");
    let got = delivered.lock().unwrap().clone();
    let unique: BTreeSet<&String> = got.iter().collect();
    eprintln!(
        "fleet: {window:.0} s: jobs ran {} times ({jobs_per_replica:?} per replica), purge {} times; {warnings} warnings, {} deliveries ({} distinct), {purged} purged",
        jobs1 - jobs0,
        purge1 - purge0,
        got.len(),
        unique.len()
    );
    json!({
        "replicas": 3,
        "window_seconds": window,
        "jobs_interval_seconds": 1,
        "purge_interval_seconds": 2,
        "jobs_runs_in_window": jobs1 - jobs0,
        "purge_runs_in_window": purge1 - purge0,
        "jobs_runs_total_by_replica": jobs_per_replica,
        "purge_runs_total_by_replica": purge_per_replica,
        "jobs_runs_total_in_database": jobs1,
        "purge_runs_total_in_database": purge1,
        "expiring_tokens": EXPIRING,
        "warnings_issued": warnings,
        "webhook_deliveries": got.len(),
        "webhook_distinct_events": unique.len(),
        "revoked_tokens": REVOKED,
        "purged": purged,
    })
}

pub fn run(depth: Depth) -> Value {
    let plan = plan(depth);
    let cluster = PgCluster::start();
    let version = cluster.psql("postgres", "SHOW server_version");
    eprintln!("fleet: writes through a kill");
    let writes = writes_through_a_kill(&cluster, &plan);
    eprintln!("fleet: a change across replicas, through Envoy");
    let across = across_replicas(&cluster, &plan);
    eprintln!("fleet: long-polls held on one replica");
    let polls = many_polls(&cluster, &plan);
    eprintln!("fleet: creates per second");
    let creates = creates(&cluster, &plan);
    eprintln!("fleet: housekeeping on three replicas");
    let housekeeping = housekeeping(&cluster, &plan);
    json!({
        "postgres": version,
        "commit": command_output("git", &["rev-parse", "--short", "HEAD"]),
        "date": command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "writes": writes,
        "across": across,
        "polls": polls,
        "creates": creates,
        "housekeeping": housekeeping,
    })
}

pub fn markdown(v: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let w = &v["writes"];
    let a = &v["across"];
    let p = &v["polls"];
    let c = &v["creates"];
    let h = &v["housekeeping"];
    let window = f(&h["window_seconds"]);
    let mut md = String::new();
    md.push_str(&format!(
        "### Control plane fleet\n\nSeveral replicas on one PostgreSQL ({}, a throwaway cluster \
         of the real server), from `bench/src/fleet.rs`; commit {}, {}.\n\n",
        v["postgres"].as_str().unwrap_or("?"),
        v["commit"].as_str().unwrap_or("?"),
        v["date"].as_str().unwrap_or("?"),
    ));
    md.push_str("| target | result | |\n|---|---|---|\n");
    md.push_str(&format!(
        "| 0 acknowledged writes lost, 0 changes missed by a poller, over {} writes on two replicas with a `kill -9` in the middle | {} lost, {} missed (of {} tokens) | {} |\n",
        u(&w["writes_acknowledged"]),
        u(&w["lost"]),
        u(&w["poller_missed"]),
        u(&w["database_tokens"]),
        met(u(&w["lost"]) == 0 && u(&w["poller_missed"]) == 0)
    ));
    md.push_str(&format!(
        "| suspend on replica 1 → 403 through an Envoy that polls replica 2: p99 < {PROPAGATION_TARGET_MS:.0} ms | p99 {:.1} ms (median {:.1}, max {:.1}; {} trials) | {} |\n",
        f(&a["suspend_ms"]["p99"]),
        f(&a["suspend_ms"]["median"]),
        f(&a["suspend_ms"]["max"]),
        u(&a["trials"]),
        met(f(&a["suspend_ms"]["p99"]) < PROPAGATION_TARGET_MS)
    ));
    md.push_str(&format!(
        "| {} long-polls held on one replica, one change (made on the other) reaches all: p99 < 1 s | {} answered; p99 {:.0} ms (median {:.0}, max {:.0}) | {} |\n",
        u(&p["polls"]),
        u(&p["answered_with_change"]),
        f(&p["fanout_from_ack_ms"]["p99"]),
        f(&p["fanout_from_ack_ms"]["median"]),
        f(&p["fanout_from_ack_ms"]["max"]),
        met(u(&p["answered_with_change"]) == u(&p["polls"]) && f(&p["fanout_from_ack_ms"]["p99"]) < FANOUT_TARGET_MS)
    ));
    md.push_str(&format!(
        "| memory per held poll < {POLL_MEMORY_TARGET_KIB:.0} KiB | {:.1} KiB ({} → {} KiB resident); {} database read(s) for all of them | {} |\n",
        f(&p["kib_per_poll"]),
        u(&p["rss_before_kib"]),
        u(&p["rss_held_kib"]),
        f(&p["database_reads"]),
        met(f(&p["kib_per_poll"]) < POLL_MEMORY_TARGET_KIB)
    ));
    md.push_str(&format!(
        "| token creates per second on PostgreSQL, beside SQLite ({} clients) | PostgreSQL {:.0} (one replica), {:.0} (two); SQLite {:.0} | |\n",
        u(&c["clients"]),
        f(&c["postgres_one_replica_per_second"]),
        f(&c["postgres_two_replicas_per_second"]),
        f(&c["sqlite_per_second"]),
    ));
    let jobs = u(&h["jobs_runs_in_window"]);
    let purges = u(&h["purge_runs_in_window"]);
    let periods = window.floor() as u64;
    let once = jobs <= periods + 1
        && purges <= periods / 2 + 1
        && u(&h["warnings_issued"]) == u(&h["expiring_tokens"])
        && u(&h["webhook_deliveries"]) == u(&h["expiring_tokens"])
        && u(&h["webhook_distinct_events"]) == u(&h["expiring_tokens"])
        && u(&h["purged"]) == u(&h["revoked_tokens"]);
    md.push_str(&format!(
        "| expiry warnings and purge once per period with three replicas (counted) | in {window:.0} s: the 1 s jobs ran {jobs} times, the 2 s purge {purges} times (by replica: {} and {}); {} warnings and {} deliveries ({} distinct) for {} expiring tokens; {} of {} revoked tokens purged | {} |\n",
        h["jobs_runs_total_by_replica"],
        h["purge_runs_total_by_replica"],
        u(&h["warnings_issued"]),
        u(&h["webhook_deliveries"]),
        u(&h["webhook_distinct_events"]),
        u(&h["expiring_tokens"]),
        u(&h["purged"]),
        u(&h["revoked_tokens"]),
        met(once)
    ));
    md.push_str(&format!(
        "\nThe writes: {} acknowledged, {} attempts not acknowledged (the killed replica's, \
         tried again on the other), in {:.1} s; the poller moved between replicas {} times. \
         The polls took {:.1} s to open; the suspend answered in {:.1} ms.\n",
        u(&w["writes_acknowledged"]),
        u(&w["unacknowledged_attempts"]),
        f(&w["seconds"]),
        u(&w["poller_failovers"]),
        f(&p["open_seconds"]),
        f(&p["api_ms"]),
    ));
    if u(&p["polls"]) < u(&p["polls_wanted"]) {
        md.push_str(&format!(
            "\nOnly {} polls of {}: this process may open {} files.\n",
            u(&p["polls"]),
            u(&p["polls_wanted"]),
            u(&p["open_file_limit"])
        ));
    }
    md
}
