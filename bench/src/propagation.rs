//! Propagation: how long after `POST /v1/tokens/{id}/suspend` answers does every Envoy
//! worker refuse the token, while Envoy is busy?
//!
//! One Envoy with two workers; closed-loop background load on another token keeps both
//! workers busy; four connections poll the test token without pause (exact_balance puts
//! two on each worker, checked from Envoy's per-worker stats). A trial suspends the token
//! and times, from the API's answer, the first 403 any poller sees and the moment every
//! poller has seen one; then it reactivates the token and waits until every poller sees 200
//! again, so each trial starts from the same state.

use crate::client::{Load, Poller};
use crate::{percentile, Depth, Envoy};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokengate_e2e::{http, Flavor, Options, Stack};

const WORKERS: u32 = 2;
const POLLERS: usize = 4;
const LOAD_CONNECTIONS: usize = 4;
/// Target for the p99 of "every worker refuses".
const TARGET_MS: f64 = 50.0;
/// Far beyond anything a working filter takes: a trial that runs into it failed.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(5);
const PATH: &str = "/bench";

pub fn run(depth: Depth, flavor: Flavor) -> Value {
    let trials = match depth {
        Depth::Full => 30,
        Depth::Quick => 5,
    };
    let stack = Stack::start_with(Options {
        control_plane: true,
        envoy: false,
        ..Options::default()
    });
    let envoy = Envoy::start(
        &format!("propagation-{}-w2", flavor.name()),
        crate::accuracy::template(flavor),
        WORKERS,
        &[
            ("CONTROL_PLANE_PORT", stack.control_plane_port.to_string()),
            ("SYNC_TOKEN", stack.sync_token.clone()),
            ("PLUGIN_EXTRA", String::new()),
        ],
    );
    // No maxRPS on either token: a 429 would neither be the load we want nor the 200 that
    // a poller waits for after reactivation.
    let (_, load_secret) = stack.create_token(json!({"name": "bench-propagation-load"}));
    let (id, secret) = stack.create_token(json!({"name": "bench-propagation-test"}));
    wait_for_200(&envoy, &load_secret, "bench-propagation-load");
    wait_for_200(&envoy, &secret, "bench-propagation-test");

    let (poller, pollers_per_worker) = balanced_pollers(&envoy, &secret);
    let load = Load::start(envoy.addr(), PATH, &load_secret, LOAD_CONNECTIONS, false);
    let load_started = Instant::now();
    let polls_before: u64 = poller.polls().iter().sum();
    std::thread::sleep(Duration::from_millis(200));
    let connections_under_load = connections_per_worker(&envoy);

    let mut done = Vec::new();
    let mut failure = None;
    for trial in 0..trials {
        match run_trial(&stack, &poller, &id) {
            Ok(t) => done.push(t),
            Err(e) => {
                failure = Some(format!("trial {}: {e}", trial + 1));
                break;
            }
        }
        // Staggered, so trials do not fall in step with any periodic work in the filter.
        std::thread::sleep(Duration::from_millis(40 + (trial as u64 * 37) % 60));
    }
    let polls: u64 = poller.polls().iter().sum::<u64>() - polls_before;
    let load_seconds = load_started.elapsed().as_secs_f64();
    let background = load.stop();
    let poller_errors: u64 = poller.errors().iter().sum();
    let poller_reconnects: u64 = poller.reconnects().iter().sum();
    drop(poller);

    let first: Vec<f64> = done.iter().map(|t| t.first_ms).collect();
    let all: Vec<f64> = done.iter().map(|t| t.all_ms).collect();
    let reactivate_all: Vec<f64> = done.iter().map(|t| t.reactivate_all_ms).collect();
    let api: Vec<f64> = done.iter().map(|t| t.api_ms).collect();
    let before_answer = done.iter().filter(|t| t.first_ms < 0.0).count();
    let first = summary(&first);
    let all = summary(&all);
    let pass = failure.is_none() && done.len() == trials && all.p99 < TARGET_MS;
    eprintln!(
        "  {} trials: first 403 median {:.2} ms p99 {:.2} ms; every worker median {:.2} ms \
         p99 {:.2} ms (target < {TARGET_MS} ms){}",
        done.len(),
        first.median,
        first.p99,
        all.median,
        all.p99,
        failure
            .as_deref()
            .map(|f| format!("; FAILED {f}"))
            .unwrap_or_default(),
    );
    json!({
        "depth": format!("{depth:?}"),
        "flavor": flavor.name(),
        "workers": WORKERS,
        "pollers": POLLERS,
        "pollers_per_worker": pollers_per_worker,
        "trials_planned": trials,
        "trials": done.len(),
        "failure": failure,
        "first_ms": first.json(),
        "all_workers_ms": all.json(),
        "reactivate_all_workers_ms": summary(&reactivate_all).json(),
        "api_call_ms": summary(&api).json(),
        "first_before_api_answer": before_answer,
        "target_p99_ms": TARGET_MS,
        "pass": pass,
        "per_trial": done.iter().map(Trial::json).collect::<Vec<_>>(),
        "poll_rps": round2(polls as f64 / load_seconds),
        "poller_errors": poller_errors,
        "poller_reconnects": poller_reconnects,
        "background": {
            "connections": LOAD_CONNECTIONS,
            "rps": round2(background.answers as f64 / background.seconds.max(1e-9)),
            "connections_per_worker": connections_under_load,
            "reconnects": background.reconnects,
        },
    })
}

