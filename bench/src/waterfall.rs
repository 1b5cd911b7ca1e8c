//! The wasm flavor step by step, so that the cost of every step is known: Envoy with no
//! filter; a wasm filter that returns at once; then with the credential header read, with
//! SHA-256, with the state and token records from shared data, with the identity headers; the
//! full filter (variant B); and the native module for comparison. The intermediate filters are the real
//! filter built with one `waterfall-*` feature each (`make bench-build`), which cuts its
//! request path after that step and lets every request through.
//!
//! Each is its own Envoy with one worker, as in `variants`, taking turns over rounds; the
//! figure is Envoy's CPU per request in a closed loop (medians over rounds). Where valgrind
//! is installed, each is also run under callgrind for a fixed number of keep-alive requests,
//! whose instruction count per request does not depend on what else the machine is doing.

use crate::load::{oha, Mode};
use crate::procstat::cpu_micros;
use crate::{median, out_dir, Depth, Envoy};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tokengate_e2e::{http, workspace_root, Options, Stack};

const CONNECTIONS: u32 = 16;
/// The target: the full wasm filter adds at most twice what a wasm filter that does
/// nothing adds.
const RATIO_MAX: f64 = 2.0;
/// Requests counted under callgrind, after as many uncounted ones.
const CALLGRIND_REQUESTS: usize = 2_000;

/// What a step runs.
#[derive(Clone, Copy)]
enum Build {
    /// The template's shipped artifact (or none).
    Shipped,
    /// A waterfall build of the wasm filter.
    Wasm(&'static str),
    /// The native module that returns at once.
    NativeReturn,
}

/// One row: key, what it is, the bench template, the build. The `W` rows and B are the
/// waterfall, each set against the row before; N0, F and D stand beside it, set against A.
const STEPS: [(&str, &str, &str, Build); 10] = [
    ("A", "Envoy, no filter", "none", Build::Shipped),
    (
        "W0",
        "a wasm filter that returns at once",
        "tokengate",
        Build::Wasm("return"),
    ),
    (
        "W1",
        "+ credential header read",
        "tokengate",
        Build::Wasm("read"),
    ),
    (
        "W2",
        "+ SHA-256 of the credential",
        "tokengate",
        Build::Wasm("hash"),
    ),
    (
        "W3",
        "+ state and token record from shared data",
        "tokengate",
        Build::Wasm("lookup"),
    ),
    (
        "W4",
        "+ credential removed, identity headers set",
        "tokengate",
        Build::Wasm("identity"),
    ),
    ("B", "the full wasm filter (B)", "tokengate", Build::Shipped),
    (
        "N0",
        "a native module that returns at once",
        "tokengate-native",
        Build::NativeReturn,
    ),
    (
        "F",
        "the native module, unlimited token",
        "tokengate-native",
        Build::Shipped,
    ),
    (
        "D",
        "Envoy's api_key_auth + local_ratelimit (D)",
        "native",
        Build::Shipped,
    ),
];

/// Rows set against A rather than against the row before.
fn beside(key: &str) -> bool {
    matches!(key, "N0" | "F" | "D")
}

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

/// The waterfall builds, made by `make bench-build`.
pub fn waterfall_artifact(file: &str) -> PathBuf {
    let path = workspace_root().join(format!("target/bench/waterfall/{file}"));
    assert!(
        path.is_file(),
        "{} is missing: make bench-build builds the waterfall filters",
        path.display()
    );
    path
}

fn vars(stack: &Stack, build: Build, token: &(String, String)) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("CONTROL_PLANE_PORT", stack.control_plane_port.to_string()),
        ("SYNC_TOKEN", stack.sync_token.clone()),
        ("PLUGIN_EXTRA", String::new()),
    ];
    v.extend(crate::variants::native_vars(std::slice::from_ref(token)));
    match build {
        Build::Shipped => {}
        Build::Wasm(step) => v.insert(
            0,
            (
                "WASM_PATH",
                waterfall_artifact(&format!("{step}.wasm"))
                    .display()
                    .to_string(),
            ),
        ),
        Build::NativeReturn => v.insert(
            0,
            (
                "MODULE_PATH",
                waterfall_artifact("native-return.so").display().to_string(),
            ),
        ),
    }
    v
}

