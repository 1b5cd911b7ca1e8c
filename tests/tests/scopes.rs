//! Scopes through real Envoy: scopes and scoped tokens made through the control plane's API,
//! requests allowed and refused by method and path, the path normalisation attacks (with
//! what the client sees and what the upstream received), a scope edited, the identity
//! header, the RFC 6750 challenge. Both flavors.

use serde_json::{json, Value};
use std::time::Duration;
use tokengate_e2e::{flavored, http, wait_until, workspace_root, Flavor, Response, Stack};

/// How long a change may take to reach Envoy (the design promises milliseconds).
const PROPAGATION: Duration = Duration::from_secs(10);
/// How long the filter may take to load its first state.
const STATE_LOAD: Duration = Duration::from_secs(40);

fn create_scope(stack: &Stack, name: &str, rules: Value) {
    let r = stack.admin(
        "POST",
        "/v1/scopes",
        Some(&json!({"name": name, "rules": rules})),
    );
    assert_eq!(
        r.status, 201,
        "create scope {name}: {} {}",
        r.status, r.body
    );
}

fn send(stack: &Stack, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    http(stack.envoy_addr(), method, path, headers, None)
        .unwrap_or_else(|e| panic!("{method} {path} through Envoy: {e}"))
}

/// The path the demo upstream says it received (with its query).
fn upstream_path(r: &Response) -> String {
    r.json()["path"].as_str().unwrap_or_default().to_string()
}

/// The paths the demo upstream logged for requests of token `id`, in order.
fn upstream_saw(stack: &Stack, id: &str) -> Vec<String> {
    let marker = format!(" token_id={id}");
    stack
        .logs()
        .lines()
        .filter_map(|l| l.strip_prefix("demo-upstream: "))
        .filter_map(|l| l.strip_suffix(&marker))
        .map(str::to_string)
        .collect()
}

fn assert_insufficient_scope(r: &Response, challenge: &str, what: &str) {
    assert_eq!(r.status, 403, "{what}: {r:?}");
    assert_eq!(
        r.error_code().as_deref(),
        Some("insufficient_scope"),
        "{what}: {r:?}"
    );
    assert_eq!(
        r.header("www-authenticate"),
        Some(challenge),
        "{what}: {r:?}"
    );
}

const NO_SCOPE_COVERS: &str = r#"Bearer error="insufficient_scope""#;

