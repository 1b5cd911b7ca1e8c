//! Every stat the README documents, asserted through a real Envoy: each kind of request moves
//! its own counter by exactly the number of such requests and no other request counter, the
//! gauges equal what the control plane says, and usage that cannot be held is counted as
//! dropped. The README's list of stats must be exactly what Envoy shows and what this file
//! checks.

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokengate_e2e::{
    calls_on_one_connection, flavored, try_wait_until, unknown_token, wait_until, Flavor, Options,
    Stack,
};

/// Generous: counters reach Envoy on the workers' next tick (200 ms).
const SETTLE: Duration = Duration::from_secs(30);
const STATE_LOAD: Duration = Duration::from_secs(40);

/// The counters one request adds to, one per outcome.
const REQUEST_COUNTERS: [&str; 9] = [
    "tokengate.allowed",
    "tokengate.denied.missing_token",
    "tokengate.denied.invalid_token",
    "tokengate.denied.token_expired",
    "tokengate.denied.token_suspended",
    "tokengate.denied.rate_limited",
    "tokengate.denied.token_state_unavailable",
    "tokengate.denied.insufficient_scope",
    "tokengate.denied.quota_exceeded",
];

/// Every `tokengate.*` stat Envoy shows, by name without the flavor's namespace
/// (`wasmcustom.`, `dynamicmodulescustom.`).
fn stats(stack: &Stack) -> BTreeMap<String, u64> {
    let namespace = stack.flavor.stat("");
    stack
        .envoy_stats(&stack.flavor.stat("tokengate"))
        .into_iter()
        .filter_map(|(name, v)| Some((name.strip_prefix(&namespace)?.to_string(), v)))
        .collect()
}

fn stat(stack: &Stack, name: &str) -> u64 {
    stack.filter_stat(name)
}

/// The stats some assertion of the test has checked.
#[derive(Default)]
struct Checker {
    checked: BTreeSet<String>,
}

impl Checker {
    /// Runs `act`, which sends requests and returns how many of each outcome the client got
    /// (by counter name), then waits for those counts to reach Envoy and requires every
    /// request counter to have moved by exactly that (by zero when not named).
    fn step(&mut self, stack: &Stack, label: &str, act: impl FnOnce() -> Vec<(&'static str, u64)>) {
        let before = stats(stack);
        let expected: BTreeMap<&str, u64> = act().into_iter().collect();
        let want = |name: &str| {
            before.get(name).copied().unwrap_or(0) + expected.get(name).copied().unwrap_or(0)
        };
        let mut now = before.clone();
        let reached = try_wait_until(SETTLE, || {
            now = stats(stack);
            expected
                .keys()
                .all(|name| now.get(*name).copied().unwrap_or(0) >= want(name))
        });
        // A second read after the expected counts arrived: an increment that went to the
        // wrong counter was flushed with them (each worker hands all its counts at once).
        let after = if reached.is_some() { stats(stack) } else { now };
        let delta = |name: &str| {
            after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
        };
        for name in REQUEST_COUNTERS {
            assert_eq!(
                delta(name),
                expected.get(name).copied().unwrap_or(0),
                "{label}: `{name}` moved by {} (expected {:?}); all deltas: {:?}",
                delta(name),
                expected,
                REQUEST_COUNTERS.map(|n| (n, delta(n)))
            );
        }
        self.checked
            .extend(expected.keys().map(|name| name.to_string()));
    }

    /// The gauges equal the token count and version the control plane hands out.
    fn gauges_follow_the_control_plane(&mut self, stack: &Stack, label: &str) {
        let auth = format!("Bearer {}", stack.sync_token);
        let answer = tokengate_e2e::http(
            stack.control_plane_addr(),
            "GET",
            "/v1/sync?since=0",
            &[("Authorization", &auth)],
            None,
        )
        .expect("sync snapshot")
        .json();
        let tokens = answer["token_count"].as_u64().expect("token_count");
        let version = answer["version"].as_u64().expect("version");
        let mut seen = (0, 0);
        let settled = try_wait_until(SETTLE, || {
            seen = (
                stat(stack, "tokengate.tokens"),
                stat(stack, "tokengate.state_version"),
            );
            seen == (tokens, version)
        });
        assert!(
            settled.is_some(),
            "{label}: gauges (tokens, state_version) are {seen:?}, the control plane says {:?}",
            (tokens, version)
        );
        self.checked.insert("tokengate.tokens".into());
        self.checked.insert("tokengate.state_version".into());
    }
}

fn statuses(stack: &Stack, headers: &[(&str, &str)], n: usize, status: u16, error: &str) -> u64 {
    for i in 0..n {
        let r = stack.call(headers);
        assert_eq!(r.status, status, "request {i} with {headers:?}: {r:?}");
        assert_eq!(r.error_code().as_deref(), Some(error), "{r:?}");
    }
    n as u64
}

/// The stat names the README's "Envoy stats" section lists (under the wasm filter's
/// namespace; the native module's are the same names under its own).
fn documented() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(tokengate_e2e::workspace_root().join("README.md"))
        .expect("README.md");
    let start = readme
        .find("### Envoy stats")
        .expect("README has an `Envoy stats` section");
    let section = &readme[start + 3..];
    let section = &section[..section.find("\n#").unwrap_or(section.len())];
    section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|s| s.strip_prefix("wasmcustom."))
        .filter(|s| s.starts_with("tokengate.") && !s.contains(' '))
        .map(str::to_string)
        .collect()
}

