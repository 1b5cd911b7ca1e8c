//! The real `tokengate serve` process: durability across `kill -9`, graceful shutdown,
//! start-up errors, and logs that never hold a secret.

mod common;

use common::process::*;
use common::{ADMIN, SYNC};
use std::io::Read;
use std::process::{Command, Stdio};
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
        dir.path().join("t.db"),
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
        dir.path().join("t.db"),
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

#[test]
fn on_postgres_acknowledged_writes_survive_kill_9_and_the_password_is_never_logged() {
    let cluster = tokengate_pgtest::shared();
    let url = cluster.fresh_database();
    // The test cluster trusts loopback, so the password is not checked; it must still never
    // reach a log line.
    let with_password = url.replacen("postgres@", "postgres:db-password-0123456789@", 1);
    let port = free_port();
    let mut s = serve(&with_password, port);
    let created: serde_json::Value = s
        .admin("POST", "/v1/tokens")
        .send_string(r#"{"name":"durable"}"#)
        .unwrap()
        .into_json()
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    s.admin("POST", &format!("/v1/tokens/{id}/suspend"))
        .call()
        .unwrap();
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let mut s = serve(&with_password, port);
    let got: serde_json::Value = s
        .admin("GET", &format!("/v1/tokens/{id}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(got["status"], "suspended");
    let log = s.stop();
    assert!(
        !log.contains("db-password-0123456789"),
        "password in the log: {log}"
    );
    assert!(log.contains("postgres://postgres@127.0.0.1"), "{log}");
}

#[test]
fn a_database_with_a_newer_schema_refuses_to_start_naming_both_versions() {
    let cluster = tokengate_pgtest::shared();
    let url = cluster.fresh_database();
    let s = serve(&url, free_port());
    drop(s);
    cluster.psql(
        url.rsplit('/').next().unwrap(),
        "UPDATE tokengate_schema SET version = 99",
    );
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("t.db");
    let s = serve(&sqlite, free_port());
    drop(s);
    let conn = rusqlite_user_version(&sqlite, 99);
    for db in [url.as_str(), conn.as_str()] {
        let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["serve", "--listen", "127.0.0.1:0", "--db", db])
            .env("TOKENGATE_ADMIN_TOKEN", ADMIN)
            .env("TOKENGATE_SYNC_TOKEN", SYNC)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{db}: started");
        assert!(err.contains("schema is version 99"), "{db}: {err}");
        assert!(err.contains("(up to version "), "{db}: {err}");
    }
}

/// Sets a SQLite file's schema version as a newer tokengate would have; its `--db`.
fn rusqlite_user_version(path: &std::path::Path, v: u32) -> String {
    rusqlite::Connection::open(path)
        .unwrap()
        .pragma_update(None, "user_version", v)
        .unwrap();
    format!("sqlite://{}", path.display())
}

/// Status, `Retry-After` and the `error` code of an answer, whatever its status.
fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Option<String>, String) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = resp.status();
    let retry = resp.header("retry-after").map(str::to_string);
    let body: serde_json::Value = resp.into_json().unwrap_or_default();
    let code = body["error"].as_str().unwrap_or_default().to_string();
    (status, retry, code)
}

