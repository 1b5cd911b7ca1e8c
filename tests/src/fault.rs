//! A fault-injecting HTTP proxy between Envoy and the control plane.
//!
//! Envoy's control-plane cluster points here instead of at `tokengate serve`. In
//! [`Fault::Pass`] every call is forwarded untouched; any other fault replaces the answer to
//! `GET /v1/sync` (other paths, such as `/v1/usage`, always pass). The proxy records when each
//! sync call came and what it got, and the most that were open at once, which is how a test
//! tells exponential backoff from a fixed retry or a storm of callouts, and one long-poll per
//! Envoy from one per worker.

use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What the proxy does with a sync call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward to the control plane.
    Pass,
    /// Answer at once with this status and a JSON error body.
    Status(u16),
    /// 200 with a body that is not JSON.
    Garbage,
    /// Forward, then send only half of the body the headers announce, and close.
    Truncated,
    /// 200 with a well-formed change list of this store whose versions are all 1: every
    /// record it carries is older than what the filter holds.
    OldVersion { store_id: String, record: Value },
    /// 200 with a body of this many bytes (a JSON string that never ends in time).
    Huge(usize),
    /// Hold the call this long, then forward it.
    Slow(Duration),
}

#[derive(Default)]
struct Counters {
    sync_calls: AtomicU64,
    open: AtomicU64,
    max_open: AtomicU64,
    /// When each sync call was answered from, and the fault it met.
    calls: Mutex<Vec<(Instant, Fault)>>,
}

/// A running proxy; stops accepting when dropped.
pub struct FaultProxy {
    pub port: u16,
    fault: Arc<Mutex<Fault>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (the control plane).
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let port = listener.local_addr().expect("local addr").port();
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (f, c, s) = (fault.clone(), counters.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (f, c) = (f.clone(), c.clone());
                thread::spawn(move || {
                    let _ = serve(conn, upstream, &f, &c);
                });
            }
        });
        FaultProxy {
            port,
            fault,
            counters,
            stop,
        }
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().expect("fault lock") = fault;
    }

    /// Sync calls seen so far.
    pub fn sync_calls(&self) -> u64 {
        self.counters.sync_calls.load(Ordering::SeqCst)
    }

    /// When each sync call so far came (once its request was read) and the fault it met.
    pub fn sync_call_log(&self) -> Vec<(Instant, Fault)> {
        self.counters
            .calls
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// The most sync calls that were open at the same moment.
    pub fn max_open_sync_calls(&self) -> u64 {
        self.counters.max_open.load(Ordering::SeqCst)
    }

    /// Forgets the high-water mark of open calls (e.g. after start-up).
    pub fn reset_max_open(&self) {
        let open = self.counters.open.load(Ordering::SeqCst);
        self.counters.max_open.store(open, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one request: head and `Content-Length` body.
fn read_request(conn: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = raw[head_end..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Ok((head, body))
}

/// The same request, closing the connection after one answer, so that the proxy can read
/// the control plane's answer to its end.
fn forward(upstream: SocketAddr, head: &str, body: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut cp = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
    cp.set_read_timeout(Some(Duration::from_secs(120)))?;
    cp.write_all(out.as_bytes())?;
    cp.write_all(body)?;
    let mut answer = Vec::new();
    cp.read_to_end(&mut answer)?;
    Ok(answer)
}

fn answer(status: u16, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} Fault\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn serve(
    mut conn: TcpStream,
    upstream: SocketAddr,
    fault: &Mutex<Fault>,
    counters: &Counters,
) -> io::Result<()> {
    let (head, body) = read_request(&mut conn)?;
    let is_sync = head
        .split_whitespace()
        .nth(1)
        .is_some_and(|p| p.starts_with("/v1/sync"));
    if !is_sync {
        let reply = forward(upstream, &head, &body)?;
        conn.write_all(&reply)?;
        return Ok(());
    }
    counters.sync_calls.fetch_add(1, Ordering::SeqCst);
    let open = counters.open.fetch_add(1, Ordering::SeqCst) + 1;
    counters.max_open.fetch_max(open, Ordering::SeqCst);
    let current = fault.lock().map(|f| f.clone()).unwrap_or(Fault::Pass);
    if let Ok(mut calls) = counters.calls.lock() {
        calls.push((Instant::now(), current.clone()));
    }
    let result = sync_reply(&mut conn, upstream, &head, &body, current);
    counters.open.fetch_sub(1, Ordering::SeqCst);
    result
}

fn sync_reply(
    conn: &mut TcpStream,
    upstream: SocketAddr,
    head: &str,
    body: &[u8],
    current: Fault,
) -> io::Result<()> {
    match current {
        Fault::Pass => {
            let reply = forward(upstream, head, body)?;
            conn.write_all(&reply)
        }
        Fault::Status(code) => conn.write_all(&answer(
            code,
            br#"{"error":"injected","message":"Injected by the fault proxy."}"#,
        )),
        Fault::Garbage => conn.write_all(&answer(200, b"<html>this is not JSON</html>")),
        Fault::Truncated => {
            let reply = forward(upstream, head, body)?;
            let head_end = reply
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(reply.len(), |i| i + 4);
            let body_len = reply.len() - head_end;
            conn.write_all(&reply[..head_end + body_len / 2])?;
            // Close without the rest: the announced length is never reached.
            conn.shutdown(Shutdown::Both)
        }
        Fault::OldVersion { store_id, record } => {
            let mut record = record;
            record["version"] = json!(1);
            let stale = json!({
                "store_id": store_id,
                "version": 1,
                "snapshot": false,
                "changes": [record],
                "token_count": 1,
            });
            conn.write_all(&answer(200, stale.to_string().as_bytes()))
        }
        Fault::Huge(n) => {
            let mut huge = Vec::with_capacity(n);
            huge.extend_from_slice(br#"{"store_id":""#);
            huge.resize(n, b'a');
            conn.write_all(&answer(200, &huge))
        }
        Fault::Slow(hold) => {
            // Envoy closes the connection when its callout times out; from then on the
            // call no longer counts as open.
            let until = Instant::now() + hold;
            conn.set_read_timeout(Some(Duration::from_millis(50)))?;
            let mut probe = [0u8; 1];
            while Instant::now() < until {
                match conn.peek(&mut probe) {
                    Ok(0) => return Ok(()),
                    Ok(_) => thread::sleep(Duration::from_millis(50)),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return Ok(()),
                }
            }
            let reply = forward(upstream, head, body)?;
            conn.write_all(&reply)
        }
    }
}
