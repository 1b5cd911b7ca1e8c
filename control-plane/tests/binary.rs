//! The real `tokengate serve` process: durability across `kill -9`, graceful shutdown,
//! start-up errors, and logs that never hold a secret.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN: &str = "admin-credential-0123456789";
const SYNC: &str = "sync-credential-0123456789";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    url: String,
}

fn serve(db: impl AsRef<std::ffi::OsStr>, port: u16) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--db"])
        .arg(db)
        .env("TOKENGATE_ADMIN_TOKEN", ADMIN)
        .env("TOKENGATE_SYNC_TOKEN", SYNC)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while ureq::get(&format!("{url}/healthz")).call().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "tokengate serve did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, url }
}

impl Server {
    fn admin(&self, method: &str, path: &str) -> ureq::Request {
        ureq::request(method, &format!("{}{path}", self.url))
            .set("authorization", &format!("Bearer {ADMIN}"))
    }

    fn stderr(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut s = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }
}

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

    let s = serve(&db, port);
    let got: serde_json::Value = s
        .admin("GET", &format!("/v1/tokens/{id}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(got["status"], "suspended");
    assert_eq!(got["version"], suspended["version"]);
    assert_eq!(got["max_rps"], 3);
    let log = s.stderr();
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

#[test]
fn sigterm_answers_held_long_polls_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = serve(dir.path().join("t.db"), free_port());
    let first: serde_json::Value = ureq::get(&format!("{}/v1/sync?since=0", s.url))
        .set("authorization", &format!("Bearer {SYNC}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let url = format!(
        "{}/v1/sync?since=0&store_id={}&wait=30",
        s.url,
        first["store_id"].as_str().unwrap()
    );
    let poll = std::thread::spawn(move || {
        let t = Instant::now();
        let r = ureq::get(&url)
            .set("authorization", &format!("Bearer {SYNC}"))
            .call();
        (t.elapsed(), r.map(|r| r.status()))
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (held, status) = poll.join().unwrap();
    assert_eq!(status.unwrap(), 200);
    assert!(
        held < Duration::from_secs(5),
        "poll held {held:?} after SIGTERM"
    );
    let exit = s.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
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
    let s = serve(&with_password, port);
    let got: serde_json::Value = s
        .admin("GET", &format!("/v1/tokens/{id}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(got["status"], "suspended");
    let log = s.stderr();
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
    drop(s.stderr());
    cluster.psql(
        url.rsplit('/').next().unwrap(),
        "UPDATE tokengate_schema SET version = 99",
    );
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("t.db");
    let s = serve(&sqlite, free_port());
    drop(s.stderr());
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
    drop(s.stderr());

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
    drop(s.stderr());
}
