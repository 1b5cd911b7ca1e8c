//! A `tokengate serve` of the scale bench's own (not the e2e harness's): the bench needs its
//! pid (memory, open sockets), its log level as shipped, a longer long-poll bound, and to
//! stop it cleanly around a bulk seed of its database.

use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokengate_e2e::{free_ports, http, random_hex, Binaries, Response};

/// Longest hold of a poll: longer than any phase of the bench, so that a held poll is
/// answered by the change the bench makes, not by its wait bound.
pub const SYNC_MAX_WAIT_SECONDS: u32 = 60;

/// A token secret: kept in memory only, never printed (its `Debug` is redacted).
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A token the bench created through the API and can present.
#[derive(Debug, Clone)]
pub struct Issued {
    pub id: String,
    pub secret: Secret,
}

pub struct ControlPlane {
    pub label: String,
    pub dir: PathBuf,
    pub port: u16,
    pub admin_token: String,
    pub sync_token: String,
    child: Option<Child>,
}

impl ControlPlane {
    /// A control plane on a fresh, empty database under `target/bench/scale/<label>/`.
    pub fn start(label: &str) -> ControlPlane {
        let dir = crate::out_dir().join("scale").join(label);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut cp = ControlPlane {
            label: label.to_string(),
            dir,
            port: free_ports(1)[0],
            admin_token: format!("admin-{}", random_hex(16)),
            sync_token: format!("sync-{}", random_hex(16)),
            child: None,
        };
        cp.spawn();
        cp
    }

    pub fn db(&self) -> PathBuf {
        self.dir.join("tokengate.db")
    }

