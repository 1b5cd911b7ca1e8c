//! Scale: does tokengate stay cheap as the token count grows, and does one control plane
//! keep up with many filters?
//!
//! - Two control planes, one with a small and one with a large token count (Full: 1,000
//!   and 100,000; Quick: 1,000 and 10,000). The small one's tokens are all created through
//!   the API by 16 concurrent clients, which gives the create throughput; the large one is
//!   seeded straight into SQLite while it is stopped (see [`control_plane::seed`]), since
//!   at the API's fsync-bound rate 100,000 creates would take minutes.
//! - An Envoy (one worker) per control plane: the time from its `/ready` until the filter
//!   holds the whole state (the `tokens` gauge is set only after a snapshot's last page),
//!   its memory, and then closed-loop load on one valid token, the two Envoys taking turns
//!   so that the ratio of their per-request CPU compares like with like on a shared machine.
//! - 1,000 long-polls held on the small control plane: its memory while they wait, and the
//!   time one suspend takes to answer all of them.

mod control_plane;
mod longpoll;

pub use longpoll::open_file_limit;

use crate::load::{oha, Mode};
use crate::procstat::{cpu_micros, rss_kib};
use crate::{median, Depth, Envoy};
use control_plane::{create_tokens, seed, ControlPlane, Created, Issued};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Concurrent API clients creating tokens.
const CREATE_CLIENTS: usize = 16;
/// Keep-alive connections of the load generator.
const LOAD_CONNECTIONS: u32 = 16;
/// Long-polls held at once on one control plane.
const POLLS: usize = 1_000;
/// Unmeasured load on each Envoy before the rounds.
const WARM_UP: Duration = Duration::from_secs(1);
/// How long the polls wait before the change. A trial with 12 s (past tokio's 10 s
/// keep-alive of idle blocking threads, nearer the filter's 20 s polls) fanned out as fast.
const HOLD: Duration = Duration::from_secs(1);
/// Per-request cost with the large token count, relative to the small one.
const COST_TARGET: f64 = 1.05;
/// Initial sync of 100,000 tokens.
const SYNC_TARGET_MS: f64 = 5_000.0;
const SYNC_TARGET_TOKENS: u64 = 100_000;
const SMALL: u64 = 1_000;

struct Plan {
    large: u64,
    /// Whether the large store may be filled through the API when that is fast enough.
    api_fill: bool,
    rounds: usize,
    load: Duration,
}

fn plan(depth: Depth) -> Plan {
    match depth {
        Depth::Full => Plan {
            large: 100_000,
            api_fill: true,
            rounds: 3,
            load: Duration::from_secs(10),
        },
        Depth::Quick => Plan {
            large: 10_000,
            api_fill: false,
            rounds: 1,
            load: Duration::from_secs(3),
        },
    }
}

/// Longest the large store may take to fill through the API, at the rate just measured.
const API_FILL_LIMIT_S: f64 = 120.0;

/// Fills the large control plane: through the API like the small one when the measured
/// rate does that within [`API_FILL_LIMIT_S`] (Full only), else one token through the API
/// (to present through Envoy) and the rest by [`seed`]. Returns that token and how.
fn fill_large(cp: &mut ControlPlane, plan: &Plan, small: &Created) -> (Issued, Value) {
    let rate = small.count as f64 / small.seconds.max(1e-9);
    let estimate = plan.large as f64 / rate;
    let (token, fill) = if plan.api_fill && estimate <= API_FILL_LIMIT_S {
        eprintln!(
            "scale: creating {} tokens through the API (about {estimate:.0} s)",
            plan.large
        );
        let c = create_tokens(cp, "scale-large", plan.large as usize, CREATE_CLIENTS);
        assert_eq!(c.failures, 0, "token creates failed; see above");
        let fill = json!({
            "how": "api",
            "rows": plan.large,
            "seconds": c.seconds,
            "per_second": c.count as f64 / c.seconds,
        });
        (c.first.expect("the first token"), fill)
    } else {
        eprintln!("scale: seeding {} tokens", plan.large);
        let token = create_tokens(cp, "scale-large", 1, 1)
            .first
            .expect("the large control plane's API token");
        cp.stop();
        let seconds = seed(cp, plan.large - 1);
        cp.spawn();
        let fill = json!({
            "how": "seed",
            "rows": plan.large - 1,
            "seconds": seconds,
            "api_estimate_seconds": estimate,
        });
        (token, fill)
    };
    assert_eq!(cp.sync_state().2, plan.large, "large control plane's count");
    (token, fill)
}

