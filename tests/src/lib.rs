//! End-to-end harness: a real `tokengate serve`, the real `demo-upstream` and a real Envoy
//! loading the real filter, wired together on free loopback ports. The filter is either
//! flavor ([`Flavor`]): the proxy-wasm `tokengate_filter.wasm` or the native dynamic module
//! `libtokengate_native.so`; [`flavored!`] runs a test once with each.
//!
//! Each [`Stack`] lives in its own temporary directory (database, rendered Envoy
//! configuration, one log file per process) and kills its processes when dropped, so tests
//! can run concurrently. When a test fails the directory is kept and its path printed, with
//! the tail of every log.
//!
//! Binaries are found as follows (build them with `make build`, or just run `make test`):
//! - control plane: `$TOKENGATE_BIN`, else `target/release/tokengate`
//! - demo upstream: `$DEMO_UPSTREAM_BIN`, else `target/release/demo-upstream`
//! - filter:        `$TOKENGATE_WASM`, else `target/wasm32-wasip1/release/tokengate_filter.wasm`
//! - native module: `$TOKENGATE_MODULE`, else `target/native/libtokengate_native.so`
//! - Envoy:         `$ENVOY_BIN`, else `.tools/envoy/envoy/_bin/envoy`
//!
//! Relative paths are taken from the workspace root.

pub mod browser;
pub mod fault;

use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a process gets to become ready. Generous: the machine may be busy with other
/// tests and Envoy compiles the wasm module on start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn locate(env: &str, default: &str, what: &str) -> PathBuf {
    let path = match std::env::var_os(env) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(default),
    };
    let path = if path.is_absolute() {
        path
    } else {
        workspace_root().join(path)
    };
    if !path.is_file() {
        panic!(
            "{what} not found at {} (set {env} to override). \
             Run `make test` (or `make build tools`) from the repository root: it installs and \
             builds everything the end-to-end tests need.",
            path.display()
        );
    }
    path
}

/// Which data-plane flavor a stack's Envoy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// The proxy-wasm filter (`envoy/envoy.yaml`).
    Wasm,
    /// The native dynamic module (`envoy/envoy-native.yaml`).
    Native,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Wasm => "wasm",
            Flavor::Native => "native",
        }
    }

    /// Where Envoy puts the filter's stats: wasm metrics and a dynamic module's metrics live
    /// under different namespaces; the names after it are the same.
    pub fn stat(self, name: &str) -> String {
        match self {
            Flavor::Wasm => format!("wasmcustom.{name}"),
            Flavor::Native => format!("dynamicmodulescustom.{name}"),
        }
    }

    fn template(self) -> &'static str {
        match self {
            Flavor::Wasm => "envoy/envoy.yaml",
            Flavor::Native => "envoy/envoy-native.yaml",
        }
    }
}

/// Runs test function `name(flavor: Flavor)` once per flavor, as the tests `name::wasm` and
/// `name::native`: `flavored!(name);` (attributes such as `#[ignore]` go before the name).
#[macro_export]
macro_rules! flavored {
    ($(#[$attr:meta])* $name:ident) => {
        mod $name {
            #[test]
            $(#[$attr])*
            fn wasm() {
                super::$name($crate::Flavor::Wasm)
            }
            #[test]
            $(#[$attr])*
            fn native() {
                super::$name($crate::Flavor::Native)
            }
        }
    };
}

/// Paths of everything a stack runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub tokengate: PathBuf,
    pub demo_upstream: PathBuf,
    pub envoy: PathBuf,
    pub wasm: PathBuf,
}

impl Binaries {
    /// Finds every binary, panicking with a message that names `make test` if one is missing.
    pub fn locate() -> Binaries {
        Binaries {
            tokengate: locate(
                "TOKENGATE_BIN",
                "target/release/tokengate",
                "control plane binary",
            ),
            demo_upstream: locate(
                "DEMO_UPSTREAM_BIN",
                "target/release/demo-upstream",
                "demo upstream binary",
            ),
            envoy: locate("ENVOY_BIN", ".tools/envoy/envoy/_bin/envoy", "Envoy binary"),
            wasm: locate(
                "TOKENGATE_WASM",
                "target/wasm32-wasip1/release/tokengate_filter.wasm",
                "tokengate filter (wasm)",
            ),
        }
    }

    /// The native module, panicking with a message that names `make test` if it is missing
    /// (only the stacks that run it need it).
    pub fn module(&self) -> PathBuf {
        locate(
            "TOKENGATE_MODULE",
            "target/native/libtokengate_native.so",
            "tokengate native module",
        )
    }

    /// The filter artifact of `flavor`.
    pub fn filter(&self, flavor: Flavor) -> PathBuf {
        match flavor {
            Flavor::Wasm => self.wasm.clone(),
            Flavor::Native => self.module(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// A tiny blocking HTTP/1.1 client: one connection per request (`Connection: close`), so
// successive calls through Envoy land on different worker threads.
// ---------------------------------------------------------------------------------------

/// An HTTP response as a test sees it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// First value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {:?}",
                self.status, self.body
            )
        })
    }

    /// The `error` field of a JSON error body, if any.
    pub fn error_code(&self) -> Option<String> {
        serde_json::from_str::<Value>(&self.body)
            .ok()?
            .get("error")?
            .as_str()
            .map(str::to_string)
    }
}

/// Sends one request and reads the whole response.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> io::Result<Response> {
    let timeout = Duration::from_secs(30);
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    exchange(stream, req.as_bytes(), method == "HEAD")
}

