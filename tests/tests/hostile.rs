//! Hostile requests through the real Envoy and filter: header bytes no well-behaved client
//! sends. Each gets the answer the README documents, the credential never reaches the
//! upstream, and the wasm VM never traps (a trapped VM would answer 503 from then on, and
//! Envoy would count a failed VM).

use serde_json::{json, Value};
use std::time::Duration;
use tokengate_e2e::{flavored, http_raw, Flavor, Response, Stack};

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