/// One token count's Envoy under test.
struct Side {
    tokens: u64,
    envoy: Envoy,
    token: Issued,
    sync: Value,
    rss_kib: u64,
    rounds: Vec<Value>,
}

/// Starts an Envoy on `cp` and times the initial sync: from `/ready` (and from the spawn)
/// until the `tokens` gauge shows all `tokens`.
fn start_synced(label: &str, cp: &ControlPlane, tokens: u64, token: Issued) -> Side {
    let spawned = Instant::now();
    let envoy = Envoy::start(
        label,
        "tokengate",
        1,
        &[
            ("CONTROL_PLANE_PORT", cp.port.to_string()),
            ("SYNC_TOKEN", cp.sync_token.clone()),
            ("PLUGIN_EXTRA", String::new()),
        ],
    );
    let ready = Instant::now();
    let at_ready = envoy.stat("wasmcustom.tokengate.tokens");
    loop {
        if envoy.stat("wasmcustom.tokengate.tokens") == tokens {
            break;
        }
        assert!(
            ready.elapsed() < Duration::from_secs(120),
            "{label}: the filter did not load {tokens} tokens within 120 s"
        );
        std::thread::sleep(Duration::from_millis(3));
    }
    let synced = Instant::now();
    // A moment for the sync's transient buffers to be dropped where they will be.
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_kib(envoy.pid());
    let from_ready = synced.duration_since(ready).as_secs_f64() * 1e3;
    eprintln!("scale: {label}: {tokens} tokens synced {from_ready:.0} ms after /ready");
    Side {
        tokens,
        sync: json!({
            "from_ready_ms": from_ready,
            "from_spawn_ms": synced.duration_since(spawned).as_secs_f64() * 1e3,
            "gauge_at_ready": at_ready,
        }),
        rss_kib: rss,
        envoy,
        token,
        rounds: Vec::new(),
    }
}

/// Closed-loop load on the side's valid token: throughput and Envoy CPU per request.
fn measure(side: &mut Side, duration: Duration) {
    let pid = side.envoy.pid();
    let before = cpu_micros(pid);
    let r = oha(
        &side.envoy.url("/"),
        &[("X-API-Token", side.token.secret.expose())],
        Mode::Closed {
            connections: LOAD_CONNECTIONS,
        },
        duration,
    );
    let cpu = cpu_micros(pid).saturating_sub(before);
    let per_request = if r.requests > 0 {
        cpu as f64 / r.requests as f64
    } else {
        0.0
    };
    eprintln!(
        "scale: {} tokens: {:.0} rps, {per_request:.1} µs CPU/request",
        side.tokens, r.rps
    );
    side.rounds.push(json!({
        "requests": r.requests,
        "rps": r.rps,
        "p50_us": r.p50_us,
        "p99_us": r.p99_us,
        "cpu_us_per_request": per_request,
        "not_200": r.requests - r.count(200) + r.errors,
    }));
}

/// Turn order of the two token counts in `round`: ABBA..., so that neither always runs
/// first (the first of a pair tends to meet a warmer or colder machine).
fn order(round: usize) -> [usize; 2] {
    match round % 2 {
        0 => [0, 1],
        _ => [1, 0],
    }
}

