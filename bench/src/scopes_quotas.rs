//! Scopes and quotas: issue 16's two targets.
//!
//! - **Scope matching cost**: Envoy CPU per request for a token with no scopes (A), one
//!   whose scope holds 10 rules (B) and one whose scope holds 50 (C). Every rule is tried
//!   before the one that matches: the request matches its scope's last rule, and each rule
//!   before it passes the method and the first two path segments before it fails. One Envoy
//!   with one worker, the three tokens taking turns round after round (the order rotating),
//!   closed-loop with oha; CPU from the Envoy's threads' schedstat. Target: C costs at most
//!   1 µs more than A.
//! - **Quota overshoot**: one token's quota counted across three Envoys (two workers each,
//!   the wasm filter) under full load: closed-loop, every connection sending its next
//!   request as soon as the last is answered, far above the quota's rate. The quota uses
//!   a test-only short period (the control plane runs with `TOKENGATE_TEST_QUOTA_PERIODS`),
//!   and the load starts before a period boundary (from `Period::window`, as the filter
//!   and the control plane compute it) and runs through whole periods. Every 2xx the three
//!   Envoys answered within a period is counted against the quota. Target: overshoot
//!   ≤ 1 % of the quota or ≤ one report interval's worth of `max_rps`, whichever is
//!   larger. Two tokens: one with `max_rps` and one with only a quota (there only the 1 %
//!   bound applies). Also: how soon after a boundary each Envoy that had been refusing
//!   admits again.

use crate::load::{oha, Mode};
use crate::procstat::cpu_micros;
use crate::report::{command_output, met};
use crate::{client, median, out_dir, Depth, Envoy};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokengate_e2e::{http, Options, Stack};
use tokengate_wire::quota::Period;

/// Issue target: the matching cost of 50 rules.
const MATCH_TARGET_US: f64 = 1.0;
/// Issue target: overshoot within 1 % of the quota...
const QUOTA_TARGET_PCT: f64 = 1.0;
/// ... or one report interval's worth of `max_rps`: the Envoys' `fleet_report_ms`, set
/// explicitly so the bound does not hang on a default.
const REPORT_MS: u32 = 1_000;
/// Requests counted per token under callgrind, after as many uncounted ones.
const CALLGRIND_REQUESTS: usize = 2_000;
/// oha's keep-alive connections for the scope runs (as the variants section).
const CONNECTIONS: u32 = 16;
/// The load starts this long before the first measured period, so the Envoys are under
/// full load when it begins.
const LEAD: Duration = Duration::from_secs(2);
/// The load goes on this long into the period after the last measured one, to see it
/// admit again.
const TAIL: Duration = Duration::from_secs(3);
/// An Envoy counts as refusing before a boundary if it admitted nothing in this long
/// before it (a rate-limited token still admits some of every second).
const REFUSING_MS: i64 = 500;
/// The path of the quota runs.
const QUOTA_PATH: &str = "/bench";
/// A path no bench scope covers.
const OUTSIDE: &str = "/outside/every/scope";

struct Plan {
    rounds: usize,
    seconds: Duration,
    warmup: Duration,
    period_s: u32,
    periods: usize,
    limit: u64,
    max_rps: u32,
    connections_per_envoy: usize,
}