fn record(stack: &Stack, id: &str) -> Value {
    stack.admin("GET", &format!("/v1/tokens/{id}"), None).json()
}

flavored!(every_documented_stat_counts_what_it_names);
fn every_documented_stat_counts_what_it_names(flavor: Flavor) {
    let mut stack = Stack::start_with(Options {
        control_plane: true,
        envoy: false,
        flavor,
    });
    // Usage reports every 300 ms, and room for one token id per worker and in the leader's
    // report, so that requests with two tokens must drop some usage.
    stack.plugin_extra = r#""usage_report_ms": 300, "usage_max_tokens": 1"#.into();
    let (_, good) = stack.create_token(json!({"name": "good"}));
    let (good2_id, good2) = stack.create_token(json!({"name": "good-2"}));
    let (_, limited) = stack.create_token(json!({"name": "limited", "max_rps": 1}));
    let (_, scoped) = stack.create_token(json!({"name": "no-scope", "scopes": []}));
    let (_, quota) =
        stack.create_token(json!({"name": "quota", "quota": {"limit": 1, "period": "month"}}));
    let (suspended_id, suspended) = stack.create_token(json!({"name": "suspended"}));
    stack.token_action(&suspended_id, "suspend");
    let (revoked_id, revoked) = stack.create_token(json!({"name": "revoked"}));
    stack.revoke_token(&revoked_id);
    let (expired_id, expired) =
        stack.create_token(json!({"name": "expired", "expires_in_seconds": 1}));
    wait_until(SETTLE, "the control plane calls the token expired", || {
        record(&stack, &expired_id)["expired"] == true
    });

    // Envoy starts with the control plane away: no state, every request a 503.
    stack.stop_control_plane();
    stack.start_envoy();
    let mut c = Checker::default();
    wait_until(SETTLE, "a failed sync counted", || {
        stat(&stack, "tokengate.sync.failure") >= 1
    });
    c.checked.insert("tokengate.sync.failure".into());
    assert_eq!(stat(&stack, "tokengate.sync.success"), 0);
    c.step(&stack, "state not loaded", || {
        let n = statuses(
            &stack,
            &[("X-API-Token", &good)],
            3,
            503,
            "token_state_unavailable",
        );
        vec![("tokengate.denied.token_state_unavailable", n)]
    });
    assert_eq!(stat(&stack, "tokengate.tokens"), 0);
    assert_eq!(stat(&stack, "tokengate.state_version"), 0);

    stack.start_control_plane();
    wait_until(STATE_LOAD, "the first state loaded", || {
        stat(&stack, "tokengate.sync.success") >= 1 && stat(&stack, "tokengate.state_version") > 0
    });
    c.checked.insert("tokengate.sync.success".into());
    c.gauges_follow_the_control_plane(&stack, "after the first snapshot");

    c.step(&stack, "no token", || {
        let n = statuses(&stack, &[], 2, 401, "missing_token");
        vec![("tokengate.denied.missing_token", n)]
    });
    c.step(&stack, "malformed, unknown and revoked tokens", || {
        let unknown = unknown_token();
        let mut n = 0;
        for token in ["tg_malformed", unknown.as_str(), revoked.as_str()] {
            n += statuses(&stack, &[("X-API-Token", token)], 1, 401, "invalid_token");
        }
        vec![("tokengate.denied.invalid_token", n)]
    });
    c.step(&stack, "an expired token", || {
        let n = statuses(
            &stack,
            &[("X-API-Token", &expired)],
            4,
            401,
            "token_expired",
        );
        vec![("tokengate.denied.token_expired", n)]
    });
    c.step(&stack, "a suspended token", || {
        let n = statuses(
            &stack,
            &[("X-API-Token", &suspended)],
            5,
            403,
            "token_suspended",
        );
        vec![("tokengate.denied.token_suspended", n)]
    });
    c.step(&stack, "a token outside its scopes", || {
        let n = statuses(
            &stack,
            &[("X-API-Token", &scoped)],
            3,
            403,
            "insufficient_scope",
        );
        vec![("tokengate.denied.insufficient_scope", n)]
    });
    // A quota of one a month, on the only Envoy: one admitted, the rest refused.
    c.step(&stack, "a token past its quota", || {
        let rs: Vec<_> = (0..4).map(|_| stack.call_with_token(&quota)).collect();
        let admitted = rs.iter().filter(|r| r.status == 200).count() as u64;
        let refused = rs
            .iter()
            .filter(|r| r.status == 429 && r.error_code().as_deref() == Some("quota_exceeded"))
            .count() as u64;
        assert_eq!((admitted, refused), (1, 3), "{rs:?}");
        vec![
            ("tokengate.allowed", admitted),
            ("tokengate.denied.quota_exceeded", refused),
        ]
    });
    c.step(&stack, "an admitted token", || {
        let n = (0..6)
            .map(|_| stack.call_with_token(&good))
            .inspect(|r| assert_eq!(r.status, 200, "{r:?}"))
            .count() as u64;
        vec![("tokengate.allowed", n)]
    });
    // max_rps 1 with a burst of 1: a quick burst is mostly refused. Counted as the client
    // saw it; repeated until some request was refused (a machine slow enough to space eight
    // requests a second apart refuses none).
    let refused = try_wait_until(SETTLE, || {
        let mut refused = 0;
        c.step(&stack, "a rate-limited token", || {
            let start = Instant::now();
            let rs: Vec<_> = (0..8).map(|_| stack.call_with_token(&limited)).collect();
            let elapsed = start.elapsed().as_secs();
            let admitted = rs.iter().filter(|r| r.status == 200).count() as u64;
            refused = rs.iter().filter(|r| r.status == 429).count() as u64;
            assert_eq!(admitted + refused, 8, "{rs:?}");
            assert!(
                admitted <= 1 + elapsed,
                "{admitted} admitted in {elapsed} s"
            );
            vec![
                ("tokengate.allowed", admitted),
                ("tokengate.denied.rate_limited", refused),
            ]
        });
        refused > 0
    });
    assert!(refused.is_some(), "no burst was ever rate limited");

    // Two tokens alternating on one connection (one worker, within a tick or two): the
    // worker holds one id, so the other's counts are dropped. Every counted request then
    // either reaches the control plane or is in `usage.dropped`.
    c.step(&stack, "two tokens on one worker", || {
        let requests: Vec<Vec<(&str, &str)>> = (0..20)
            .map(|i| {
                vec![(
                    "X-API-Token",
                    if i % 2 == 0 {
                        good.as_str()
                    } else {
                        good2.as_str()
                    },
                )]
            })
            .collect();
        let rs = calls_on_one_connection(stack.envoy_addr(), "/hello", &requests)
            .expect("keep-alive requests through Envoy");
        assert!(rs.iter().all(|r| r.status == 200), "{rs:?}");
        vec![("tokengate.allowed", rs.len() as u64)]
    });
    let counted = |s: &BTreeMap<String, u64>| {
        [
            "tokengate.allowed",
            "tokengate.denied.token_expired",
            "tokengate.denied.token_suspended",
            "tokengate.denied.rate_limited",
            "tokengate.denied.insufficient_scope",
            "tokengate.denied.quota_exceeded",
        ]
        .iter()
        .map(|n| s.get(*n).copied().unwrap_or(0))
        .sum::<u64>()
    };
    let mut seen = (0, 0, 0);
    let balanced = try_wait_until(SETTLE, || {
        let s = stats(&stack);
        let list = stack.admin("GET", "/v1/tokens?limit=1000", None).json();
        let reported: u64 = list["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| {
                t["requests_allowed"].as_u64().unwrap_or(0)
                    + t["requests_denied"].as_u64().unwrap_or(0)
            })
            .sum();
        let dropped = s.get("tokengate.usage.dropped").copied().unwrap_or(0);
        seen = (counted(&s), reported, dropped);
        seen.0 == reported + dropped
    });
    assert!(
        balanced.is_some(),
        "counted requests, reported to the control plane, dropped: {seen:?}"
    );
    eprintln!(
        "usage: {} requests counted, {} reported, {} dropped",
        seen.0, seen.1, seen.2
    );
    assert!(
        seen.2 > 0,
        "two tokens on one worker dropped nothing: {seen:?}"
    );
    assert!(stat(&stack, "tokengate.usage.reports") > 0);
    assert_eq!(stat(&stack, "tokengate.usage.failures"), 0);
    for name in [
        "tokengate.usage.dropped",
        "tokengate.usage.reports",
        "tokengate.usage.failures",
    ] {
        c.checked.insert(name.into());
    }

    // The gauges follow changes: one token fewer, one more, and the version with them.
    let successes = stat(&stack, "tokengate.sync.success");
    stack.revoke_token(&good2_id);
    c.gauges_follow_the_control_plane(&stack, "after a revocation");
    stack.create_token(json!({"name": "newcomer"}));
    c.gauges_follow_the_control_plane(&stack, "after a creation");
    assert!(stat(&stack, "tokengate.sync.success") > successes);

    // Nothing here panicked (the native module's caught panics are its unit tests'; the
    // wasm filter's panics would trap its VM, and it counts none).
    assert_eq!(stat(&stack, "tokengate.panics"), 0);
    c.checked.insert("tokengate.panics".into());

    // The README lists exactly the stats Envoy shows, and this test checked each of them.
    let documented = documented();
    let shown: BTreeSet<String> = stats(&stack).into_keys().collect();
    assert_eq!(documented, shown, "the README's stats and Envoy's differ");
    assert_eq!(
        documented, c.checked,
        "documented stats this test does not check"
    );
}