/// Median over rounds of `large / small` for `key`, pairing each round's two runs, which
/// ran back to back and so met the same load from the rest of the machine.
fn paired_ratio(small: &[Value], large: &[Value], key: &str) -> (f64, Vec<f64>) {
    let ratios: Vec<f64> = small
        .iter()
        .zip(large)
        .filter_map(|(s, l)| {
            let (s, l) = (s[key].as_f64()?, l[key].as_f64()?);
            (s > 0.0).then_some(l / s)
        })
        .collect();
    (median(&mut ratios.clone()), ratios)
}

fn figures(side: &Side) -> Value {
    let mut rps: Vec<f64> = side
        .rounds
        .iter()
        .filter_map(|r| r["rps"].as_f64())
        .collect();
    let mut cpu: Vec<f64> = side
        .rounds
        .iter()
        .filter_map(|r| r["cpu_us_per_request"].as_f64())
        .collect();
    json!({
        "tokens": side.tokens,
        "sync": side.sync,
        "envoy_rss_kib": side.rss_kib,
        "rps": median(&mut rps),
        "cpu_us_per_request": median(&mut cpu),
        "rounds": side.rounds,
    })
}

pub fn run(depth: Depth) -> Value {
    let plan = plan(depth);

    eprintln!("scale: creating {SMALL} tokens through the API ({CREATE_CLIENTS} clients)");
    let mut small_cp = ControlPlane::start("small");
    let mut created = create_tokens(&small_cp, "scale", SMALL as usize, CREATE_CLIENTS);
    assert_eq!(created.failures, 0, "token creates failed; see above");
    let small_token = created.first.take().expect("the first token");
    let suspend_id = small_token.id.clone();
    assert_eq!(
        small_cp.sync_state().2,
        SMALL,
        "small control plane's count"
    );

    let mut large_cp = ControlPlane::start("large");
    let (large_token, large_fill) = fill_large(&mut large_cp, &plan, &created);

    let none_rss = {
        let none = Envoy::start("scale-none", "none", 1, &[]);
        std::thread::sleep(Duration::from_millis(500));
        rss_kib(none.pid())
    };
    let mut sides = [
        start_synced("scale-small", &small_cp, SMALL, small_token),
        start_synced("scale-large", &large_cp, plan.large, large_token),
    ];
    // V8 compiles the filter with its baseline tier first and optimises hot functions
    // later, in the background: unmeasured load first, so that no round meets a colder VM.
    for side in &sides {
        oha(
            &side.envoy.url("/"),
            &[("X-API-Token", side.token.secret.expose())],
            Mode::Closed {
                connections: LOAD_CONNECTIONS,
            },
            WARM_UP,
        );
    }
    for round in 0..plan.rounds {
        for i in order(round) {
            measure(&mut sides[i], plan.load);
        }
    }
    let (ratio, per_round) = paired_ratio(&sides[0].rounds, &sides[1].rounds, "cpu_us_per_request");
    let (rps_ratio, _) = paired_ratio(&sides[0].rounds, &sides[1].rounds, "rps");
    let envoys: Vec<Value> = sides.iter().map(figures).collect();
    let large_sync_ms = sides[1].sync["from_ready_ms"].as_f64().unwrap_or(f64::MAX);
    // The Envoys' own polls and load would blur the control plane's figures.
    drop(sides);
    drop(large_cp);

    let limit = longpoll::open_file_limit().unwrap_or(u64::MAX);
    // Our side needs a descriptor per poll, and so does the control plane, which inherits
    // our limit; leave room for everything else.
    let polls = POLLS.min(limit.saturating_sub(100) as usize);
    if polls < POLLS {
        eprintln!("scale: open-file limit {limit}: {polls} long-polls instead of {POLLS} (raise `ulimit -n`)");
    }
    eprintln!("scale: {polls} long-polls on one control plane");
    let fan_out = longpoll::fan_out(&small_cp, polls, HOLD, &suspend_id, "suspend");
    small_cp.stop();

    json!({
        "depth": format!("{depth:?}"),
        "token_counts": [SMALL, plan.large],
        "create": {
            "tokens": created.count,
            "clients": CREATE_CLIENTS,
            "keep_alive": false,
            "seconds": created.seconds,
            "per_second": created.count as f64 / created.seconds,
        },
        "large_fill": large_fill,
        "envoy_none_rss_kib": none_rss,
        "envoys": envoys,
        "cost_ratio": {
            "cpu_us_per_request": ratio,
            "per_round": per_round,
            "rps": rps_ratio,
            "target": COST_TARGET,
            "pass": ratio <= COST_TARGET,
        },
        "sync_target": {
            "tokens": SYNC_TARGET_TOKENS,
            "ms": SYNC_TARGET_MS,
            "measured_tokens": plan.large,
            "pass": (plan.large >= SYNC_TARGET_TOKENS).then_some(large_sync_ms < SYNC_TARGET_MS),
        },
        "longpoll": fan_out,
        "load": {
            "connections": LOAD_CONNECTIONS,
            "seconds": plan.load.as_secs_f64(),
            "rounds": plan.rounds,
            "envoy_workers": 1,
        },
    })
}

