//! The real `tokengate serve` process: durability across `kill -9`, graceful shutdown,
//! start-up errors, and logs that never hold a secret.

mod common;

use common::process::{free_port, serve, serve_with};
use common::{ADMIN, SYNC};
use std::process::Command;
use std::time::{Duration, Instant};

/// The control plane's debug line for a sync poll it holds.
const HELD: &str = "sync poll held until a change";

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let port = free_port();
    let mut s = serve(&db, port);
    let created: serde_json::Value = s
        .admin("POST", "/v1/tokens")
        .send_string(r#"{"name":"durable","max_rps":3}"#)
        .unwrap()
        .into_json()
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let suspended: serde_json::Value = s
        .admin("POST", &format!("/v1/tokens/{id}/suspend"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    // SIGKILL right after the answer: no chance to flush anything the answer did not wait for.
    s.child.kill().unwrap();
    s.child.wait().unwrap();

    let mut s = serve(&db, port);
    let got: serde_json::Value = s
        .admin("GET", &format!("/v1/tokens/{id}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(got["status"], "suspended");
    assert_eq!(got["version"], suspended["version"]);
    assert_eq!(got["max_rps"], 3);
    let log = s.stop();
    assert!(
        !log.contains(created["token"].as_str().unwrap()),
        "secret in the log"
    );
    assert!(
        !log.contains(ADMIN) && !log.contains(SYNC),
        "credential in the log"
    );
    assert!(log.contains("request"), "access log expected: {log}");
}

/// Starts a long-poll at the current version on another thread and waits until the server
/// says it holds it; joining gives the answer's status and body.
fn held_poll(
    s: &common::process::Server,
    wait_seconds: u64,
) -> std::thread::JoinHandle<(Duration, u16, serde_json::Value)> {
    let first: serde_json::Value = ureq::get(&format!("{}/v1/sync?since=0", s.url))
        .set("authorization", &format!("Bearer {SYNC}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let url = format!(
        "{}/v1/sync?since={}&store_id={}&wait={wait_seconds}",
        s.url,
        first["version"],
        first["store_id"].as_str().unwrap()
    );
    let held = s.log_lines(HELD);
    let poll = std::thread::spawn(move || {
        let t = Instant::now();
        let r = ureq::get(&url)
            .set("authorization", &format!("Bearer {SYNC}"))
            .call()
            .unwrap();
        let status = r.status();
        (t.elapsed(), status, r.into_json().unwrap())
    });
    s.wait_for_log(HELD, held, Duration::from_secs(60));
    poll
}

#[test]
fn a_change_answers_a_held_poll_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // The poll may be held for 300 s: only a change that fails to wake it lets it run out.
    let s = serve_with(
        &dir.path().join("t.db"),
        free_port(),
        &["--sync-max-wait-seconds", "300"],
    );
    let (status, created) = s.call("POST", "/v1/tokens", Some(r#"{"name":"x"}"#));
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let poll = held_poll(&s, 300);
    let changed_at = Instant::now();
    let (status, suspended) = s.call("POST", &format!("/v1/tokens/{id}/suspend"), None);
    assert_eq!(status, 200, "{suspended}");
    let (held, status, answer) = poll.join().unwrap();
    eprintln!(
        "a held poll answered {:?} after the suspend returned",
        changed_at.elapsed()
    );
    assert_eq!(status, 200);
    assert!(held < Duration::from_secs(300), "ran to its wait: {held:?}");
    assert_eq!(answer["version"], suspended["version"], "{answer}");
    assert_eq!(answer["changes"][0]["id"], id, "{answer}");
    assert_eq!(answer["changes"][0]["status"], "suspended", "{answer}");
}

#[test]
fn sigterm_answers_held_long_polls_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = serve_with(
        &dir.path().join("t.db"),
        free_port(),
        &["--sync-max-wait-seconds", "300"],
    );
    let poll = held_poll(&s, 300);
    let kill = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let signalled = Instant::now();
    let (held, status, answer) = poll.join().unwrap();
    eprintln!(
        "a held poll answered {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert_eq!(status, 200);
    assert_eq!(
        answer["changes"].as_array().map(Vec::len),
        Some(0),
        "{answer}"
    );
    // Only a poll that SIGTERM did not release runs to its 300 s.
    assert!(held < Duration::from_secs(300), "ran to its wait: {held:?}");
    let exit = s.wait_exit(Duration::from_secs(120));
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn missing_credentials_are_a_clear_start_up_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            "/nonexistent/x.db",
        ])
        .env_remove("TOKENGATE_ADMIN_TOKEN")
        .env("TOKENGATE_SYNC_TOKEN", SYNC)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TOKENGATE_ADMIN_TOKEN"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            "/nonexistent/x.db",
        ])
        .env("TOKENGATE_ADMIN_TOKEN", "short")
        .env("TOKENGATE_SYNC_TOKEN", SYNC)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 16"),
        "{out:?}"
    );
}

/// `tokengate serve` with `args` and `env` must refuse to start, saying `expected`.
fn refuses_to_start(args: &[&str], env: &[(&str, &str)], expected: &str) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokengate"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        "/nonexistent/x.db",
    ])
    .args(args)
    .env_remove("TOKENGATE_ADMIN_TOKEN")
    .env("TOKENGATE_SYNC_TOKEN", SYNC);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} started");
    assert!(err.contains(expected), "{args:?}: {err}");
}

#[test]
fn governance_options_are_checked_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("admins");
    std::fs::write(
        &creds,
        "# team\nalice:alice-secret-0123456789\nbob has no colon\n",
    )
    .unwrap();
    let creds = creds.to_str().unwrap();
    refuses_to_start(
        &["--admin-credentials-file", creds],
        &[],
        "--admin-credentials-file line 3: expected `name:secret`",
    );
    std::fs::write(
        dir.path().join("dup"),
        "alice:alice-secret-0123456789\nalice:other-secret-0123456789\n",
    )
    .unwrap();
    refuses_to_start(
        &[
            "--admin-credentials-file",
            dir.path().join("dup").to_str().unwrap(),
        ],
        &[],
        "`alice` is given twice",
    );
    let admin = [("TOKENGATE_ADMIN_TOKEN", "admin-credential-0123456789")];
    refuses_to_start(
        &["--webhook-url", "http://127.0.0.1:1/hook"],
        &admin,
        "TOKENGATE_WEBHOOK_SECRET",
    );
    refuses_to_start(
        &[
            "--webhook-url",
            "ftp://x",
            "--webhook-secret",
            "webhook-secret-0123456789",
        ],
        &admin,
        "--webhook-url must be an http",
    );
    refuses_to_start(
        &["--user-max-lifetime", "90 days"],
        &admin,
        "is not a duration",
    );
    refuses_to_start(&["--expiry-warnings", "7d,never"], &admin, "use `none`");
    refuses_to_start(
        &["--jobs-interval", "never"],
        &admin,
        "--jobs-interval cannot be `never`",
    );
}
