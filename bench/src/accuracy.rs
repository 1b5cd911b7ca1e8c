//! Rate-limit accuracy: does a hammered token get its maxRPS, no more and no less, with one
//! Envoy worker and with two sharing the GCRA state through shared data?
//!
//! Per cell (maxRPS × client connections × Envoy workers): a fresh token with that maxRPS
//! (burst left at its default, one second's worth), hammered closed-loop by our own client
//! ([`crate::client`], which times every answer) for a warm-up and then the measured
//! duration. Two targets:
//! - the admitted rate over the measured duration is within ±2 % of maxRPS;
//! - no 1 s window of the whole run, warm-up included, holds more admitted requests than
//!   limit + burst, the most GCRA allows in any second.

use crate::{client, Depth, Envoy};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokengate_e2e::{http, Flavor, Options, Stack};

/// The fresh token's bucket starts full: the first `burst` requests pass at once. Counting
/// them in the rate would add burst / duration (10 % over 10 s, with the default burst of
/// one second's worth) to what is the limiter's steady-state accuracy, so the warm-up
/// drains the burst first and only what follows is measured.
const WARMUP: Duration = Duration::from_secs(2);
const WINDOW_US: u64 = 1_000_000;
/// Target for the admitted rate, in percent of maxRPS.
const RATE_TOLERANCE_PCT: f64 = 2.0;
/// Below this much offered load the client, not the limiter, sets the admitted rate, so the
/// rate target says nothing about the filter.
const SATURATION: f64 = 1.1;
const PATH: &str = "/bench";

const CAS_NOTE: &str = "The filter refuses (429) a request whose CAS retry budget \
    (`cas_retries`, default 16) runs out, so a lost CAS race can only lower the admitted \
    rate. Had it admitted instead, the excess would show here as a worst 1 s window above \
    limit + burst.";
const WINDOW_NOTE: &str = "The worst window counts only requests sent and answered inside \
    it, so client-side latency never inflates it: the filter decided each counted request \
    inside the window, and GCRA admits at most limit + burst in any 1 s.";

struct Plan {
    rates: &'static [u32],
    connections: &'static [usize],
    workers: &'static [u32],
    seconds: u64,
}

fn plan(depth: Depth) -> Plan {
    match depth {
        Depth::Full => Plan {
            rates: &[10, 100, 1000],
            connections: &[1, 16, 64],
            workers: &[1, 2],
            seconds: 10,
        },
        Depth::Quick => Plan {
            rates: &[100, 1000],
            connections: &[16],
            workers: &[2],
            seconds: 3,
        },
    }
}

pub fn run(depth: Depth, flavor: Flavor) -> Value {
    let plan = plan(depth);
    let measure = Duration::from_secs(plan.seconds);
    let stack = Stack::start_with(Options {
        control_plane: true,
        envoy: false,
        ..Options::default()
    });
    let mut cells = Vec::new();
    for &workers in plan.workers {
        let envoy = Envoy::start(
            &format!("acc-{}-w{workers}", flavor.name()),
            template(flavor),
            workers,
            &[
                ("CONTROL_PLANE_PORT", stack.control_plane_port.to_string()),
                ("SYNC_TOKEN", stack.sync_token.clone()),
                ("PLUGIN_EXTRA", String::new()),
            ],
        );
        for &max_rps in plan.rates {
            for &connections in plan.connections {
                let cell = cell(
                    &stack,
                    &envoy,
                    flavor,
                    max_rps,
                    connections,
                    workers,
                    measure,
                );
                eprintln!(
                    "  maxRPS {max_rps:>4} × {connections:>2} conn × {workers} worker(s): \
                     offered {:.0}/s, admitted {:.1}/s ({:+.2} %), worst 1 s window {} of {}",
                    cell["offered_rps"].as_f64().unwrap_or(0.0),
                    cell["admitted_rps"].as_f64().unwrap_or(0.0),
                    cell["error_pct"].as_f64().unwrap_or(0.0),
                    cell["worst_window"],
                    cell["limit_plus_burst"],
                );
                cells.push(cell);
            }
        }
    }
    let count = |key: &str| cells.iter().filter(|c| c[key] == true).count();
    let summary = json!({
        "cells": cells.len(),
        "rate_applicable": count("saturated"),
        "rate_ok": count("rate_ok"),
        "window_ok": count("window_ok"),
    });
    json!({
        "depth": format!("{depth:?}"),
        "flavor": flavor.name(),
        "warmup_seconds": WARMUP.as_secs(),
        "seconds": plan.seconds,
        "rate_tolerance_pct": RATE_TOLERANCE_PCT,
        "cells": cells,
        "summary": summary,
        "notes": [WINDOW_NOTE, CAS_NOTE],
    })
}

