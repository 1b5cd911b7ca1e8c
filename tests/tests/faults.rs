//! Control-plane faults, seen from a client through Envoy. A fault-injecting proxy sits
//! between Envoy and the real control plane and spoils the answers to `/v1/sync` in each of
//! the ways a broken or hostile control plane could. Through every fault the last good state
//! keeps serving, the failure is counted, the VM never traps, the filter never polls in a
//! storm (and never more than one poll at a time per Envoy), and service recovers when the
//! control plane answers properly again.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokengate_e2e::fault::{Fault, FaultProxy};
use tokengate_e2e::{flavored, unknown_token, wait_until, Flavor, Options, Stack};

const STATE_LOAD: Duration = Duration::from_secs(40);
const PROPAGATION: Duration = Duration::from_secs(10);
/// The plugin's `sync_wait_seconds` in these tests: short, so that a poll in flight when a
/// fault starts ends soon and the next one meets the fault.
const WAIT_SECONDS: u32 = 2;
/// The filter's callout timeout for a sync poll: its wait plus 5 s.
const CALLOUT_TIMEOUT: Duration = Duration::from_secs(WAIT_SECONDS as u64 + 5);
/// The plugin's backoff after a failed sync (its defaults): 250 ms doubling to 10 s.
const BACKOFF_INITIAL_MS: u64 = 250;
const BACKOFF_MAX_MS: u64 = 10_000;

/// The shortest wait the filter may leave after its `n`th failure in a row (1-based): the
/// exponential delay, less the most its jitter takes off (an eighth), less a millisecond
/// for clocks read at millisecond resolution.
fn least_backoff_ms(n: u32) -> u64 {
    let base = BACKOFF_INITIAL_MS
        .saturating_mul(1 << (n - 1).min(20))
        .min(BACKOFF_MAX_MS);
    (base - base / 8).saturating_sub(1)
}

