//! The real `tokengate serve` process, for tests of the binary and the CLI.

use super::{ADMIN, SYNC};
use std::ffi::OsStr;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
}

/// `db`: a SQLite file or a PostgreSQL URL.
pub fn serve(db: impl AsRef<OsStr>, port: u16) -> Server {
    serve_with(db, port, &[], None)
}

/// `tokengate serve` with more arguments, and optionally a lower open-file limit (set by a
/// shell that then execs tokengate, so the child's pid is tokengate's).
pub fn serve_with(
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
    let child = cmd
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--db"])
        .arg(db)
        .args(args)
        .env("TOKENGATE_ADMIN_TOKEN", ADMIN)
        .env("TOKENGATE_SYNC_TOKEN", SYNC)
        .env_remove("TOKENGATE_LOG_FORMAT")
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
    pub fn admin(&self, method: &str, path: &str) -> ureq::Request {
        ureq::request(method, &format!("{}{path}", self.url))
            .set("authorization", &format!("Bearer {ADMIN}"))
    }

    pub fn stderr(mut self) -> String {
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

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
