//! tokengate against what users would otherwise run, each in its own Envoy with one worker
//! (the other core is the load generator's), all on the same pinned Envoy and the same
//! direct-response route, so that the differences are the checks alone:
//!
//! - A: no check (the floor);
//! - B: tokengate, a token with no limit;
//! - C: tokengate, a token limited to 1,000,000 requests/s (never reached, but every
//!   request goes through the GCRA compare-and-swap in shared data);
//! - D: Envoy's own filters: `api_key_auth` over the same tokens and `local_ratelimit` with
//!   a bucket per key (as large as C's limit);
//! - E: `ext_authz` (HTTP) to `bench-authz`, a small service doing tokengate's lookup;
//! - F: tokengate's native module (an Envoy dynamic module), C's token: the same checks as
//!   B and C, and the same GCRA on every request, without the wasm VM.
//!
//! All five stay up for the whole run and take turns, round after round, so that every
//! ratio compares runs that met the same noise from the rest of a shared machine. A round
//! runs every variant's closed loop (capacity and CPU per request), then every variant's
//! open loop at one fixed rate (latency, corrected for coordinated omission). The rate is
//! half the lower of A's and B's capacity in the first round, hence closed loops first.

use crate::load::{oha, LoadResult, Mode};
use crate::procstat::{cpu_micros, rss_kib};
use crate::{median, out_dir, sibling_binary, Depth, Envoy, Helper};
use serde_json::{json, Value};
use std::fs;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokengate_e2e::{free_ports, http, Options, Stack};

/// Keep-alive connections of the load generator, closed and open loop alike.
const CONNECTIONS: u32 = 16;
/// Tokens in the control plane, all of them credentials of D and records in B, C and E.
const TOKENS: usize = 100;
/// C's limit, and D's bucket per key: the control plane's maximum.
const LIMIT_RPS: u32 = 1_000_000;

/// Issue targets.
const CPU_RATIO_MAX: f64 = 1.5;
const RPS_RATIO_MIN: f64 = 3.0;
const P99_ADDED_MAX_US: f64 = 50.0;
/// The native module's stretch goal: no more added CPU than Envoy's own filters.
const NATIVE_CPU_RATIO_STRETCH: f64 = 1.0;

struct Plan {
    rounds: usize,
    load: Duration,
    warmup: Duration,
}

fn plan(depth: Depth) -> Plan {
    match depth {
        Depth::Full => Plan {
            rounds: 3,
            load: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
        },
        Depth::Quick => Plan {
            rounds: 1,
            load: Duration::from_secs(3),
            warmup: Duration::from_millis(500),
        },
    }
}

fn start_envoy(label: &str, template: &str, vars: &[(&str, String)]) -> Envoy {
    Envoy::start(label, template, 1, vars)
}