#[test]
fn while_postgres_is_down_calls_answer_503_and_readyz_is_false_then_all_recovers() {
    let cluster = tokengate_pgtest::PgCluster::start();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--db"])
        .arg(cluster.url())
        .args(["--db-timeout", "2s"])
        .env("TOKENGATE_ADMIN_TOKEN", ADMIN)
        .env("TOKENGATE_SYNC_TOKEN", SYNC)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let get = |path: &str| answer(ureq::get(&format!("{url}{path}")).call());
    let admin = |method: &str, path: &str| {
        let req = ureq::request(method, &format!("{url}{path}"))
            .set("authorization", &format!("Bearer {ADMIN}"));
        answer(if method == "POST" {
            req.send_string(r#"{"name":"x"}"#)
        } else {
            req.call()
        })
    };
    let start = Instant::now();
    while ureq::get(&format!("{url}/readyz")).call().is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(admin("POST", "/v1/tokens").0, 201);

    cluster.stop();
    let (status, retry, code) = admin("POST", "/v1/tokens");
    assert_eq!((status, code.as_str()), (503, "store_unavailable"));
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(admin("GET", "/v1/tokens").0, 503);
    let sync = answer(
        ureq::get(&format!("{url}/v1/sync?since=0"))
            .set("authorization", &format!("Bearer {SYNC}"))
            .call(),
    );
    assert_eq!((sync.0, sync.2.as_str()), (503, "store_unavailable"));
    let (status, _, code) = get("/readyz");
    assert_eq!((status, code.as_str()), (503, "store_unavailable"));
    assert_eq!(get("/healthz").0, 200, "alive, just not ready");
    assert!(child.try_wait().unwrap().is_none(), "still running");

    cluster.start_again();
    let start = Instant::now();
    while get("/readyz").0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never ready again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(admin("POST", "/v1/tokens").0, 201);
    let listed: serde_json::Value = ureq::get(&format!("{url}/v1/tokens"))
        .set("authorization", &format!("Bearer {ADMIN}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(listed["tokens"].as_array().unwrap().len(), 2);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn migrate_moves_a_sqlite_install_to_postgres_and_filters_keep_their_state() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("t.db");
    let port = free_port();
    let s = serve(&sqlite, port);
    let mut ids = vec![];
    for name in ["a", "b", "c"] {
        let v: serde_json::Value = s
            .admin("POST", "/v1/tokens")
            .send_string(&format!(r#"{{"name":"{name}","max_rps":5}}"#))
            .unwrap()
            .into_json()
            .unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    s.admin("POST", &format!("/v1/tokens/{}/suspend", ids[1]))
        .call()
        .unwrap();
    let sync = |url: &str, q: &str| -> serde_json::Value {
        ureq::get(&format!("{url}/v1/sync?{q}"))
            .set("authorization", &format!("Bearer {SYNC}"))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    let held = sync(&s.url, "since=0");
    let list = |url: &str| -> serde_json::Value {
        ureq::get(&format!("{url}/v1/tokens"))
            .set("authorization", &format!("Bearer {ADMIN}"))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    let before = list(&s.url);
    drop(s);

    let pg = tokengate_pgtest::shared().fresh_database();
    let migrate = |from: &str, to: &str| {
        Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["migrate", "--from", from, "--to", to])
            .output()
            .unwrap()
    };
    let from = format!("sqlite://{}", sqlite.display());
    let out = migrate(&from, &pg);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("copied 3 tokens (version 4)"), "{said}");

    let s = serve(&pg, free_port());
    assert_eq!(list(&s.url), before, "the same tokens, versions and usage");
    // A filter that held the SQLite store's state goes on from its version: no snapshot.
    let store_id = held["store_id"].as_str().unwrap();
    let next = sync(&s.url, &format!("since=4&store_id={store_id}&wait=1"));
    assert_eq!(
        (next["snapshot"].as_bool(), next["version"].as_u64()),
        (Some(false), Some(4))
    );
    // The target is no longer empty: a second run is refused and changes nothing.
    let again = migrate(&from, &pg);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("migrate into an empty one"),
        "{again:?}"
    );
    let missing = migrate("/nonexistent/t.db", &pg);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such file"));
    drop(s);
}

#[test]
fn guessable_credentials_are_refused_at_start_with_how_to_make_one() {
    for (var, weak) in [
        ("TOKENGATE_ADMIN_TOKEN", "aaaaaaaaaaaaaaaa"),
        ("TOKENGATE_ADMIN_TOKEN", "password12345678"),
        ("TOKENGATE_SYNC_TOKEN", "0123456789abcdef"),
    ] {
        let mut env = vec![("TOKENGATE_ADMIN_TOKEN", ADMIN)];
        env.retain(|(k, _)| *k != var);
        env.push((var, weak));
        refuses_to_start(&[], &env, "too easy to guess");
        refuses_to_start(&[], &env, "openssl rand -hex 32");
    }
    refuses_to_start(
        &["--admin-token", "abcabcabcabcabcabcabc"],
        &[],
        "--admin-token (TOKENGATE_ADMIN_TOKEN) is too easy to guess",
    );
}

/// Reads `stream` until the server closes it (end of file or reset); false if it stays
/// open for `within`.
fn closed_within(stream: &mut std::net::TcpStream, within: Duration) -> bool {
    let end = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

fn metric(url: &str, line_start: &str) -> u64 {
    let text = ureq::get(&format!("{url}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .unwrap_or_else(|| panic!("{line_start} not in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Sockets that send half a request, or nothing, or trickle a body, must not hold the
/// control plane: with an open-file limit of 256 (so a connection cap of 192), 400 of them
/// are opened; `/v1/sync` and the admin API still answer at once, a long-poll held longer
/// than every deadline still completes, and the server closes every hostile socket.
#[test]
fn slow_and_idle_clients_cannot_lock_out_sync_and_admins() {
    use std::io::Write;
    const HEADER_DEADLINE: Duration = Duration::from_secs(3);
    let dir = tempfile::tempdir().unwrap();
    let mut s = serve_limited(
        dir.path().join("t.db"),
        free_port(),
        &[
            "--header-read-timeout",
            "3s",
            "--idle-timeout",
            "4s",
            "--body-read-timeout",
            "3s",
        ],
        Some(256),
    );
    let addr = s.url.trim_start_matches("http://").to_string();
    let sync = |query: &str| {
        ureq::get(&format!("{}/v1/sync?{query}", s.url))
            .set("authorization", &format!("Bearer {SYNC}"))
            .timeout(Duration::from_secs(60))
            .call()
            .unwrap()
    };
    let first: serde_json::Value = sync("since=0").into_json().unwrap();
    // A long-poll on its own connection, held for 6 s: longer than the header, idle and
    // body deadlines; it must not be cut short or closed to make room.
    let poll_url = format!(
        "{}/v1/sync?since={}&store_id={}&wait=6",
        s.url,
        first["version"],
        first["store_id"].as_str().unwrap()
    );
    let poll = std::thread::spawn(move || {
        let t = Instant::now();
        let r = ureq::get(&poll_url)
            .set("authorization", &format!("Bearer {SYNC}"))
            .timeout(Duration::from_secs(60))
            .call();
        (
            t.elapsed(),
            r.map(|r| r.status()).map_err(|e| e.to_string()),
        )
    });
    // Let the poll reach the server before the flood.
    std::thread::sleep(Duration::from_millis(300));

    let server_addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut hostile: Vec<std::net::TcpStream> = (0..400)
        .map(|i| {
            let mut c = std::net::TcpStream::connect_timeout(&server_addr, Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("hostile connection {i}: {e}"));
            match i % 3 {
                0 => c.write_all(b"GET /v1/sync?since=0 HTTP/1.1\r\nHost: x\r\n").unwrap(),
                1 => c
                    .write_all(b"POST /v1/session HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\n{\"cred")
                    .unwrap(),
                _ => {}
            }
            c
        })
        .collect();
    let opened = Instant::now();

    // The filters' sync and the admin API answer within a second.
    let t = Instant::now();
    let r = sync("since=0");
    let sync_took = t.elapsed();
    assert_eq!(r.status(), 200);
    let t = Instant::now();
    let r = s.admin("GET", "/v1/tokens").call().unwrap();
    let admin_took = t.elapsed();
    assert_eq!(r.status(), 200);
    println!("with 400 hostile sockets: /v1/sync answered in {sync_took:?}, GET /v1/tokens in {admin_took:?}");
    assert!(
        sync_took < Duration::from_secs(1),
        "/v1/sync took {sync_took:?}"
    );
    assert!(
        admin_took < Duration::from_secs(1),
        "admin API took {admin_took:?}"
    );

    // Every hostile socket is closed: at the latest when its deadline passes.
    for (i, c) in hostile.iter_mut().enumerate() {
        let left = (opened + HEADER_DEADLINE + Duration::from_secs(20))
            .saturating_duration_since(Instant::now());
        assert!(closed_within(c, left), "hostile socket {i} still open");
    }
    println!(
        "all 400 closed {:?} after the last was opened",
        opened.elapsed()
    );

    let (held, status) = poll.join().unwrap();
    assert_eq!(status, Ok(200));
    assert!(
        held >= Duration::from_secs(5),
        "the long-poll was answered after {held:?}"
    );

    // A kept-alive connection that goes quiet is closed after the idle timeout.
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(closed_within(&mut idle, Duration::from_secs(4 + 20)));

    // A body that trickles is answered 408 once its deadline passes.
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"POST /v1/session HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 50\r\n\r\n{\"cre")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(3 + 20)))
        .unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    assert!(
        metric(
            &s.url,
            "tokengate_connections_closed_total{reason=\"evicted\"}"
        ) > 0
    );
    assert!(
        metric(
            &s.url,
            "tokengate_connections_closed_total{reason=\"header_timeout\"}"
        ) > 0
    );
    assert!(
        metric(
            &s.url,
            "tokengate_connections_closed_total{reason=\"idle_timeout\"}"
        ) > 0
    );
    assert!(
        metric(
            &s.url,
            "tokengate_connections_closed_total{reason=\"body_timeout\"}"
        ) > 0
    );
    let log = s.stop();
    assert!(log.contains("max_connections=192"), "{log}");
    assert!(!log.contains("Too many open files"), "{log}");
}

/// The log is plain text when stderr is not a terminal, with whole milliseconds; a refused
/// credential is logged with the client's address and never the credential itself; and
/// `--log-format json` writes one JSON object per line.
#[test]
fn logs_are_plain_or_json_and_name_the_address_of_a_refused_credential() {
    const GUESS: &str = "guessed-credential-5e0c2d7b9a";
    let dir = tempfile::tempdir().unwrap();
    let mut s = serve(dir.path().join("t.db"), free_port());
    let r = ureq::get(&format!("{}/v1/tokens", s.url))
        .set("authorization", &format!("Bearer {GUESS}"))
        .call();
    assert!(matches!(r, Err(ureq::Error::Status(401, _))));
    s.admin("GET", "/v1/tokens").call().unwrap();
    let log = s.stop();
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file: {log:?}"
    );
    assert!(!log.contains(GUESS) && !log.contains(ADMIN), "{log}");
    let refused = log
        .lines()
        .find(|l| l.contains("credential refused"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(refused.contains("client=127.0.0.1"), "{refused}");
    assert!(
        refused.contains("credential=\"admin\"") || refused.contains("credential=admin"),
        "{refused}"
    );
    let request = log
        .lines()
        .find(|l| l.contains("status=200") && l.contains("path=/v1/tokens"))
        .unwrap_or_else(|| panic!("{log}"));
    let ms = request
        .split("ms=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert!(
        ms.parse::<u64>().is_ok(),
        "not whole milliseconds: {request}"
    );

    let mut s = serve_with(
        dir.path().join("t.db"),
        free_port(),
        &["--log-format", "json"],
    );
    s.admin("GET", "/v1/tokens").call().unwrap();
    let log = s.stop();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let request = lines
        .iter()
        .find(|l| l["message"] == "request" && l["path"] == "/v1/tokens")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(request["status"], 200);
    assert!(request["ms"].is_u64(), "{request}");
    assert_eq!(request["client"], "127.0.0.1");
}
