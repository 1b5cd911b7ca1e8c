//! Governance end to end: rotation with a grace period enforced by a real Envoy, the kind
//! reaching the upstream, and the CLI's rotate, audit and expiring-within views.

use serde_json::{json, Value};
use std::time::Duration;
use tokengate_e2e::{flavored, wait_until, Flavor, Stack};

const PROPAGATION: Duration = Duration::from_secs(10);
const STATE_LOAD: Duration = Duration::from_secs(40);

fn cli(stack: &Stack, args: &[&str]) -> String {
    let out = std::process::Command::new(&stack.bins.tokengate)
        .args(args)
        .env("TOKENGATE_URL", stack.control_plane_url())
        .env("TOKENGATE_ADMIN_TOKEN", &stack.admin_token)
        .output()
        .expect("run tokengate CLI");
    assert!(
        out.status.success(),
        "tokengate {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn upstream_identity(stack: &Stack, secret: &str) -> Value {
    let r = stack.call_with_token(secret);
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["identity"].clone()
}

/// Unix time in seconds, as a float.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

fn assert_expired(r: &tokengate_e2e::Response) {
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.error_code().as_deref(), Some("token_expired"), "{r:?}");
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer error="invalid_token""#),
        "{r:?}"
    );
}

flavored!(rotation_grace_is_enforced_by_envoy_and_visible_in_the_cli);
fn rotation_grace_is_enforced_by_envoy_and_visible_in_the_cli(flavor: Flavor) {
    let mut stack = Stack::start_flavor(flavor);
    let (id, first) = stack.create_token(json!({
        "name": "nightly-export", "kind": "service", "owner": "data-eng",
        "expires_in_seconds": 3 * 86_400
    }));
    stack.wait_for_status(&first, 200, STATE_LOAD);
    let identity = upstream_identity(&stack, &first);
    assert_eq!(identity["token_kind"], "service", "{identity}");
    assert_eq!(identity["token_owner"], "data-eng", "{identity}");

    // A rotation without grace refuses the replaced secret at once.
    let human = cli(&stack, &["token", "rotate", &id]);
    assert!(human.contains("will not be shown again"), "{human}");
    let second = human
        .split_whitespace()
        .find(|w| w.starts_with("tg_"))
        .expect("new secret printed")
        .to_string();
    wait_until(PROPAGATION, "replaced secret refused", || {
        stack.call_with_token(&first).status == 401
    });
    assert_eq!(
        stack.call_with_token(&first).error_code().as_deref(),
        Some("invalid_token")
    );
    stack.wait_for_status(&second, 200, PROPAGATION);

    // Rotate through the CLI with a grace: both secrets work, as the same token, until the
    // time the control plane gives for the old one.
    let rotated: Value = serde_json::from_str(&cli(
        &stack,
        &["token", "rotate", &id, "--grace", "10s", "--json"],
    ))
    .unwrap();
    let third = rotated["token"].as_str().unwrap().to_string();
    assert_eq!(rotated["id"], id.as_str());
    let valid_until = chrono::DateTime::parse_from_rfc3339(
        rotated["old_secret_valid_until"]
            .as_str()
            .expect("old_secret_valid_until"),
    )
    .expect("an RFC 3339 time")
    .timestamp() as f64;
    stack.wait_for_status(&third, 200, PROPAGATION);
    assert_eq!(upstream_identity(&stack, &third)["token_id"], id.as_str());
    // The old secret, judged by the clock around the request: admitted before the grace
    // ends, refused as expired after (a machine too slow to ask in time sees the latter).
    let asked = unix_now();
    let r = stack.call_with_token(&second);
    let answered = unix_now();
    if answered < valid_until {
        assert_eq!(r.status, 200, "inside the grace: {r:?}");
        assert_eq!(r.json()["identity"]["token_id"], id.as_str());
    } else if asked >= valid_until {
        assert_expired(&r);
    }

    // The audit trail and the expiring view, from the CLI.
    let audit = cli(&stack, &["audit", "--token", &id]);
    let actions: Vec<&str> = audit
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(
        actions,
        ["token.rotated", "token.rotated", "token.created"],
        "{audit}"
    );
    assert!(audit.lines().nth(1).unwrap().contains(" admin "), "{audit}");
    for secret in [&first, &second, &third] {
        assert!(!audit.contains(secret.as_str()));
    }
    let soon = cli(&stack, &["token", "list", "--expiring-within", "7d"]);
    assert!(soon.contains(&id), "{soon}");
    let none = cli(&stack, &["token", "list", "--expiring-within", "1d"]);
    assert!(!none.contains(&id), "{none}");
    let json: Value = serde_json::from_str(&cli(
        &stack,
        &["audit", "--action", "token.created", "--json"],
    ))
    .unwrap();
    assert_eq!(json["entries"].as_array().unwrap().len(), 1);

    // With the control plane gone, the filter refuses the old secret on its own once the
    // grace is over (its record expires then), never before, and keeps the new one.
    stack.stop_control_plane();
    let mut refused_at = 0.0;
    wait_until(
        Duration::from_secs(30),
        "old secret refused as expired after its grace, control plane away",
        || {
            let r = stack.call_with_token(&second);
            refused_at = unix_now();
            assert!(
                r.status == 200 || r.error_code().as_deref() == Some("token_expired"),
                "{r:?}"
            );
            r.status == 401
        },
    );
    assert!(
        refused_at >= valid_until,
        "refused {:.1} s before the grace ended",
        valid_until - refused_at
    );
    assert_expired(&stack.call_with_token(&second));
    assert_eq!(stack.call_with_token(&third).status, 200);
}