fn start_authz(stack: &Stack) -> (Helper, SocketAddr) {
    let port = free_ports(1)[0];
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let log_path = out_dir().join("run/bench-authz.log");
    let log = fs::File::create(&log_path).expect("create the bench-authz log");
    let binary = sibling_binary("bench-authz");
    let child = Command::new(&binary)
        .args(["--listen", &addr.to_string()])
        .args(["--control-plane", &stack.control_plane_addr().to_string()])
        .env("TOKENGATE_SYNC_TOKEN", &stack.sync_token)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "spawn {}: {e} (cargo build --release -p tokengate-bench)",
                binary.display()
            )
        });
    let mut helper = Helper(child);
    let start = Instant::now();
    while !http(addr, "GET", "/healthz", &[], None).is_ok_and(|r| r.status == 200) {
        let exited = helper_exited(&mut helper);
        assert!(
            !exited,
            "bench-authz exited during start-up; see {}",
            log_path.display()
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "bench-authz not ready after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (helper, addr)
}

fn helper_exited(helper: &mut Helper) -> bool {
    matches!(helper.0.try_wait(), Ok(Some(_)))
}

/// One variant under test, up for the whole run.
struct Variant {
    key: &'static str,
    /// Short, for the chart.
    label: &'static str,
    /// For the tables.
    title: &'static str,
    envoy: Envoy,
    /// The token header the load sends (none for A).
    token: Option<String>,
    /// The ext_authz service (E only): its CPU is part of the variant's cost.
    authz: Option<Helper>,
    rounds: Vec<Value>,
}

impl Variant {
    fn headers(&self) -> Vec<(&str, &str)> {
        self.token
            .as_deref()
            .map(|t| ("X-API-Token", t))
            .into_iter()
            .collect()
    }

    fn authz_pid(&self) -> Option<u32> {
        self.authz.as_ref().map(|h| h.0.id())
    }
}

/// Every answer must be 200: a variant that refused its requests quickly would look fast.
fn assert_all_ok(variant: &Variant, phase: &str, r: &LoadResult) {
    assert!(
        r.requests > 0 && r.count(200) == r.requests && r.errors == 0,
        "variant {} ({phase}): not every request was answered 200: statuses {:?}, {} errors",
        variant.key,
        r.statuses,
        r.errors
    );
}

fn load_json(r: &LoadResult) -> Value {
    json!({
        "requests": r.requests,
        "seconds": r.seconds,
        "rps": r.rps,
        "p50_us": r.p50_us,
        "p99_us": r.p99_us,
        "p999_us": r.p999_us,
        "statuses": r.statuses,
        "errors": r.errors,
    })
}

fn per_request(micros: u64, requests: u64) -> f64 {
    if requests == 0 {
        0.0
    } else {
        micros as f64 / requests as f64
    }
}

/// Closed loop: capacity, and CPU per answered request from the processes' own counters.
fn closed(variant: &Variant, duration: Duration) -> Value {
    let envoy_pid = variant.envoy.pid();
    let authz_pid = variant.authz_pid();
    let envoy_before = cpu_micros(envoy_pid);
    let authz_before = authz_pid.map(cpu_micros).unwrap_or(0);
    let r = oha(
        &variant.envoy.url("/"),
        &variant.headers(),
        Mode::Closed {
            connections: CONNECTIONS,
        },
        duration,
    );
    let envoy_cpu = cpu_micros(envoy_pid).saturating_sub(envoy_before);
    let authz_cpu = authz_pid
        .map(|p| cpu_micros(p).saturating_sub(authz_before))
        .unwrap_or(0);
    assert_all_ok(variant, "closed loop", &r);
    let envoy_per = per_request(envoy_cpu, r.requests);
    let authz_per = per_request(authz_cpu, r.requests);
    eprintln!(
        "variants: {} closed: {:.0} rps, {:.1} µs Envoy CPU/request{}",
        variant.key,
        r.rps,
        envoy_per,
        if authz_pid.is_some() {
            format!(" + {authz_per:.1} µs bench-authz")
        } else {
            String::new()
        }
    );
    let mut v = load_json(&r);
    v["envoy_cpu_us_per_request"] = json!(envoy_per);
    if authz_pid.is_some() {
        v["authz_cpu_us_per_request"] = json!(authz_per);
    }
    v["cpu_us_per_request"] = json!(envoy_per + authz_per);
    v
}

/// Open loop at `rate`: latency as a client sending at that pace would see it.
fn open(variant: &Variant, rate: u32, duration: Duration) -> Value {
    let r = oha(
        &variant.envoy.url("/"),
        &variant.headers(),
        Mode::Open {
            rate,
            connections: CONNECTIONS,
        },
        duration,
    );
    assert_all_ok(variant, "open loop", &r);
    eprintln!(
        "variants: {} open at {rate}/s: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs",
        variant.key, r.p50_us, r.p99_us, r.p999_us
    );
    load_json(&r)
}

/// Each variant must allow its token and refuse a request without one, or it is not
/// checking anything. B and C also wait here for the filter's first sync.
fn check_gates(variants: &[Variant]) {
    for v in variants {
        let start = Instant::now();
        loop {
            let r = http(v.envoy.addr(), "GET", "/", &v.headers(), None);
            if r.as_ref().is_ok_and(|r| r.status == 200) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "variant {}: its token is not answered 200 after 30 s (last: {:?})",
                v.key,
                r.map(|r| r.status)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if v.token.is_some() {
            let r = http(v.envoy.addr(), "GET", "/", &[], None).expect("request without token");
            assert_eq!(
                r.status, 401,
                "variant {}: a request without a token must be refused",
                v.key
            );
        }
    }
}

/// The credentials and per-key descriptors of D, as YAML flow lists.
pub fn native_vars(tokens: &[(String, String)]) -> Vec<(&'static str, String)> {
    let credentials: Vec<String> = tokens
        .iter()
        .map(|(id, secret)| format!("{{key: \"{secret}\", client: \"{id}\"}}"))
        .collect();
    let descriptors: Vec<String> = tokens
        .iter()
        .map(|(id, _)| {
            format!(
                "{{entries: [{{key: client, value: \"{id}\"}}], token_bucket: \
                 {{max_tokens: {LIMIT_RPS}, tokens_per_fill: {LIMIT_RPS}, fill_interval: 1s}}}}"
            )
        })
        .collect();
    vec![
        ("CREDENTIALS", format!("[{}]", credentials.join(", "))),
        ("DESCRIPTORS", format!("[{}]", descriptors.join(", "))),
    ]
}

pub fn run(depth: Depth) -> Value {
    let plan = plan(depth);
    let started = Instant::now();

    let stack = Stack::start_with(Options {
        control_plane: true,
        envoy: false,
        ..Options::default()
    });

    // B's token first, C's second; the rest make the state as large as D's key list.
    let mut tokens = vec![
        stack.create_token(json!({"name": "bench-unlimited"})),
        stack.create_token(json!({"name": "bench-limited", "max_rps": LIMIT_RPS})),
    ];
    for i in 2..TOKENS {
        tokens.push(stack.create_token(json!({"name": format!("bench-{i}")})));
    }
    let unlimited = tokens[0].1.clone();
    let limited = tokens[1].1.clone();
    let limited_for_f = limited.clone();

    let tokengate_vars = [
        ("CONTROL_PLANE_PORT", stack.control_plane_port.to_string()),
        ("SYNC_TOKEN", stack.sync_token.clone()),
        ("PLUGIN_EXTRA", String::new()),
    ];
    let native = start_envoy("variant-d", "native", &native_vars(&tokens));
    // The rendered file holds every secret in clear; Envoy has read it.
    let _ = fs::remove_file(out_dir().join("run/variant-d.yaml"));
    let (authz, authz_addr) = start_authz(&stack);
    let ext_authz = start_envoy(
        "variant-e",
        "ext-authz",
        &[("AUTHZ_PORT", authz_addr.port().to_string())],
    );
    let mut variants = vec![
        Variant {
            key: "A",
            label: "A: none",
            title: "A: no check",
            envoy: start_envoy("variant-a", "none", &[]),
            token: None,
            authz: None,
            rounds: Vec::new(),
        },
        Variant {
            key: "B",
            label: "B: tokengate",
            title: "B: tokengate",
            envoy: start_envoy("variant-b", "tokengate", &tokengate_vars),
            token: Some(unlimited.clone()),
            authz: None,
            rounds: Vec::new(),
        },
        Variant {
            key: "C",
            label: "C: + limit",
            title: "C: tokengate, maxRPS 1,000,000",
            envoy: start_envoy("variant-c", "tokengate", &tokengate_vars),
            token: Some(limited.clone()),
            authz: None,
            rounds: Vec::new(),
        },
        Variant {
            key: "D",
            label: "D: Envoy's",
            title: "D: api_key_auth + local_ratelimit",
            envoy: native,
            token: Some(limited),
            authz: None,
            rounds: Vec::new(),
        },
        Variant {
            key: "E",
            label: "E: ext_authz",
            title: "E: ext_authz (HTTP) + service",
            envoy: ext_authz,
            token: Some(unlimited),
            authz: Some(authz),
            rounds: Vec::new(),
        },
        Variant {
            key: "F",
            label: "F: module",
            title: "F: tokengate native module, maxRPS 1,000,000",
            envoy: start_envoy("variant-f", "tokengate-native", &tokengate_vars),
            token: Some(limited_for_f),
            authz: None,
            rounds: Vec::new(),
        },
    ];
    check_gates(&variants);
    eprintln!(
        "variants: {} tokens, {} Envoys up in {:.1} s",
        TOKENS,
        variants.len(),
        started.elapsed().as_secs_f64()
    );

    // Not measured: the first requests pay for connection set-up and cold caches.
    for v in &variants {
        let r = oha(
            &v.envoy.url("/"),
            &v.headers(),
            Mode::Closed {
                connections: CONNECTIONS,
            },
            plan.warmup,
        );
        assert_all_ok(v, "warm-up", &r);
    }

    let mut rate = 0;
    for round in 0..plan.rounds {
        let closed_runs: Vec<Value> = variants.iter().map(|v| closed(v, plan.load)).collect();
        if round == 0 {
            rate = open_rate(
                closed_runs[0]["rps"].as_f64().unwrap_or(0.0),
                closed_runs[1]["rps"].as_f64().unwrap_or(0.0),
            );
            eprintln!("variants: open-loop rate {rate} requests/s");
        }
        for (v, c) in variants.iter_mut().zip(closed_runs) {
            let o = open(v, rate, plan.load);
            v.rounds
                .push(json!({"round": round + 1, "closed": c, "open": o}));
        }
    }

    // D really went through the per-key buckets (the filter is a no-op when disabled).
    let d = &variants[3].envoy;
    let limited_ok = d.stat("per_key.http_local_rate_limit.ok");
    let limited_denied = d.stat("per_key.http_local_rate_limit.rate_limited");
    assert!(
        limited_ok > 0 && limited_denied == 0,
        "variant D: local_ratelimit ok {limited_ok}, rate_limited {limited_denied}"
    );

    let mut summaries: Vec<Value> = variants.iter().map(summarise).collect();
    let a_cpu = summaries[0]["cpu_us_per_request"].as_f64().unwrap_or(0.0);
    for s in &mut summaries {
        let added = s["cpu_us_per_request"].as_f64().unwrap_or(0.0) - a_cpu;
        s["added_cpu_us_per_request"] = json!(added);
    }
    let medians: Vec<Summary> = summaries.iter().map(Summary::from_json).collect();
    let mut targets = targets(&medians[0], &medians[1], &medians[3], &medians[4]);
    targets.extend(native_targets(
        &medians[0],
        &medians[3],
        &medians[4],
        &medians[5],
    ));
    let figures = json!({
        "rounds": plan.rounds,
        "seconds_per_run": plan.load.as_secs_f64(),
        "connections": CONNECTIONS,
        "tokens": TOKENS,
        "limit_rps": LIMIT_RPS,
        "open_rate": rate,
        "envoy_workers": 1,
        "authz_runtime": format!(
            "tokio multi-thread, default worker count ({})",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        ),
        "variants": summaries,
        "targets": targets,
    });
    eprintln!("variants: done in {:.1} s", started.elapsed().as_secs_f64());
    // The Envoys before the control plane, so that B and C do not log a failed sync.
    drop(variants);
    drop(stack);
    figures
}

/// Half the lower of A's and B's capacity: both run well below saturation, so their
/// latencies differ by the check and not by queueing.
fn open_rate(a_rps: f64, b_rps: f64) -> u32 {
    ((a_rps.min(b_rps) / 2.0).round() as u32).max(1)
}

fn round_values(v: &Variant, phase: &str, key: &str) -> Vec<f64> {
    v.rounds
        .iter()
        .filter_map(|r| r[phase][key].as_f64())
        .collect()
}

fn summarise(v: &Variant) -> Value {
    let med = |phase: &str, key: &str| median(&mut round_values(v, phase, key));
    let mut s = json!({
        "key": v.key,
        "label": v.label,
        "title": v.title,
        "rps": med("closed", "rps"),
        "envoy_cpu_us_per_request": med("closed", "envoy_cpu_us_per_request"),
        "cpu_us_per_request": med("closed", "cpu_us_per_request"),
        "p50_us": med("open", "p50_us"),
        "p99_us": med("open", "p99_us"),
        "p999_us": med("open", "p999_us"),
        "envoy_rss_kib": rss_kib(v.envoy.pid()),
        "rounds": v.rounds,
    });
    if let Some(pid) = v.authz_pid() {
        s["authz_cpu_us_per_request"] = json!(med("closed", "authz_cpu_us_per_request"));
        s["authz_rss_kib"] = json!(rss_kib(pid));
    }
    s
}

/// The medians the targets are computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Summary {
    rps: f64,
    /// Envoy's plus, for E, the authz service's.
    cpu_us_per_request: f64,
    p99_us: f64,
}

impl Summary {
    fn from_json(v: &Value) -> Summary {
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        Summary {
            rps: f("rps"),
            cpu_us_per_request: f("cpu_us_per_request"),
            p99_us: f("p99_us"),
        }
    }
}

fn target(name: &str, what: &str, value: Option<f64>, goal: &str, pass: bool) -> Value {
    json!({"name": name, "what": what, "value": value, "goal": goal, "pass": pass})
}

/// The issue's three targets. A ratio with a denominator that noise drove to zero or below
/// has no value and fails, rather than passing on a meaningless number.
fn targets(a: &Summary, b: &Summary, d: &Summary, e: &Summary) -> Vec<Value> {
    let b_added = b.cpu_us_per_request - a.cpu_us_per_request;
    let d_added = d.cpu_us_per_request - a.cpu_us_per_request;
    let cpu_ratio = (d_added > 0.0).then(|| b_added / d_added);
    let rps_ratio = (e.rps > 0.0).then(|| b.rps / e.rps);
    let p99_added = b.p99_us - a.p99_us;
    vec![
        target(
            "b_cpu_added_over_a / d_cpu_added_over_a",
            "CPU tokengate adds per request ÷ CPU Envoy's native filters add",
            cpu_ratio,
            &format!("≤ {CPU_RATIO_MAX}"),
            cpu_ratio.is_some_and(|r| r <= CPU_RATIO_MAX),
        ),
        target(
            "b_rps / e_rps",
            "tokengate's throughput ÷ ext_authz's",
            rps_ratio,
            &format!("≥ {RPS_RATIO_MIN}"),
            rps_ratio.is_some_and(|r| r >= RPS_RATIO_MIN),
        ),
        target(
            "b_p99_minus_a_p99_us",
            "p99 latency tokengate adds (µs)",
            Some(p99_added),
            &format!("< {P99_ADDED_MAX_US}"),
            p99_added < P99_ADDED_MAX_US,
        ),
    ]
}

/// The native module's targets: its added CPU against Envoy's own filters (goal, then the
/// stretch goal) and its throughput against ext_authz's.
fn native_targets(a: &Summary, d: &Summary, e: &Summary, f: &Summary) -> Vec<Value> {
    let f_added = f.cpu_us_per_request - a.cpu_us_per_request;
    let d_added = d.cpu_us_per_request - a.cpu_us_per_request;
    let cpu_ratio = (d_added > 0.0).then(|| f_added / d_added);
    let rps_ratio = (e.rps > 0.0).then(|| f.rps / e.rps);
    vec![
        target(
            "f_cpu_added_over_a / d_cpu_added_over_a",
            "CPU the native module adds per request ÷ CPU Envoy's native filters add",
            cpu_ratio,
            &format!("≤ {CPU_RATIO_MAX}"),
            cpu_ratio.is_some_and(|r| r <= CPU_RATIO_MAX),
        ),
        target(
            "f_cpu_added_over_a / d_cpu_added_over_a (stretch)",
            "the same, stretch goal",
            cpu_ratio,
            &format!("≤ {NATIVE_CPU_RATIO_STRETCH}"),
            cpu_ratio.is_some_and(|r| r <= NATIVE_CPU_RATIO_STRETCH),
        ),
        target(
            "f_rps / e_rps",
            "the native module's throughput ÷ ext_authz's",
            rps_ratio,
            &format!("≥ {RPS_RATIO_MIN}"),
            rps_ratio.is_some_and(|r| r >= RPS_RATIO_MIN),
        ),
    ]
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key)?.as_f64()
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "–".to_string(),
        Some(x) if x.abs() >= 1000.0 => {
            let digits = (x.round().abs() as u64).to_string().into_bytes();
            let groups: Vec<String> = digits
                .rchunks(3)
                .rev()
                .map(|g| String::from_utf8_lossy(g).into_owned())
                .collect();
            let sign = if x < 0.0 { "-" } else { "" };
            format!("{sign}{}", groups.join(","))
        }
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
    }
}

