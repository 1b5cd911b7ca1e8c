//! Hostile requests through the real Envoy and filter: header bytes no well-behaved client
//! sends. Each gets the answer the README documents, the credential never reaches the
//! upstream, and the wasm VM never traps (a trapped VM would answer 503 from then on, and
//! Envoy would count a failed VM).

use serde_json::{json, Value};
use std::time::Duration;
use tokengate_e2e::{flavored, http_raw, Flavor, Options, Response, Stack};

const STATE_LOAD: Duration = Duration::from_secs(40);

/// Sends `GET /hello` with the given header lines, verbatim bytes.
fn raw(stack: &Stack, header_lines: &[&[u8]]) -> Response {
    let mut req = format!(
        "GET /hello HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        stack.envoy_addr()
    )
    .into_bytes();
    for line in header_lines {
        req.extend_from_slice(line);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    http_raw(stack.envoy_addr(), &req).expect("envoy answers")
}

fn line(name: &str, value: &str) -> Vec<u8> {
    format!("{name}: {value}").into_bytes()
}

fn error_of(r: &Response) -> String {
    r.error_code().unwrap_or_default()
}

/// What the upstream saw, for an admitted request.
fn upstream_headers(r: &Response) -> serde_json::Map<String, Value> {
    r.json()["headers"]
        .as_object()
        .cloned()
        .unwrap_or_else(|| panic!("no headers echoed: {r:?}"))
}

flavored!(hostile_token_headers_get_their_documented_answers_and_never_trap_the_vm);
fn hostile_token_headers_get_their_documented_answers_and_never_trap_the_vm(flavor: Flavor) {
    let stack = Stack::start_flavor(flavor);
    let (id, good) = stack.create_token(json!({"name": "hostile-reference"}));
    stack.wait_for_status(&good, 200, STATE_LOAD);
    let (_, other) = stack.create_token(json!({"name": "hostile-other", "owner": "o2"}));
    stack.wait_for_status(&other, 200, STATE_LOAD);
    let bearer = format!("Bearer {good}");
    let vms_before = stack.filter_health();
    assert_eq!(vms_before.1, 0, "VM reloads before the test");

    struct Case {
        what: &'static str,
        lines: Vec<Vec<u8>>,
        status: u16,
        error: &'static str,
    }
    let mut non_utf8 = b"X-API-Token: tg_".to_vec();
    non_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28, 0x80]);
    non_utf8.extend_from_slice(&good.as_bytes()[8..]);
    let mut non_utf8_bearer = b"Authorization: Bearer \xff\xfe".to_vec();
    non_utf8_bearer.extend_from_slice(good.as_bytes());
    let cases = vec![
        Case {
            what: "non-UTF-8 bytes in X-API-Token",
            lines: vec![non_utf8],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "non-UTF-8 bytes in a Bearer token",
            lines: vec![non_utf8_bearer],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "an 8 KiB X-API-Token",
            lines: vec![line("X-API-Token", &format!("tg_{}", "A".repeat(8 * 1024)))],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "a valid token with 8 KiB of trailing garbage",
            lines: vec![line(
                "X-API-Token",
                &format!("{good}{}", "x".repeat(8 * 1024)),
            )],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "an empty X-API-Token",
            lines: vec![b"X-API-Token:".to_vec()],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "X-API-Token of spaces and tabs",
            lines: vec![b"X-API-Token:  \t  ".to_vec()],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "a valid token with surrounding whitespace",
            lines: vec![line("X-API-Token", &format!(" \t{good}\t "))],
            status: 200,
            error: "",
        },
        Case {
            what: "a valid token with a space inside",
            lines: vec![line(
                "X-API-Token",
                &format!("{} {}", &good[..10], &good[10..]),
            )],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "header name in odd case",
            lines: vec![line("x-ApI-tOkEn", &good)],
            status: 200,
            error: "",
        },
        Case {
            what: "scheme in lower case",
            lines: vec![line("Authorization", &format!("bearer {good}"))],
            status: 200,
            error: "",
        },
        Case {
            what: "scheme in upper case",
            lines: vec![line("Authorization", &format!("BEARER {good}"))],
            status: 200,
            error: "",
        },
        Case {
            what: "Authorization: Basic",
            lines: vec![line("Authorization", "Basic dXNlcjpwYXNzd29yZA==")],
            status: 401,
            error: "missing_token",
        },
        Case {
            what: "an empty bearer",
            lines: vec![line("Authorization", "Bearer ")],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "a bearer of spaces",
            lines: vec![line("Authorization", "Bearer      ")],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "the scheme alone",
            lines: vec![line("Authorization", "Bearer")],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "Bearer with no space before the token",
            lines: vec![line("Authorization", &format!("Bearer{good}"))],
            status: 401,
            error: "missing_token",
        },
        Case {
            what: "both headers, the same token",
            lines: vec![line("X-API-Token", &good), line("Authorization", &bearer)],
            status: 200,
            error: "",
        },
        Case {
            what: "both headers, X-API-Token valid and the bearer garbage",
            lines: vec![
                line("X-API-Token", &good),
                line("Authorization", "Bearer tg_garbage"),
            ],
            status: 200,
            error: "",
        },
        Case {
            what: "X-API-Token valid, the same token after Bearer and a tab",
            lines: vec![
                line("X-API-Token", &good),
                line("Authorization", &format!("Bearer\t{good}")),
            ],
            status: 200,
            error: "",
        },
        Case {
            what: "X-API-Token valid, the same token in Authorization bare",
            lines: vec![line("X-API-Token", &good), line("Authorization", &good)],
            status: 200,
            error: "",
        },
        Case {
            what: "X-API-Token valid, the same token in Basic credentials",
            lines: vec![
                line("X-API-Token", &good),
                line("Authorization", &format!("Basic {good}")),
            ],
            status: 200,
            error: "",
        },
        Case {
            what: "X-API-Token valid, another token after a lower-case scheme, no space",
            lines: vec![
                line("X-API-Token", &good),
                line("Authorization", &format!("bearer{other}")),
            ],
            status: 200,
            error: "",
        },
        Case {
            what: "both headers, X-API-Token garbage and the bearer valid",
            lines: vec![
                line("X-API-Token", "tg_garbage"),
                line("Authorization", &bearer),
            ],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "two X-API-Token headers, both valid and different",
            lines: vec![line("X-API-Token", &good), line("X-API-Token", &other)],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "two X-API-Token headers, the valid one first",
            lines: vec![
                line("X-API-Token", &good),
                line("X-API-Token", "tg_garbage"),
            ],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "two X-API-Token headers, the valid one second",
            lines: vec![
                line("X-API-Token", "tg_garbage"),
                line("X-API-Token", &good),
            ],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "two X-API-Token headers, the same valid token twice",
            lines: vec![line("X-API-Token", &good), line("X-API-Token", &good)],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "two Authorization headers",
            lines: vec![
                line("Authorization", &bearer),
                line("Authorization", "Basic eDp5"),
            ],
            status: 401,
            error: "invalid_token",
        },
        Case {
            what: "identity headers and no token",
            lines: vec![
                line("X-Tokengate-Token-Id", &id),
                line("X-Tokengate-Token-Name", "hostile-reference"),
            ],
            status: 401,
            error: "missing_token",
        },
    ];

    let mut failures = Vec::new();
    for case in &cases {
        let lines: Vec<&[u8]> = case.lines.iter().map(Vec::as_slice).collect();
        let r = raw(&stack, &lines);
        eprintln!("{:<60} -> {} {}", case.what, r.status, error_of(&r));
        if r.status != case.status || (case.status != 200 && error_of(&r) != case.error) {
            failures.push(format!(
                "{}: expected {} {}, got {} {}",
                case.what, case.status, case.error, r.status, r.body
            ));
            continue;
        }
        if r.status == 200 {
            let headers = upstream_headers(&r);
            assert!(
                !headers.contains_key("x-api-token"),
                "{}: {headers:?}",
                case.what
            );
            assert!(
                !headers.contains_key("authorization"),
                "{}: {headers:?}",
                case.what
            );
            assert_eq!(
                r.json()["identity"]["token_id"],
                id.as_str(),
                "{}",
                case.what
            );
            for secret in [&good, &other] {
                assert!(
                    !r.body.contains(secret.as_str()),
                    "{}: a secret reached the upstream: {}",
                    case.what,
                    r.body
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "unexpected answers:\n{}",
        failures.join("\n")
    );

    // Spoofed identity alongside a valid token is replaced, never passed on.
    let r = raw(
        &stack,
        &[
            line("X-API-Token", &good).as_slice(),
            line("X-Tokengate-Token-Id", "spoofed").as_slice(),
            line("X-Tokengate-Token-Id", "spoofed-again").as_slice(),
            line("x-tokengate-token-name", "spoofed").as_slice(),
            line("x-tokengate-token-name", "spoofed").as_slice(),
            line("x-tokengate-token-owner", "spoofed").as_slice(),
            line("X-TOKENGATE-TOKEN-KIND", "spoofed").as_slice(),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        !r.body.contains("spoofed"),
        "spoofed identity reached the upstream: {}",
        r.body
    );

    // Headers too large for Envoy are refused by Envoy itself, before the filter.
    let r = raw(
        &stack,
        &[line("X-API-Token", &"A".repeat(100 * 1024)).as_slice()],
    );
    eprintln!("{:<60} -> {}", "a 100 KiB X-API-Token", r.status);
    assert_eq!(r.status, 431, "{r:?}");

    // The VM is alive and well: the reference token still works on every worker, and no
    // VM failure was counted.
    for _ in 0..20 {
        assert_eq!(stack.call_with_token(&good).status, 200);
    }
    assert_eq!(
        stack.filter_health(),
        vms_before,
        "the filter failed (a wasm VM replaced, or a native hook panicked)"
    );
    assert!(
        !stack.logs().contains("Uncaught") && !stack.logs().contains("panicked"),
        "the VM reported a trap or panic:\n{}",
        stack.logs_tail(40)
    );
}

/// A request carrying a valid token and tokengate headers spelt with underscores (and in
/// mixed case): CGI-style upstreams (WSGI, Rack, PHP) read `x_tokengate_token_id` as
/// `x-tokengate-token-id`. Returns what the upstream saw.
fn send_underscored_spoofs(stack: &Stack, good: &str) -> Response {
    let r = raw(
        stack,
        &[
            line("X-API-Token", good).as_slice(),
            line("x_tokengate_token_id", "tok_SPOOF").as_slice(),
            line("X-Tokengate-Token_Owner", "root").as_slice(),
            line("X_TOKENGATE_TOKEN_KIND", "spoofed-kind").as_slice(),
            line("x_tokengate_token_name", "spoofed-name").as_slice(),
            line("x_tokengate_token_expires", "spoofed-expiry").as_slice(),
            line("x-tokengate-token-expires", "spoofed-expiry").as_slice(),
            line("X-Tokengate-Anything", "spoofed-other").as_slice(),
            line("x_api_token", good).as_slice(),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    r
}

/// No header the upstream could read as a tokengate header, other than the filter's own
/// four identity headers with the token's real values, and no secret.
fn assert_only_real_identity(r: &Response, id: &str, good: &str) {
    let headers = upstream_headers(r);
    let cgi = |name: &str| name.to_ascii_lowercase().replace('_', "-");
    let tokengate: Vec<&String> = headers
        .keys()
        .filter(|n| cgi(n).starts_with("x-tokengate-"))
        .collect();
    assert_eq!(
        tokengate,
        [
            "x-tokengate-token-id",
            "x-tokengate-token-kind",
            "x-tokengate-token-name",
            "x-tokengate-token-owner"
        ],
        "upstream saw {headers:?}"
    );
    assert_eq!(headers["x-tokengate-token-id"], id);
    assert_eq!(headers["x-tokengate-token-owner"], "spoof-check-owner");
    assert_eq!(headers["x-tokengate-token-kind"], "user");
    for spoof in ["SPOOF", "root", "spoofed", good] {
        assert!(
            !r.body.contains(spoof),
            "{spoof:?} reached the upstream: {}",
            r.body
        );
    }
    assert!(
        !headers
            .keys()
            .any(|n| cgi(n) == "x-api-token" || n == "authorization"),
        "a credential header reached the upstream: {headers:?}"
    );
}

flavored!(underscored_identity_headers_are_dropped_by_the_shipped_envoy_configuration);
fn underscored_identity_headers_are_dropped_by_the_shipped_envoy_configuration(flavor: Flavor) {
    let stack = Stack::start_flavor(flavor);
    let (id, good) =
        stack.create_token(json!({"name": "spoof-check", "owner": "spoof-check-owner"}));
    stack.wait_for_status(&good, 200, STATE_LOAD);
    let dropped = "http1.dropped_headers_with_underscores";
    let before = stack.envoy_stat(dropped);
    let r = send_underscored_spoofs(&stack, &good);
    assert_only_real_identity(&r, &id, &good);
    // Envoy itself dropped the six underscored names, before the filter.
    assert_eq!(stack.envoy_stat(dropped) - before, 6);
}

flavored!(underscored_identity_headers_are_removed_by_the_filter_when_envoy_allows_them);
fn underscored_identity_headers_are_removed_by_the_filter_when_envoy_allows_them(flavor: Flavor) {
    // As an Envoy that keeps Envoy's default (ALLOW), Istio's sidecars and gateways among
    // them unless configured otherwise: the filter is then the only line of defence.
    let mut stack = Stack::start_with(Options {
        envoy: false,
        flavor,
        ..Options::default()
    });
    stack.envoy_config_edits.push((
        "headers_with_underscores_action: DROP_HEADER".into(),
        "headers_with_underscores_action: ALLOW".into(),
    ));
    stack.start_envoy();
    let (id, good) =
        stack.create_token(json!({"name": "spoof-check", "owner": "spoof-check-owner"}));
    stack.wait_for_status(&good, 200, STATE_LOAD);
    let r = send_underscored_spoofs(&stack, &good);
    assert_eq!(
        stack.envoy_stat("http1.dropped_headers_with_underscores"),
        0
    );
    assert_only_real_identity(&r, &id, &good);
}

#[test]
fn every_shipped_envoy_configuration_drops_or_rejects_headers_with_underscores() {
    // envoy/envoy.yaml is also what docker compose renders; the Istio overlays carry an
    // EnvoyFilter, checked by `make check-k8s`.
    for file in [
        "envoy/envoy.yaml",
        "envoy/snippet.yaml",
        "envoy/envoy-native.yaml",
        "envoy/snippet-native.yaml",
    ] {
        let path = tokengate_e2e::workspace_root().join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {file}: {e}"));
        let managers = text
            .matches("- name: envoy.filters.network.http_connection_manager")
            .count();
        let protected = text
            .lines()
            .filter(|l| {
                let l = l.trim();
                l == "headers_with_underscores_action: DROP_HEADER"
                    || l == "headers_with_underscores_action: REJECT_REQUEST"
            })
            .count();
        assert!(managers > 0, "{file}: no http_connection_manager");
        assert_eq!(
            protected, managers,
            "{file}: every http_connection_manager must set headers_with_underscores_action"
        );
    }
}