fn scopes_hold_a_token_to_its_methods_and_paths(flavor: Flavor) {
    let stack = Stack::start_flavor(flavor);
    create_scope(
        &stack,
        "orders:read",
        json!([{"methods": ["GET", "HEAD"], "path": "/orders/**"}]),
    );
    create_scope(
        &stack,
        "orders:write",
        json!([{"methods": ["POST"], "path": "/orders"}]),
    );
    create_scope(&stack, "admin", json!([{"path": "/admin/**"}]));
    let (id, secret) = stack.create_token(json!({"name": "reader", "scopes": ["orders:read"]}));
    let (free_id, free) = stack.create_token(json!({"name": "unrestricted"}));
    let token = [("X-API-Token", secret.as_str())];
    wait_until(STATE_LOAD, "the scoped token is let through", || {
        send(&stack, "GET", "/orders/1", &token).status == 200
    });

    // Allowed: the scope's methods on its paths; upstream learns the granted scopes, whatever
    // the client sent as that header.
    for (method, path) in [
        ("GET", "/orders"),
        ("GET", "/orders/7/lines"),
        ("HEAD", "/orders/7"),
    ] {
        let r = send(
            &stack,
            method,
            path,
            &[token[0], ("X-Tokengate-Scopes", "admin")],
        );
        assert_eq!(r.status, 200, "{method} {path}: {r:?}");
        if method == "GET" {
            let echo = r.json();
            assert_eq!(echo["path"], path);
            assert_eq!(
                echo["headers"]["x-tokengate-scopes"], "orders:read",
                "{echo}"
            );
            assert_eq!(echo["identity"]["token_id"], id.as_str());
        }
    }

    // Refused by method and by path, with the scopes that would do in the challenge.
    let r = send(&stack, "POST", "/orders", &token);
    assert_insufficient_scope(
        &r,
        r#"Bearer error="insufficient_scope", scope="orders:write""#,
        "POST",
    );
    let r = send(&stack, "DELETE", "/orders/7", &token);
    assert_insufficient_scope(&r, NO_SCOPE_COVERS, "DELETE");
    let r = send(&stack, "GET", "/admin/users", &token);
    assert_insufficient_scope(
        &r,
        r#"Bearer error="insufficient_scope", scope="admin""#,
        "admin",
    );
    let r = send(&stack, "GET", "/hello", &token);
    assert_insufficient_scope(&r, NO_SCOPE_COVERS, "elsewhere");

    // The normalisation attacks. Each: what the client sees, and (below) that the upstream
    // never received a path the scope does not cover.
    enum Sees {
        /// Let through; the upstream received this path.
        Upstream(&'static str),
        /// Refused by the filter: 403 `insufficient_scope` with this challenge.
        Refused(&'static str),
        /// Refused by Envoy's listener before the filter: this status.
        Listener(u16),
    }
    let admin = r#"Bearer error="insufficient_scope", scope="admin""#;
    let attacks = [
        // `..` resolved by the listener: /admin, which the scope does not cover.
        ("/orders/../admin/users", Sees::Refused(admin)),
        ("/orders/%2e%2e/admin/users", Sees::Refused(admin)),
        ("/orders/%2E%2E/admin/users", Sees::Refused(admin)),
        // Case matters: /ORDERS is another path.
        ("/ORDERS", Sees::Refused(NO_SCOPE_COVERS)),
        ("/Orders/7", Sees::Refused(NO_SCOPE_COVERS)),
        // `//` merged by the listener: /orders, covered.
        ("//orders", Sees::Upstream("/orders")),
        ("/orders//7", Sees::Upstream("/orders/7")),
        // An encoded `/` or `\`: refused by the listener, never decoded into another path.
        ("/orders%2Fsecret", Sees::Listener(400)),
        ("/orders%2f..%2fadmin", Sees::Listener(400)),
        ("/orders/..%5Cadmin", Sees::Listener(400)),
        // `;` parameters: the filter cannot know how the upstream reads them. (Envoy's
        // normalisation already reads `..;` as `..`.)
        ("/orders;jsessionid=1", Sees::Refused(NO_SCOPE_COVERS)),
        ("/orders/7;a=b", Sees::Refused(NO_SCOPE_COVERS)),
        ("/orders/..;/admin/users", Sees::Refused(admin)),
        // The query is not part of the path matched, and travels unchanged.
        (
            "/orders?next=/admin/users",
            Sees::Upstream("/orders?next=/admin/users"),
        ),
        ("/admin/users?/orders", Sees::Refused(admin)),
        // A fragment has no place in a request: Envoy refuses it.
        ("/orders#/../admin", Sees::Listener(400)),
        ("/admin/users#/orders", Sees::Listener(400)),
    ];
    for (path, sees) in &attacks {
        let r = send(&stack, "GET", path, &token);
        match sees {
            Sees::Upstream(got) => {
                assert_eq!(r.status, 200, "{path}: {r:?}");
                assert_eq!(upstream_path(&r), *got, "{path}");
            }
            Sees::Refused(challenge) => assert_insufficient_scope(&r, challenge, path),
            Sees::Listener(status) => {
                assert_eq!(r.status, *status, "{path}: {r:?}");
                assert_eq!(
                    r.error_code(),
                    None,
                    "{path}: Envoy's answer, not the filter's"
                );
            }
        }
    }

    // A token with no scopes: unchanged, anywhere; no scopes header upstream, even a sent one.
    for path in ["/admin/users", "/orders/7", "/anything"] {
        let r = send(
            &stack,
            "DELETE",
            path,
            &[("X-API-Token", &free), ("X-Tokengate-Scopes", "admin")],
        );
        assert_eq!(r.status, 200, "unrestricted {path}: {r:?}");
        let echo = r.json();
        assert_eq!(echo["identity"]["token_id"], free_id.as_str());
        assert!(
            echo["headers"].get("x-tokengate-scopes").is_none(),
            "{echo}"
        );
    }

    // A scope edited: seen within the usual propagation time.
    let r = stack.admin(
        "PATCH",
        "/v1/scopes/orders:read",
        Some(&json!({"rules": [{"methods": ["GET"], "path": "/v2/orders/**"}]})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let took = wait_until(PROPAGATION, "the edited scope is in force", || {
        send(&stack, "GET", "/v2/orders/1", &token).status == 200
    });
    eprintln!("{}: a scope edit reached Envoy in {took:?}", flavor.name());
    let r = send(&stack, "GET", "/orders/1", &token);
    assert_insufficient_scope(&r, NO_SCOPE_COVERS, "after the edit");

    // The upstream received only what the scope covered at the time.
    let saw = upstream_saw(&stack, &id);
    assert!(!saw.is_empty());
    for line in &saw {
        let (method, path) = line.split_once(' ').unwrap_or_else(|| panic!("{line}"));
        let covered = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
        assert!(
            matches!(method, "GET" | "HEAD") && (covered("/orders") || covered("/v2/orders")),
            "the upstream received {line} for the scoped token: {saw:?}"
        );
        assert!(
            !path.contains("..")
                && !path.contains("//")
                && !path.contains(';')
                && !path.contains('%'),
            "the upstream received {line}"
        );
    }

    // Refusals count under their own reason (the wasm flavor flushes counts on its tick).
    wait_until(PROPAGATION, "the insufficient_scope counter", || {
        stack.filter_stat("tokengate.denied.insufficient_scope") > 0
    });
}
flavored!(scopes_hold_a_token_to_its_methods_and_paths);

fn a_token_created_with_a_new_scope_is_let_through_at_once(flavor: Flavor) {
    // The scope and the token come in one sync answer or two; either way the token never
    // meets a filter that does not know the scope it names (the set is written first).
    let stack = Stack::start_flavor(flavor);
    let (_, probe) = stack.create_token(json!({"name": "probe"}));
    stack.wait_for_status(&probe, 200, STATE_LOAD);
    for i in 0..5 {
        let name = format!("fresh-{i}");
        create_scope(&stack, &name, json!([{"path": format!("/fresh/{i}")}]));
        let (_, secret) = stack.create_token(json!({"name": name, "scopes": [name]}));
        let path = format!("/fresh/{i}");
        let mut last = None;
        wait_until(PROPAGATION, "the new token", || {
            let r = send(&stack, "GET", &path, &[("X-API-Token", &secret)]);
            let status = r.status;
            last = Some(r);
            status != 401
        });
        let r = last.unwrap_or_else(|| panic!("no answer"));
        assert_eq!(r.status, 200, "its first answer other than 401: {r:?}");
    }
}
flavored!(a_token_created_with_a_new_scope_is_let_through_at_once);

#[test]
fn every_shipped_envoy_configuration_normalises_paths() {
    // envoy/envoy.yaml is also what docker compose renders and what the end-to-end tests
    // run; the Istio and Envoy Gateway manifests are checked by `make check-k8s`.
    for file in [
        "envoy/envoy.yaml",
        "envoy/snippet.yaml",
        "envoy/envoy-native.yaml",
        "envoy/snippet-native.yaml",
        "bench/envoy/tokengate.yaml",
        "bench/envoy/tokengate-native.yaml",
        "bench/envoy/native.yaml",
        "bench/envoy/none.yaml",
        "bench/envoy/ext-authz.yaml",
        "deploy/kubernetes/sidecar/underscore-headers.yaml",
        "deploy/kubernetes/gateway/underscore-headers.yaml",
    ] {
        let text = std::fs::read_to_string(workspace_root().join(file))
            .unwrap_or_else(|e| panic!("read {file}: {e}"));
        let managers = text
            .matches("envoy.filters.network.http_connection_manager")
            .count();
        assert!(managers > 0, "{file}: no http_connection_manager");
        for setting in [
            "normalize_path: true",
            "merge_slashes: true",
            "path_with_escaped_slashes_action: REJECT_REQUEST",
        ] {
            let set = text.lines().filter(|l| l.trim() == setting).count();
            assert_eq!(
                set, managers,
                "{file}: every http_connection_manager sets {setting}"
            );
        }
    }
    let eg = std::fs::read_to_string(
        workspace_root().join("deploy/kubernetes/envoy-gateway/underscore-headers.yaml"),
    )
    .unwrap_or_default();
    assert!(eg.contains("escapedSlashesAction: RejectRequest"));
}
