//! Throwaway PostgreSQL clusters for tests: the real server (Debian's `postgresql` package;
//! `make test` installs it), initialised with `initdb` in a temporary directory, started with
//! `pg_ctl` on a free loopback port, and removed afterwards. No mock database.
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then every server command runs as
//! the `postgres` OS user (`runuser -u postgres --`) in a directory that user owns. As any
//! other user the commands run as that user.
//!
//! A cluster is stopped and its directory removed when the [`PgCluster`] is dropped. So that
//! nothing is left behind when the test process dies without unwinding (a `kill -9`, or
//! [`shared`], whose static is never dropped), each cluster also has a watchdog: a small shell
//! in its own session that waits for the test process to exit, then stops the server and
//! removes the directory.
//!
//! The binaries come from `$PG_BINDIR`, else `pg_config --bindir`, else the newest
//! `/usr/lib/postgresql/*/bin`.

pub mod proxy;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The database every cluster creates at start (beside `postgres`).
pub const DATABASE: &str = "tokengate";
/// The superuser, trusted on loopback without a password.
pub const USER: &str = "postgres";

/// Where the PostgreSQL server binaries are; panics naming `make test` when they are absent.
pub fn bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BINDIR").filter(|d| !d.is_empty()) {
        return checked(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("initdb").is_file() {
            return dir;
        }
    }
    // Debian's pg_config (libpq-dev) may point at a client-only directory; the server's
    // binaries are under /usr/lib/postgresql/<major>/bin.
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, dir)) => dir,
        None => checked(PathBuf::from("/usr/lib/postgresql/15/bin")),
    }
}

fn checked(dir: PathBuf) -> PathBuf {
    for tool in ["initdb", "pg_ctl", "psql"] {
        if !dir.join(tool).is_file() {
            panic!(
                "PostgreSQL's {tool} is not in {}: run `make test` (it installs Debian's \
                 `postgresql` package with apt) or set PG_BINDIR to the server's bin directory",
                dir.display()
            );
        }
    }
    dir
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A command that runs as the user owning the clusters (`postgres` when we are root).
fn as_owner(program: &Path) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", USER, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {cmd:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running (or stopped, see [`PgCluster::stop`]) PostgreSQL cluster of its own.
pub struct PgCluster {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    databases: AtomicU32,
}

impl PgCluster {
    /// Initialises and starts a cluster with a `tokengate` database; waits until it accepts
    /// connections.
    pub fn start() -> PgCluster {
        let bindir = bindir();
        let dir = if running_as_root() {
            let out = run(
                {
                    let mut c = Command::new("runuser");
                    c.args(["-u", USER, "--", "mktemp", "-d", "/tmp/tokengate-pg.XXXXXX"]);
                    c
                },
                "create the cluster directory as postgres",
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        } else {
            let out = run(
                {
                    let mut c = Command::new("mktemp");
                    c.args(["-d", "/tmp/tokengate-pg.XXXXXX"]);
                    c
                },
                "create the cluster directory",
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        };
        let cluster = PgCluster {
            bindir,
            dir,
            port: free_port(),
            databases: AtomicU32::new(0),
        };
        cluster.watchdog();
        let mut init = as_owner(&cluster.bindir.join("initdb"));
        init.arg("-D")
            .arg(cluster.data())
            .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            // The data directory is thrown away; the server itself still fsyncs commits.
            .arg("--no-sync");
        run(init, "initdb");
        cluster.start_again();
        cluster.psql("postgres", &format!("CREATE DATABASE {DATABASE}"));
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Stops the server and removes the directory once this process has exited, however
    /// it exits.
    fn watchdog(&self) {
        let stop = if running_as_root() {
            format!("runuser -u {USER} -- \"$2/pg_ctl\"")
        } else {
            "\"$2/pg_ctl\"".to_string()
        };
        let script = format!(
            "while kill -0 \"$1\" 2>/dev/null; do sleep 1; done; \
             {stop} -D \"$3/data\" stop -m immediate >/dev/null 2>&1; rm -rf \"$3\""
        );
        let spawned = Command::new("setsid")
            .args(["sh", "-c", &script, "tokengate-pg-watchdog"])
            .arg(std::process::id().to_string())
            .arg(&self.bindir)
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Err(e) = spawned {
            eprintln!(
                "pgtest: no watchdog for {} ({e}); Drop still cleans up",
                self.dir.display()
            );
        }
    }

    /// Starts the server again after [`PgCluster::stop`] (on the same port and data).
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300",
            self.port,
            self.dir.display()
        );
        let mut ctl = as_owner(&self.bindir.join("pg_ctl"));
        ctl.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "120", "-o", &options, "start"]);
        run(ctl, "pg_ctl start");
    }

    /// Stops the server the fast way (clients are disconnected, the data stays).
    pub fn stop(&self) {
        self.stop_mode("fast");
    }

    /// Stops the server as a crash would (no checkpoint; recovery at the next start).
    pub fn crash(&self) {
        self.stop_mode("immediate");
    }

    fn stop_mode(&self, mode: &str) {
        let mut ctl = as_owner(&self.bindir.join("pg_ctl"));
        ctl.arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "120", "-m", mode, "stop"]);
        run(ctl, "pg_ctl stop");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `tokengate` database's URL.
    pub fn url(&self) -> String {
        self.url_of(DATABASE)
    }

    pub fn url_of(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database in this cluster; its URL.
    pub fn fresh_database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{n}");
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url_of(&name)
    }

    /// Runs SQL with psql as the superuser; its output, unaligned and without headers.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let mut c = Command::new(self.bindir.join("psql"));
        c.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .args([
            "-p",
            &self.port.to_string(),
            "-U",
            USER,
            "-d",
            database,
            "-c",
            sql,
        ]);
        let out = run(c, "psql");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Waits until the server accepts connections again (after [`PgCluster::start_again`]
    /// returns it does; this is for a server restarted by someone else).
    pub fn wait_accepting(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let ok = Command::new(self.bindir.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "PostgreSQL not accepting after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut ctl = as_owner(&self.bindir.join("pg_ctl"));
        ctl.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = ctl.status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One cluster for the whole test process, started on first use; each test takes a
/// [`PgCluster::fresh_database`] in it. The watchdog removes it when the process exits.
pub fn shared() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(PgCluster::start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_starts_answers_restarts_and_is_removed() {
        let c = PgCluster::start();
        let dir = c.dir.clone();
        assert!(dir.join("data/PG_VERSION").is_file());
        assert_eq!(c.psql(DATABASE, "SELECT 40 + 2"), "42");
        let url = c.fresh_database();
        let db = url.rsplit('/').next().unwrap().to_string();
        c.psql(&db, "CREATE TABLE t (x int); INSERT INTO t VALUES (7)");
        c.stop();
        c.start_again();
        assert_eq!(
            c.psql(&db, "SELECT x FROM t"),
            "7",
            "data survive a restart"
        );
        drop(c);
        assert!(!dir.exists(), "the directory is removed");
    }
}
