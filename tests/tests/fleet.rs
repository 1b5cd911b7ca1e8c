//! Several control-plane replicas on one PostgreSQL (the real server, a throwaway cluster)
//! behind a real Envoy whose control-plane cluster lists every replica; real HTTP, real
//! faults: a replica killed with SIGKILL, PostgreSQL stopped and started, a replica cut off
//! from its database by a proxy that stops forwarding.

use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokengate_e2e::{wait_until, Response, Stack};
use tokengate_pgtest::proxy::{Cut, TcpProxy};
use tokengate_pgtest::PgCluster;

const PROPAGATION: Duration = Duration::from_secs(20);
const RECOVERY: Duration = Duration::from_secs(90);

fn created(r: &Response) -> (String, String) {
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

fn create_on(stack: &Stack, i: usize, name: &str) -> (String, String) {
    created(
        &stack
            .admin_on(i, "POST", "/v1/tokens", Some(&json!({ "name": name })))
            .unwrap(),
    )
}

fn action_on(stack: &Stack, i: usize, id: &str, action: &str) {
    let r = stack
        .admin_on(i, "POST", &format!("/v1/tokens/{id}/{action}"), None)
        .unwrap();
    assert_eq!(r.status, 200, "{action} on replica {i}: {}", r.body);
}

/// The replica holding Envoy's long-poll, from the replicas' own metrics.
fn poll_holder(stack: &Stack) -> usize {
    let mut holder = None;
    wait_until(PROPAGATION, "a replica holding Envoy's long-poll", || {
        holder = (0..stack.replica_count())
            .find(|i| stack.replica_metric(*i, "tokengate_sync_polls_held") == Some(1.0));
        holder.is_some()
    });
    holder.unwrap()
}

/// Envoy's view of the control-plane hosts: `(port, healthy)`.
fn envoy_hosts(stack: &Stack) -> Vec<(u16, bool)> {
    let r = stack.envoy_admin("/clusters");
    r.body
        .lines()
        .filter(|l| l.starts_with("tokengate_control_plane::") && l.contains("::health_flags::"))
        .filter_map(|l| {
            let mut parts = l.split("::");
            let addr = parts.nth(1)?;
            let flags = parts.nth(1)?;
            Some((addr.rsplit(':').next()?.parse().ok()?, flags == "healthy"))
        })
        .collect()
}

/// Requests through Envoy with `token` until stopped; counts the answers that were not 200.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    wrong: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(stack: &Stack, token: &str) -> Traffic {
        let (stop, sent, wrong) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(vec![])),
        );
        let addr = stack.envoy_addr();
        let token = token.to_string();
        let (s, n, w) = (stop.clone(), sent.clone(), wrong.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let r =
                    tokengate_e2e::http(addr, "GET", "/hello", &[("X-API-Token", &token)], None);
                n.fetch_add(1, Ordering::SeqCst);
                match r {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => w.lock().unwrap().push(format!("{} {}", r.status, r.body)),
                    Err(e) => w.lock().unwrap().push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Traffic {
            stop,
            sent,
            wrong,
            thread: Some(thread),
        }
    }

    /// Stops; returns how many requests were sent, asserting every one was admitted.
    fn finish(mut self, what: &str) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let wrong = self.wrong.lock().unwrap();
        assert!(
            wrong.is_empty(),
            "{what}: {} of {} requests refused: {:?}",
            wrong.len(),
            self.sent.load(Ordering::SeqCst),
            &wrong[..wrong.len().min(5)]
        );
        self.sent.load(Ordering::SeqCst)
    }
}

#[test]
fn changes_made_through_any_replica_reach_envoy_and_both_replicas_came_up_together() {
    // Both replicas start at once on an empty database: they race for the first migration.
    let db = tokengate_pgtest::shared().fresh_database();
    let stack = Stack::start_fleet(&db, 2, true);
    wait_until(PROPAGATION, "Envoy to see both replicas healthy", || {
        let hosts = envoy_hosts(&stack);
        hosts.len() == 2 && hosts.iter().all(|(_, healthy)| *healthy)
    });
    let (id, token) = create_on(&stack, 0, "fleet-one");
    let took = stack.wait_for_status(&token, 200, PROPAGATION);
    println!("created on replica 0: admitted after {took:?}");
    for (replica, action, status) in [
        (1, "suspend", 403),
        (0, "reactivate", 200),
        (1, "suspend", 403),
        (1, "reactivate", 200),
    ] {
        action_on(&stack, replica, &id, action);
        let took = stack.wait_for_status(&token, status, PROPAGATION);
        println!("{action} on replica {replica}: {status} after {took:?}");
    }
    let r = stack
        .admin_on(1, "DELETE", &format!("/v1/tokens/{id}"), None)
        .unwrap();
    assert_eq!(r.status, 204);
    stack.wait_for_status(&token, 401, PROPAGATION);
    // One store: the same id and version from both.
    let a = stack.admin_on(0, "GET", "/readyz", None).unwrap();
    let b = stack.admin_on(1, "GET", "/readyz", None).unwrap();
    assert_eq!((a.status, b.status), (200, 200));
}