fn wait_for_200(envoy: &Envoy, token: &str) {
    let start = Instant::now();
    while !http(envoy.addr(), "GET", "/", &[("X-API-Token", token)], None)
        .is_ok_and(|r| r.status == 200)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}: the token is not answered 200 after 30 s",
            envoy.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(depth: Depth) -> Value {
    let plan = plan(depth);
    let started = Instant::now();
    let stack = Stack::start_with(Options {
        control_plane: true,
        envoy: false,
        ..Options::default()
    });
    let issued = stack.create_token(json!({"name": "bench-waterfall"}));
    let token = issued.1.clone();
    let envoys: Vec<Envoy> = STEPS
        .iter()
        .map(|(key, _, template, build)| {
            Envoy::start(
                &format!("waterfall-{key}"),
                template,
                1,
                &vars(&stack, *build, &issued),
            )
        })
        .collect();
    for e in &envoys {
        wait_for_200(e, &token);
    }
    let headers = [("X-API-Token", token.as_str())];
    for e in &envoys {
        oha(
            &e.url("/"),
            &headers,
            Mode::Closed {
                connections: CONNECTIONS,
            },
            plan.warmup,
        );
    }
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); STEPS.len()];
    for round in 0..plan.rounds {
        for (i, e) in envoys.iter().enumerate() {
            let before = cpu_micros(e.pid());
            let r = oha(
                &e.url("/"),
                &headers,
                Mode::Closed {
                    connections: CONNECTIONS,
                },
                plan.load,
            );
            let used = cpu_micros(e.pid()).saturating_sub(before);
            assert!(
                r.requests > 0 && r.count(200) == r.requests,
                "{}: not every request was answered 200: {:?}",
                e.name,
                r.statuses
            );
            let per = used as f64 / r.requests as f64;
            eprintln!(
                "waterfall: round {} {}: {:.0} rps, {per:.2} µs Envoy CPU/request",
                round + 1,
                STEPS[i].0,
                r.rps
            );
            cpu[i].push(per);
        }
    }
    drop(envoys);
    // D's configuration holds the secret in clear; Envoy has read it.
    let _ = std::fs::remove_file(out_dir().join("run/waterfall-D.yaml"));
    let instructions = callgrind(&stack, &issued);
    drop(stack);

    let medians: Vec<f64> = cpu.iter_mut().map(|v| median(v)).collect();
    let steps: Vec<Value> = STEPS
        .iter()
        .enumerate()
        .map(|(i, (key, what, _, _))| {
            let ir = instructions.as_ref().and_then(|v| v.get(i).copied());
            json!({
                "key": key,
                "what": what,
                "cpu_us_per_request": medians[i],
                "cpu_rounds": cpu[i],
                "instructions_per_request": ir,
            })
        })
        .collect();
    let added = |i: usize| medians[i] - medians[0];
    let ratio = (added(1) > 0.0).then(|| added(6) / added(1));
    let ir_ratio = instructions
        .as_ref()
        .and_then(|v| (v[1] > v[0]).then(|| (v[6] - v[0]) / (v[1] - v[0])));
    // The native module (unlimited token) against Envoy's own filters, by instructions:
    // independent of the machine's load, unlike the variants' CPU time.
    let native_vs_d = instructions
        .as_ref()
        .and_then(|v| (v[9] > v[0]).then(|| (v[8] - v[0]) / (v[9] - v[0])));
    eprintln!(
        "waterfall: done in {:.0} s; full filter ÷ empty filter (added CPU) {ratio:?}",
        started.elapsed().as_secs_f64()
    );
    json!({
        "depth": format!("{depth:?}"),
        "rounds": plan.rounds,
        "seconds_per_run": plan.load.as_secs_f64(),
        "connections": CONNECTIONS,
        "callgrind_requests": CALLGRIND_REQUESTS,
        "steps": steps,
        "native_over_d_instructions": native_vs_d,
        "target": {
            "what": "CPU the full wasm filter adds ÷ CPU a wasm filter that returns at once adds",
            "value": ratio,
            "instructions_value": ir_ratio,
            "goal": format!("≤ {RATIO_MAX}"),
            "pass": ratio.is_some_and(|r| r <= RATIO_MAX),
        },
    })
}