/// The bench template of a flavor's filter.
pub fn template(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Wasm => "tokengate",
        Flavor::Native => "tokengate-native",
    }
}

fn cell(
    stack: &Stack,
    envoy: &Envoy,
    flavor: Flavor,
    max_rps: u32,
    connections: usize,
    workers: u32,
    measure: Duration,
) -> Value {
    let name = format!(
        "bench-accuracy-{}-{max_rps}rps-c{connections}-w{workers}",
        flavor.name()
    );
    let (_id, secret) = stack.create_token(json!({"name": name, "max_rps": max_rps}));
    wait_until_known(envoy, &secret, &name);
    let allowed = flavor.stat("tokengate.allowed");
    let allowed_before = envoy.stat(&allowed);
    let r = client::run(envoy.addr(), PATH, &secret, connections, WARMUP + measure);
    // The filter hands its request counters to Envoy once per tick (200 ms).
    std::thread::sleep(Duration::from_millis(500));
    let envoy_allowed = envoy.stat(&allowed) - allowed_before;

    let burst = max_rps;
    let (from, to) = (
        WARMUP.as_micros() as u64,
        (WARMUP + measure).as_micros() as u64,
    );
    let secs = measure.as_secs_f64();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for s in r.samples.iter().filter(|s| (from..to).contains(&s.done_us)) {
        *statuses.entry(s.status).or_default() += 1;
    }
    let measured = |status: u16| statuses.get(&status).copied().unwrap_or(0);
    let offered: u64 = statuses
        .iter()
        .filter(|(&st, _)| st != 0)
        .map(|(_, n)| n)
        .sum();
    let offered_rps = offered as f64 / secs;
    let admitted_rps = measured(200) as f64 / secs;
    let error = error_pct(admitted_rps, max_rps);
    let saturated = offered_rps >= SATURATION * f64::from(max_rps);

    let mut admitted: Vec<(u64, u64)> = r
        .samples
        .iter()
        .filter(|s| s.status == 200)
        .map(|s| (s.sent_us, s.done_us))
        .collect();
    let admitted_total = admitted.len();
    let worst = worst_window(&mut admitted, WINDOW_US);
    let mut done: Vec<u64> = admitted.iter().map(|&(_, d)| d).collect();
    let worst_by_completion = worst_window_by_completion(&mut done, WINDOW_US);
    let limit_plus_burst = u64::from(max_rps) + u64::from(burst);
    let others: BTreeMap<String, u64> = statuses
        .iter()
        .filter(|(&st, _)| !matches!(st, 0 | 200 | 429))
        .map(|(st, n)| (st.to_string(), *n))
        .collect();
    json!({
        "max_rps": max_rps,
        "burst": burst,
        "concurrency": connections,
        "workers": workers,
        "seconds": secs,
        "offered_rps": round2(offered_rps),
        "admitted_rps": round2(admitted_rps),
        "error_pct": round2(error),
        "saturated": saturated,
        "rate_ok": saturated && error.abs() <= RATE_TOLERANCE_PCT,
        "rate_limited": measured(429),
        "other_statuses": others,
        "errors": measured(0),
        "reconnects": r.reconnects,
        "worst_window": worst,
        // For comparison only: by answer time alone, latency jitter can crowd one more
        // answer into a second than the filter admitted in it.
        "worst_window_by_completion": worst_by_completion,
        "limit_plus_burst": limit_plus_burst,
        "window_ok": worst as u64 <= limit_plus_burst,
        "admitted_total": admitted_total,
        "envoy_allowed": envoy_allowed,
    })
}