fn plan(depth: Depth) -> Plan {
    match depth {
        Depth::Full => Plan {
            // Many short rounds: the difference sought is a few per cent of the whole.
            rounds: 9,
            seconds: Duration::from_secs(5),
            warmup: Duration::from_secs(2),
            period_s: 20,
            periods: 3,
            limit: 10_000,
            max_rps: 2_000,
            connections_per_envoy: 4,
        },
        Depth::Quick => Plan {
            rounds: 2,
            seconds: Duration::from_secs(2),
            warmup: Duration::from_millis(500),
            period_s: 8,
            periods: 1,
            limit: 2_000,
            max_rps: 1_000,
            connections_per_envoy: 4,
        },
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn start_envoy(stack: &Stack, label: &str, proxy: &str, workers: u32) -> Envoy {
    Envoy::start(
        label,
        "tokengate",
        workers,
        &[
            ("CONTROL_PLANE_PORT", stack.control_plane_port.to_string()),
            ("SYNC_TOKEN", stack.sync_token.clone()),
            (
                "PLUGIN_EXTRA",
                format!(r#""proxy_id": "{proxy}", "fleet_report_ms": {REPORT_MS},"#),
            ),
        ],
    )
}

/// Waits until `secret` is answered `want` on `path` by every Envoy (the token synced).
fn wait_status(envoys: &[&Envoy], path: &str, secret: &str, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for e in envoys {
        loop {
            let r = http(e.addr(), "GET", path, &[("x-api-token", secret)], None);
            if r.as_ref().is_ok_and(|r| r.status == want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {path} not answered {want} after 60 s (last: {:?})",
                e.name,
                r.map(|r| (r.status, r.body))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// --------------------------------------------------------------------------------------
// Scope matching cost

/// `n` rules, each passing the method and the first two segments of the request path of
/// [`scoped_path`] before failing on the third, but the last, which matches.
fn rules(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"methods": ["GET", "POST"], "path": format!("/api/v1/r{i:02}/*/items/**")}))
        .collect()
}

/// A path matching only the last of `rules(n)` (the same length for any `n` < 100).
fn scoped_path(n: usize) -> String {
    format!("/api/v1/r{:02}/42/items/7", n.saturating_sub(1))
}

fn create_scope(stack: &Stack, name: &str, n: usize) {
    let body = json!({"name": name, "description": format!("bench: {n} rules"), "rules": rules(n)});
    let r = stack.admin("POST", "/v1/scopes", Some(&body));
    assert!(
        r.status == 201 || r.status == 200,
        "POST /v1/scopes {name}: {} {} (the control plane needs the scopes API)",
        r.status,
        r.body
    );
}

struct ScopeVariant {
    key: &'static str,
    title: String,
    rules: usize,
    secret: String,
    path: String,
    cpu: Vec<f64>,
    rps: Vec<f64>,
}

fn closed_run(envoy: &Envoy, v: &ScopeVariant, duration: Duration) -> (f64, f64) {
    let before = cpu_micros(envoy.pid());
    let r = oha(
        &envoy.url(&v.path),
        &[("X-API-Token", v.secret.as_str())],
        Mode::Closed {
            connections: CONNECTIONS,
        },
        duration,
    );
    let used = cpu_micros(envoy.pid()).saturating_sub(before);
    assert!(
        r.requests > 0 && r.count(200) == r.requests && r.errors == 0,
        "scopes {}: not every request was answered 200: statuses {:?}, {} errors",
        v.key,
        r.statuses,
        r.errors
    );
    (used as f64 / r.requests as f64, r.rps)
}

fn scopes(stack: &Stack, plan: &Plan) -> Value {
    create_scope(stack, "bench-10", 10);
    create_scope(stack, "bench-50", 50);
    let (_, a) = stack.create_token(json!({"name": "sq-unrestricted"}));
    let (_, b) = stack.create_token(json!({"name": "sq-10-rules", "scopes": ["bench-10"]}));
    let (_, c) = stack.create_token(json!({"name": "sq-50-rules", "scopes": ["bench-50"]}));
    let envoy = start_envoy(stack, "sq-scopes", "sq-scopes", 1);
    let mut variants = vec![
        ScopeVariant {
            key: "A",
            title: "A: no scopes (unrestricted)".into(),
            rules: 0,
            secret: a,
            // The same length as the others', so the paths cost Envoy the same.
            path: scoped_path(50),
            cpu: vec![],
            rps: vec![],
        },
        ScopeVariant {
            key: "B",
            title: "B: a scope of 10 rules".into(),
            rules: 10,
            secret: b,
            path: scoped_path(10),
            cpu: vec![],
            rps: vec![],
        },
        ScopeVariant {
            key: "C",
            title: "C: a scope of 50 rules".into(),
            rules: 50,
            secret: c,
            path: scoped_path(50),
            cpu: vec![],
            rps: vec![],
        },
    ];
    // Each token allowed on its path; a scoped one refused outside its scope, or the
    // matching is not running at all.
    for v in &variants {
        wait_status(&[&envoy], &v.path, &v.secret, 200);
        let outside = http(
            envoy.addr(),
            "GET",
            OUTSIDE,
            &[("x-api-token", &v.secret)],
            None,
        )
        .expect("a request outside the scopes");
        if v.rules == 0 {
            assert_eq!(outside.status, 200, "the unrestricted token refused");
        } else {
            assert!(
                outside.status == 403
                    && outside.error_code().as_deref() == Some("insufficient_scope"),
                "scopes {}: a request outside its scope was answered {} {} (the filter needs \
                 scope matching)",
                v.key,
                outside.status,
                outside.body
            );
        }
        // Not measured: connection set-up and cold caches.
        let _ = closed_run(&envoy, v, plan.warmup);
    }
    for round in 0..plan.rounds {
        for i in 0..variants.len() {
            let v = &mut variants[(round + i) % 3];
            let (cpu, rps) = closed_run(&envoy, v, plan.seconds);
            eprintln!(
                "  scopes round {}: {} {:.2} µs Envoy CPU/request, {rps:.0} requests/s",
                round + 1,
                v.key,
                cpu
            );
            v.cpu.push(cpu);
            v.rps.push(rps);
        }
    }
    drop(envoy);
    let mut figures = scope_figures(&variants, plan);
    if let Some(counts) = callgrind(stack, &variants) {
        let a = counts[0];
        for (row, n) in figures["variants"]
            .as_array_mut()
            .into_iter()
            .flatten()
            .zip(&counts)
        {
            row["instructions"] = json!(n.round());
            row["instructions_minus_a"] = json!((n - a).round());
        }
        figures["callgrind_requests"] = json!(CALLGRIND_REQUESTS);
    }
    figures
}

/// `n` requests of `v` on one kept-alive connection, every one answered 200.
fn requests(envoy: &Envoy, v: &ScopeVariant, n: usize) {
    let mut conn = client::Conn::new(
        envoy.addr(),
        client::request_bytes(envoy.addr(), &v.path, &v.secret),
    );
    let mut sent = Instant::now();
    for _ in 0..n {
        let status = conn
            .call(&mut sent)
            .unwrap_or_else(|e| panic!("scopes {} under callgrind: {e}", v.key));
        assert_eq!(status, 200, "scopes {} under callgrind", v.key);
    }
}

/// Instructions per request of each token, in one Envoy (one worker) under callgrind, or
/// `None` when valgrind is not installed: the measure the machine's load does not move.
/// Instrumentation is on only around each token's counted requests.
fn callgrind(stack: &Stack, variants: &[ScopeVariant]) -> Option<Vec<f64>> {
    let have = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("valgrind") || !have("callgrind_control") {
        eprintln!("  scopes: valgrind not installed, no instruction counts");
        return None;
    }
    let dir = out_dir().join("run/callgrind-scopes");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create target/bench/run/callgrind-scopes");
    let out = dir.join("envoy.out");
    let wrapper = vec![
        "valgrind".to_string(),
        "--tool=callgrind".into(),
        "--instr-atstart=no".into(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    let envoy = Envoy::start_under(
        "sq-scopes-callgrind",
        "tokengate",
        1,
        &[
            ("CONTROL_PLANE_PORT", stack.control_plane_port.to_string()),
            ("SYNC_TOKEN", stack.sync_token.clone()),
            ("PLUGIN_EXTRA", String::new()),
        ],
        &wrapper,
        Duration::from_secs(300),
    );
    let control = |what: &[&str]| {
        Command::new("callgrind_control")
            .args(what)
            .arg(envoy.pid().to_string())
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let mut counts = vec![];
    let mut seen = std::collections::BTreeSet::new();
    for v in variants {
        wait_status(&[&envoy], &v.path, &v.secret, 200);
        requests(&envoy, v, CALLGRIND_REQUESTS);
        assert!(
            control(&["-i", "on"]) && control(&["-z"]),
            "callgrind_control failed"
        );
        requests(&envoy, v, CALLGRIND_REQUESTS);
        assert!(
            control(&["-d"]) && control(&["-i", "off"]),
            "callgrind_control failed"
        );
        let dump = std::fs::read_dir(&dir)
            .expect("the callgrind directory")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p != &out && !seen.contains(p))
            .expect("a new callgrind dump");
        seen.insert(dump.clone());
        let text = std::fs::read_to_string(&dump).expect("read the callgrind dump");
        let total: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("summary:"))
            .and_then(|x| x.trim().parse().ok())
            .expect("a summary line in the callgrind dump");
        let per = total / CALLGRIND_REQUESTS as f64;
        eprintln!(
            "  scopes: callgrind {}: {per:.0} instructions/request",
            v.key
        );
        counts.push(per);
    }
    drop(envoy);
    Some(counts)
}

fn scope_figures(variants: &[ScopeVariant], plan: &Plan) -> Value {
    let a_rounds = &variants[0].cpu;
    let a = median(&mut a_rounds.clone());
    let rows: Vec<Value> = variants
        .iter()
        .map(|v| {
            let cpu = median(&mut v.cpu.clone());
            // Per round, against A's run of the same round: the noise they met is shared.
            let mut diffs: Vec<f64> = v.cpu.iter().zip(a_rounds).map(|(x, a)| x - a).collect();
            let rounds_diff: Vec<f64> = diffs.iter().map(|d| round2(*d)).collect();
            json!({
                "key": v.key,
                "title": v.title,
                "rules": v.rules,
                "path": v.path,
                "cpu_us": round2(cpu),
                "ratio_to_a": if a > 0.0 { (cpu / a * 1000.0).round() / 1000.0 } else { 0.0 },
                "minus_a_us": round2(median(&mut diffs)),
                "rounds_minus_a_us": rounds_diff,
                "rps": round2(median(&mut v.rps.clone())),
                "rounds_cpu_us": v.cpu.iter().map(|x| round2(*x)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let c_minus_a = rows[2]["minus_a_us"].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "  scopes: A {} µs, B {} µs ({:+} µs), C {} µs ({:+} µs)",
        rows[0]["cpu_us"], rows[1]["cpu_us"], rows[1]["minus_a_us"], rows[2]["cpu_us"], c_minus_a
    );
    json!({
        "rounds": plan.rounds,
        "seconds_per_run": plan.seconds.as_secs_f64(),
        "connections": CONNECTIONS,
        "envoy_workers": 1,
        "variants": rows,
        "c_minus_a_us": c_minus_a,
        "target_us": MATCH_TARGET_US,
        "ok": c_minus_a <= MATCH_TARGET_US,
    })
}

// --------------------------------------------------------------------------------------
// Quota overshoot

/// One answer of the quota load, its times in Unix microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    envoy: usize,
    sent: i64,
    done: i64,
    status: u16,
}

fn ok(status: u16) -> bool {
    (200..300).contains(&status)
}

/// 2xx in `[start, end)`: those sent and answered within it, and those that straddle one
/// of its ends (decided on one side or the other; the verdict counts them in).
fn count_period(answers: &[Answer], start: i64, end: i64) -> (u64, u64) {
    let (mut inside, mut straddling) = (0, 0);
    for a in answers.iter().filter(|a| ok(a.status)) {
        if a.sent >= start && a.done < end {
            inside += 1;
        } else if a.sent < end && a.done >= start {
            straddling += 1;
        }
    }
    (inside, straddling)
}

/// The overshoot bound: the larger of 1 % of the quota and one report interval's worth of
/// `max_rps` (none without one), and which of the two it is.
fn bound(limit: u64, max_rps: Option<u32>, report_ms: u32) -> (u64, &'static str) {
    let pct = (limit as f64 * QUOTA_TARGET_PCT / 100.0).ceil() as u64;
    let interval = max_rps.map_or(0, |r| u64::from(r) * u64::from(report_ms) / 1_000);
    if interval > pct {
        (interval, "one report interval of max_rps")
    } else {
        (pct, "1 % of the quota")
    }
}

/// For each Envoy that was refusing everything in the [`REFUSING_MS`] before `boundary`
/// (while still answering): milliseconds from the boundary until the answer of its first
/// 2xx sent at or after it (`None`: none came).
fn readmit(answers: &[Answer], envoys: usize, boundary: i64) -> Vec<(usize, Option<f64>)> {
    let before = boundary - REFUSING_MS * 1_000;
    (0..envoys)
        .filter(|&e| {
            let recent: Vec<&Answer> = answers
                .iter()
                .filter(|a| a.envoy == e && a.done >= before && a.done < boundary)
                .collect();
            !recent.is_empty() && !recent.iter().any(|a| ok(a.status))
        })
        .map(|e| {
            let first = answers
                .iter()
                .filter(|a| a.envoy == e && ok(a.status) && a.sent >= boundary)
                .map(|a| a.done)
                .min();
            (e, first.map(|d| round2((d - boundary) as f64 / 1e3)))
        })
        .collect()
}

struct QuotaCase {
    name: &'static str,
    max_rps: Option<u32>,
}

/// What a request refused for the quota looks like, probed once the quota is spent.
fn probe(envoy: &Envoy, secret: &str) -> (Value, Option<Answer>) {
    let sent = unix_us(SystemTime::now());
    let r = http(
        envoy.addr(),
        "GET",
        QUOTA_PATH,
        &[("x-api-token", secret)],
        None,
    )
    .expect("the probe");
    let done = unix_us(SystemTime::now());
    let v = json!({
        "status": r.status,
        "error": r.error_code(),
        "retry_after": r.header("retry-after"),
        "ratelimit_policy": r.header("ratelimit-policy"),
    });
    let answer = Answer {
        envoy: 0,
        sent,
        done,
        status: r.status,
    };
    (v, Some(answer))
}

fn quota_case(stack: &Stack, envoys: &[Envoy], plan: &Plan, case: &QuotaCase) -> Value {
    let period = Period::Seconds(plan.period_s);
    let len_us = i64::from(plan.period_s) * 1_000_000;
    let mut body = json!({
        "name": format!("sq-quota-{}", case.name),
        "quota": {"limit": plan.limit, "period": period.as_string()},
    });
    if let Some(r) = case.max_rps {
        body["max_rps"] = json!(r);
    }
    let (id, secret) = stack.create_token(body);
    let record = stack.admin("GET", &format!("/v1/tokens/{id}"), None).json();
    assert!(
        record["quota"]["limit"].as_u64() == Some(plan.limit),
        "the token record does not carry its quota (the control plane needs quotas): {record}"
    );
    let all: Vec<&Envoy> = envoys.iter().collect();
    wait_status(&all, QUOTA_PATH, &secret, 200);

    // The first measured period: the next one that leaves LEAD to start the load before it.
    let now = unix_us(SystemTime::now());
    let (_, mut first) = period.window(now.div_euclid(1_000_000));
    let mut first_us = first * 1_000_000;
    if first_us - now < LEAD.as_micros() as i64 + 200_000 {
        first += i64::from(plan.period_s);
        first_us = first * 1_000_000;
    }
    let sleep_until = |at_us: i64| {
        let wait = at_us - unix_us(SystemTime::now());
        if wait > 0 {
            std::thread::sleep(Duration::from_micros(wait as u64));
        }
    };
    sleep_until(first_us - LEAD.as_micros() as i64);
    let loads: Vec<(client::Load, i64)> = envoys
        .iter()
        .map(|e| {
            let (wall, mono) = (unix_us(SystemTime::now()), Instant::now());
            let load = client::Load::start(
                e.addr(),
                QUOTA_PATH,
                &secret,
                plan.connections_per_envoy,
                true,
            );
            let offset = wall + load.started().saturating_duration_since(mono).as_micros() as i64;
            (load, offset)
        })
        .collect();
    let load_started = unix_us(SystemTime::now());
    // Well into the first period the quota is spent, whichever token this is.
    sleep_until(first_us + len_us * 9 / 10);
    let (probe_seen, probe_answer) = probe(&envoys[0], &secret);
    let end_us = first_us + len_us * plan.periods as i64;
    sleep_until(end_us + TAIL.as_micros() as i64);
    let mut answers: Vec<Answer> = vec![];
    let mut errors = 0u64;
    let mut reconnects = 0u64;
    for (i, (load, offset)) in loads.into_iter().enumerate() {
        let r = load.stop();
        reconnects += r.reconnects;
        for s in r.samples {
            if s.status == 0 {
                errors += 1;
                continue;
            }
            answers.push(Answer {
                envoy: i,
                sent: offset + s.sent_us as i64,
                done: offset + s.done_us as i64,
                status: s.status,
            });
        }
    }
    answers.extend(probe_answer);
    let load_seconds = (unix_us(SystemTime::now()) - load_started) as f64 / 1e6;
    let statuses: BTreeMap<u16, u64> = answers.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(a.status).or_default() += 1;
        m
    });
    let offered_rps = answers.len() as f64 / load_seconds.max(1e-9);

    let (bound, bound_kind) = bound(plan.limit, case.max_rps, REPORT_MS);
    let mut periods = vec![];
    let mut worst_overshoot = i64::MIN;
    for k in 0..plan.periods {
        let start = first_us + len_us * k as i64;
        let end = start + len_us;
        let (inside, straddling) = count_period(&answers, start, end);
        let admitted = inside + straddling;
        let overshoot = admitted as i64 - plan.limit as i64;
        worst_overshoot = worst_overshoot.max(overshoot);
        let mut admitted_at: Vec<i64> = answers
            .iter()
            .filter(|a| ok(a.status) && a.sent >= start && a.sent < end)
            .map(|a| a.done)
            .collect();
        admitted_at.sort_unstable();
        let last_ok = admitted_at.last().copied();
        // Grants of what other Envoys left unspent trickle in until the period ends, so the
        // last admission says little; 99 % of the quota says when it was as good as spent.
        let most = ((plan.limit as f64 * 0.99).ceil() as usize).max(1);
        let most_at = admitted_at.get(most - 1).copied();
        let per_envoy: Vec<u64> = (0..envoys.len())
            .map(|e| {
                answers
                    .iter()
                    .filter(|a| a.envoy == e && ok(a.status) && a.sent < end && a.done >= start)
                    .count() as u64
            })
            .collect();
        eprintln!(
            "  quota {} period {}: admitted {admitted} ({inside} inside, {straddling} across an \
             end) of {}; overshoot {overshoot} (bound {bound}: {bound_kind})",
            case.name,
            k + 1,
            plan.limit
        );
        periods.push(json!({
            "start": start / 1_000_000,
            "admitted": admitted,
            "inside": inside,
            "straddling": straddling,
            "per_envoy": per_envoy,
            "overshoot": overshoot,
            "overshoot_pct": round2(overshoot as f64 / plan.limit as f64 * 100.0),
            "last_admitted_s": last_ok.map(|d| round2((d - start) as f64 / 1e6)),
            "used_99_s": most_at.map(|d| round2((d - start) as f64 / 1e6)),
        }));
    }
    // Every boundary the load crossed while an Envoy was refusing: the first measured
    // period's start (if the period before was spent in the lead-in) and each end.
    let mut readmits = vec![];
    for k in 0..=plan.periods {
        let boundary = first_us + len_us * k as i64;
        let per = readmit(&answers, envoys.len(), boundary);
        if per.is_empty() {
            continue;
        }
        let worst = per
            .iter()
            .map(|(_, ms)| ms.unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max);
        eprintln!(
            "  quota {} boundary {k}: {} refusing Envoy(s) admit again after {:?} ms",
            case.name,
            per.len(),
            per.iter().map(|(_, ms)| *ms).collect::<Vec<_>>()
        );
        readmits.push(json!({
            "boundary": k,
            "refusing_envoys": per.len(),
            "ms": per.iter().map(|(_, ms)| *ms).collect::<Vec<_>>(),
            "worst_ms": worst.is_finite().then_some(worst),
        }));
    }
    let worst_readmit_ms = readmits
        .iter()
        .map(|r| r["worst_ms"].as_f64().unwrap_or(f64::INFINITY))
        .fold(None, |acc: Option<f64>, x| {
            Some(acc.map_or(x, |a| a.max(x)))
        });
    let probe_ok = probe_seen["status"] == 429 && probe_seen["error"] == "quota_exceeded";
    json!({
        "name": case.name,
        "limit": plan.limit,
        "max_rps": case.max_rps,
        "bound": bound,
        "bound_kind": bound_kind,
        "offered_rps": round2(offered_rps),
        "statuses": statuses,
        "errors": errors,
        "reconnects": reconnects,
        "periods": periods,
        "worst_overshoot": worst_overshoot,
        "worst_overshoot_pct": round2(worst_overshoot as f64 / plan.limit as f64 * 100.0),
        "ok": worst_overshoot <= bound as i64,
        "readmits": readmits,
        "worst_readmit_ms": worst_readmit_ms.map(|x| if x.is_finite() { json!(x) } else { json!("never") }),
        "probe": probe_seen,
        "probe_ok": probe_ok,
    })
}

fn quotas(stack: &Stack, plan: &Plan) -> Value {
    let envoys: Vec<Envoy> = (1..=3)
        .map(|i| start_envoy(stack, &format!("sq-quota-{i}"), &format!("sq-{i}"), 2))
        .collect();
    let cases = [
        QuotaCase {
            name: "with-max-rps",
            max_rps: Some(plan.max_rps),
        },
        QuotaCase {
            name: "quota-only",
            max_rps: None,
        },
    ];
    let results: Vec<Value> = cases
        .iter()
        .map(|c| quota_case(stack, &envoys, plan, c))
        .collect();
    drop(envoys);
    json!({
        "envoys": 3,
        "envoy_workers": 2,
        "connections_per_envoy": plan.connections_per_envoy,
        "period": Period::Seconds(plan.period_s).as_string(),
        "periods": plan.periods,
        "report_ms": REPORT_MS,
        "cases": results,
    })
}

pub fn run(depth: Depth) -> Value {
    let plan = plan(depth);
    let mut stack = Stack::start_with(Options {
        control_plane: false,
        envoy: false,
        ..Options::default()
    });
    stack
        .control_plane_env
        .push(("TOKENGATE_TEST_QUOTA_PERIODS".into(), "true".into()));
    stack.start_control_plane();
    eprintln!("scopes and quotas: scope matching cost (0, 10, 50 rules)");
    let scopes = scopes(&stack, &plan);
    eprintln!("scopes and quotas: quota overshoot across three Envoys at full load");
    let quotas = quotas(&stack, &plan);
    json!({
        "depth": format!("{depth:?}"),
        "commit": command_output("git", &["rev-parse", "--short", "HEAD"]),
        "date": command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "scopes": scopes,
        "quotas": quotas,
    })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The section's tables; a part without figures (a run of the other part alone) is left out.
pub fn markdown(v: &Value) -> String {
    let mut md = format!(
        "### Scopes and quotas\n\nFrom `bench/src/scopes_quotas.rs`; commit {}, {}.\n\n",
        v["commit"].as_str().unwrap_or("?"),
        v["date"].as_str().unwrap_or("?"),
    );
    if v["scopes"].is_object() {
        md.push_str(&scope_markdown(&v["scopes"]));
    }
    if v["quotas"].is_object() {
        md.push_str(&quota_markdown(&v["quotas"]));
    }
    md
}

fn scope_markdown(s: &Value) -> String {
    let mut md = format!(
        "**Scope matching cost.** One Envoy with one worker thread (the wasm filter) in front \
         of a direct response; three tokens take turns, {} round(s) of {} s each, closed-loop \
         from oha over {} keep-alive connections; Envoy CPU from its threads' schedstat, \
         medians over rounds (the difference to A is the median of each round's difference). \
         Each scoped request matches its scope's last rule; every rule before it takes the \
         method and two path segments to refuse (`GET /api/v1/r49/42/items/7` against \
         `/api/v1/r00/*/items/**` .. `/api/v1/r49/*/items/**`). Instructions per request: \
         the same tokens through one Envoy (one worker) under callgrind, {} keep-alive requests \
         each counted after as many uncounted (independent of the machine's load).\n\n",
        s["rounds"], s["seconds_per_run"], s["connections"], s["callgrind_requests"],
    );
    md.push_str(
        "| token | rules | Envoy CPU µs/request | ÷ A | − A (µs) | requests/s | instructions/request | − A | rounds (µs) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in s["variants"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.3} | {:+.2} | {:.0} | {} | {} | {} |\n",
            r["title"].as_str().unwrap_or("?"),
            r["rules"],
            f(&r["cpu_us"]),
            f(&r["ratio_to_a"]),
            f(&r["minus_a_us"]),
            f(&r["rps"]),
            r["instructions"]
                .as_f64()
                .map_or("–".into(), |n| format!("{n:.0}")),
            r["instructions_minus_a"]
                .as_f64()
                .map_or("–".into(), |n| format!("{n:+.0}")),
            r["rounds_cpu_us"],
        ));
    }
    md.push_str(&format!(
        "\n| target | result | |\n|---|---|---|\n| matching 50 rules costs ≤ {} µs per request \
         (C − A) | {:+.2} µs of Envoy CPU; {} instructions | {} |\n\n",
        f(&s["target_us"]),
        f(&s["c_minus_a_us"]),
        s["variants"][2]["instructions_minus_a"]
            .as_f64()
            .map_or("–".into(), |n| format!("{n:+.0}")),
        met(s["ok"] == true),
    ));
    md
}

fn quota_markdown(q: &Value) -> String {
    let mut md = format!(
        "**Quota overshoot.** One token's quota across {} Envoys ({} workers each, the wasm \
         filter, reporting every {} ms) in front of one control plane (SQLite), at full load: \
         closed-loop over {} keep-alive connections per Envoy, far above the quota's rate. \
         The quota has the test-only period `{}`; the load starts {} s before a period \
         boundary and runs through {} whole period(s). Admitted counts every 2xx the three \
         answered within a period, with any request that straddles one of its ends. The \
         bound is the larger of 1 % of the quota and one report interval's worth of \
         `max_rps`.\n\n",
        q["envoys"],
        q["envoy_workers"],
        q["report_ms"],
        q["connections_per_envoy"],
        q["period"].as_str().unwrap_or("?"),
        LEAD.as_secs(),
        q["periods"],
    );
    md.push_str(
        "| token | quota | max_rps | offered/s | admitted per period | worst overshoot | bound (which) | | 99 % of the quota admitted after | next period admits after | refused for the quota |\n\
         |---|---:|---:|---:|---|---:|---|---|---|---|---|\n",
    );
    for c in q["cases"].as_array().into_iter().flatten() {
        let periods = c["periods"].as_array().cloned().unwrap_or_default();
        let admitted: Vec<String> = periods
            .iter()
            .map(|p| format!("{}", p["admitted"]))
            .collect();
        let secs = |x: &Value| x.as_f64().map_or("–".to_string(), |s| format!("{s:.2} s"));
        let used: Vec<String> = periods
            .iter()
            .map(|p| {
                format!(
                    "{} (last at {})",
                    secs(&p["used_99_s"]),
                    secs(&p["last_admitted_s"])
                )
            })
            .collect();
        let readmit = match &c["worst_readmit_ms"] {
            Value::Null => "– (no Envoy refusing at a boundary)".to_string(),
            Value::String(s) => s.clone(),
            x => format!("≤ {:.0} ms (worst Envoy)", f(x)),
        };
        let p = &c["probe"];
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} ({:+.2} %) | {} ({}) | {} | {} | {} | {} {}, Retry-After {}, RateLimit-Policy `{}` |\n",
            c["name"].as_str().unwrap_or("?"),
            c["limit"],
            c["max_rps"].as_u64().map_or("–".into(), |r| r.to_string()),
            f(&c["offered_rps"]),
            admitted.join(", "),
            c["worst_overshoot"],
            f(&c["worst_overshoot_pct"]),
            c["bound"],
            c["bound_kind"].as_str().unwrap_or("?"),
            met(c["ok"] == true),
            used.join(", "),
            readmit,
            p["status"],
            p["error"].as_str().unwrap_or("?"),
            p["retry_after"].as_str().unwrap_or("none"),
            p["ratelimit_policy"].as_str().unwrap_or("none"),
        ));
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(envoy: usize, sent: i64, done: i64, status: u16) -> Answer {
        Answer {
            envoy,
            sent,
            done,
            status,
        }
    }

    #[test]
    fn every_rule_but_the_last_misses_the_path() {
        let rs = rules(50);
        assert_eq!(rs.len(), 50);
        assert_eq!(rs[49]["path"], "/api/v1/r49/*/items/**");
        assert_eq!(scoped_path(50), "/api/v1/r49/42/items/7");
        assert_eq!(scoped_path(10).len(), scoped_path(50).len());
        let rules: Vec<tokengate_wire::scope::Rule> =
            serde_json::from_value(json!(rs)).expect("rules");
        for r in &rules {
            tokengate_wire::scope::check_rule(r).expect("a valid rule");
        }
        let path = scoped_path(50);
        let req = tokengate_wire::scope::RequestPath::parse(path.as_bytes()).expect("path");
        let only_last =
            |i: usize| tokengate_wire::scope::Compiled::new(&rules[i..=i]).allows(b"GET", &req);
        assert!(only_last(49));
        assert!((0..49).all(|i| !only_last(i)));
    }

    #[test]
    fn a_period_counts_its_2xx_and_those_across_its_ends() {
        let answers = [
            a(0, 90, 99, 200),   // before
            a(0, 95, 105, 200),  // across the start
            a(1, 100, 110, 200), // inside
            a(2, 150, 160, 429), // refused
            a(1, 190, 199, 204), // inside
            a(0, 199, 201, 200), // across the end
            a(0, 200, 210, 200), // after
        ];
        assert_eq!(count_period(&answers, 100, 200), (2, 2));
    }

    #[test]
    fn the_larger_bound_applies() {
        assert_eq!(
            bound(10_000, Some(2_000), 1_000),
            (2_000, "one report interval of max_rps")
        );
        assert_eq!(bound(10_000, None, 1_000), (100, "1 % of the quota"));
        assert_eq!(
            bound(1_000_000, Some(50), 1_000),
            (10_000, "1 % of the quota")
        );
        assert_eq!(bound(2_001, None, 1_000), (21, "1 % of the quota"));
    }

    #[test]
    fn readmission_is_timed_for_envoys_refusing_before_the_boundary() {
        let b = 10_000_000;
        let answers = [
            // Envoy 0 refusing, then admitted 3 ms after the boundary.
            a(0, b - 100_000, b - 99_000, 429),
            a(0, b + 1_000, b + 3_000, 200),
            // Envoy 1 still admitting before the boundary: not timed.
            a(1, b - 100_000, b - 99_000, 200),
            a(1, b + 1_000, b + 2_000, 200),
            // Envoy 2 refusing and never admitting.
            a(2, b - 50_000, b - 49_000, 429),
            a(2, b + 1_000, b + 2_000, 429),
            // A straddler answered after the boundary but sent before: not the new period's.
            a(0, b - 10, b + 500, 200),
        ];
        assert_eq!(readmit(&answers, 3, b), vec![(0, Some(3.0)), (2, None)]);
    }

    #[test]
    fn markdown_shows_both_parts() {
        let v = json!({
            "commit": "abc", "date": "today",
            "scopes": {"rounds": 1, "seconds_per_run": 2.0, "connections": 16,
                "c_minus_a_us": 0.4, "target_us": 1.0, "ok": true,
                "variants": [{"title": "A: x", "rules": 0, "cpu_us": 20.0, "ratio_to_a": 1.0,
                              "minus_a_us": 0.0, "rps": 30000.0, "rounds_cpu_us": [20.0]}]},
            "quotas": {"envoys": 3, "envoy_workers": 2, "report_ms": 1000,
                "connections_per_envoy": 4, "period": "20s", "periods": 1,
                "cases": [{"name": "quota-only", "limit": 100, "max_rps": null,
                    "offered_rps": 9000.0, "periods": [{"admitted": 101, "last_admitted_s": 0.2, "used_99_s": 0.1}],
                    "worst_overshoot": 1, "worst_overshoot_pct": 1.0, "bound": 1,
                    "bound_kind": "1 % of the quota", "ok": true, "worst_readmit_ms": 4.0,
                    "probe": {"status": 429, "error": "quota_exceeded", "retry_after": "7",
                              "ratelimit_policy": "\"quota\";q=100;w=20"}}]}
        });
        let md = markdown(&v);
        assert!(md.contains("| A: x | 0 | 20.00 | 1.000 | +0.00 | 30000 | – | – | [20.0] |"));
        assert!(md.contains("| +0.40 µs of Envoy CPU; – instructions | met |"));
        assert!(md.contains("| quota-only | 100 | – | 9000 | 101 | 1 (+1.00 %) | 1 (1 % of the quota) | met | 0.10 s (last at 0.20 s) | ≤ 4 ms (worst Envoy) |"));
        assert!(md.contains("429 quota_exceeded, Retry-After 7"));
        let scopes_only = json!({"commit": "abc", "date": "today", "scopes": v["scopes"]});
        let md = markdown(&scopes_only);
        assert!(md.contains("Scope matching cost") && !md.contains("Quota overshoot"));
    }
}