    /// Starts it (again) on its database, port and credentials; waits for `/healthz`.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.label);
        let log_path = self.dir.join("control-plane.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", log_path.display()));
        let bin = Binaries::locate().tokengate;
        let child = Command::new(&bin)
            .arg("serve")
            .args(["--listen", &self.addr().to_string()])
            .arg("--db")
            .arg(self.db())
            .env("TOKENGATE_ADMIN_TOKEN", &self.admin_token)
            .env("TOKENGATE_SYNC_TOKEN", &self.sync_token)
            .env(
                "TOKENGATE_SYNC_MAX_WAIT_SECONDS",
                SYNC_MAX_WAIT_SECONDS.to_string(),
            )
            // The shipped default (one line per request): the figures are those of the
            // control plane as users run it.
            .env("TOKENGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if http(self.addr(), "GET", "/healthz", &[], None).is_ok_and(|r| r.status == 200) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "control plane {} exited ({status}) during start-up; see {}",
                    self.label,
                    log_path.display()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "control plane {} not healthy after 60 s",
                self.label
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops it with SIGTERM (SQLite checkpoints and closes), SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let start = Instant::now();
        while matches!(child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    pub fn admin(&self, method: &str, path: &str, body: Option<&str>) -> io::Result<Response> {
        let auth = format!("Bearer {}", self.admin_token);
        http(
            self.addr(),
            method,
            path,
            &[("Authorization", &auth), ("Accept", "application/json")],
            body,
        )
    }

    /// `(store_id, version, live token count)` from the first page of a fresh snapshot.
    pub fn sync_state(&self) -> (String, u64, u64) {
        let auth = format!("Bearer {}", self.sync_token);
        let r = http(
            self.addr(),
            "GET",
            "/v1/sync?since=0",
            &[("Authorization", &auth)],
            None,
        )
        .unwrap_or_else(|e| panic!("{}: GET /v1/sync: {e}", self.label));
        assert_eq!(r.status, 200, "{}: GET /v1/sync", self.label);
        let v = r.json();
        (
            v["store_id"].as_str().unwrap_or_default().to_string(),
            v["version"].as_u64().unwrap_or(0),
            v["token_count"].as_u64().unwrap_or(0),
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What creating tokens through the API gave.
pub struct Created {
    pub count: usize,
    pub seconds: f64,
    pub failures: usize,
    /// The first token created, to present through Envoy.
    pub first: Option<Issued>,
}

/// Creates `count` tokens with `POST /v1/tokens`, `clients` threads at once, one
/// connection per request (the e2e client sends `Connection: close`; on loopback a
/// connect costs tens of microseconds, far below the fsync each create waits for).
pub fn create_tokens(cp: &ControlPlane, prefix: &str, count: usize, clients: usize) -> Created {
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let first: Arc<Mutex<Option<Issued>>> = Arc::default();
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..clients {
            let (next, failures, first) = (next.clone(), failures.clone(), first.clone());
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let body = format!(r#"{{"name": "{prefix}-{i}"}}"#);
                match cp.admin("POST", "/v1/tokens", Some(&body)) {
                    Ok(r) if r.status == 201 => {
                        if i == 0 {
                            let v = r.json();
                            let id = v["id"].as_str().unwrap_or_default().to_string();
                            let secret = Secret(v["token"].as_str().unwrap_or_default().into());
                            *first.lock().expect("lock") = Some(Issued { id, secret });
                        }
                    }
                    // Only the status and error code: a body could hold a secret.
                    Ok(r) => {
                        eprintln!(
                            "scale: create on {}: {} {:?}",
                            cp.label,
                            r.status,
                            r.error_code()
                        );
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("scale: create on {}: {e}", cp.label);
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let first = first.lock().expect("lock").take();
    Created {
        count,
        seconds,
        failures: failures.load(Ordering::Relaxed),
        first,
    }
}

/// Inserts `rows` active, unlimited tokens straight into the control plane's `tokens`
/// table, in one transaction, with the versions and creation order the control plane
/// would have given them (the next versions after the store's, `meta.version` raised to
/// the last). Their hashes are random 32-byte values: nobody holds their secrets, and
/// the filter cannot tell them from `sha256` of real ones. No audit entries are written
/// (the sync never reads them). The control plane must be stopped.
///
/// Python's `sqlite3` module does the writing because the bench crate does not link
/// SQLite, and `python3` is already a requirement of `make run` / `make test`.
const SEED_PY: &str = r#"
import os, sqlite3, sys, time
db, n = sys.argv[1], int(sys.argv[2])
c = sqlite3.connect(db, isolation_level=None)
c.execute("PRAGMA journal_mode=WAL")
c.execute("PRAGMA synchronous=FULL")
schema = c.execute("PRAGMA user_version").fetchone()[0]
if schema < 3:
    sys.exit(f"schema version {schema}: expected >= 3 (tokens.created_seq)")
c.execute("BEGIN IMMEDIATE")
v0 = int(c.execute("SELECT COALESCE((SELECT value FROM meta WHERE key = 'version'), '0')").fetchone()[0])
s0 = c.execute("SELECT COALESCE(MAX(created_seq), 0) FROM tokens").fetchone()[0]
now = int(time.time())
rows = ((f"tok_seed{i:012d}", os.urandom(32).hex(), f"scale-seed-{i}", v0 + i, now, s0 + i)
        for i in range(1, n + 1))
c.executemany(
    "INSERT INTO tokens (id, hash, name, kind, owner, status, max_rps, burst, created_at,"
    " updated_at, expires_at, last_used_at, version, requests_allowed, requests_denied,"
    " rotated_at, retired, created_seq)"
    " VALUES (?1, ?2, ?3, 'user', 'bench', 'active', NULL, NULL, ?5, ?5, NULL, NULL, ?4,"
    " 0, 0, NULL, '[]', ?6)",
    rows)
c.execute("INSERT INTO meta (key, value) VALUES ('version', ?1)"
          " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(v0 + n),))
c.execute("COMMIT")
print(v0 + n)
"#;

/// Runs [`SEED_PY`]; returns the seconds it took.
pub fn seed(cp: &ControlPlane, rows: u64) -> f64 {
    assert!(cp.child.is_none(), "seed a stopped control plane only");
    let started = Instant::now();
    let out = Command::new("python3")
        .args(["-c", SEED_PY])
        .arg(cp.db())
        .arg(rows.to_string())
        .output()
        .unwrap_or_else(|e| panic!("run python3 (needed to seed the database): {e}"));
    assert!(
        out.status.success(),
        "seeding {} failed: {}",
        cp.db().display(),
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed().as_secs_f64()
}
