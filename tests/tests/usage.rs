//! The filter's side of governance, end to end: usage counted in Envoy reaches the control
//! plane's `last_used_at` and counters; the expiry header reaches clients; a failing usage
//! endpoint never holds up traffic.

use serde_json::json;
use std::time::Duration;
use tokengate_e2e::{flavored, try_wait_until, wait_until, Flavor, Options, Stack};

const PROPAGATION: Duration = Duration::from_secs(10);
const STATE_LOAD: Duration = Duration::from_secs(40);

/// A control plane, then Envoy with `extra` plugin fields.
fn stack_with(flavor: Flavor, extra: &str) -> Stack {
    let mut stack = Stack::start_with(Options {
        control_plane: true,
        envoy: false,
        flavor,
    });
    stack.plugin_extra = extra.to_string();
    stack.start_envoy();
    stack
}

flavored!(usage_counted_in_envoy_reaches_last_used_at);
fn usage_counted_in_envoy_reaches_last_used_at(flavor: Flavor) {
    let stack = stack_with(flavor, r#""usage_report_ms": 300"#);
    let (id, secret) = stack.create_token(json!({"name": "counted", "max_rps": 1000}));
    let (other_id, other) = stack.create_token(json!({"name": "other"}));
    stack.wait_for_status(&secret, 200, STATE_LOAD);
    stack.wait_for_status(&other, 200, STATE_LOAD);
    // Fresh connections each time, so both workers count; then refusals for a known token.
    for _ in 0..20 {
        assert_eq!(stack.call_with_token(&secret).status, 200);
    }
    stack.token_action(&id, "suspend");
    wait_until(PROPAGATION, "suspend enforced", || {
        stack.call_with_token(&secret).status == 403
    });
    for _ in 0..5 {
        assert_eq!(stack.call_with_token(&secret).status, 403);
    }
    // The control plane's totals must equal what Envoy counted itself (the waits above sent
    // a few more requests than the loops; refusals before a token was known carry no id).
    let reached = try_wait_until(Duration::from_secs(20), || {
        let t = stack.admin("GET", &format!("/v1/tokens/{id}"), None).json();
        let total = t["requests_allowed"].as_u64().unwrap_or(0)
            + t["requests_denied"].as_u64().unwrap_or(0);
        let envoy_total = stack.filter_stat("tokengate.allowed")
            + stack.filter_stat("tokengate.denied.token_suspended");
        let other = stack
            .admin("GET", &format!("/v1/tokens/{other_id}"), None)
            .json();
        let other_allowed = other["requests_allowed"].as_u64().unwrap_or(0);
        t["last_used_at"].is_string()
            && total + other_allowed == envoy_total
            && t["requests_denied"].as_u64() >= Some(5)
    });
    let t = stack.admin("GET", &format!("/v1/tokens/{id}"), None).json();
    assert!(
        reached.is_some(),
        "usage never reached the control plane: {t}; stats: {}",
        stack.envoy_admin("/stats?filter=tokengate").body
    );
    assert!(t["requests_allowed"].as_u64().unwrap() >= 21, "{t}");
    assert!(t["requests_denied"].as_u64().unwrap() >= 6, "{t}");
    assert!(stack.filter_stat("tokengate.usage.reports") > 0);
    assert_eq!(stack.filter_stat("tokengate.usage.dropped"), 0);
    // The version did not move with usage: no sync churn.
    let v = t["version"].as_u64().unwrap();
    let list = stack.admin("GET", "/v1/tokens", None).json();
    assert!(list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["version"].as_u64() <= Some(v)));
}

flavored!(responses_announce_an_expiry_inside_the_warning_window);
fn responses_announce_an_expiry_inside_the_warning_window(flavor: Flavor) {
    let stack = Stack::start_flavor(flavor);
    let created = stack
        .admin(
            "POST",
            "/v1/tokens",
            Some(&json!({"name": "soon", "expires_in_seconds": 3600})),
        )
        .json();
    let soon = created["token"].as_str().expect("secret").to_string();
    let expires_at =
        chrono::DateTime::parse_from_rfc3339(created["expires_at"].as_str().expect("expires_at"))
            .expect("an RFC 3339 time");
    let (_, later) =
        stack.create_token(json!({"name": "later", "expires_in_seconds": 30 * 86_400}));
    let (_, never) = stack.create_token(json!({"name": "never"}));
    stack.wait_for_status(&soon, 200, STATE_LOAD);
    let r = stack.call_with_token(&soon);
    let announced = r
        .header("x-tokengate-token-expires")
        .expect("expiry header")
        .to_string();
    // Exactly the expiry the control plane gave the token.
    let t = chrono::DateTime::parse_from_rfc3339(&announced).expect("an RFC 3339 time");
    assert_eq!(t, expires_at, "{announced}");
    for quiet in [&later, &never] {
        stack.wait_for_status(quiet, 200, PROPAGATION);
        assert_eq!(
            stack
                .call_with_token(quiet)
                .header("x-tokengate-token-expires"),
            None
        );
    }

    let off = stack_with(flavor, r#""expiry_warning_seconds": 0"#);
    let (_, soon) = off.create_token(json!({"name": "soon", "expires_in_seconds": 3600}));
    off.wait_for_status(&soon, 200, STATE_LOAD);
    assert_eq!(
        off.call_with_token(&soon)
            .header("x-tokengate-token-expires"),
        None
    );
}

flavored!(a_failing_usage_endpoint_never_holds_up_traffic);
fn a_failing_usage_endpoint_never_holds_up_traffic(flavor: Flavor) {
    let stack = stack_with(
        flavor,
        r#""usage_report_ms": 200, "usage_path": "/v1/no-such-endpoint""#,
    );
    let (_, secret) = stack.create_token(json!({"name": "busy"}));
    stack.wait_for_status(&secret, 200, STATE_LOAD);
    wait_until(Duration::from_secs(20), "usage failures counted", || {
        assert_eq!(stack.call_with_token(&secret).status, 200);
        stack.filter_stat("tokengate.usage.failures") >= 2
    });
    assert_eq!(stack.filter_stat("tokengate.usage.reports"), 0);
    assert!(stack.filter_stat("tokengate.sync.success") > 0);
}