/// Sends bytes exactly as given (a request no well-behaved client would write) and reads
/// the response.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> io::Result<Response> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    exchange(stream, request, false)
}

/// `GET path` once per header set, one after another on one kept-alive connection, so that
/// every request lands on the same Envoy worker within a few milliseconds.
pub fn calls_on_one_connection(
    addr: SocketAddr,
    path: &str,
    requests: &[Vec<(&str, &str)>],
) -> io::Result<Vec<Response>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    stream.set_nodelay(true)?;
    let mut responses = Vec::with_capacity(requests.len());
    for headers in requests {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        let r = exchange_on(&mut stream, req.as_bytes(), false)?;
        if r.header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            return Err(bad(format!("the server closed the connection after {r:?}")));
        }
        responses.push(r);
    }
    Ok(responses)
}

fn exchange(mut stream: TcpStream, request: &[u8], head: bool) -> io::Result<Response> {
    exchange_on(&mut stream, request, head)
}

fn exchange_on(stream: &mut TcpStream, request: &[u8], head: bool) -> io::Result<Response> {
    stream.write_all(request)?;
    // Read until the response is complete by its own framing rather than until EOF: a
    // server may keep the socket open for a while after answering (Envoy's delayed close).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if response_complete(&raw, head) {
            break;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    parse_response(&raw, head)
}

