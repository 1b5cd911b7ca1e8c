//! The real `tokengate serve` process, for what only the binary does: flags, background
//! jobs, signals and logs. Its log (stderr, at `TOKENGATE_LOG=debug`) is collected as it is
//! written, so a test can wait for a line instead of sleeping.

use super::{ADMIN, SYNC};
use std::ffi::OsStr;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the process may take to answer `/healthz`; generous, for a busy machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Server {
    pub child: Child,
    pub url: String,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

/// `tokengate serve` on `db` (a SQLite file or a PostgreSQL URL) and `port` with the test
/// credentials.
pub fn serve(db: impl AsRef<OsStr>, port: u16) -> Server {
    serve_with(db, port, &[])
}

/// [`serve`] with more options; waits for `/healthz`.
pub fn serve_with(db: impl AsRef<OsStr>, port: u16, args: &[&str]) -> Server {
    serve_limited(db, port, args, None)
}

/// [`serve_with`], optionally under a lower open-file limit (set by a shell that then execs
/// tokengate, so the child's pid is tokengate's).
pub fn serve_limited(
    db: impl AsRef<OsStr>,
    port: u16,
    args: &[&str],
    open_files: Option<u32>,
) -> Server {
    let mut cmd = match open_files {
        Some(n) => {
            let mut c = Command::new("sh");
            c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\"")])
                .arg(env!("CARGO_BIN_EXE_tokengate"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_tokengate")),
    };
    let mut child = cmd
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--db"])
        .arg(db)
        .args(args)
        .env("TOKENGATE_ADMIN_TOKEN", ADMIN)
        .env("TOKENGATE_SYNC_TOKEN", SYNC)
        .env("TOKENGATE_LOG", "debug")
        .env_remove("TOKENGATE_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        log,
        reader: Some(reader),
    };
    let start = Instant::now();
    while ureq::get(&format!("{}/healthz", server.url))
        .call()
        .is_err()
    {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!(
                "tokengate serve {args:?} exited ({status}):\n{}",
                server.stop()
            );
        }
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "tokengate serve did not come up in {READY_TIMEOUT:?}:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

impl Server {
    pub fn admin(&self, method: &str, path: &str) -> ureq::Request {
        ureq::request(method, &format!("{}{path}", self.url))
            .set("authorization", &format!("Bearer {ADMIN}"))
    }

    /// An admin call with an optional JSON body: the status and the body as JSON (null when
    /// it is not JSON), whatever the status.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let req = self.admin(method, path);
        let res = match body {
            Some(b) => req.set("content-type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// How many log lines so far contain `needle`.
    pub fn log_lines(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until the log has more than `seen` lines containing `needle`.
    pub fn wait_for_log(&self, needle: &str, seen: usize, timeout: Duration) {
        let start = Instant::now();
        while self.log_lines(needle) <= seen {
            assert!(
                start.elapsed() < timeout,
                "no new log line with {needle:?} in {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the process (SIGKILL) and returns its whole log.
    pub fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log()
    }

    /// Waits for the process to exit by itself, at most `timeout`; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "tokengate serve still running after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
