//! One limit for the whole fleet: three real Envoys (two workers each) in front of one real
//! control plane share a token's `max_rps`. Expected counts come from the measured elapsed
//! time and the limit; the tolerances are loose enough for a busy shared machine (the
//! precise figures are `make bench`'s "fleet accuracy" section), yet far from what a limit
//! per Envoy would admit.

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokengate_e2e::{http, wait_until, Flavor, Options, Stack};

/// Three stacks of Envoys at once are heavy for a two-core machine: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const CONVERGE: Duration = Duration::from_secs(60);

/// The control plane and three Envoys with distinct proxy ids.
fn fleet(flavor: Flavor) -> (Stack, Stack, Stack) {
    let mut a = Stack::start_with(Options {
        envoy: false,
        flavor,
        ..Options::default()
    });
    a.set_proxy_id("envoy-a");
    a.start_envoy();
    let b = a.another_envoy("envoy-b", "");
    let c = a.another_envoy("envoy-c", "");
    (a, b, c)
}

/// Requests sent at a steady rate to each target from its own thread, each recorded with
/// its send time (seconds since the start) and status (0: no answer).
struct Driver {
    start: Instant,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<(f64, u16)>>>,
}

impl Driver {
    fn start(targets: &[(SocketAddr, f64)], secret: &str) -> Driver {
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = targets
            .iter()
            .map(|&(addr, rate)| {
                let (stop, secret) = (stop.clone(), secret.to_string());
                std::thread::spawn(move || {
                    let every = Duration::from_secs_f64(1.0 / rate);
                    let mut next = Instant::now();
                    let mut sent = vec![];
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if now < next {
                            std::thread::sleep(next - now);
                        } else if now - next > Duration::from_secs(1) {
                            // Fell behind (a busy machine): no burst to catch up.
                            next = now;
                        }
                        let at = start.elapsed().as_secs_f64();
                        let status = http(addr, "GET", "/", &[("x-api-token", &secret)], None)
                            .map_or(0, |r| r.status);
                        sent.push((at, status));
                        next += every;
                    }
                    sent
                })
            })
            .collect();
        Driver {
            start,
            stop,
            threads,
        }
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Stops every thread; each target's requests.
    fn finish(self) -> Vec<Vec<(f64, u16)>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("driver thread"))
            .collect()
    }
}

/// Requests sent in `[from, to)` that got `status`.
fn count(sent: &[(f64, u16)], status: u16, from: f64, to: f64) -> f64 {
    sent.iter()
        .filter(|(at, s)| *s == status && *at >= from && *at < to)
        .count() as f64
}

fn admitted(sent: &[(f64, u16)], from: f64, to: f64) -> f64 {
    count(sent, 200, from, to)
}

fn offered(sent: &[(f64, u16)], from: f64, to: f64) -> f64 {
    admitted(sent, from, to) + count(sent, 429, from, to)
}

fn token(stack: &Stack, body: Value) -> (String, String) {
    stack.create_token(body)
}

/// The token's live fleet view (`GET /v1/tokens/{id}`).
fn view(stack: &Stack, id: &str) -> Value {
    let r = stack.admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["fleet"].clone()
}

fn share_of(v: &Value, proxy: &str) -> Option<f64> {
    v["shares"]
        .as_array()?
        .iter()
        .find(|s| s["proxy_id"] == proxy)
        .and_then(|s| s["share_rps"].as_f64())
}

fn shares_sum(v: &Value) -> f64 {
    v["shares"].as_array().map_or(0.0, |a| {
        a.iter().filter_map(|s| s["share_rps"].as_f64()).sum()
    })
}

/// Waits until the view lists exactly `proxies` as holding shares that add up to `limit`.
fn wait_for_shares(stack: &Stack, id: &str, proxies: &[&str], limit: f64) -> Value {
    let mut last = Value::Null;
    wait_until(CONVERGE, "the fleet's shares", || {
        last = view(stack, id);
        let held: Vec<&str> = last["shares"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["proxy_id"].as_str()).collect())
            .unwrap_or_default();
        held.len() == proxies.len()
            && proxies.iter().all(|p| held.contains(p))
            && (shares_sum(&last) - limit).abs() < 0.01
    });
    last
}

/// Skewed load (most of it on one Envoy) on one fleet-limited token: the three Envoys
/// together admit close to the limit, where a limit per Envoy would admit far more.
fn skewed_load_holds_the_total(a: &Stack, b: &Stack, c: &Stack) {
    const LIMIT: f64 = 20.0;
    let (id, secret) = token(a, json!({"name": "fleet-skew", "max_rps": 20}));
    let d = Driver::start(
        &[
            (a.envoy_addr(), 36.0),
            (b.envoy_addr(), 8.0),
            (c.envoy_addr(), 4.0),
        ],
        &secret,
    );
    wait_for_shares(a, &id, &["envoy-a", "envoy-b", "envoy-c"], LIMIT);
    let from = d.now();
    std::thread::sleep(Duration::from_secs(8));
    let to = d.now();
    let live = view(a, &id);
    let sent = d.finish();
    let secs = to - from;
    let total: f64 = sent.iter().map(|s| admitted(s, from, to)).sum();
    let asked: f64 = sent.iter().map(|s| offered(s, from, to)).sum();
    // A limit per Envoy would admit 20 + 8 + 4 = 32 a second.
    let most = LIMIT * secs + LIMIT + LIMIT;
    let least = 0.75 * LIMIT.min(asked / secs) * secs;
    assert!(
        total <= most && total >= least,
        "admitted {total} in {secs:.2} s (offered {asked}), expected {least:.0}..={most:.0}; \
         per Envoy {:?}; fleet view {live}",
        sent.iter()
            .map(|s| admitted(s, from, to))
            .collect::<Vec<_>>()
    );
    // The view the CLI and console show: three proxies, shares adding up to the limit, the
    // busiest Envoy holding the largest.
    assert_eq!(live["proxies_live"], 3, "{live}");
    assert!((shares_sum(&live) - LIMIT).abs() < 0.01, "{live}");
    let (sa, sc) = (share_of(&live, "envoy-a"), share_of(&live, "envoy-c"));
    assert!(sa > sc, "{live}");
    let admitted_rps = live["admitted_rps"].as_f64().unwrap_or(0.0);
    assert!(admitted_rps > 0.0 && admitted_rps <= 2.0 * LIMIT, "{live}");
}