struct Trial {
    /// Suspend request → its answer.
    api_ms: f64,
    /// From the suspend call's answer to the first 403 any poller saw (negative: the filter
    /// had the change before the API's answer reached us).
    first_ms: f64,
    /// From the suspend call's answer to the moment every poller had seen a 403.
    all_ms: f64,
    /// The same as `all_ms` for the reactivation and 200.
    reactivate_all_ms: f64,
}

impl Trial {
    fn json(&self) -> Value {
        json!({
            "api_ms": round2(self.api_ms),
            "first_ms": round2(self.first_ms),
            "all_ms": round2(self.all_ms),
            "reactivate_all_ms": round2(self.reactivate_all_ms),
        })
    }
}

fn run_trial(stack: &Stack, poller: &Poller, id: &str) -> Result<Trial, String> {
    // Armed before the call: a poller that sees the 403 before the API's answer arrives
    // must not be missed (its time then comes out negative).
    let sent = poller.arm(403);
    stack.token_action(id, "suspend");
    let answered = Instant::now();
    let seen = poller
        .wait_all(TRIAL_TIMEOUT)
        .ok_or_else(|| format!("not every poller saw 403 within {TRIAL_TIMEOUT:?}"))?;
    let (first_ms, all_ms) = spread(answered, &seen);

    poller.arm(200);
    stack.token_action(id, "reactivate");
    let reanswered = Instant::now();
    let seen = poller
        .wait_all(TRIAL_TIMEOUT)
        .ok_or_else(|| format!("not every poller saw 200 again within {TRIAL_TIMEOUT:?}"))?;
    let (_, reactivate_all_ms) = spread(reanswered, &seen);
    Ok(Trial {
        api_ms: ms(answered - sent),
        first_ms,
        all_ms,
        reactivate_all_ms,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Milliseconds from `from` to the earliest and to the latest of `seen`, signed.
fn spread(from: Instant, seen: &[Instant]) -> (f64, f64) {
    let signed = |t: Instant| match t.checked_duration_since(from) {
        Some(d) => ms(d),
        None => -ms(from - t),
    };
    let first = seen
        .iter()
        .copied()
        .map(signed)
        .fold(f64::INFINITY, f64::min);
    let last = seen
        .iter()
        .copied()
        .map(signed)
        .fold(f64::NEG_INFINITY, f64::max);
    (first, last)
}

struct Summary {
    n: usize,
    median: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn json(&self) -> Value {
        json!({
            "n": self.n,
            "median": round2(self.median),
            "p99": round2(self.p99),
            "max": round2(self.max),
        })
    }
}

/// Median and p99 by nearest rank (`crate::percentile`): with fewer than 100 trials the
/// p99 is the largest value, the honest reading of so few samples.
fn summary(values: &[f64]) -> Summary {
    let mut v = values.to_vec();
    Summary {
        n: v.len(),
        median: percentile(&mut v, 0.5),
        p99: percentile(&mut v, 0.99),
        max: v.iter().copied().fold(0.0, f64::max),
    }
}

/// Waits until the filter lets the token through (it arrives by long-poll).
fn wait_for_200(envoy: &Envoy, secret: &str, name: &str) {
    let start = Instant::now();
    loop {
        let status = http(envoy.addr(), "GET", PATH, &[("X-API-Token", secret)], None)
            .map(|r| r.status)
            .unwrap_or(0);
        if status == 200 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "token {name} not admitted by Envoy after 10 s (last status {status})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Opens the pollers before any other connection, one after another, so that they alone
/// decide exact_balance's choice, and checks from Envoy's stats that each worker got its
/// share. The probes' closed connections can linger in the count for a moment and skew the
/// choice, hence the wait for a clean slate and the retries.
fn balanced_pollers(envoy: &Envoy, secret: &str) -> (Poller, Vec<u64>) {
    let even = vec![(POLLERS / WORKERS as usize) as u64; WORKERS as usize];
    let mut attempt = 0;
    loop {
        let start = Instant::now();
        while connections_per_worker(envoy).iter().sum::<u64>() > 0
            && start.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let poller = Poller::start(envoy.addr(), PATH, secret, POLLERS);
        let per_worker = connections_per_worker(envoy);
        attempt += 1;
        if per_worker == even || attempt == 5 {
            return (poller, per_worker);
        }
        eprintln!("  pollers landed {per_worker:?} on the workers; opening them again");
        drop(poller);
    }
}

/// Active downstream connections of the bench listener, per worker.
fn connections_per_worker(envoy: &Envoy) -> Vec<u64> {
    (0..WORKERS)
        .map(|w| {
            envoy.stat(&format!(
                "listener.127.0.0.1_{}.worker_{w}.downstream_cx_active",
                envoy.port
            ))
        })
        .collect()
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn markdown(v: &Value) -> String {
    let mut md = format!(
        "### Propagation: suspend → 403 on every worker ({})\n\n",
        crate::accuracy::flavor_title(v)
    );
    if v["trials"].is_null() {
        md.push_str("(no figures)\n");
        return md;
    }
    let n = v["trials"].as_u64().unwrap_or(0);
    md.push_str(&format!(
        "Envoy with {} workers, busy with closed-loop load on another token ({} \
         connections); {} connections poll the test token without pause ({} per worker). \
         Each trial suspends the token through the API and times, from the API's answer, \
         the first 403 any poller sees and the moment every poller has seen one (so every \
         worker refuses), then reactivates it and waits for 200 everywhere.\n\n",
        v["workers"],
        v["background"]["connections"],
        v["pollers"],
        v["pollers_per_worker"]
            .as_array()
            .map(|a| a
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(" + "))
            .unwrap_or_default(),
    ));
    let f = &v["first_ms"];
    let a = &v["all_workers_ms"];
    let num = |x: &Value| x.as_f64().unwrap_or(f64::NAN);
    let target = num(&v["target_p99_ms"]);
    md.push_str(&format!(
        "| trials | first 403, median | first 403, p99 | every worker, median | every \
         worker, p99 | target: every worker p99 < {target:.0} ms |\n\
         |---:|---:|---:|---:|---:|:--|\n\
         | {n} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} |\n\n",
        num(&f["median"]),
        num(&f["p99"]),
        num(&a["median"]),
        num(&a["p99"]),
        if v["pass"] == true {
            "pass"
        } else {
            "**FAIL**"
        },
    ));
    let rank = ((0.99 * n as f64).ceil() as u64).clamp(1, n.max(1));
    if rank == n {
        md.push_str(&format!(
            "p99 by nearest rank: with {n} trials it is the maximum. "
        ));
    }
    md.push_str(&format!(
        "Reactivation, 200 on every worker: median {:.2} ms. The suspend call itself took \
         {:.2} ms (median); a first 403 can come before its answer does (negative time, {} \
         of {n} trials). ",
        num(&v["reactivate_all_workers_ms"]["median"]),
        num(&v["api_call_ms"]["median"]),
        v["first_before_api_answer"],
    ));
    // A poller notices a change only on its next answer, so its answer interval is the
    // resolution of these times.
    let per_poller = num(&v["poll_rps"]) / num(&v["pollers"]);
    if per_poller > 0.0 {
        md.push_str(&format!(
            "Each poller got an answer every {:.2} ms, the resolution of these times.",
            1000.0 / per_poller
        ));
    }
    if let Some(f) = v["failure"].as_str() {
        md.push_str(&format!(" Stopped early: {f}."));
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_signed_from_the_answer() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let seen = [
            t0 + Duration::from_millis(7),
            t0 - Duration::from_millis(1),
            t0 + Duration::from_millis(3),
        ];
        let (first, all) = spread(t0, &seen);
        assert!((first + 1.0).abs() < 1e-6, "{first}");
        assert!((all - 7.0).abs() < 1e-6, "{all}");
    }

    #[test]
    fn p99_of_thirty_trials_is_the_maximum() {
        let v: Vec<f64> = (1..=30).rev().map(f64::from).collect();
        let s = summary(&v);
        assert_eq!((s.n, s.median, s.p99, s.max), (30, 15.0, 30.0, 30.0));
        let s = summary(&[]);
        assert_eq!((s.n, s.median, s.p99), (0, 0.0, 0.0));
    }

    #[test]
    fn markdown_reports_the_target_and_the_rank_rule() {
        let v = json!({
            "workers": 2, "pollers": 4, "pollers_per_worker": [2, 2], "trials": 30,
            "background": {"connections": 4},
            "first_ms": {"median": 1.5, "p99": 4.0},
            "all_workers_ms": {"median": 2.25, "p99": 9.0},
            "reactivate_all_workers_ms": {"median": 2.0},
            "api_call_ms": {"median": 3.0}, "first_before_api_answer": 1,
            "poll_rps": 8000.0,
            "target_p99_ms": 50.0, "pass": true, "failure": null,
        });
        let md = markdown(&v);
        assert!(
            md.contains("| 30 | 1.50 ms | 4.00 ms | 2.25 ms | 9.00 ms | pass |"),
            "{md}"
        );
        assert!(md.contains("with 30 trials it is the maximum"));
        assert!(md.contains("every 0.50 ms"), "{md}");
        assert!(md.contains("(2 + 2 per worker)"), "{md}");
    }
}
