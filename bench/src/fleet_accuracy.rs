//! Fleet accuracy: one token's `max_rps` shared by several Envoys (two workers each, the
//! wasm filter) in front of one control plane.
//!
//! - **Splits**: 3 Envoys × maxRPS 10 / 100 / 1,000 × load split evenly, 80/15/5 and all on
//!   one; twice maxRPS offered in total, open-loop (paced per Envoy, kept-alive
//!   connections). Target: the total admitted within ±5 % of maxRPS after a 2 s warm-up
//!   (stretch ±2 %); no 1 s window across the fleet above maxRPS + burst.
//! - **Shift**: maxRPS 100, the split moves from 80/15/5 to 5/15/80 mid-run; the admitted
//!   rate over time (a chart), and how long until the total is back within ±5 % (≤ 2 s).
//! - **Join and leave**: a fourth Envoy starts taking load, then stops; how long until the
//!   control plane's shares settle (the four, then the three, add up to the limit and the
//!   total is within ±5 %: ≤ 2 s).
//! - **CPU per request**: fleet against proxy scope, A/B/A/B in one run on one Envoy
//!   (one worker), closed-loop, limits far above the load so every request is admitted.
//! - **Control-plane cost** of the reports: 100 simulated proxies reporting 1,000 active
//!   fleet-limited tokens each, once a second: CPU and bytes per proxy per second.

use crate::fleet::replica_pid;
use crate::procstat::cpu_micros;
use crate::report::{command_output, met};
use crate::{client, Depth, Envoy};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokengate_e2e::{http, Options, Stack};

const WARMUP: Duration = Duration::from_secs(2);
const TARGET_PCT: f64 = 5.0;
const STRETCH_PCT: f64 = 2.0;
const SETTLE_TARGET_S: f64 = 2.0;
const CPU_TARGET_PCT: f64 = 5.0;
const PATH: &str = "/bench";
/// Rolling windows for the time series.
const STEP_MS: u64 = 100;

struct Plan {
    rates: &'static [u32],
    seconds: u64,
    phase_seconds: u64,
    cpu_seconds: u64,
    proxies: usize,
    tokens: usize,
    report_seconds: u64,
}

fn plan(depth: Depth) -> Plan {
    match depth {
        Depth::Full => Plan {
            rates: &[10, 100, 1000],
            seconds: 8,
            phase_seconds: 8,
            cpu_seconds: 5,
            proxies: 100,
            tokens: 1_000,
            report_seconds: 10,
        },
        Depth::Quick => Plan {
            rates: &[100],
            seconds: 3,
            phase_seconds: 5,
            cpu_seconds: 2,
            proxies: 20,
            tokens: 200,
            report_seconds: 3,
        },
    }
}

const SPLITS: [(&str, [f64; 3]); 3] = [
    ("even", [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]),
    ("80/15/5", [0.80, 0.15, 0.05]),
    ("all on one", [1.0, 0.0, 0.0]),
];