/// Waits until the filter has the new token (the sync is a long-poll away). The probe that
/// gets through takes one request of the burst, which the warm-up drains anyway.
fn wait_until_known(envoy: &Envoy, secret: &str, name: &str) {
    let start = Instant::now();
    loop {
        let status = http(envoy.addr(), "GET", PATH, &[("X-API-Token", secret)], None)
            .map(|r| r.status)
            .unwrap_or(0);
        if matches!(status, 200 | 429) {
            return;
        }
        // The token's name only: its secret stays out of every message.
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "token {name} not known to Envoy after 10 s (last status {status})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Signed distance of the admitted rate from the limit, in percent of the limit.
pub fn error_pct(admitted_rps: f64, max_rps: u32) -> f64 {
    (admitted_rps - f64::from(max_rps)) / f64::from(max_rps) * 100.0
}

/// The most requests whose whole exchange (sent, answered) fits in one window of
/// `window_us`. The filter decided each such request inside that window, so this never
/// over-counts what it admitted there; counting by answer time alone can (a slow answer
/// at the window's start and a fast one at its end). Sorts `intervals` by send time.
pub fn worst_window(intervals: &mut [(u64, u64)], window_us: u64) -> usize {
    intervals.sort_unstable();
    let mut best = 0;
    // The best window can always start at some request's send time. Each scan stops at the
    // first send past the window, so the cost is n × (requests per window).
    for (i, &(start, _)) in intervals.iter().enumerate() {
        let end = start + window_us;
        let inside = intervals[i..]
            .iter()
            .take_while(|&&(sent, _)| sent <= end)
            .filter(|&&(_, done)| done <= end)
            .count();
        best = best.max(inside);
    }
    best
}

/// The most instants of `times` within one closed window of `window_us` (sorts `times`).
pub fn worst_window_by_completion(times: &mut [u64], window_us: u64) -> usize {
    times.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi] - times[lo] > window_us {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// The flavor a section's figures are for, as a heading says it.
pub fn flavor_title(v: &Value) -> &'static str {
    match v["flavor"].as_str() {
        Some("native") => "native module",
        _ => "wasm filter",
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn yes_no(ok: bool) -> &'static str {
    if ok {
        "pass"
    } else {
        "**FAIL**"
    }
}

pub fn markdown(v: &Value) -> String {
    let mut md = format!("### Rate-limit accuracy ({})\n\n", flavor_title(v));
    let Some(cells) = v["cells"].as_array() else {
        md.push_str("(no figures)\n");
        return md;
    };
    md.push_str(&format!(
        "A fresh token per row, hammered closed-loop by the bench's own client: {} s of \
         warm-up (drains the initial burst), then {} s measured. Admitted rate target: \
         within ±{}% of maxRPS. Worst 1 s window (whole run, warm-up included) target: never \
         above limit + burst (burst = one second's worth).\n\n",
        v["warmup_seconds"], v["seconds"], v["rate_tolerance_pct"]
    ));
    md.push_str(
        "| maxRPS | connections | workers | offered rps | admitted rps | error | 429s (measured) | \
         worst 1 s window | limit + burst | rate | window |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|:--|\n",
    );
    for c in cells {
        let rate = if c["saturated"] == true {
            yes_no(c["rate_ok"] == true).to_string()
        } else {
            "n/a (offered < 1.1 × limit)".to_string()
        };
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.1} | {:+.2} % | {} | {} | {} | {} | {} |\n",
            c["max_rps"],
            c["concurrency"],
            c["workers"],
            c["offered_rps"].as_f64().unwrap_or(0.0),
            c["admitted_rps"].as_f64().unwrap_or(0.0),
            c["error_pct"].as_f64().unwrap_or(0.0),
            c["rate_limited"],
            c["worst_window"],
            c["limit_plus_burst"],
            rate,
            yes_no(c["window_ok"] == true),
        ));
    }
    let s = &v["summary"];
    md.push_str(&format!(
        "\nAdmitted rate within ±{}%: {} of {} cells ({} of {} offered enough load to \
         saturate the limit). Worst 1 s window ≤ limit + burst: {} of {} cells.\n\n",
        v["rate_tolerance_pct"],
        s["rate_ok"],
        s["cells"],
        s["rate_applicable"],
        s["cells"],
        s["window_ok"],
        s["cells"],
    ));
    if let Some(notes) = v["notes"].as_array() {
        let notes: Vec<&str> = notes.iter().filter_map(Value::as_str).collect();
        md.push_str(&notes.join("\n\n"));
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_signed_percent_of_the_limit() {
        assert_eq!(error_pct(100.0, 100), 0.0);
        assert!((error_pct(102.0, 100) - 2.0).abs() < 1e-9);
        assert!((error_pct(990.0, 1000) + 1.0).abs() < 1e-9);
    }

    #[test]
    fn worst_window_counts_only_exchanges_wholly_inside() {
        // Four quick exchanges in the first second, then one that was sent inside it but
        // answered after it ended.
        let mut v = vec![(0, 10), (100, 110), (500, 510), (999_000, 999_100)];
        v.push((999_990, 1_000_020));
        assert_eq!(worst_window(&mut v, WINDOW_US), 4);
        // The straggler and a later one do fit a window that starts later.
        v.push((1_500_000, 1_500_010));
        assert_eq!(worst_window(&mut v, WINDOW_US), 4);
        // Boundaries are inclusive: a window is [start, start + 1 s].
        let mut edge = vec![(0, 0), (1_000_000, 1_000_000)];
        assert_eq!(worst_window(&mut edge, WINDOW_US), 2);
        assert_eq!(worst_window(&mut [], WINDOW_US), 0);
    }

    #[test]
    fn worst_window_slides_to_the_densest_second() {
        // 10 per second for 3 s, plus a burst of 5 at 1.5 s.
        let mut v: Vec<(u64, u64)> = (0..30).map(|i| (i * 100_000, i * 100_000 + 50)).collect();
        v.extend((0..5).map(|i| (1_500_000 + i, 1_500_000 + i + 1)));
        // [0.6, 1.6] s: the steady ones sent at 0.6 … 1.5 s (the one sent at 1.6 s is
        // answered after the window) plus the burst.
        assert_eq!(worst_window(&mut v, WINDOW_US), 15);
    }

    #[test]
    fn completion_window_is_a_plain_sliding_count() {
        let mut t = vec![2_000_000, 0, 500_000, 1_000_000, 1_000_001];
        assert_eq!(worst_window_by_completion(&mut t, WINDOW_US), 3);
        assert_eq!(worst_window_by_completion(&mut [], WINDOW_US), 0);
    }

    #[test]
    fn markdown_shows_every_cell_and_the_summary() {
        let v = json!({
            "warmup_seconds": 2, "seconds": 3, "rate_tolerance_pct": 2.0,
            "cells": [
                {"max_rps": 100, "concurrency": 16, "workers": 2, "offered_rps": 9000.0,
                 "admitted_rps": 100.33, "error_pct": 0.33, "saturated": true, "rate_ok": true,
                 "rate_limited": 26000, "worst_window": 199, "limit_plus_burst": 200,
                 "window_ok": true},
                {"max_rps": 1000, "concurrency": 1, "workers": 1, "offered_rps": 800.0,
                 "admitted_rps": 800.0, "error_pct": -20.0, "saturated": false,
                 "rate_ok": false, "rate_limited": 0, "worst_window": 1800,
                 "limit_plus_burst": 2000, "window_ok": true}
            ],
            "summary": {"cells": 2, "rate_applicable": 1, "rate_ok": 1, "window_ok": 2},
            "notes": [CAS_NOTE],
        });
        let md = markdown(&v);
        assert!(md.contains(
            "| 100 | 16 | 2 | 9000 | 100.3 | +0.33 % | 26000 | 199 | 200 | pass | pass |"
        ));
        assert!(md.contains("n/a (offered < 1.1 × limit)"));
        assert!(md.contains("1 of 2 cells (1 of 2 offered enough"));
        assert!(md.contains("cas_retries"));
    }
}