/// Sends `n` requests over one keep-alive connection and reads every answer.
fn keep_alive(addr: SocketAddr, token: &str, n: usize) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET / HTTP/1.1\r\nHost: bench\r\nX-API-Token: {token}\r\n\r\n");
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    for _ in 0..n {
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        buf.clear();
        loop {
            let got = s.read(&mut chunk).map_err(|e| e.to_string())?;
            if got == 0 {
                return Err("connection closed".into());
            }
            buf.extend_from_slice(&chunk[..got]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                if !head.starts_with("http/1.1 200") {
                    return Err(format!("answer {}", head.lines().next().unwrap_or("")));
                }
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Instructions per request of each step under callgrind, or `None` when valgrind is not
/// installed. Instrumentation is switched on only around the counted requests.
fn callgrind(stack: &Stack, issued: &(String, String)) -> Option<Vec<f64>> {
    let token = issued.1.as_str();
    let have = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("valgrind") || !have("callgrind_control") {
        eprintln!("waterfall: valgrind not installed, no instruction counts");
        return None;
    }
    let dir = out_dir().join("run/callgrind");
    std::fs::create_dir_all(&dir).expect("create target/bench/run/callgrind");
    let mut counts = Vec::new();
    for (key, _, template, build) in STEPS {
        let out = dir.join(format!("{key}.out"));
        let wrapper = vec![
            "valgrind".to_string(),
            "--tool=callgrind".into(),
            "--instr-atstart=no".into(),
            format!("--callgrind-out-file={}", out.display()),
        ];
        let envoy = Envoy::start_under(
            &format!("callgrind-{key}"),
            template,
            1,
            &vars(stack, build, issued),
            &wrapper,
            Duration::from_secs(300),
        );
        wait_for_200(&envoy, token);
        let control = |what: &[&str]| {
            Command::new("callgrind_control")
                .args(what)
                .arg(envoy.pid().to_string())
                .output()
                .is_ok_and(|o| o.status.success())
        };
        keep_alive(envoy.addr(), token, CALLGRIND_REQUESTS)
            .unwrap_or_else(|e| panic!("callgrind {key}: warm-up: {e}"));
        assert!(
            control(&["-i", "on"]) && control(&["-z"]),
            "callgrind_control failed"
        );
        keep_alive(envoy.addr(), token, CALLGRIND_REQUESTS)
            .unwrap_or_else(|e| panic!("callgrind {key}: {e}"));
        assert!(control(&["-d"]), "callgrind_control -d failed");
        drop(envoy);
        let _ = std::fs::remove_file(out_dir().join(format!("run/callgrind-{key}.yaml")));
        let dumped = std::fs::read_dir(&dir)
            .expect("the callgrind directory")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{key}.out.")))
            })
            .max()
            .expect("a callgrind dump");
        let text = std::fs::read_to_string(&dumped).expect("read the callgrind dump");
        let total: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("summary:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a summary line in the callgrind dump");
        let per = total / CALLGRIND_REQUESTS as f64;
        eprintln!("waterfall: callgrind {key}: {per:.0} instructions/request");
        counts.push(per);
    }
    Some(counts)
}

fn fmt(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".to_string(), |v| format!("{v:.digits$}"))
}

pub fn markdown(v: &Value) -> String {
    let mut md = String::from("### The wasm flavor, step by step\n\n");
    let Some(steps) = v["steps"].as_array() else {
        md.push_str("(no figures)\n");
        return md;
    };
    md.push_str(&format!(
        "Each step is its own Envoy with one worker in front of the same direct response, the \
         steps taking turns: {} round(s) of {} s closed loop over {} keep-alive connections, \
         Envoy's CPU per request (median over rounds). Instructions per request: the same \
         Envoy under callgrind, {} keep-alive requests counted after as many uncounted \
         (independent of the machine's load). Each intermediate filter is the real one built \
         with a `waterfall-*` feature that stops after that step.\n\n",
        v["rounds"], v["seconds_per_run"], v["connections"], v["callgrind_requests"]
    ));
    md.push_str(
        "| step | Envoy CPU µs/request | this step adds | instructions/request | this step adds |\n\
         |---|---:|---:|---:|---:|\n",
    );
    let mut prev: Option<(f64, Option<f64>)> = None;
    for s in steps {
        let cpu = s["cpu_us_per_request"].as_f64().unwrap_or(0.0);
        let ir = s["instructions_per_request"].as_f64();
        // Rows beside the waterfall, not steps of it, are set against A.
        let base = if beside(s["key"].as_str().unwrap_or("")) {
            steps.first().map(|a| {
                (
                    a["cpu_us_per_request"].as_f64().unwrap_or(0.0),
                    a["instructions_per_request"].as_f64(),
                )
            })
        } else {
            prev
        };
        let (cpu_step, ir_step) = match base {
            Some((c, i)) => (Some(cpu - c), ir.zip(i).map(|(a, b)| a - b)),
            None => (None, None),
        };
        md.push_str(&format!(
            "| {}: {} | {:.2} | {} | {} | {} |\n",
            s["key"].as_str().unwrap_or("?"),
            s["what"].as_str().unwrap_or("?"),
            cpu,
            fmt(cpu_step, 2),
            fmt(ir, 0),
            fmt(ir_step, 0),
        ));
        if !beside(s["key"].as_str().unwrap_or("")) {
            prev = Some((cpu, ir));
        }
    }
    let t = &v["target"];
    md.push_str(&format!(
        "\n| target | value | by instructions | goal | |\n|---|---:|---:|---|---|\n| {} | {} | {} | {} | {} |\n",
        t["what"].as_str().unwrap_or("?"),
        fmt(t["value"].as_f64(), 2),
        fmt(t["instructions_value"].as_f64(), 2),
        t["goal"].as_str().unwrap_or("?"),
        if t["pass"] == true { "pass" } else { "**fail**" },
    ));
    if let Some(r) = v["native_over_d_instructions"].as_f64() {
        md.push_str(&format!(
            "\nInstructions the native module (F) adds per request ÷ those Envoy's `api_key_auth` + \
             `local_ratelimit` (D) add: {r:.2}.\n"
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_shows_what_it_adds_and_f_is_set_against_a() {
        let step = |key: &str, cpu: f64, ir: f64| {
            json!({"key": key, "what": format!("{key} step"), "cpu_us_per_request": cpu,
                   "instructions_per_request": ir})
        };
        let v = json!({
            "rounds": 1, "seconds_per_run": 3.0, "connections": 16, "callgrind_requests": 10,
            "steps": [step("A", 10.0, 1000.0), step("W0", 14.0, 1500.0), step("B", 20.0, 2600.0),
                      step("F", 12.0, 1200.0), step("D", 11.0, 1100.0)],
            "native_over_d_instructions": 2.0,
            "target": {"what": "ratio", "value": 2.5, "instructions_value": 3.2, "goal": "≤ 2",
                       "pass": false},
        });
        let md = markdown(&v);
        assert!(md.contains("| A: A step | 10.00 | – | 1000 | – |"), "{md}");
        assert!(
            md.contains("| W0: W0 step | 14.00 | 4.00 | 1500 | 500 |"),
            "{md}"
        );
        assert!(
            md.contains("| B: B step | 20.00 | 6.00 | 2600 | 1100 |"),
            "{md}"
        );
        assert!(
            md.contains("| F: F step | 12.00 | 2.00 | 1200 | 200 |"),
            "{md}"
        );
        assert!(
            md.contains("| ratio | 2.50 | 3.20 | ≤ 2 | **fail** |"),
            "{md}"
        );
    }
}