fn envoy(stack: &Stack, label: &str, proxy: &str, workers: u32) -> Envoy {
    Envoy::start(
        label,
        "tokengate",
        workers,
        &[
            ("CONTROL_PLANE_PORT", stack.control_plane_port.to_string()),
            ("SYNC_TOKEN", stack.sync_token.clone()),
            ("PLUGIN_EXTRA", format!(r#""proxy_id": "{proxy}","#)),
        ],
    )
}

/// Open-loop load: one thread and one kept-alive connection per target, each sending at a
/// rate that can change mid-run; every request recorded as (target, sent µs, status).
struct Paced {
    stop: Arc<AtomicBool>,
    /// Thousandths of a request per second, per target.
    rates: Vec<Arc<AtomicU64>>,
    threads: Vec<JoinHandle<Vec<(usize, u64, u16)>>>,
    started: Instant,
}

impl Paced {
    fn start(targets: &[SocketAddr], rates: &[f64], token: &str) -> Paced {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let shared: Vec<Arc<AtomicU64>> = rates
            .iter()
            .map(|r| Arc::new(AtomicU64::new((r * 1_000.0) as u64)))
            .collect();
        let threads = targets
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                let (stop, rate) = (stop.clone(), shared[i].clone());
                let request = client::request_bytes(addr, PATH, token);
                std::thread::spawn(move || {
                    let mut conn = client::Conn::new(addr, request);
                    let mut out = Vec::with_capacity(1 << 14);
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        let milli = rate.load(Ordering::Relaxed);
                        if milli == 0 {
                            std::thread::sleep(Duration::from_millis(5));
                            next = Instant::now();
                            continue;
                        }
                        let now = Instant::now();
                        if now < next {
                            std::thread::sleep(next - now);
                        } else if now - next > Duration::from_millis(100) {
                            next = now;
                        }
                        let mut sent = Instant::now();
                        let status = conn.call(&mut sent).unwrap_or(0);
                        out.push((i, micros(started, sent), status));
                        next += Duration::from_secs_f64(1_000.0 / milli as f64);
                    }
                    out
                })
            })
            .collect();
        Paced {
            stop,
            rates: shared,
            threads,
            started,
        }
    }

    fn set(&self, rates: &[f64]) {
        for (slot, r) in self.rates.iter().zip(rates) {
            slot.store((r * 1_000.0) as u64, Ordering::Relaxed);
        }
    }

    fn now_us(&self) -> u64 {
        micros(self.started, Instant::now())
    }

    fn finish(self) -> Vec<(usize, u64, u16)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<_> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("a load thread panicked"))
            .collect();
        all.sort_unstable_by_key(|s| s.1);
        all
    }
}

fn micros(since: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(since).as_micros() as u64
}

fn admitted_in(samples: &[(usize, u64, u16)], from: u64, to: u64) -> usize {
    samples
        .iter()
        .filter(|s| s.2 == 200 && (from..to).contains(&s.1))
        .count()
}

