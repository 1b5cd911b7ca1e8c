//! Load from a standard generator: oha (crates.io), installed by `make bench` into
//! `.tools/oha`. Closed loop for throughput; open loop at a fixed rate with oha's latency
//! correction for latency, so that a stall is not hidden by requests that were never sent
//! (coordinated omission).

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use tokengate_e2e::workspace_root;

#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// As fast as `connections` keep-alive connections go, each waiting for its answer.
    Closed { connections: u32 },
    /// `rate` requests per second in all, spread over `connections`, latency measured
    /// from when each request was due.
    Open { rate: u32, connections: u32 },
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadResult {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no HTTP answer.
    pub errors: u64,
    /// Requests still in flight when the duration ended, which oha abandons; not failures.
    pub aborted: u64,
}

impl LoadResult {
    pub fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }
}

/// oha: `$OHA`, else `.tools/oha/bin/oha`, else `oha` on the PATH.
pub fn oha_path() -> PathBuf {
    if let Some(p) = std::env::var_os("OHA") {
        return PathBuf::from(p);
    }
    let local = workspace_root().join(".tools/oha/bin/oha");
    if local.exists() {
        local
    } else {
        PathBuf::from("oha")
    }
}

/// Runs oha against `url` for `duration` and reads its JSON summary.
pub fn oha(url: &str, headers: &[(&str, &str)], mode: Mode, duration: Duration) -> LoadResult {
    let mut cmd = Command::new(oha_path());
    // Keep-alive is oha's default, and what a client of an API gateway does.
    cmd.args(["--no-tui", "--output-format", "json"]);
    cmd.args(["-z", &format!("{}ms", duration.as_millis())]);
    match mode {
        Mode::Closed { connections } => {
            cmd.args(["-c", &connections.to_string()]);
        }
        Mode::Open { rate, connections } => {
            cmd.args(["-c", &connections.to_string()]);
            cmd.args(["-q", &rate.to_string(), "--latency-correction"]);
        }
    }
    for (name, value) in headers {
        cmd.args(["-H", &format!("{name}: {value}")]);
    }
    cmd.arg(url);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e} (make bench installs it)", oha_path().display()));
    assert!(
        out.status.success(),
        "oha failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&out.stdout).unwrap_or_else(|| {
        panic!(
            "oha's output is not the JSON expected:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// oha's name for a request cut off by `-z`.
const DEADLINE: &str = "aborted due to deadline";

fn parse(json: &[u8]) -> Option<LoadResult> {
    let v: Value = serde_json::from_slice(json).ok()?;
    let summary = &v["summary"];
    let seconds = summary["total"].as_f64()?;
    let pct = |key: &str| v["latencyPercentiles"][key].as_f64().unwrap_or(0.0) * 1e6;
    let statuses: BTreeMap<u16, u64> = v["statusCodeDistribution"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, n)| Some((k.parse().ok()?, n.as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    let (mut errors, mut aborted) = (0, 0);
    for (kind, n) in v["errorDistribution"].as_object().into_iter().flatten() {
        let n = n.as_u64().unwrap_or(0);
        if kind == DEADLINE {
            aborted += n;
        } else {
            errors += n;
        }
    }
    let answered: u64 = statuses.values().sum();
    Some(LoadResult {
        requests: answered,
        seconds,
        rps: if seconds > 0.0 {
            answered as f64 / seconds
        } else {
            0.0
        },
        p50_us: pct("p50"),
        p99_us: pct("p99"),
        p999_us: pct("p99.9"),
        statuses,
        errors,
        aborted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_oha_json_and_keeps_deadline_aborts_apart_from_errors() {
        let json = br#"{
            "summary": {"total": 2.0},
            "latencyPercentiles": {"p50": 0.000150, "p99": 0.0016, "p99.9": 0.002},
            "statusCodeDistribution": {"200": 900, "401": 100},
            "errorDistribution": {"aborted due to deadline": 16, "connection closed": 2}
        }"#;
        let r = parse(json).unwrap();
        assert_eq!(r.requests, 1_000);
        assert_eq!(r.rps, 500.0);
        assert_eq!(r.count(200), 900);
        assert_eq!(r.count(401), 100);
        assert_eq!((r.errors, r.aborted), (2, 16));
        assert!((r.p50_us - 150.0).abs() < 1e-6);
        assert!((r.p999_us - 2_000.0).abs() < 1e-6);
        assert!(parse(b"not json").is_none());
    }
}
