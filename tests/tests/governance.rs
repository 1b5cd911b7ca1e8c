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

flavored!(rotation_grace_is_enforced_by_envoy_and_visible_in_the_cli);
fn rotation_grace_is_enforced_by_envoy_and_visible_in_the_cli(flavor: Flavor) {
    let stack = Stack::start_flavor(flavor);
    let (id, first) = stack.create_token(json!({
        "name": "nightly-export", "kind": "service", "owner": "data-eng",
        "expires_in_seconds": 3 * 86_400
    }));
    stack.wait_for_status(&first, 200, STATE_LOAD);
    let identity = upstream_identity(&stack, &first);
    assert_eq!(identity["token_kind"], "service", "{identity}");
    assert_eq!(identity["token_owner"], "data-eng", "{identity}");

    // Rotate through the CLI with a short grace: both secrets work, as the same token.
    let rotated: Value = serde_json::from_str(&cli(
        &stack,
        &["token", "rotate", &id, "--grace", "4s", "--json"],
    ))
    .unwrap();
    let second = rotated["token"].as_str().unwrap().to_string();
    assert_eq!(rotated["id"], id.as_str());
    stack.wait_for_status(&second, 200, PROPAGATION);
    assert_eq!(upstream_identity(&stack, &second)["token_id"], id.as_str());
    assert_eq!(upstream_identity(&stack, &first)["token_id"], id.as_str());
    // When the grace ends the old secret is refused, with no further change pushed.
    wait_until(PROPAGATION, "old secret refused after its grace", || {
        stack.call_with_token(&first).status == 401
    });
    assert_eq!(stack.call_with_token(&second).status, 200);

    // A rotation without grace refuses the replaced secret at once.
    let human = cli(&stack, &["token", "rotate", &id]);
    assert!(human.contains("will not be shown again"), "{human}");
    let third = human
        .split_whitespace()
        .find(|w| w.starts_with("tg_"))
        .expect("new secret printed")
        .to_string();
    wait_until(PROPAGATION, "replaced secret refused", || {
        stack.call_with_token(&second).status == 401
    });
    assert_eq!(stack.call_with_token(&third).status, 200);
    assert_eq!(
        stack.call_with_token(&second).json()["error"],
        "invalid_token"
    );

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
}