/// The section's tables: the variants side by side, then the targets.
pub fn markdown(v: &Value) -> String {
    let variants = v["variants"].as_array().cloned().unwrap_or_default();
    let mut md = String::from("### Against the alternatives\n\n");
    md.push_str(&format!(
        "Each variant is its own Envoy with one worker thread, in front of the same \
         direct-response route; load from oha over {} keep-alive connections. {} round(s) \
         of {} s per run, the variants taking turns; medians over rounds. Throughput and \
         CPU from a closed loop; latency from an open loop at {} requests/s for every \
         variant (half the lower of A's and B's capacity), with oha's latency correction. \
         {} tokens; D holds them all as keys with a bucket of {} requests/s each; \
         bench-authz runs on {}.\n\n",
        v["connections"],
        v["rounds"],
        v["seconds_per_run"],
        v["open_rate"],
        v["tokens"],
        fmt_value(num(v, "limit_rps")),
        v["authz_runtime"].as_str().unwrap_or("tokio"),
    ));
    md.push_str("| |");
    for var in &variants {
        md.push_str(&format!(" {} |", var["title"].as_str().unwrap_or("?")));
    }
    md.push('\n');
    md.push_str(&format!("|---|{}\n", "---:|".repeat(variants.len())));
    // (row, figure, divisor)
    let rows = [
        ("requests/s (closed loop)", "rps", 1.0),
        ("Envoy CPU µs/request", "envoy_cpu_us_per_request", 1.0),
        (
            "ext_authz service CPU µs/request",
            "authz_cpu_us_per_request",
            1.0,
        ),
        (
            "CPU µs/request added over A",
            "added_cpu_us_per_request",
            1.0,
        ),
        ("p50 latency µs", "p50_us", 1.0),
        ("p99 latency µs", "p99_us", 1.0),
        ("p99.9 latency µs", "p999_us", 1.0),
        ("Envoy RSS MiB", "envoy_rss_kib", 1024.0),
        ("ext_authz service RSS MiB", "authz_rss_kib", 1024.0),
    ];
    for (name, key, divisor) in rows {
        md.push_str(&format!("| {name} |"));
        for var in &variants {
            md.push_str(&format!(
                " {} |",
                fmt_value(num(var, key).map(|x| x / divisor))
            ));
        }
        md.push('\n');
    }
    md.push_str("\n| target | value | goal | |\n|---|---:|---|---|\n");
    for t in v["targets"].as_array().into_iter().flatten() {
        let value = t["value"].as_f64();
        let shown = match value {
            Some(x) if x.abs() < 10.0 => format!("{x:.2}"),
            other => fmt_value(other),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            t["what"].as_str().unwrap_or("?"),
            shown,
            t["goal"].as_str().unwrap_or("?"),
            if t["pass"].as_bool() == Some(true) {
                "pass"
            } else {
                "**fail**"
            }
        ));
    }
    md
}