#[test]
fn killing_a_replica_under_traffic_and_writes_loses_no_acknowledged_write() {
    let db = tokengate_pgtest::shared().fresh_database();
    let mut stack = Stack::start_fleet(&db, 2, true);
    let (_, good) = create_on(&stack, 0, "keeps-working");
    stack.wait_for_status(&good, 200, PROPAGATION);
    let holder = poll_holder(&stack);
    let survivor = 1 - holder;
    println!("replica {holder} holds Envoy's long-poll; killing it");
    let traffic = Traffic::start(&stack, &good);

    // Writers on both replicas; every acknowledged write is remembered.
    let acked: Arc<Mutex<Vec<(String, &'static str)>>> = Arc::default();
    let unanswered: Arc<Mutex<std::collections::BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|i| {
            let (addr, auth) = (
                stack.replica_addr(i),
                format!("Bearer {}", stack.admin_token),
            );
            let (acked, stop) = (acked.clone(), stop.clone());
            let unanswered = unanswered.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let body = json!({ "name": format!("w{i}-{n}") }).to_string();
                    let headers = [("Authorization", auth.as_str())];
                    let Ok(r) =
                        tokengate_e2e::http(addr, "POST", "/v1/tokens", &headers, Some(&body))
                    else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    if r.status != 201 {
                        continue;
                    }
                    let id = r.json()["id"].as_str().unwrap().to_string();
                    acked.lock().unwrap().push((id.clone(), "active"));
                    if n % 2 == 0 {
                        let path = format!("/v1/tokens/{id}/suspend");
                        match tokengate_e2e::http(addr, "POST", &path, &headers, None) {
                            Ok(r) if r.status == 200 => {
                                acked.lock().unwrap().push((id, "suspended"));
                            }
                            // No answer (the replica was killed mid-call): the suspension
                            // may or may not have been committed; only acknowledged writes
                            // are promised.
                            Err(_) => {
                                unanswered.lock().unwrap().insert(id);
                            }
                            Ok(_) => {}
                        }
                    }
                }
            })
        })
        .collect();
    wait_until(PROPAGATION, "some writes on both replicas", || {
        acked.lock().unwrap().len() >= 20
    });
    stack.kill_replica(holder);
    let killed_at = acked.lock().unwrap().len();
    wait_until(PROPAGATION, "more writes after the kill", || {
        acked.lock().unwrap().len() >= killed_at + 20
    });
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }

    // Envoy syncs through the survivor: a new token and a suspension reach it.
    let (id, token) = create_on(&stack, survivor, "after-the-kill");
    let took = stack.wait_for_status(&token, 200, PROPAGATION);
    println!("a token created on the survivor admitted {took:?} later");
    action_on(&stack, survivor, &id, "suspend");
    stack.wait_for_status(&token, 403, PROPAGATION);
    assert_eq!(poll_holder(&stack), survivor);
    let sent = traffic.finish("through the kill");
    println!("{sent} requests through Envoy during the kill, all admitted");

    // Every write acknowledged by either replica, the dead one's included, is there.
    let acked = acked.lock().unwrap().clone();
    let mut expected = std::collections::BTreeMap::new();
    for (id, status) in &acked {
        expected.insert(id.clone(), *status);
    }
    for (id, status) in &expected {
        let r = stack
            .admin_on(survivor, "GET", &format!("/v1/tokens/{id}"), None)
            .unwrap();
        assert_eq!(r.status, 200, "acknowledged token {id} is missing");
        let got = r.json()["status"].as_str().unwrap_or_default().to_string();
        let unacknowledged_suspend =
            *status == "active" && got == "suspended" && unanswered.lock().unwrap().contains(id);
        assert!(
            got == *status || unacknowledged_suspend,
            "{id}: {got}, acknowledged as {status}"
        );
    }
    println!(
        "{} acknowledged writes ({} tokens), none lost",
        acked.len(),
        expected.len()
    );
}

/// A write's answer: the replica, the status, the error code, `Retry-After`, and the id of
/// the token created.
type WriteAnswer = (usize, u16, Option<String>, Option<String>, Option<String>);