/// The gaps between consecutive sync calls that met `fault`, from the first one after
/// `since`.
fn gaps(proxy: &FaultProxy, fault: &Fault, since: Instant) -> Vec<Duration> {
    let times: Vec<Instant> = proxy
        .sync_call_log()
        .into_iter()
        .filter(|(t, f)| *t >= since && f == fault)
        .map(|(t, _)| t)
        .collect();
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

struct Tokens {
    good: String,
    suspended: String,
    suspended_id: String,
    unknown: String,
}

/// Clients keep getting the last good answers for `window`; returns how many requests
/// were checked.
fn keeps_serving(stack: &Stack, tokens: &Tokens, window: Duration, label: &str) -> usize {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < window {
        for (token, status) in [
            (&tokens.good, 200),
            (&tokens.suspended, 403),
            (&tokens.unknown, 401),
        ] {
            let r = stack.call_with_token(token);
            assert_eq!(r.status, status, "{label}: request {n}: {r:?}");
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    n
}

fn sync_record(stack: &Stack, id: &str) -> (String, Value) {
    let auth = format!("Bearer {}", stack.sync_token);
    let r = tokengate_e2e::http(
        stack.control_plane_addr(),
        "GET",
        "/v1/sync?since=0",
        &[("Authorization", &auth)],
        None,
    )
    .expect("sync snapshot");
    let body = r.json();
    let record = body["changes"]
        .as_array()
        .and_then(|c| c.iter().find(|r| r["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("{id} not in the snapshot: {body}"));
    (
        body["store_id"].as_str().unwrap_or_default().to_string(),
        record,
    )
}

flavored!(every_control_plane_fault_keeps_the_last_good_state_without_a_storm);
fn every_control_plane_fault_keeps_the_last_good_state_without_a_storm(flavor: Flavor) {
    let mut stack = Stack::start_with(Options {
        control_plane: true,
        envoy: false,
        flavor,
    });
    let proxy = FaultProxy::start(stack.control_plane_addr());
    stack.envoy_control_plane_port = Some(proxy.port);
    stack.sync_wait_seconds = WAIT_SECONDS;
    // One sync leader throughout, however slowly a busy machine runs its ticks: a new
    // leader would start its own backoff from the beginning.
    stack.plugin_extra = r#""lease_ms": 600000"#.into();

    let (_, good) = stack.create_token(json!({"name": "faults-good"}));
    let (suspended_id, suspended) = stack.create_token(json!({"name": "faults-suspended"}));
    stack.token_action(&suspended_id, "suspend");
    let tokens = Tokens {
        good,
        suspended,
        suspended_id,
        unknown: unknown_token(),
    };
    stack.start_envoy();
    stack.wait_for_status(&tokens.good, 200, STATE_LOAD);
    stack.wait_for_status(&tokens.suspended, 403, PROPAGATION);
    let vms = stack.filter_health();
    let mut version = stack.filter_stat("tokengate.state_version");
    assert!(version > 0, "no state version gauge");

    // The stale answer replays the suspended token as active, at version 1.
    let (store_id, mut record) = sync_record(&stack, &tokens.suspended_id);
    record["status"] = json!("active");

    let faults = [
        ("HTTP 500", Fault::Status(500), Duration::from_secs(5)),
        ("HTTP 503", Fault::Status(503), Duration::from_secs(5)),
        ("not JSON", Fault::Garbage, Duration::from_secs(5)),
        ("truncated body", Fault::Truncated, Duration::from_secs(5)),
        (
            "an old version",
            Fault::OldVersion { store_id, record },
            Duration::from_secs(5),
        ),
        (
            "a 80 MiB body",
            Fault::Huge(80 << 20),
            Duration::from_secs(5),
        ),
        (
            "slower than the callout timeout",
            Fault::Slow(CALLOUT_TIMEOUT + Duration::from_secs(3)),
            CALLOUT_TIMEOUT + Duration::from_secs(3),
        ),
    ];
    for (label, fault, window) in faults {
        let counts_failure = !matches!(fault, Fault::OldVersion { .. });
        // Answered at once, so the backoff alone spaces the calls.
        let fails_fast = matches!(fault, Fault::Status(_) | Fault::Garbage);
        let failures = stack.filter_stat("tokengate.sync.failure");
        let set_at = Instant::now();
        proxy.set(fault.clone());
        // Let the poll in flight end (a held long-poll lasts WAIT_SECONDS) before counting
        // calls in the window.
        std::thread::sleep(Duration::from_secs(u64::from(WAIT_SECONDS) + 1));
        let calls = proxy.sync_calls();
        proxy.reset_max_open();

        let checked = keeps_serving(&stack, &tokens, window, label);

        let calls = proxy.sync_calls() - calls;
        let new_failures = stack.filter_stat("tokengate.sync.failure") - failures;
        let max_open = proxy.max_open_sync_calls();
        eprintln!(
            "{label:<32} {checked:>4} requests served from the last good state; \
             {calls} sync calls in {window:?}, {new_failures} failures counted since the \
             fault began; at most {max_open} open at once"
        );
        if counts_failure {
            assert!(new_failures >= 1, "{label}: no sync failure counted");
        }
        // No storm: retries and paced "nothing new" answers come at most every 250 ms.
        let bound = window.as_millis() as u64 / BACKOFF_INITIAL_MS + 2;
        assert!(
            calls <= bound,
            "{label}: {calls} sync calls in {window:?}, a storm"
        );
        // And the spacing: after the n-th failure in a row the next call waits at least the
        // n-th exponential delay (a fixed 250 ms retry fails from the second gap on, and
        // only a lower bound is checked, which a busy machine cannot break). Answers with
        // nothing new are paced by the initial delay, not backed off.
        if fails_fast {
            wait_until(
                Duration::from_secs(60),
                &format!("{label}: five sync calls meeting the fault"),
                || gaps(&proxy, &fault, set_at).len() >= 4,
            );
        }
        let gaps = gaps(&proxy, &fault, set_at);
        for (i, gap) in gaps.iter().enumerate() {
            let least = if counts_failure {
                least_backoff_ms(i as u32 + 1)
            } else {
                BACKOFF_INITIAL_MS - 1
            };
            assert!(
                gap.as_millis() as u64 >= least,
                "{label}: call {} came {gap:?} after the one before, under {least} ms; gaps {gaps:?}",
                i + 2
            );
        }
        eprintln!("{label:<32} gaps between sync calls meeting the fault: {gaps:?}");
        assert!(max_open <= 1, "{label}: {max_open} polls open at once");
        assert_eq!(
            stack.filter_stat("tokengate.state_version"),
            version,
            "{label}: the state version moved"
        );
        assert_eq!(stack.filter_health(), vms, "{label}: a VM failed");

        // Recovery: the control plane answers properly again; a change reaches Envoy.
        proxy.set(Fault::Pass);
        let (_, fresh) = stack.create_token(json!({"name": format!("after {label}")}));
        let took = stack.wait_for_status(&fresh, 200, STATE_LOAD);
        eprintln!("{label:<32} recovered: a new token admitted {took:?} after the fault ended");
        let now = stack.filter_stat("tokengate.state_version");
        assert!(now > version, "{label}: no progress after recovery");
        // The stale replay never resurrected the suspended token.
        assert_eq!(
            stack.call_with_token(&tokens.suspended).status,
            403,
            "{label}"
        );
        wait_until(PROPAGATION, "the gauge settles", || {
            stack.filter_stat("tokengate.state_version") == now
        });
        // The next fault compares against the state after this recovery.
        version = now;
    }
    assert!(
        !stack.logs().contains("panicked") && !stack.logs().contains("Uncaught"),
        "{}",
        stack.logs_tail(40)
    );
}

flavored!(killed_mid_traffic_the_control_plane_is_missed_counted_and_rejoined);
fn killed_mid_traffic_the_control_plane_is_missed_counted_and_rejoined(flavor: Flavor) {
    let mut stack = Stack::start_flavor(flavor);
    let (_, good) = stack.create_token(json!({"name": "survivor"}));
    let (_, short) = stack.create_token(json!({"name": "short", "expires_in_seconds": 4}));
    stack.wait_for_status(&good, 200, STATE_LOAD);
    // Loaded by the filter: admitted, or already expired on a machine slower than 4 s.
    wait_until(PROPAGATION, "the short-lived token loaded", || {
        let r = stack.call_with_token(&short);
        r.status == 200 || r.error_code().as_deref() == Some("token_expired")
    });
    let failures = stack.filter_stat("tokengate.sync.failure");
    let vms = stack.filter_health();

    // Traffic in flight while the control plane dies (SIGKILL).
    let addr = stack.envoy_addr();
    let token = good.clone();
    let traffic = std::thread::spawn(move || {
        let mut statuses = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(6) {
            let r = tokengate_e2e::http(addr, "GET", "/", &[("X-API-Token", &token)], None)
                .map(|r| r.status)
                .unwrap_or(0);
            statuses.push(r);
        }
        statuses
    });
    std::thread::sleep(Duration::from_millis(500));
    stack.stop_control_plane();
    let statuses = traffic.join().expect("traffic thread");
    let refused = statuses.iter().filter(|s| **s != 200).count();
    eprintln!(
        "{} requests while the control plane was killed: {refused} not 200",
        statuses.len()
    );
    assert_eq!(refused, 0, "{statuses:?}");

    // Expiry is still enforced from the last known state.
    wait_until(Duration::from_secs(10), "local expiry", || {
        stack.call_with_token(&short).error_code().as_deref() == Some("token_expired")
    });
    // The failed polls are counted, with backoff.
    wait_until(Duration::from_secs(15), "sync failures counted", || {
        stack.filter_stat("tokengate.sync.failure") > failures
    });
    let counted = stack.filter_stat("tokengate.sync.failure") - failures;
    eprintln!("sync failures counted while the control plane was down: {counted}");

    stack.start_control_plane();
    let (_, fresh) = stack.create_token(json!({"name": "after the kill"}));
    let took = stack.wait_for_status(&fresh, 200, STATE_LOAD);
    eprintln!("a token created after the restart was admitted after {took:?}");
    assert_eq!(stack.call_with_token(&good).status, 200);
    assert_eq!(stack.filter_health(), vms, "a VM failed");
}