#[test]
fn three_envoys_share_one_limit_then_lose_a_proxy_then_the_control_plane() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut a, mut b, c) = fleet(Flavor::Wasm);
    skewed_load_holds_the_total(&a, &b, &c);

    // "proxy" scope: the old meaning, the limit per Envoy.
    let (_, secret) = token(
        &a,
        json!({"name": "per-proxy", "max_rps": 5, "limit_scope": "proxy"}),
    );
    let envoys = [a.envoy_addr(), b.envoy_addr(), c.envoy_addr()];
    let d = Driver::start(&envoys.map(|e| (e, 12.0)), &secret);
    std::thread::sleep(Duration::from_secs(6));
    let to = d.now();
    let sent = d.finish();
    for (i, s) in sent.iter().enumerate() {
        let got = admitted(s, 0.0, to);
        let asked = offered(s, 0.0, to);
        assert!(
            got >= 0.8 * 5.0f64.min(asked / to) * to && got <= 5.0 * to + 5.0 + 5.0,
            "Envoy {i} admitted {got} of {asked} in {to:.2} s with 5/s per Envoy"
        );
    }

    // A proxy that stops reporting loses its share and the others take it.
    const LIMIT: f64 = 20.0;
    let (id, secret) = token(&a, json!({"name": "fleet-loss", "max_rps": 20}));
    let d = Driver::start(
        &[
            (a.envoy_addr(), 25.0),
            (b.envoy_addr(), 25.0),
            (c.envoy_addr(), 5.0),
        ],
        &secret,
    );
    wait_for_shares(&a, &id, &["envoy-a", "envoy-b", "envoy-c"], LIMIT);
    b.stop_envoy();
    let before = wait_for_shares(&a, &id, &["envoy-a", "envoy-c"], LIMIT);
    assert_eq!(before["proxies_live"], 2, "{before}");
    // The load on C is 5/s: A's share grows to about the rest, from a third of the limit.
    let from = d.now();
    std::thread::sleep(Duration::from_secs(6));
    let to = d.now();
    let secs = to - from;
    let shares = view(&a, &id);

    // The control plane goes away: each proxy keeps its last share until it expires, then
    // takes max_rps / the proxies it last knew of (two): never unlimited, never zero.
    a.stop_control_plane();
    let killed = d.now();
    std::thread::sleep(Duration::from_secs(11));
    let end = d.now();
    let sent = d.finish();
    let (sa, sc) = (&sent[0], &sent[2]);
    let a_rate = admitted(sa, from, to) / secs;
    assert!(
        a_rate >= 0.8 * 15.0 && a_rate <= 15.0 + 2.0 * LIMIT / secs,
        "Envoy A admitted {a_rate:.1}/s after B left (offered {:.1}/s); shares {shares}",
        offered(sa, from, to) / secs
    );
    let total = |from: f64, to: f64| admitted(sa, from, to) + admitted(sc, from, to);
    assert!(
        total(from, to) <= LIMIT * secs + 2.0 * LIMIT,
        "admitted {} in {secs:.2} s",
        total(from, to)
    );
    // Within the last share while it holds (its time to live is three report intervals).
    let share_a = share_of(&shares, "envoy-a").unwrap_or(LIMIT);
    let held = admitted(sa, killed, killed + 2.0);
    assert!(
        held <= share_a * 2.0 + share_a + 2.0,
        "Envoy A admitted {held} in the 2 s after the control plane died, share {share_a}/s"
    );
    // Then the fallback: 20 / 2 proxies = 10/s for A (C asks only 5/s).
    let (fb_from, fb_to) = (killed + 4.5, end);
    let fb_secs = fb_to - fb_from;
    let fallback = admitted(sa, fb_from, fb_to);
    assert!(
        fallback >= 0.7 * 10.0 * fb_secs && fallback <= 10.0 * fb_secs + 10.0 + 3.0,
        "Envoy A admitted {fallback} in {fb_secs:.2} s of fallback (10/s expected)"
    );
    let all = total(killed, end);
    assert!(
        all <= LIMIT * (end - killed) + LIMIT + 3.0,
        "admitted {all} in {:.2} s without the control plane: above the limit plus burst",
        end - killed
    );
}

#[test]
fn the_native_module_shares_one_limit_too() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b, c) = fleet(Flavor::Native);
    skewed_load_holds_the_total(&a, &b, &c);
}