/// Creates tokens on every replica in turn until stopped; remembers each answer.
struct Writer {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<WriteAnswer>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(stack: &Stack) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let answers: Arc<Mutex<Vec<_>>> = Arc::default();
        let addrs: Vec<_> = (0..stack.replica_count())
            .map(|i| stack.replica_addr(i))
            .collect();
        let auth = format!("Bearer {}", stack.admin_token);
        let (s, a) = (stop.clone(), answers.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0usize;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                let i = n % addrs.len();
                let body = json!({ "name": format!("load-{n}") }).to_string();
                let r = tokengate_e2e::http(
                    addrs[i],
                    "POST",
                    "/v1/tokens",
                    &[("Authorization", auth.as_str())],
                    Some(&body),
                )
                .expect("a replica stopped answering");
                let id = (r.status == 201).then(|| r.json()["id"].as_str().unwrap().to_string());
                let retry = r.header("retry-after").map(str::to_string);
                a.lock()
                    .unwrap()
                    .push((i, r.status, r.error_code(), retry, id));
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Writer {
            stop,
            answers,
            thread: Some(thread),
        }
    }

    fn refused(&self) -> usize {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.1 == 503)
            .count()
    }

    fn finish(mut self) -> Vec<WriteAnswer> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let answers = self.answers.lock().unwrap().clone();
        answers
    }
}

#[test]
fn postgres_restarted_under_load_replicas_answer_503_then_recover_on_their_own() {
    let cluster = PgCluster::start();
    let stack = Stack::start_fleet_with(&cluster.url(), 2, true, |s| {
        s.control_plane_env
            .push(("TOKENGATE_DB_TIMEOUT".into(), "2s".into()));
    });
    let (id, good) = create_on(&stack, 0, "through-the-outage");
    stack.wait_for_status(&good, 200, PROPAGATION);
    let traffic = Traffic::start(&stack, &good);
    let writer = Writer::start(&stack);
    wait_until(PROPAGATION, "writes before the restart", || {
        writer.answers.lock().unwrap().len() >= 10
    });

    let down = Instant::now();
    cluster.stop();
    for i in 0..2 {
        let addr = stack.replica_addr(i);
        wait_until(RECOVERY, "a replica to say it is not ready", || {
            tokengate_e2e::http(addr, "GET", "/readyz", &[], None).is_ok_and(|r| {
                r.status == 503 && r.error_code().as_deref() == Some("store_unavailable")
            })
        });
        let r = tokengate_e2e::http(addr, "GET", "/healthz", &[], None).unwrap();
        assert_eq!(r.status, 200, "alive while the database is away");
    }
    // Writes are refused on both replicas while it is away.
    wait_until(RECOVERY, "writes refused on both replicas", || {
        let answers = writer.answers.lock().unwrap();
        (0..2).all(|i| answers.iter().filter(|a| a.0 == i && a.1 == 503).count() >= 3)
    });
    cluster.start_again();
    let outage = down.elapsed();
    for i in 0..2 {
        let addr = stack.replica_addr(i);
        wait_until(RECOVERY, "a replica to be ready again", || {
            tokengate_e2e::http(addr, "GET", "/readyz", &[], None).is_ok_and(|r| r.status == 200)
        });
    }
    let refused = writer.refused();
    wait_until(RECOVERY, "writes accepted again on both replicas", || {
        let answers = writer.answers.lock().unwrap();
        (0..2).all(|i| {
            answers
                .iter()
                .skip(refused)
                .filter(|a| a.0 == i && a.1 == 201)
                .count()
                >= 3
        })
    });
    let answers = writer.finish();
    let sent = traffic.finish("while PostgreSQL was restarted");
    println!(
        "{sent} requests through Envoy, all admitted, over a {outage:?} outage; {} writes, {} refused",
        answers.len(),
        answers.iter().filter(|a| a.1 == 503).count()
    );
    for (i, status, code, retry, _) in &answers {
        match status {
            201 => {}
            503 => {
                assert_eq!(code.as_deref(), Some("store_unavailable"), "replica {i}");
                assert_eq!(retry.as_deref(), Some("1"), "replica {i}: Retry-After");
            }
            other => panic!("replica {i} answered {other} ({code:?})"),
        }
    }
    // Every write the replicas acknowledged, before or after, is there.
    for id in answers.iter().filter_map(|a| a.4.as_ref()) {
        let r = stack
            .admin_on(0, "GET", &format!("/v1/tokens/{id}"), None)
            .unwrap();
        assert_eq!(r.status, 200, "acknowledged token {id} is missing");
    }
    // Changes flow again, through either replica.
    action_on(&stack, 1, &id, "suspend");
    stack.wait_for_status(&good, 403, PROPAGATION);
    action_on(&stack, 0, &id, "reactivate");
    stack.wait_for_status(&good, 200, PROPAGATION);
    let mut stack = stack;
    for i in 0..2 {
        assert!(stack.replica_alive(i), "replica {i} exited");
    }
    // Nothing retried in a loop: the listener's reconnections back off.
    let logs = stack.logs();
    let reconnects = logs
        .lines()
        .filter(|l| l.contains("change listener cannot connect"))
        .count();
    let bound = 2 * (8 + outage.as_secs() as usize / 5 + 4);
    assert!(
        reconnects <= bound,
        "{reconnects} listener reconnection attempts in {outage:?} (at most {bound})"
    );
}