/// True once `raw` holds a whole response: headers plus `Content-Length` bytes, or a
/// terminated chunked body. Without either, only EOF ends the response.
fn response_complete(raw: &[u8], head: bool) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head_text = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status_no_body = head_text
        .split_whitespace()
        .nth(1)
        .is_some_and(|s| s.starts_with('1') || s == "204" || s == "304");
    if head || status_no_body {
        return true;
    }
    let body = &raw[end + 4..];
    for line in head_text.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim() {
                "content-length" => {
                    return value
                        .trim()
                        .parse::<usize>()
                        .is_ok_and(|len| body.len() >= len)
                }
                "transfer-encoding" if value.contains("chunked") => {
                    return body.ends_with(b"0\r\n\r\n") && dechunk(body).is_ok()
                }
                _ => {}
            }
        }
    }
    false
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn parse_response(raw: &[u8], head: bool) -> io::Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad(format!("incomplete response ({} bytes)", raw.len())))?;
    let head_text = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let body = if head || status == 204 || status == 304 {
        Vec::new()
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        rest[..len.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("truncated chunk size"))?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim().to_string();
        let size = usize::from_str_radix(&size_text, 16)
            .map_err(|_| bad(format!("bad chunk size {size_text:?}")))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err(bad("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// Polls `predicate` (every 2 ms) until it returns true and returns how long that took;
/// panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut predicate: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if predicate() {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Like [`wait_until`], but returns `None` on timeout instead of panicking.
pub fn try_wait_until(timeout: Duration, mut predicate: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if predicate() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `n` distinct free loopback ports. The listeners are held until all are picked, so the
/// ports differ from one another; another process could still take one before we bind it,
/// which is unlikely enough on loopback with ephemeral ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// A random lower-case hex string of `bytes` bytes, from /dev/urandom.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A well-formed token (right shape and checksum) that no control plane ever issued.
pub fn unknown_token() -> String {
    let alphabet = tokengate_wire::token::BASE62;
    let mut buf = [0u8; tokengate_wire::token::RANDOM_LEN];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    let random: String = buf
        .iter()
        .map(|b| alphabet[(*b as usize) % alphabet.len()] as char)
        .collect();
    tokengate_wire::token::compose(&random).expect("compose a token")
}

/// The rendered configuration with one more endpoint in the control-plane cluster (another
/// replica on the same host), as `envoy/render.sh` does for `CONTROL_PLANE_PORTS`.
pub fn add_control_plane_endpoint(config: &str, port: u16) -> String {
    let mut out = String::with_capacity(config.len() + 200);
    let mut added = false;
    let mut in_cluster = false;
    for line in config.lines() {
        out.push_str(line);
        out.push('\n');
        if line.contains("cluster_name: tokengate_control_plane") {
            in_cluster = true;
        }
        if in_cluster && !added && line.trim_start().starts_with("- endpoint: {") {
            let (head, _) = line.split_at(line.find("port_value: ").expect("an endpoint line"));
            out.push_str(&format!("{head}port_value: {port} }} }} }}\n"));
            added = true;
        }
    }
    assert!(added, "no control-plane endpoint line in the configuration");
    out
}

/// Renders `envoy/envoy.yaml` (the shipped template) by replacing every `${NAME}`.
pub fn render_envoy_config(vars: &[(&str, String)]) -> String {
    render_envoy_template("envoy/envoy.yaml", vars)
}

/// Renders a shipped template (a path under the workspace root) by replacing every
/// `${NAME}`.
pub fn render_envoy_template(template: &str, vars: &[(&str, String)]) -> String {
    let template_path = workspace_root().join(template);
    let mut text = fs::read_to_string(&template_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", template_path.display()));
    for (name, value) in vars {
        text = text.replace(&format!("${{{name}}}"), value);
    }
    if let Some(pos) = text.find("${") {
        let rest: String = text[pos..].chars().take(40).collect();
        panic!("{template} has a placeholder the harness does not fill: {rest}");
    }
    text
}

// ---------------------------------------------------------------------------------------
// The stack
// ---------------------------------------------------------------------------------------

static STACK_SEQ: AtomicU32 = AtomicU32::new(0);

/// What [`Stack::start_with`] starts.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub control_plane: bool,
    pub envoy: bool,
    pub flavor: Flavor,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            control_plane: true,
            envoy: true,
            flavor: Flavor::Wasm,
        }
    }
}

/// A control plane, a demo upstream and an Envoy with the filter, on free loopback ports.
pub struct Stack {
    pub dir: PathBuf,
    pub bins: Binaries,
    /// The filter flavor every `start_envoy` runs.
    pub flavor: Flavor,
    pub admin_token: String,
    pub sync_token: String,
    pub control_plane_port: u16,
    pub upstream_port: u16,
    pub envoy_port: u16,
    pub envoy_admin_port: u16,
    /// The SQLite file of a single control plane (see `db`).
    pub db_path: PathBuf,
    /// `--db` of every control-plane process: `db_path`, or a PostgreSQL URL shared by the
    /// replicas of `start_fleet`.
    pub db: String,
    /// Ports of the replicas after the first (whose port is `control_plane_port`).
    pub replica_ports: Vec<u16>,
    /// Extra environment for the control-plane processes.
    pub control_plane_env: Vec<(String, String)>,
    /// `--db` of a given replica when it differs from `db` (a replica behind a proxy).
    pub replica_db: std::collections::BTreeMap<usize, String>,
    /// Extra plugin configuration fields (`"name": value, ...`) for the next `start_envoy`.
    pub plugin_extra: String,
    /// The plugin's `sync_wait_seconds` for the next `start_envoy` (the shipped config's 20).
    pub sync_wait_seconds: u32,
    /// Where the next `start_envoy` sends control-plane calls (a fault proxy, say);
    /// `None`: the control plane itself, or every replica.
    pub envoy_control_plane_port: Option<u16>,
    /// Text replacements `(from, to)` applied to the rendered Envoy configuration by the
    /// next `start_envoy`, for a test that needs a setting other than the shipped one;
    /// each `from` must occur in the configuration.
    pub envoy_config_edits: Vec<(String, String)>,
    /// `TOKENGATE_LOG` of the next `start_control_plane`: `debug` unless a test says
    /// otherwise, because the suite checks that no secret reaches any log.
    pub control_plane_log: String,
    /// Extra `tokengate serve` options for the next `start_control_plane`.
    pub control_plane_args: Vec<String>,
    control_plane: Option<Child>,
    replicas: Vec<Option<Child>>,
    upstream: Option<Child>,
    envoy: Option<Child>,
    control_plane_starts: u32,
    envoy_starts: u32,
}

fn log_file(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

impl Stack {
    /// Everything running and ready, with the wasm filter.
    pub fn start() -> Stack {
        Stack::start_with(Options::default())
    }

    /// Everything running and ready, with the filter of `flavor`.
    pub fn start_flavor(flavor: Flavor) -> Stack {
        Stack::start_with(Options {
            flavor,
            ..Options::default()
        })
    }

    /// Starts the demo upstream always, the control plane and Envoy as asked, and waits for
    /// what it started to be ready.
    pub fn start_with(opts: Options) -> Stack {
        let bins = Binaries::locate();
        let seq = STACK_SEQ.fetch_add(1, Ordering::SeqCst);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "tokengate-e2e-{}-{seq}-{nanos:x}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let ports = free_ports(4);
        let db_path = dir.join("tokengate.db");
        let mut stack = Stack {
            db: db_path.display().to_string(),
            db_path,
            replica_ports: vec![],
            control_plane_env: vec![],
            replica_db: Default::default(),
            replicas: vec![],
            dir,
            bins,
            flavor: opts.flavor,
            admin_token: format!("admin-{}", random_hex(16)),
            sync_token: format!("sync-{}", random_hex(16)),
            control_plane_port: ports[0],
            upstream_port: ports[1],
            envoy_port: ports[2],
            envoy_admin_port: ports[3],
            plugin_extra: String::new(),
            sync_wait_seconds: 20,
            envoy_control_plane_port: None,
            envoy_config_edits: Vec::new(),
            control_plane_log: "debug".into(),
            control_plane_args: Vec::new(),
            control_plane: None,
            upstream: None,
            envoy: None,
            control_plane_starts: 0,
            envoy_starts: 0,
        };
        stack.start_upstream();
        if opts.control_plane {
            stack.start_control_plane();
        }
        if opts.envoy {
            stack.start_envoy();
        }
        stack
    }

    pub fn control_plane_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.control_plane_port))
    }
    pub fn envoy_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.envoy_port))
    }
    pub fn envoy_admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.envoy_admin_port))
    }
    pub fn upstream_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.upstream_port))
    }
    pub fn control_plane_url(&self) -> String {
        format!("http://{}", self.control_plane_addr())
    }

    /// `n` control-plane replicas on the PostgreSQL database `db_url`, started at once (so
    /// that they race for the first migration) and waited for (`/readyz`), the demo
    /// upstream, and, if asked, an Envoy whose control-plane cluster lists every replica.
    pub fn start_fleet(db_url: &str, n: usize, envoy: bool) -> Stack {
        Stack::start_fleet_with(db_url, n, envoy, |_| {})
    }

    /// As `start_fleet`, with `prepare` run before any replica starts (to point one at a
    /// proxy through `replica_db`, say).
    pub fn start_fleet_with(
        db_url: &str,
        n: usize,
        envoy: bool,
        prepare: impl FnOnce(&mut Stack),
    ) -> Stack {
        assert!(n >= 1);
        let mut stack = Stack::start_with(Options {
            control_plane: false,
            envoy: false,
            ..Options::default()
        });
        stack.db = db_url.to_string();
        stack.replica_ports = free_ports(n - 1);
        stack.replicas = (1..n).map(|_| None).collect();
        prepare(&mut stack);
        for i in 0..n {
            stack.spawn_replica(i);
        }
        for i in 0..n {
            stack.wait_replica_ready(i);
        }
        if envoy {
            stack.start_envoy();
        }
        stack
    }

    /// How many control-plane replicas the stack has (running or not).
    pub fn replica_count(&self) -> usize {
        1 + self.replica_ports.len()
    }

    pub fn replica_port(&self, i: usize) -> u16 {
        if i == 0 {
            self.control_plane_port
        } else {
            self.replica_ports[i - 1]
        }
    }

    pub fn replica_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.replica_port(i)))
    }

    fn replica_child(&mut self, i: usize) -> &mut Option<Child> {
        if i == 0 {
            &mut self.control_plane
        } else {
            &mut self.replicas[i - 1]
        }
    }

    fn spawn_replica(&mut self, i: usize) {
        assert!(
            self.replica_child(i).is_none(),
            "replica {i} already running"
        );
        self.control_plane_starts += 1;
        let log = if i == 0 {
            self.dir.join("control-plane.log")
        } else {
            self.dir.join(format!("control-plane-{i}.log"))
        };
        let mut f = log_file(&log);
        let _ = writeln!(f, "---- harness: start #{} ----", self.control_plane_starts);
        let mut cmd = Command::new(&self.bins.tokengate);
        cmd.arg("serve")
            .arg("--listen")
            .arg(self.replica_addr(i).to_string())
            .arg("--db")
            .arg(self.replica_db.get(&i).unwrap_or(&self.db))
            .args(&self.control_plane_args)
            .env("TOKENGATE_ADMIN_TOKEN", &self.admin_token)
            .env("TOKENGATE_SYNC_TOKEN", &self.sync_token)
            .env("TOKENGATE_LOG", &self.control_plane_log);
        cmd.envs(self.control_plane_env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bins.tokengate.display()));
        *self.replica_child(i) = Some(child);
    }

    fn wait_replica_ready(&mut self, i: usize) {
        let addr = self.replica_addr(i);
        self.wait_ready(&format!("replica {i} /readyz"), |s| {
            http(addr, "GET", "/readyz", &[], None).is_ok_and(|r| r.status == 200)
                || s.exited(|s| s.replica_child(i))
        });
        if self.exited(|s| s.replica_child(i)) {
            panic!(
                "replica {i} exited during start-up; logs:\n{}",
                self.logs_tail(40)
            );
        }
    }

    /// Starts (again) replica `i` and waits until it is ready.
    pub fn start_replica(&mut self, i: usize) {
        self.spawn_replica(i);
        self.wait_replica_ready(i);
    }

    /// Kills replica `i` with SIGKILL and waits for it to be gone.
    pub fn kill_replica(&mut self, i: usize) {
        if let Some(mut child) = self.replica_child(i).take() {
            kill(&mut child);
        }
    }

    /// Whether replica `i` is still running.
    pub fn replica_alive(&mut self, i: usize) -> bool {
        !self.exited(|s| s.replica_child(i))
    }

    /// A call to replica `i` with the admin credential; `Err` when it cannot be reached.
    pub fn admin_on(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> io::Result<Response> {
        let auth = format!("Bearer {}", self.admin_token);
        let body = body.map(Value::to_string);
        http(
            self.replica_addr(i),
            method,
            path,
            &[("Accept", "application/json"), ("Authorization", &auth)],
            body.as_deref(),
        )
    }

    /// A metric of replica `i` (`GET /metrics`), by its whole series name.
    pub fn replica_metric(&self, i: usize, series: &str) -> Option<f64> {
        let r = http(self.replica_addr(i), "GET", "/metrics", &[], None).ok()?;
        r.body
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Envoy's `--base-id`: unique among live stacks because the admin port is, so two
    /// Envoys never share hot-restart shared memory.
    pub fn base_id(&self) -> u32 {
        u32::from(self.envoy_admin_port)
    }

    fn start_upstream(&mut self) {
        let log = self.dir.join("demo-upstream.log");
        let child = Command::new(&self.bins.demo_upstream)
            .arg("--listen")
            .arg(self.upstream_addr().to_string())
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bins.demo_upstream.display()));
        self.upstream = Some(child);
        let addr = self.upstream_addr();
        self.wait_ready("demo upstream", |s| {
            http(addr, "GET", "/", &[], None).is_ok_and(|r| r.status == 200)
                || s.exited(|s| &mut s.upstream)
        });
        self.check_alive("demo upstream", |s| &mut s.upstream, &log);
    }

    /// Puts an upstream the test runs itself (a gRPC server, say) in place of the demo
    /// upstream, which is stopped; takes effect at the next `start_envoy`.
    pub fn replace_upstream(&mut self, port: u16) {
        if let Some(mut child) = self.upstream.take() {
            kill(&mut child);
        }
        self.upstream_port = port;
    }

    /// Starts (or restarts) the control plane on the stack's database, port and
    /// credentials, and waits for `/healthz`.
    pub fn start_control_plane(&mut self) {
        assert!(
            self.control_plane.is_none(),
            "control plane already running"
        );
        self.control_plane_starts += 1;
        let log = self.dir.join("control-plane.log");
        let mut f = log_file(&log);
        let _ = writeln!(f, "---- harness: start #{} ----", self.control_plane_starts);
        let child = Command::new(&self.bins.tokengate)
            .arg("serve")
            .arg("--listen")
            .arg(self.control_plane_addr().to_string())
            .arg("--db")
            .arg(&self.db)
            .args(&self.control_plane_args)
            .envs(self.control_plane_env.iter().map(|(k, v)| (k, v)))
            .env("TOKENGATE_ADMIN_TOKEN", &self.admin_token)
            .env("TOKENGATE_SYNC_TOKEN", &self.sync_token)
            .env("TOKENGATE_LOG", &self.control_plane_log)
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bins.tokengate.display()));
        self.control_plane = Some(child);
        let addr = self.control_plane_addr();
        self.wait_ready("control plane /healthz", |s| {
            http(addr, "GET", "/healthz", &[], None).is_ok_and(|r| r.status == 200)
                || s.exited(|s| &mut s.control_plane)
        });
        self.check_alive("control plane", |s| &mut s.control_plane, &log);
    }

    /// Kills the control plane (as a crash would) and waits for it to be gone.
    pub fn stop_control_plane(&mut self) {
        if let Some(mut child) = self.control_plane.take() {
            kill(&mut child);
        }
    }

    /// Stops and starts the control plane on the same database and port.
    pub fn restart_control_plane(&mut self) {
        self.stop_control_plane();
        self.start_control_plane();
    }

    /// Renders the shipped template of the stack's flavor (`envoy/envoy.yaml` or
    /// `envoy/envoy-native.yaml`), starts Envoy and waits for its admin `/ready`.
    pub fn start_envoy(&mut self) {
        assert!(self.envoy.is_none(), "envoy already running");
        self.envoy_starts += 1;
        let filter = self.bins.filter(self.flavor).display().to_string();
        let filter_var = match self.flavor {
            Flavor::Wasm => "WASM_PATH",
            Flavor::Native => "MODULE_PATH",
        };
        let config = render_envoy_template(
            self.flavor.template(),
            &[
                ("LISTEN_ADDRESS", "127.0.0.1".into()),
                ("LISTEN_PORT", self.envoy_port.to_string()),
                ("ADMIN_ADDRESS", "127.0.0.1".into()),
                ("ADMIN_PORT", self.envoy_admin_port.to_string()),
                ("UPSTREAM_PORT", self.upstream_port.to_string()),
                (
                    "CONTROL_PLANE_PORT",
                    self.envoy_control_plane_port
                        .unwrap_or(self.control_plane_port)
                        .to_string(),
                ),
                ("UPSTREAM_HOST", "127.0.0.1".into()),
                ("CONTROL_PLANE_HOST", "127.0.0.1".into()),
                (filter_var, filter),
                ("SYNC_TOKEN", self.sync_token.clone()),
            ],
        );
        let anchor = r#""sync_wait_seconds": 20"#;
        assert!(
            config.contains(anchor),
            "the template changed: update the harness"
        );
        let mut fields = format!(r#""sync_wait_seconds": {}"#, self.sync_wait_seconds);
        if !self.plugin_extra.is_empty() {
            fields.push_str(&format!(", {}", self.plugin_extra));
        }
        let mut config = config.replace(anchor, &fields);
        for (from, to) in &self.envoy_config_edits {
            assert!(
                config.contains(from.as_str()),
                "the rendered envoy.yaml has no {from:?} to replace"
            );
            config = config.replace(from.as_str(), to);
        }
        if self.envoy_control_plane_port.is_none() {
            for i in 1..self.replica_count() {
                config = add_control_plane_endpoint(&config, self.replica_port(i));
            }
        }
        let config_path = self.dir.join("envoy.yaml");
        fs::write(&config_path, config).expect("write rendered envoy.yaml");
        // Envoy's log goes to stderr, captured in a file: `--log-path` is flushed only every
        // few seconds, too late for a test that reads the logs right after acting.
        let log = self.dir.join("envoy.log");
        let child = Command::new(&self.bins.envoy)
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", "2"])
            .arg("--base-id")
            .arg(self.base_id().to_string())
            // Killed stacks would otherwise leave hot-restart shared memory in /dev/shm.
            .arg("--disable-hot-restart")
            .args(["-l", "info"])
            // The filter's own log lines at debug: they must not leak secrets either.
            .args(["--component-log-level", "wasm:debug,dynamic_modules:debug"])
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bins.envoy.display()));
        self.envoy = Some(child);
        let admin = self.envoy_admin_addr();
        self.wait_ready("envoy admin /ready", |s| {
            http(admin, "GET", "/ready", &[], None).is_ok_and(|r| r.status == 200)
                || s.exited(|s| &mut s.envoy)
        });
        self.check_alive("envoy", |s| &mut s.envoy, &log);
    }

    /// Kills Envoy.
    pub fn stop_envoy(&mut self) {
        if let Some(mut child) = self.envoy.take() {
            kill(&mut child);
        }
    }

    fn exited(&mut self, which: impl Fn(&mut Stack) -> &mut Option<Child>) -> bool {
        match which(self) {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    fn wait_ready(&mut self, what: &str, mut ready: impl FnMut(&mut Stack) -> bool) {
        let start = Instant::now();
        while !ready(self) {
            if start.elapsed() > READY_TIMEOUT {
                panic!(
                    "{what} not ready after {READY_TIMEOUT:?}; logs in {}\n{}",
                    self.dir.display(),
                    self.logs_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn check_alive(
        &mut self,
        what: &str,
        which: impl Fn(&mut Stack) -> &mut Option<Child>,
        log: &Path,
    ) {
        if self.exited(which) {
            panic!(
                "{what} exited during start-up; its log ({}):\n{}",
                log.display(),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
    }

    // ---- calls -------------------------------------------------------------------------

    /// A control plane call with the admin credential; panics if the control plane cannot
    /// be reached.
    pub fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let auth = format!("Bearer {}", self.admin_token);
        self.admin_with(method, path, body, Some(&auth))
            .unwrap_or_else(|e| panic!("control plane {method} {path}: {e}"))
    }

    /// A control plane call with any (or no) `Authorization` header value.
    pub fn admin_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        authorization: Option<&str>,
    ) -> io::Result<Response> {
        let mut headers = vec![("Accept", "application/json")];
        if let Some(a) = authorization {
            headers.push(("Authorization", a));
        }
        let body = body.map(Value::to_string);
        http(
            self.control_plane_addr(),
            method,
            path,
            &headers,
            body.as_deref(),
        )
    }

    /// `POST /v1/tokens` with `body`; asserts 201 and returns `(id, secret)`.
    pub fn create_token(&self, body: Value) -> (String, String) {
        let r = self.admin("POST", "/v1/tokens", Some(&body));
        assert_eq!(
            r.status, 201,
            "create token {body}: {} {}",
            r.status, r.body
        );
        let v = r.json();
        let id = match &v["id"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("create response has no id: {other} in {}", r.body),
        };
        let secret = v["token"]
            .as_str()
            .unwrap_or_else(|| panic!("create response has no token: {}", r.body))
            .to_string();
        (id, secret)
    }

    /// `POST /v1/tokens/{id}/{action}` (suspend, reactivate); asserts 200.
    pub fn token_action(&self, id: &str, action: &str) -> Response {
        let r = self.admin("POST", &format!("/v1/tokens/{id}/{action}"), None);
        assert_eq!(r.status, 200, "{action} {id}: {} {}", r.status, r.body);
        r
    }

    /// `PATCH /v1/tokens/{id}`; asserts 200.
    pub fn update_token(&self, id: &str, body: Value) -> Response {
        let r = self.admin("PATCH", &format!("/v1/tokens/{id}"), Some(&body));
        assert_eq!(r.status, 200, "update {id} {body}: {} {}", r.status, r.body);
        r
    }

    /// `DELETE /v1/tokens/{id}`; asserts 204.
    pub fn revoke_token(&self, id: &str) {
        let r = self.admin("DELETE", &format!("/v1/tokens/{id}"), None);
        assert_eq!(r.status, 204, "revoke {id}: {} {}", r.status, r.body);
    }

    /// `GET /hello` through Envoy with `headers`.
    pub fn call(&self, headers: &[(&str, &str)]) -> Response {
        self.call_path("/hello", headers)
    }

    /// `GET path` through Envoy with `headers`.
    pub fn call_path(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        http(self.envoy_addr(), "GET", path, headers, None)
            .unwrap_or_else(|e| panic!("request through envoy GET {path}: {e}"))
    }

    /// `GET /hello` through Envoy with `X-API-Token: token`.
    pub fn call_with_token(&self, token: &str) -> Response {
        self.call(&[("X-API-Token", token)])
    }

    /// Waits until a request with `token` gets `status` and returns how long that took.
    pub fn wait_for_status(&self, token: &str, status: u16, timeout: Duration) -> Duration {
        let mut last = None;
        let r = try_wait_until(timeout, || {
            let r = self.call_with_token(token);
            let ok = r.status == status;
            last = Some(r);
            ok
        });
        match r {
            Some(d) => d,
            None => panic!(
                "timed out after {timeout:?} waiting for status {status}; last response: {:?}",
                last
            ),
        }
    }

    /// Envoy's counters and gauges whose names match the regex `filter`, by name.
    pub fn envoy_stats(&self, filter: &str) -> std::collections::BTreeMap<String, u64> {
        let r = self.envoy_admin(&format!("/stats?filter={filter}"));
        r.body
            .lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(": ")?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// One counter or gauge (0 when Envoy has not created it yet).
    pub fn envoy_stat(&self, name: &str) -> u64 {
        // The name as a regex matches itself (a dot matches a dot, among others).
        self.envoy_stats(name).get(name).copied().unwrap_or(0)
    }

    /// One of the filter's own stats (`tokengate.sync.failure`, ...), under the namespace of
    /// the stack's flavor.
    pub fn filter_stat(&self, name: &str) -> u64 {
        self.envoy_stat(&self.flavor.stat(name))
    }

    /// What would show a failed filter: for the wasm flavor, Envoy's count of wasm VMs
    /// created and of VM reloads (Envoy replaces a VM that failed, under the plugin's failure
    /// policy: a trap shows in one or the other); for the native module, its count of
    /// panics caught at the boundary (and Envoy answering at all).
    pub fn filter_health(&self) -> (u64, u64) {
        match self.flavor {
            Flavor::Wasm => self.vm_health(),
            Flavor::Native => (1, self.filter_stat("tokengate.panics")),
        }
    }

    /// Envoy's count of wasm VMs created and of VM reloads (Envoy replaces a VM that
    /// failed, under the plugin's failure policy): a trap shows in one or the other.
    pub fn vm_health(&self) -> (u64, u64) {
        let stats = self.envoy_stats("wasm");
        let created = stats.get("wasm.envoy.wasm.runtime.v8.created").copied();
        let reloads: u64 = stats
            .iter()
            .filter(|(name, _)| name.contains("vm_reload") && !name.ends_with("vm_reload_backoff"))
            .map(|(_, v)| v)
            .sum();
        (created.expect("Envoy counts created wasm VMs"), reloads)
    }

    /// An Envoy admin call (e.g. `/stats?filter=tokengate`).
    pub fn envoy_admin(&self, path: &str) -> Response {
        http(self.envoy_admin_addr(), "GET", path, &[], None)
            .unwrap_or_else(|e| panic!("envoy admin {path}: {e}"))
    }

    // ---- logs --------------------------------------------------------------------------

    fn log_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    /// Every process's log (control plane, demo upstream, Envoy) as one string, each file
    /// under a `==== name ====` heading.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for f in self.log_files() {
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            all.push_str(&format!("==== {name} ====\n"));
            all.push_str(&String::from_utf8_lossy(&fs::read(&f).unwrap_or_default()));
            all.push('\n');
        }
        all
    }

    /// The last `n` lines of every log.
    pub fn logs_tail(&self, n: usize) -> String {
        let mut all = String::new();
        for f in self.log_files() {
            let text = String::from_utf8_lossy(&fs::read(&f).unwrap_or_default()).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(n);
            all.push_str(&format!(
                "==== {} (last {} lines) ====\n",
                f.display(),
                lines.len() - from
            ));
            for l in &lines[from..] {
                all.push_str(l);
                all.push('\n');
            }
        }
        all
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let replicas: Vec<Child> = self.replicas.iter_mut().filter_map(Option::take).collect();
        for child in [
            self.envoy.take(),
            self.control_plane.take(),
            self.upstream.take(),
        ]
        .into_iter()
        .flatten()
        .chain(replicas)
        {
            let mut child = child;
            kill(&mut child);
        }
        if std::thread::panicking() {
            eprintln!(
                "test failed; stack directory kept: {}\n{}",
                self.dir.display(),
                self.logs_tail(40)
            );
        } else if std::env::var_os("TOKENGATE_E2E_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