/// The most admitted requests sent within any 1 s.
fn worst_window(samples: &[(usize, u64, u16)]) -> usize {
    let times: Vec<u64> = samples.iter().filter(|s| s.2 == 200).map(|s| s.1).collect();
    let (mut best, mut lo) = (0, 0);
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= 1_000_000 {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

fn pct(admitted_rps: f64, max_rps: u32) -> f64 {
    (admitted_rps - f64::from(max_rps)) / f64::from(max_rps) * 100.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn wait_known(stack: &Stack, envoys: &[&Envoy], secret: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for e in envoys {
        while http(e.addr(), "GET", PATH, &[("x-api-token", secret)], None)
            .map_or(true, |r| r.status == 401 || r.status == 503)
        {
            assert!(
                Instant::now() < deadline,
                "the token never reached {}",
                e.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = stack;
}

fn splits(stack: &Stack, envoys: &[Envoy], plan: &Plan) -> Vec<Value> {
    let addrs: Vec<SocketAddr> = envoys.iter().map(Envoy::addr).collect();
    let mut cells = vec![];
    for &max_rps in plan.rates {
        for (name, split) in SPLITS {
            let label = format!("fleet-{max_rps}-{}", name.replace(['/', ' '], "-"));
            let (_, secret) = stack.create_token(json!({"name": label, "max_rps": max_rps}));
            wait_known(stack, &envoys.iter().collect::<Vec<_>>(), &secret);
            let offered = 2.0 * f64::from(max_rps);
            let rates: Vec<f64> = split.iter().map(|s| s * offered).collect();
            let load = Paced::start(&addrs, &rates, &secret);
            std::thread::sleep(WARMUP + Duration::from_secs(plan.seconds));
            let end = load.now_us();
            let samples = load.finish();
            let from = WARMUP.as_micros() as u64;
            let secs = (end - from) as f64 / 1e6;
            let admitted = admitted_in(&samples, from, end) as f64 / secs;
            let sent = samples.iter().filter(|s| s.1 >= from && s.2 != 0).count() as f64 / secs;
            let error = pct(admitted, max_rps);
            let worst = worst_window(&samples);
            let bound = 2 * max_rps as usize;
            eprintln!(
                "  maxRPS {max_rps:>4} {name:>10}: offered {sent:.0}/s, admitted {admitted:.1}/s \
                 ({error:+.2} %), worst 1 s {worst} (bound {bound})"
            );
            cells.push(json!({
                "max_rps": max_rps,
                "split": name,
                "offered_rps": round2(sent),
                "admitted_rps": round2(admitted),
                "error_pct": round2(error),
                "ok": error.abs() <= TARGET_PCT,
                "stretch_ok": error.abs() <= STRETCH_PCT,
                "worst_window": worst,
                "limit_plus_burst": bound,
                "window_ok": worst <= bound,
            }));
        }
    }
    cells
}

/// The total admitted per second over a rolling 1 s, every `STEP_MS`, with each Envoy's.
fn series(samples: &[(usize, u64, u16)], envoys: usize, end: u64) -> Vec<Value> {
    let mut out = vec![];
    let mut t = 1_000_000;
    while t <= end {
        let mut per = vec![0usize; envoys];
        for s in samples
            .iter()
            .filter(|s| s.2 == 200 && s.1 + 1_000_000 > t && s.1 <= t)
        {
            per[s.0] += 1;
        }
        out.push(
            json!({"t": round2(t as f64 / 1e6), "total": per.iter().sum::<usize>(), "per": per}),
        );
        t += STEP_MS * 1_000;
    }
    out
}

/// Seconds after `at_s` from which every 1 s window is within ±`TARGET_PCT` of `max_rps`
/// for `HOLD_S` (None: never within the series). A window is judged from its start (the
/// series holds each window at its end), so a window that began before the event does not
/// count against it.
fn settle(series: &[Value], at_s: f64, max_rps: u32) -> Option<f64> {
    let ok = |v: &Value| {
        let total = v["total"].as_f64().unwrap_or(0.0);
        pct(total, max_rps).abs() <= TARGET_PCT
    };
    let start = |v: &Value| v["t"].as_f64().unwrap_or(0.0) - 1.0;
    let after: Vec<&Value> = series.iter().filter(|v| start(v) >= at_s).collect();
    (0..after.len())
        .find(|&i| {
            let from = start(after[i]);
            let held: Vec<&&Value> = after[i..]
                .iter()
                .take_while(|v| start(v) <= from + HOLD_S)
                .collect();
            held.last()
                .is_some_and(|v| start(v) >= from + HOLD_S - 0.11)
                && held.iter().all(|v| ok(v))
        })
        .map(|i| round2(start(after[i]) - at_s))
}

/// How long the total must hold within the target to count as settled.
const HOLD_S: f64 = 3.0;

fn shift(stack: &Stack, envoys: &[Envoy], plan: &Plan) -> Value {
    let max_rps = 100;
    let addrs: Vec<SocketAddr> = envoys.iter().map(Envoy::addr).collect();
    let (_, secret) = stack.create_token(json!({"name": "fleet-shift", "max_rps": max_rps}));
    wait_known(stack, &envoys.iter().collect::<Vec<_>>(), &secret);
    let offered = 2.0 * f64::from(max_rps);
    let load = Paced::start(
        &addrs,
        &[0.8 * offered, 0.15 * offered, 0.05 * offered],
        &secret,
    );
    std::thread::sleep(Duration::from_secs(plan.phase_seconds));
    let at = load.now_us();
    load.set(&[0.05 * offered, 0.15 * offered, 0.8 * offered]);
    std::thread::sleep(Duration::from_secs(plan.phase_seconds));
    let end = load.now_us();
    let samples = load.finish();
    let s = series(&samples, envoys.len(), end);
    let at_s = at as f64 / 1e6;
    let settled = settle(&s, at_s, max_rps);
    eprintln!("  shift at {at_s:.1} s: back within ±{TARGET_PCT} % after {settled:?} s");
    json!({
        "max_rps": max_rps,
        "from": "80/15/5",
        "to": "5/15/80",
        "shift_at_s": round2(at_s),
        "settle_s": settled,
        "ok": settled.is_some_and(|s| s <= SETTLE_TARGET_S),
        "series": s,
    })
}

fn view(stack: &Stack, id: &str) -> Value {
    stack.admin("GET", &format!("/v1/tokens/{id}"), None).json()["fleet"].clone()
}

fn join_leave(stack: &Stack, envoys: &[Envoy], plan: &Plan) -> Value {
    let max_rps = 100;
    let (id, secret) = stack.create_token(json!({"name": "fleet-join", "max_rps": max_rps}));
    let fourth = envoy(stack, "fleet-acc-4", "bench-4", 2);
    let mut addrs: Vec<SocketAddr> = envoys.iter().map(Envoy::addr).collect();
    addrs.push(fourth.addr());
    let all: Vec<&Envoy> = envoys.iter().chain([&fourth]).collect();
    wait_known(stack, &all, &secret);
    let each = 2.0 * f64::from(max_rps) / 3.0;
    let load = Paced::start(&addrs, &[each, each, each, 0.0], &secret);
    std::thread::sleep(Duration::from_secs(plan.phase_seconds));
    // The fourth Envoy takes a fourth of the load.
    let joined = load.now_us();
    let quarter = 2.0 * f64::from(max_rps) / 4.0;
    load.set(&[quarter; 4]);
    let shares = |n: usize| {
        let v = view(stack, &id);
        let held = v["shares"].as_array().map_or(0, Vec::len);
        let sum: f64 = v["shares"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["share_rps"].as_f64()).sum())
            .unwrap_or(0.0);
        held == n && (sum - f64::from(max_rps)).abs() < 0.01
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !shares(4) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let joined_view_s = (load.now_us() - joined) as f64 / 1e6;
    std::thread::sleep(Duration::from_secs(plan.phase_seconds));
    // It leaves: its Envoy stops, its load with it.
    let left = load.now_us();
    load.set(&[each, each, each, 0.0]);
    drop(fourth);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !shares(3) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left_view_s = (load.now_us() - left) as f64 / 1e6;
    std::thread::sleep(Duration::from_secs(plan.phase_seconds));
    let end = load.now_us();
    let samples = load.finish();
    let fourth_answers: std::collections::BTreeMap<u16, usize> = samples
        .iter()
        .filter(|x| x.0 == 3)
        .fold(Default::default(), |mut m, x| {
            *m.entry(x.2).or_default() += 1;
            m
        });
    eprintln!("  the fourth Envoy's answers by status: {fourth_answers:?}");
    let s = series(&samples, 4, end);
    let (join_s, leave_s) = (joined as f64 / 1e6, left as f64 / 1e6);
    let in_window = |from: f64, to: f64| -> Vec<Value> {
        s.iter()
            .filter(|v| {
                let t = v["t"].as_f64().unwrap_or(0.0);
                t >= from && t < to
            })
            .cloned()
            .collect()
    };
    let join_settle = settle(&in_window(join_s, leave_s), join_s, max_rps);
    let leave_settle = settle(&in_window(leave_s, f64::MAX), leave_s, max_rps);
    eprintln!(
        "  join: shares of four after {joined_view_s:.2} s, total settled after {join_settle:?} s; \
         leave: shares of three after {left_view_s:.2} s, total settled after {leave_settle:?} s"
    );
    json!({
        "max_rps": max_rps,
        "join_shares_s": round2(joined_view_s),
        "join_settle_s": join_settle,
        "leave_shares_s": round2(left_view_s),
        "leave_settle_s": leave_settle,
        "join_ok": join_settle.is_some_and(|s| s <= SETTLE_TARGET_S),
        "leave_ok": leave_settle.is_some_and(|s| s <= SETTLE_TARGET_S),
        "series": s,
    })
}

/// Envoy CPU per admitted request, fleet scope against proxy scope, A/B/A/B.
fn cpu(stack: &Stack, plan: &Plan) -> Value {
    let e = envoy(stack, "fleet-acc-cpu", "bench-cpu", 1);
    let mut tokens = vec![];
    for scope in ["fleet", "proxy"] {
        let (_, secret) = stack.create_token(json!({
            "name": format!("cpu-{scope}"), "max_rps": 1_000_000, "limit_scope": scope
        }));
        wait_known(stack, &[&e], &secret);
        tokens.push((scope, secret));
    }
    let mut per = [vec![], vec![]];
    for _round in 0..3 {
        for (i, (_, secret)) in tokens.iter().enumerate() {
            let before = cpu_micros(e.pid());
            let r = client::run(
                e.addr(),
                PATH,
                secret,
                8,
                Duration::from_secs(plan.cpu_seconds),
            );
            let used = cpu_micros(e.pid()) - before;
            let ok = r.samples.iter().filter(|s| s.status == 200).count().max(1);
            per[i].push(used as f64 / ok as f64);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (fleet, proxy) = (mean(&per[0]), mean(&per[1]));
    let diff = (fleet - proxy) / proxy * 100.0;
    eprintln!("  CPU per request: fleet {fleet:.2} µs, proxy {proxy:.2} µs ({diff:+.1} %)");
    json!({
        "fleet_us": round2(fleet),
        "proxy_us": round2(proxy),
        "rounds_fleet_us": per[0].iter().map(|x| round2(*x)).collect::<Vec<_>>(),
        "rounds_proxy_us": per[1].iter().map(|x| round2(*x)).collect::<Vec<_>>(),
        "diff_pct": round2(diff),
        "ok": diff.abs() <= CPU_TARGET_PCT,
    })
}

/// 100 simulated proxies, each reporting its 1,000 tokens once a second.
fn control_plane_cost(stack: &Stack, plan: &Plan) -> Value {
    let auth = format!("Bearer {}", stack.admin_token);
    let mut ids = vec![];
    for i in 0..plan.tokens {
        let r = http(
            stack.control_plane_addr(),
            "POST",
            "/v1/tokens",
            &[("authorization", &auth)],
            Some(&json!({"name": format!("cost-{i}"), "max_rps": 1000}).to_string()),
        )
        .expect("create");
        ids.push(r.json()["id"].as_str().unwrap_or_default().to_string());
    }
    let bodies: Vec<String> = (0..plan.proxies)
        .map(|p| {
            let tokens: Vec<Value> = ids
                .iter()
                .map(|id| json!({"id": id, "admitted": 5 + p % 7, "refused": p % 3}))
                .collect();
            json!({"proxy_id": format!("sim-{p:03}"), "interval_ms": 1000, "tokens": tokens})
                .to_string()
        })
        .collect();
    let pid = replica_pid(stack, 0);
    let sync = format!("Bearer {}", stack.sync_token);
    let addr = stack.control_plane_addr();
    let bodies = Arc::new(bodies);
    let threads = 16usize;
    let started = Instant::now();
    let cpu_before = cpu_micros(pid);
    let seconds = plan.report_seconds;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (bodies, sync) = (bodies.clone(), sync.clone());
            std::thread::spawn(move || {
                let (mut sent, mut received, mut done, mut failed, mut late) =
                    (0u64, 0u64, 0u64, 0u64, 0u64);
                let mut latencies = vec![];
                for second in 0..seconds {
                    let due = started + Duration::from_secs(second);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    } else {
                        late += 1;
                    }
                    for p in (t..bodies.len()).step_by(threads) {
                        let t0 = Instant::now();
                        match http(
                            addr,
                            "POST",
                            "/v1/fleet",
                            &[("authorization", &sync)],
                            Some(&bodies[p]),
                        ) {
                            Ok(r) if r.status == 200 => {
                                done += 1;
                                sent += bodies[p].len() as u64;
                                received += r.body.len() as u64;
                                latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                            }
                            _ => failed += 1,
                        }
                    }
                }
                (sent, received, done, failed, late, latencies)
            })
        })
        .collect();
    let (mut sent, mut received, mut done, mut failed, mut late) = (0, 0, 0, 0, 0);
    let mut latencies = vec![];
    for w in workers {
        let (s, r, d, f, l, lat) = w.join().expect("reporter");
        sent += s;
        received += r;
        done += d;
        failed += f;
        late += l;
        latencies.extend(lat);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = (cpu_micros(pid) - cpu_before) as f64 / 1e6;
    let proxy_seconds = plan.proxies as f64 * elapsed;
    let p50 = crate::median(&mut latencies.clone());
    let p99 = crate::percentile(&mut latencies, 0.99);
    let per_proxy_cpu_ms = cpu_s * 1e3 / proxy_seconds;
    eprintln!(
        "  {} proxies × {} tokens for {elapsed:.1} s: {done} reports ({failed} failed), control plane CPU \
         {cpu_s:.1} s ({per_proxy_cpu_ms:.2} ms per proxy per second), {:.0} B in and {:.0} B out per proxy per second, \
         p50 {p50:.0} ms, p99 {p99:.0} ms",
        plan.proxies,
        plan.tokens,
        sent as f64 / proxy_seconds,
        received as f64 / proxy_seconds,
    );
    json!({
        "proxies": plan.proxies,
        "tokens": plan.tokens,
        "seconds": round2(elapsed),
        "reports": done,
        "failed": failed,
        "late_rounds": late,
        "reports_per_second": round2(done as f64 / elapsed),
        "wanted_per_second": plan.proxies,
        "cpu_seconds": round2(cpu_s),
        "cpu_cores": round2(cpu_s / elapsed),
        "cpu_ms_per_proxy_second": round2(per_proxy_cpu_ms),
        "bytes_in_per_proxy_second": round2(sent as f64 / proxy_seconds),
        "bytes_out_per_proxy_second": round2(received as f64 / proxy_seconds),
        "p50_ms": round2(p50),
        "p99_ms": round2(p99),
    })
}

pub fn run(depth: Depth) -> Value {
    let plan = plan(depth);
    let stack = Stack::start_with(Options {
        control_plane: true,
        envoy: false,
        ..Options::default()
    });
    let envoys: Vec<Envoy> = (1..=3)
        .map(|i| envoy(&stack, &format!("fleet-acc-{i}"), &format!("bench-{i}"), 2))
        .collect();
    eprintln!("fleet accuracy: splits");
    let cells = splits(&stack, &envoys, &plan);
    eprintln!("fleet accuracy: a load shift");
    let shift = shift(&stack, &envoys, &plan);
    eprintln!("fleet accuracy: a fourth Envoy joins, then leaves");
    let join = join_leave(&stack, &envoys, &plan);
    drop(envoys);
    eprintln!("fleet accuracy: CPU per request, fleet against proxy scope");
    let cpu = cpu(&stack, &plan);
    eprintln!("fleet accuracy: the control plane's cost of the reports");
    let cost = control_plane_cost(&stack, &plan);
    json!({
        "depth": format!("{depth:?}"),
        "commit": command_output("git", &["rev-parse", "--short", "HEAD"]),
        "date": command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "warmup_seconds": WARMUP.as_secs(),
        "seconds": plan.seconds,
        "cells": cells,
        "shift": shift,
        "join": join,
        "cpu": cpu,
        "cost": cost,
    })
}

pub fn markdown(v: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut md = format!(
        "### Fleet accuracy\n\nOne token's `max_rps` shared by three Envoys (two workers each, \
         the wasm filter) in front of one control plane (SQLite), from \
         `bench/src/fleet_accuracy.rs`; commit {}, {}. Twice `max_rps` offered in total, \
         open-loop, split between the Envoys as shown; the rate is measured after {} s of \
         warm-up over {} s.\n\n",
        v["commit"].as_str().unwrap_or("?"),
        v["date"].as_str().unwrap_or("?"),
        v["warmup_seconds"],
        v["seconds"],
    );
    md.push_str("| maxRPS | split | offered/s | admitted/s | error | ±5 % | ±2 % | worst 1 s (bound) |\n|---|---|---|---|---|---|---|---|\n");
    for c in v["cells"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {:+.2} % | {} | {} | {} ({}) {} |\n",
            c["max_rps"],
            c["split"].as_str().unwrap_or(""),
            f(&c["offered_rps"]),
            f(&c["admitted_rps"]),
            f(&c["error_pct"]),
            met(c["ok"] == true),
            met(c["stretch_ok"] == true),
            c["worst_window"],
            c["limit_plus_burst"],
            if c["window_ok"] == true {
                ""
            } else {
                "**over**"
            },
        ));
    }
    let s = &v["shift"];
    let j = &v["join"];
    let c = &v["cpu"];
    let k = &v["cost"];
    let secs = |x: &Value| {
        x.as_f64()
            .map_or("never".to_string(), |s| format!("{s:.1} s"))
    };
    md.push_str("\n| target | result | |\n|---|---|---|\n");
    md.push_str(&format!(
        "| load shifted mid-run ({} to {}, maxRPS {}): back within ±5 % in ≤ 2 s (from then, every 1 s window of the next 3 s is within ±5 %) | {} | {} |\n",
        s["from"].as_str().unwrap_or(""),
        s["to"].as_str().unwrap_or(""),
        s["max_rps"],
        secs(&s["settle_s"]),
        met(s["ok"] == true),
    ));
    md.push_str(&format!(
        "| a fourth Envoy joins: shares settle in ≤ 2 s | the control plane's shares counted four after {:.1} s; the total back within ±5 % after {} | {} |\n",
        f(&j["join_shares_s"]),
        secs(&j["join_settle_s"]),
        met(j["join_ok"] == true),
    ));
    md.push_str(&format!(
        "| it leaves (killed): shares settle in ≤ 2 s | shares of three after {:.1} s; the total back within ±5 % after {} | {} |\n",
        f(&j["leave_shares_s"]),
        secs(&j["leave_settle_s"]),
        met(j["leave_ok"] == true),
    ));
    md.push_str(&format!(
        "| Envoy CPU per request unchanged against the per-proxy limit (±5 %) | fleet {:.2} µs, proxy {:.2} µs ({:+.1} %; rounds {} and {}) | {} |\n",
        f(&c["fleet_us"]),
        f(&c["proxy_us"]),
        f(&c["diff_pct"]),
        c["rounds_fleet_us"],
        c["rounds_proxy_us"],
        met(c["ok"] == true),
    ));
    md.push_str(&format!(
        "| control-plane cost of the reports at {} proxies × {} tokens, once a second | {:.1} reports/s of {} wanted ({} failed); {:.2} ms CPU per proxy per second ({:.2} cores); {:.0} B in, {:.0} B out per proxy per second; p50 {:.0} ms, p99 {:.0} ms | measured |\n",
        k["proxies"],
        k["tokens"],
        f(&k["reports_per_second"]),
        k["wanted_per_second"],
        k["failed"],
        f(&k["cpu_ms_per_proxy_second"]),
        f(&k["cpu_cores"]),
        f(&k["bytes_in_per_proxy_second"]),
        f(&k["bytes_out_per_proxy_second"]),
        f(&k["p50_ms"]),
        f(&k["p99_ms"]),
    ));
    md.push_str("\n![admitted per second during the shift](benchmarks-fleet-shift.svg)\n\n");
    md
}

/// The shift's time series as an SVG line chart: the total and each Envoy's admitted rate
/// (rolling 1 s) against time, with the limit and the moment of the shift marked.
pub fn shift_chart(v: &Value) -> Option<String> {
    let s = &v["shift"];
    let points = s["series"].as_array()?;
    let max_rps = s["max_rps"].as_f64()?;
    let shift_at = s["shift_at_s"].as_f64()?;
    let (w, h, left, top, bottom, right) = (860.0, 360.0, 60.0, 50.0, 300.0, 840.0);
    let t_max = points.last()?["t"].as_f64()?.max(1.0);
    let y_max = (max_rps * 1.5).max(1.0);
    let x = |t: f64| left + (right - left) * t / t_max;
    let y = |r: f64| bottom - (bottom - top) * (r / y_max).min(1.0);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="20" y="24" font-size="16" font-weight="700">Admitted per second (rolling 1 s), three Envoys, maxRPS {max_rps:.0}: load moves from 80/15/5 to 5/15/80</text>"#
    );
    for i in 0..=3 {
        let r = y_max * f64::from(i) / 3.0;
        out.push_str(&format!(
            r##"<line x1="{left}" y1="{0:.1}" x2="{right}" y2="{0:.1}" stroke="#e3e7eb"/><text x="{1:.1}" y="{2:.1}" font-size="11" text-anchor="end" fill="#52606d">{r:.0}</text>"##,
            y(r),
            left - 5.0,
            y(r) + 4.0
        ));
    }
    out.push_str(&format!(
        r##"<line x1="{left}" y1="{0:.1}" x2="{right}" y2="{0:.1}" stroke="#b5485d" stroke-dasharray="6 4"/><text x="{right}" y="{1:.1}" font-size="11" text-anchor="end" fill="#b5485d">maxRPS</text>"##,
        y(max_rps),
        y(max_rps) - 4.0
    ));
    out.push_str(&format!(
        r##"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{bottom}" stroke="#52606d" stroke-dasharray="2 3"/><text x="{1:.1}" y="{2:.1}" font-size="11" fill="#52606d">shift</text>"##,
        x(shift_at),
        x(shift_at) + 4.0,
        top + 12.0
    ));
    let line = |pick: &dyn Fn(&Value) -> f64, colour: &str, width: f64| {
        let pts: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p["t"].as_f64().unwrap_or(0.0)), y(pick(p))))
            .collect();
        format!(
            r#"<polyline fill="none" stroke="{colour}" stroke-width="{width}" points="{}"/>"#,
            pts.join(" ")
        )
    };
    let colours = ["#2f6fdf", "#e08a2c", "#4c9a6a"];
    for (i, colour) in colours.iter().enumerate() {
        out.push_str(&line(
            &|p: &Value| p["per"][i].as_f64().unwrap_or(0.0),
            colour,
            1.5,
        ));
        out.push_str(&format!(
            r#"<text x="{:.1}" y="{:.1}" font-size="12" fill="{colour}">Envoy {}</text>"#,
            left + 10.0 + 90.0 * i as f64,
            bottom + 40.0,
            i + 1
        ));
    }
    out.push_str(&line(
        &|p: &Value| p["total"].as_f64().unwrap_or(0.0),
        "#111",
        2.5,
    ));
    out.push_str(&format!(
        r##"<text x="{:.1}" y="{:.1}" font-size="12" font-weight="600">total</text><text x="{:.1}" y="{:.1}" font-size="11" fill="#52606d">seconds</text>"##,
        left + 280.0,
        bottom + 40.0,
        right - 40.0,
        bottom + 18.0
    ));
    for t in (0..=(t_max as u64)).step_by(2) {
        out.push_str(&format!(
            r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle" fill="#52606d">{t}</text>"##,
            x(t as f64),
            bottom + 16.0
        ));
    }
    out.push_str("</svg>\n");
    Some(out)
}