#[test]
fn a_replica_cut_off_from_postgres_is_left_aside_and_no_envoy_version_goes_back() {
    let cluster = tokengate_pgtest::shared();
    let db = cluster.fresh_database();
    let proxy = TcpProxy::start(([127, 0, 0, 1], cluster.port()).into());
    let through_proxy = proxy.url(&db, cluster.port());
    let stack = Stack::start_fleet_with(&db, 2, true, |s| {
        s.replica_db.insert(1, through_proxy);
        s.control_plane_env
            .push(("TOKENGATE_DB_TIMEOUT".into(), "2s".into()));
    });
    let (id, token) = create_on(&stack, 0, "watched");
    stack.wait_for_status(&token, 200, PROPAGATION);

    // Envoy's state version, sampled all along: it must never go down.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let admin = stack.envoy_admin_addr();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = vec![];
            while !stop.load(Ordering::SeqCst) {
                if let Ok(r) = tokengate_e2e::http(
                    admin,
                    "GET",
                    "/stats?filter=^wasmcustom.tokengate.state_version$",
                    &[],
                    None,
                ) {
                    if let Some(v) = r
                        .body
                        .lines()
                        .find_map(|l| l.split_once(": ")?.1.trim().parse::<u64>().ok())
                    {
                        seen.push(v);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        })
    };

    proxy.set(Cut::Blackhole);
    let cut_port = stack.replica_port(1);
    wait_until(
        RECOVERY,
        "the cut-off replica to say it is not ready",
        || {
            stack
                .admin_on(1, "GET", "/readyz", None)
                .is_ok_and(|r| r.status == 503)
        },
    );
    // Within a few health checks (every 2 s), not Envoy's default once a minute for a
    // cluster without routed traffic.
    wait_until(
        PROPAGATION,
        "Envoy to set the cut-off replica aside",
        || {
            envoy_hosts(&stack)
                .iter()
                .any(|(port, healthy)| *port == cut_port && !healthy)
        },
    );
    // The other replica carries on: changes reach Envoy through it.
    for (action, status) in [("suspend", 403), ("reactivate", 200), ("suspend", 403)] {
        action_on(&stack, 0, &id, action);
        stack.wait_for_status(&token, status, PROPAGATION);
    }
    let (_, fresh) = create_on(&stack, 0, "made-during-the-cut");
    stack.wait_for_status(&fresh, 200, PROPAGATION);

    proxy.set(Cut::Open);
    wait_until(RECOVERY, "the cut-off replica to be ready again", || {
        stack
            .admin_on(1, "GET", "/readyz", None)
            .is_ok_and(|r| r.status == 200)
    });
    wait_until(PROPAGATION, "Envoy to take the replica back", || {
        envoy_hosts(&stack)
            .iter()
            .any(|(port, healthy)| *port == cut_port && *healthy)
    });
    action_on(&stack, 1, &id, "reactivate");
    stack.wait_for_status(&token, 200, PROPAGATION);
    let version: u64 = stack
        .admin_on(1, "GET", &format!("/v1/tokens/{id}"), None)
        .unwrap()
        .json()["version"]
        .as_u64()
        .unwrap();
    wait_until(PROPAGATION, "Envoy to hold the latest version", || {
        stack.envoy_stat("wasmcustom.tokengate.state_version") >= version
    });
    stop.store(true, Ordering::SeqCst);
    let seen = sampler.join().unwrap();
    assert!(seen.len() > 10, "too few samples: {seen:?}");
    let back: Vec<_> = seen.windows(2).filter(|w| w[1] < w[0]).collect();
    assert!(back.is_empty(), "Envoy's version went back: {back:?}");
    println!(
        "{} samples of Envoy's version, from {} to {}, never down",
        seen.len(),
        seen[0],
        seen[seen.len() - 1]
    );
}
