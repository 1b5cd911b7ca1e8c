//! The OpenAPI document against a real `tokengate serve`, checked by schemathesis: every
//! operation, every check (`--checks all`), every phase (examples, coverage, fuzzing and the
//! stateful one that follows the document's links), with a fixed seed and a bounded number of
//! examples. Any answer the document does not describe, any request the document allows
//! that the server refuses and any it forbids that the server accepts, is a failure.
//!
//! schemathesis comes from PyPI, pinned with every dependency in
//! `tests/schemathesis/requirements.txt`, in a virtualenv that `make schemathesis` (and so
//! `make test`) makes in `.tools/schemathesis`; `$SCHEMATHESIS_PYTHON` names another. Its
//! configuration (`schemathesis.toml`) and hooks (`hooks.py`) sit beside that file.

use std::process::Command;
use std::time::Instant;
use tokengate_e2e::{http, workspace_root, Options, Stack};

/// Cases per operation and phase: about 2,000 requests, under a minute on a busy machine.
const MAX_EXAMPLES: u32 = 100;
/// Fixed, so that a failure is reproduced by running the test again.
const SEED: u64 = 18;

fn schemathesis_python() -> std::path::PathBuf {
    let path = match std::env::var_os("SCHEMATHESIS_PYTHON") {
        Some(p) if !p.is_empty() => std::path::PathBuf::from(p),
        _ => workspace_root().join(".tools/schemathesis/bin/python"),
    };
    assert!(
        path.is_file(),
        "schemathesis not found at {} (set SCHEMATHESIS_PYTHON to override). Run `make \
         schemathesis` (or `make test`) from the repository root: it installs the pinned \
         version into .tools/schemathesis.",
        path.display()
    );
    path
}

#[test]
fn schemathesis_finds_the_document_true_to_the_server() {
    let python = schemathesis_python();
    let mut stack = Stack::start_with(Options {
        control_plane: false,
        envoy: false,
        ..Options::default()
    });
    stack.control_plane_args = [
        // schemathesis presents wrong credentials on purpose, hundreds of them (and the
        // document says what the throttle answers: 429 with Retry-After): let the API's own
        // answers be what is tested.
        "--auth-failure-burst",
        "1000",
        "--auth-failure-interval",
        "1s",
        // A poll that finds nothing new is held this long at most.
        "--sync-max-wait-seconds",
        "1",
    ]
    .map(String::from)
    .to_vec();
    stack.start_control_plane();

    // The console session the configuration names (the hooks sign in afresh for each
    // request that carries it).
    let addr = stack.control_plane_addr();
    let body = format!(r#"{{"credential":"{}"}}"#, stack.admin_token);
    let r = http(
        addr,
        "POST",
        "/v1/session",
        &[("content-type", "application/json")],
        Some(&body),
    )
    .expect("sign in");
    assert_eq!(r.status, 201, "{}", r.body);
    let cookie = r
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .and_then(|c| c.strip_prefix("tokengate_session="))
        .expect("a session cookie")
        .to_string();
    let csrf = r.json()["csrf_token"]
        .as_str()
        .expect("csrf_token")
        .to_string();

    let config = workspace_root().join("tests/schemathesis");
    let started = Instant::now();
    let out = Command::new(&python)
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(config.join("schemathesis.toml"))
        .arg("run")
        .arg(format!("{}/v1/openapi.json", stack.control_plane_url()))
        .args(["--checks", "all"])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--max-examples", &MAX_EXAMPLES.to_string()])
        .args(["--seed", &SEED.to_string()])
        .args(["--workers", "1"])
        .args(["--generation-database", "none"])
        .arg("--no-color")
        .current_dir(&stack.dir)
        .env("SCHEMATHESIS_HOOKS", config.join("hooks.py"))
        .env("TG_ADMIN", &stack.admin_token)
        .env("TG_SYNC", &stack.sync_token)
        .env("TG_SESSION", &cookie)
        .env("TG_CSRF", &csrf)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", python.display()));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis found the document and the server at odds ({}):\n{report}\n\
         control plane log (tail):\n{}",
        out.status,
        stack.logs_tail(40)
    );
    let summary: Vec<&str> = report
        .lines()
        .filter(|l| {
            l.contains("generated,") || l.contains("Scenarios:") || l.contains("API Links:")
        })
        .collect();
    println!(
        "schemathesis: {} in {:.0?}, no failures",
        summary
            .join("; ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed()
    );
    // Every phase ran: an empty run passes too, and proves nothing.
    for phase in ["Examples", "Coverage", "Fuzzing", "Stateful"] {
        assert!(
            report
                .lines()
                .any(|l| l.contains('✅') && l.contains(phase)),
            "the {phase} phase did not run and pass:\n{report}"
        );
    }
    // And every operation: schemathesis counts all but the document's own.
    let count = |label: &str| {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|rest| {
                rest.trim()
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
    };
    let selected = count("Selected:").expect("schemathesis names the operations it selected");
    assert_eq!(count("Tested:"), Some(selected.clone()), "{report}");
    assert_eq!(selected, "23", "{report}");
}