/// (label, requests/s, CPU µs/request added over A) per variant, for the chart.
pub fn chart_data(v: &Value) -> Vec<(String, f64, f64)> {
    v["variants"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            (
                x["label"].as_str().unwrap_or("?").to_string(),
                num(x, "rps").unwrap_or(0.0),
                num(x, "added_cpu_us_per_request").unwrap_or(0.0),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(rps: f64, cpu: f64, p99: f64) -> Summary {
        Summary {
            rps,
            cpu_us_per_request: cpu,
            p99_us: p99,
        }
    }

    #[test]
    fn targets_compare_added_cost_not_total_cost() {
        let a = s(40_000.0, 20.0, 300.0);
        let b = s(30_000.0, 26.0, 330.0);
        let d = s(32_000.0, 25.0, 320.0);
        let e = s(8_000.0, 90.0, 900.0);
        let t = targets(&a, &b, &d, &e);
        assert_eq!(t[0]["value"].as_f64(), Some(6.0 / 5.0));
        assert_eq!(t[0]["pass"], true);
        assert_eq!(t[1]["value"].as_f64(), Some(3.75));
        assert_eq!(t[1]["pass"], true);
        assert_eq!(t[2]["value"].as_f64(), Some(30.0));
        assert_eq!(t[2]["pass"], true);

        let slow = targets(&a, &s(20_000.0, 35.0, 400.0), &d, &e);
        assert_eq!(slow[0]["pass"], false, "15 / 5 = 3 > 1.5");
        assert_eq!(slow[1]["pass"], false, "2.5 < 3");
        assert_eq!(slow[2]["pass"], false, "100 µs ≥ 50");
    }

    #[test]
    fn the_native_module_is_held_to_envoys_own_filters() {
        let a = s(40_000.0, 20.0, 300.0);
        let d = s(32_000.0, 25.0, 320.0);
        let e = s(8_000.0, 90.0, 900.0);
        let t = native_targets(&a, &d, &e, &s(36_000.0, 24.0, 310.0));
        assert_eq!(t[0]["value"].as_f64(), Some(4.0 / 5.0));
        assert_eq!(
            (t[0]["pass"].clone(), t[1]["pass"].clone()),
            (json!(true), json!(true))
        );
        assert_eq!(t[2]["value"].as_f64(), Some(4.5));
        let t = native_targets(&a, &d, &e, &s(30_000.0, 27.0, 310.0));
        assert_eq!(t[0]["value"].as_f64(), Some(7.0 / 5.0));
        assert_eq!(
            (t[0]["pass"].clone(), t[1]["pass"].clone()),
            (json!(true), json!(false))
        );
    }

    #[test]
    fn a_ratio_over_noise_has_no_value_and_fails() {
        let a = s(40_000.0, 20.0, 300.0);
        let d_no_cheaper_than_a = s(40_000.0, 19.5, 300.0);
        let t = targets(&a, &a, &d_no_cheaper_than_a, &s(0.0, 0.0, 0.0));
        assert!(t[0]["value"].is_null() && t[0]["pass"] == false);
        assert!(t[1]["value"].is_null() && t[1]["pass"] == false);
    }

    #[test]
    fn the_open_loop_rate_is_half_the_slower_of_a_and_b() {
        assert_eq!(open_rate(40_000.0, 30_001.0), 15_001);
        assert_eq!(open_rate(20_000.0, 30_000.0), 10_000);
        assert_eq!(open_rate(0.0, 0.0), 1);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(fmt_value(Some(41_234.4)), "41,234");
        assert_eq!(fmt_value(Some(-1_500.0)), "-1,500");
        assert_eq!(fmt_value(Some(250.4)), "250");
        assert_eq!(fmt_value(Some(6.25)), "6.2");
        assert_eq!(fmt_value(None), "–");
    }

    #[test]
    fn native_config_lists_every_key_with_its_own_bucket() {
        let tokens = vec![
            ("tok_1".to_string(), "tg_a".to_string()),
            ("tok_2".to_string(), "tg_b".to_string()),
        ];
        let vars = native_vars(&tokens);
        assert_eq!(
            vars[0].1,
            r#"[{key: "tg_a", client: "tok_1"}, {key: "tg_b", client: "tok_2"}]"#
        );
        assert_eq!(vars[1].1.matches("token_bucket").count(), 2);
        assert!(vars[1].1.contains(r#"value: "tok_2""#));
    }

    #[test]
    fn markdown_and_chart_show_every_variant_and_target() {
        let variant = |key: &str, rps: f64, cpu: f64| {
            json!({"key": key, "label": format!("{key}: x"), "title": format!("{key}: title"),
                   "rps": rps, "envoy_cpu_us_per_request": cpu, "cpu_us_per_request": cpu,
                   "p50_us": 100.0, "p99_us": 300.0, "p999_us": 900.0,
                   "added_cpu_us_per_request": cpu - 20.0, "envoy_rss_kib": 40_960.0})
        };
        let a = s(40_000.0, 20.0, 300.0);
        let v = json!({
            "rounds": 1, "seconds_per_run": 3.0, "connections": 16, "tokens": 100,
            "limit_rps": 1_000_000, "open_rate": 15_000, "authz_runtime": "tokio",
            "variants": [variant("A", 40_000.0, 20.0), variant("B", 30_000.0, 26.0)],
            "targets": targets(&a, &a, &a, &a),
        });
        let md = markdown(&v);
        assert!(md.contains("| | A: title | B: title |\n|---|---:|---:|\n"));
        assert!(md.contains("| CPU µs/request added over A | 0.0 | 6.0 |"));
        assert!(md.contains("| Envoy RSS MiB | 40.0 | 40.0 |"));
        assert_eq!(md.matches("**fail**").count(), 2);
        let bars = chart_data(&v);
        assert_eq!(bars[1], ("B: x".to_string(), 30_000.0, 6.0));
    }

    /// `cargo test -p tokengate-bench --lib variants::tests::print_latest -- --ignored
    /// --nocapture`: the tables of the last run, without running it again.
    #[test]
    #[ignore]
    fn print_latest() {
        let path = out_dir().join("variants.json");
        let text = fs::read_to_string(&path).expect("a variants run's figures");
        println!("{}", markdown(&serde_json::from_str(&text).unwrap()));
    }
}