// ---- the report ---------------------------------------------------------------------

fn thousands(n: u64) -> String {
    let digits = n.to_string().into_bytes();
    let groups: Vec<&str> = digits
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).unwrap_or_default())
        .collect();
    groups.join(",")
}

fn mib(kib: &Value) -> String {
    kib.as_f64()
        .map_or("–".into(), |k| format!("{:.1} MiB", k / 1024.0))
}

fn ms(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x < 10.0 => format!("{x:.1} ms"),
        Some(x) => format!("{} ms", thousands(x.round() as u64)),
        None => "–".into(),
    }
}

fn verdict(pass: &Value) -> &'static str {
    match pass.as_bool() {
        Some(true) => "pass",
        Some(false) => "**miss**",
        None => "not measured at this size",
    }
}

/// The section's tables for `docs/benchmarks.md`.
pub fn markdown(v: &Value) -> String {
    let empty = Vec::new();
    let envoys = v["envoys"].as_array().unwrap_or(&empty);
    let count = |e: &Value| thousands(e["tokens"].as_u64().unwrap_or(0));
    let mut out = String::new();
    out.push_str("### Token count\n\n");
    out.push_str(&format!(
        "One Envoy worker per token count, both up at once, each on its own control plane; \
         closed-loop load from oha ({} connections, {:.0} s × {} round(s), taking turns, after \
         1 s of warm-up) on one valid token. The cost is Envoy's CPU time (all its threads) \
         per request; the ratio is the median over rounds of each round's pair.\n\n",
        v["load"]["connections"],
        v["load"]["seconds"].as_f64().unwrap_or(0.0),
        v["load"]["rounds"]
    ));
    let header: Vec<String> = envoys
        .iter()
        .map(|e| format!("{} tokens", count(e)))
        .collect();
    out.push_str(&format!("| | {} |\n", header.join(" | ")));
    out.push_str(&format!("|---|{}\n", "---:|".repeat(envoys.len())));
    let mut row = |name: &str, cell: &dyn Fn(&Value) -> String| {
        let cells: Vec<String> = envoys.iter().map(cell).collect();
        out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
    };
    row("initial sync, from Envoy `/ready`", &|e| {
        ms(&e["sync"]["from_ready_ms"])
    });
    row("initial sync, from Envoy's start", &|e| {
        ms(&e["sync"]["from_spawn_ms"])
    });
    row("Envoy RSS after the sync", &|e| mib(&e["envoy_rss_kib"]));
    row("throughput", &|e| {
        format!(
            "{} rps",
            thousands(e["rps"].as_f64().unwrap_or(0.0).round() as u64)
        )
    });
    row("Envoy CPU per request", &|e| {
        format!("{:.1} µs", e["cpu_us_per_request"].as_f64().unwrap_or(0.0))
    });
    let ratio = &v["cost_ratio"];
    row("CPU per request vs the first", &|e| {
        if e["tokens"] == envoys[0]["tokens"] {
            "1".into()
        } else {
            format!(
                "{:.3} (target ≤ {}: {})",
                ratio["cpu_us_per_request"].as_f64().unwrap_or(0.0),
                ratio["target"],
                verdict(&ratio["pass"])
            )
        }
    });
    let target = &v["sync_target"];
    out.push_str(&format!(
        "\nA filter-less Envoy (one worker) takes {}. Target: {} tokens synced in under {} s: {}.\n",
        mib(&v["envoy_none_rss_kib"]),
        thousands(target["tokens"].as_u64().unwrap_or(0)),
        target["ms"].as_f64().unwrap_or(0.0) / 1e3,
        verdict(&target["pass"]),
    ));

    let c = &v["create"];
    let s = &v["large_fill"];
    let p = &v["longpoll"];
    let polls = p["polls"].as_u64().unwrap_or(0);
    let per_poll = match (p["rss_held_kib"].as_f64(), p["rss_before_kib"].as_f64()) {
        (Some(h), Some(b)) if polls > 0 => format!(" ({:.1} KiB per poll)", (h - b) / polls as f64),
        _ => String::new(),
    };
    out.push_str("\n### Control plane\n\n| | |\n|---|---:|\n");
    out.push_str(&format!(
        "| token creates, {} clients, one connection per request (SQLite fsync per write) | {}/s |\n",
        c["clients"],
        thousands(c["per_second"].as_f64().unwrap_or(0.0).round() as u64)
    ));
    let filled = if s["how"] == "api" {
        format!(
            "| filling the large store through the API, same clients | {} tokens at {}/s |\n",
            thousands(s["rows"].as_u64().unwrap_or(0)),
            thousands(s["per_second"].as_f64().unwrap_or(0.0).round() as u64)
        )
    } else {
        format!(
            "| filling the large store by direct insert (control plane stopped) | {} rows in {:.1} s |\n",
            thousands(s["rows"].as_u64().unwrap_or(0)),
            s["seconds"].as_f64().unwrap_or(0.0)
        )
    };
    out.push_str(&filled);
    out.push_str(&format!(
        "| long-polls held at once | {} of {} |\n",
        thousands(p["held"].as_u64().unwrap_or(0)),
        thousands(polls)
    ));
    out.push_str(&format!(
        "| control plane RSS before / while held | {} / {}{per_poll} |\n",
        mib(&p["rss_before_kib"]),
        mib(&p["rss_held_kib"])
    ));
    out.push_str(&format!(
        "| control plane threads before / while held / right after the change | {} / {} / {} |\n",
        p["control_plane_threads_before"],
        p["control_plane_threads_held"],
        p["control_plane_threads_after"]
    ));
    out.push_str(&format!(
        "| the suspend's own answer, with the polls held | {} |\n",
        ms(&p["api_ms"])
    ));
    out.push_str(&format!(
        "| one suspend reaches every poll, from the API's answer: median / last | {} / {} |\n",
        ms(&p["fanout_from_ack_ms"]["median"]),
        ms(&p["fanout_from_ack_ms"]["max"])
    ));
    out.push_str(&format!(
        "| polls answered with the change | {} of {} |\n",
        thousands(p["answered_with_change"].as_u64().unwrap_or(0)),
        thousands(polls)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_alternate_so_neither_count_always_goes_first() {
        assert_eq!(order(0), [0, 1]);
        assert_eq!(order(1), [1, 0]);
        assert_eq!(order(2), [0, 1]);
    }

    #[test]
    fn the_ratio_pairs_rounds_and_takes_the_median() {
        let small = [json!({"c": 10.0}), json!({"c": 20.0}), json!({"c": 10.0})];
        let large = [json!({"c": 11.0}), json!({"c": 20.0}), json!({"c": 30.0})];
        let (ratio, each) = paired_ratio(&small, &large, "c");
        assert_eq!(each, [1.1, 1.0, 3.0]);
        assert_eq!(ratio, 1.1);
        let (none, _) = paired_ratio(&[json!({"c": 0.0})], &[json!({"c": 1.0})], "c");
        assert_eq!(none, 0.0);
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    fn sample() -> Value {
        json!({
            "token_counts": [1000, 100000],
            "create": {"clients": 16, "per_second": 812.4, "tokens": 1000},
            "large_fill": {"how": "seed", "rows": 99999, "seconds": 0.91},
            "envoy_none_rss_kib": 30720,
            "envoys": [
                {"tokens": 1000, "sync": {"from_ready_ms": 180.2, "from_spawn_ms": 900.0},
                 "envoy_rss_kib": 51200, "rps": 9876.4, "cpu_us_per_request": 98.31},
                {"tokens": 100000, "sync": {"from_ready_ms": 2400.0, "from_spawn_ms": 3100.0},
                 "envoy_rss_kib": 102400, "rps": 9700.0, "cpu_us_per_request": 100.0},
            ],
            "cost_ratio": {"cpu_us_per_request": 1.0178, "target": 1.05, "pass": true},
            "sync_target": {"tokens": 100000, "ms": 5000.0, "pass": true},
            "longpoll": {"polls": 1000, "held": 1000, "answered_with_change": 1000,
                         "rss_before_kib": 10240, "rss_held_kib": 20480,
                         "fanout_from_ack_ms": {"median": 12.3, "max": 45.6}},
            "load": {"connections": 16, "seconds": 10.0, "rounds": 3},
        })
    }

    #[test]
    fn the_tables_show_both_counts_the_ratio_and_the_control_plane() {
        let md = markdown(&sample());
        assert!(md.contains("| | 1,000 tokens | 100,000 tokens |"), "{md}");
        assert!(
            md.contains("| initial sync, from Envoy `/ready` | 180 ms | 2,400 ms |"),
            "{md}"
        );
        assert!(
            md.contains("| Envoy RSS after the sync | 50.0 MiB | 100.0 MiB |"),
            "{md}"
        );
        assert!(
            md.contains("| Envoy CPU per request | 98.3 µs | 100.0 µs |"),
            "{md}"
        );
        assert!(md.contains("1.018 (target ≤ 1.05: pass)"), "{md}");
        assert!(md.contains("under 5 s: pass"), "{md}");
        assert!(md.contains("| 812/s |"), "{md}");
        assert!(md.contains("| 99,999 rows in 0.9 s |"), "{md}");
        assert!(md.contains("| 1,000 of 1,000 |"), "{md}");
        assert!(
            md.contains("10.0 MiB / 20.0 MiB (10.2 KiB per poll)"),
            "{md}"
        );
        assert!(md.contains("| 12 ms / 46 ms |"), "{md}");
    }

    #[test]
    fn a_missed_target_and_a_size_below_it_are_told_apart() {
        let mut v = sample();
        v["cost_ratio"]["pass"] = json!(false);
        v["sync_target"]["pass"] = Value::Null;
        let md = markdown(&v);
        assert!(md.contains(": **miss**)"), "{md}");
        assert!(md.contains("not measured at this size"), "{md}");
        v["large_fill"] = json!({"how": "api", "rows": 100000, "per_second": 2500.4});
        assert!(markdown(&v).contains("| 100,000 tokens at 2,500/s |"));
    }

    #[test]
    fn the_report_survives_missing_figures() {
        let md = markdown(&json!({}));
        assert!(md.contains("### Control plane"));
    }
}
