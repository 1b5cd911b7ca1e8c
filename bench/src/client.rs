//! The bench's own HTTP/1.1 load client, for the two sections that need to know *when* each
//! answer came and what it was (oha only reports aggregates): closed-loop keep-alive
//! connections, one OS thread each, recording every response; and pollers that report the
//! first time each connection sees a status after a given instant.
//!
//! Lean on purpose: the request bytes are built once, a response is parsed in place from a
//! fixed buffer (status line, `Content-Length`, `Connection: close`), and a sample is a few
//! bytes pushed onto a thread-local vector, so one core drives thousands of requests per
//! second and the client does not become the bottleneck it is measuring.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One answer: when its request was written and when its response was complete (both in
/// microseconds since the load started), and its status (0: no HTTP answer).
///
/// Both ends are kept because the filter decides somewhere between the two; a window count
/// that only trusts requests lying wholly inside the window never over-counts (see
/// `accuracy::worst_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub sent_us: u64,
    pub done_us: u64,
    pub status: u16,
}

/// `GET path` with `X-API-Token: token`, keep-alive. The bytes hold the secret: they are
/// written to the socket and nowhere else.
pub(crate) fn request_bytes(addr: SocketAddr, path: &str, token: &str) -> Arc<[u8]> {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nX-API-Token: {token}\r\n\r\n")
        .into_bytes()
        .into()
}

/// Headers bigger than this are not something the filter or a direct response send.
const BUF: usize = 16 * 1024;

/// One keep-alive connection that reconnects when the server closes it.
pub(crate) struct Conn {
    addr: SocketAddr,
    request: Arc<[u8]>,
    stream: Option<TcpStream>,
    buf: Box<[u8; BUF]>,
    reconnects: u64,
}

enum Framing {
    Length(usize),
    /// No `Content-Length` (nor chunking, which Envoy does not use for these small local
    /// and direct responses): the body runs to the end of the connection.
    UntilClose,
}

/// What a response's head says: status, where the body starts, how it is framed, and
/// whether the server will close the connection after it.
#[derive(Debug)]
struct Head {
    status: u16,
    body_start: usize,
    length: Option<usize>,
    close: bool,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Parses the head in `raw` if it is all there (`Ok(None)`: read more).
fn parse_head(raw: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = &raw[..end];
    let mut lines = head.split(|&b| b == b'\n');
    let status_line = lines.next().unwrap_or_default();
    // "HTTP/1.1 200 OK"
    let status = status_line
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let mut length = None;
    let mut close = status_line.starts_with(b"HTTP/1.0");
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| invalid("bad content-length"))?;
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(invalid("chunked responses are not expected here"));
        } else if name.eq_ignore_ascii_case(b"connection") && value.eq_ignore_ascii_case(b"close") {
            close = true;
        }
    }
    Ok(Some(Head {
        status,
        body_start: end + 4,
        length,
        close,
    }))
}

impl Conn {
    pub(crate) fn new(addr: SocketAddr, request: Arc<[u8]>) -> Conn {
        Conn {
            addr,
            request,
            stream: None,
            buf: Box::new([0; BUF]),
            reconnects: 0,
        }
    }

    fn connect(&mut self) -> io::Result<&mut TcpStream> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            // A stuck answer must not hang the bench: it shows as an error instead.
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.stream = Some(s);
            self.reconnects += 1;
        }
        Ok(self.stream.as_mut().expect("just connected"))
    }

    /// One request and its response; the status. Retries once on a fresh connection when
    /// a kept-alive one turns out closed before any byte of the answer (the server's idle
    /// close racing our next request), which is not an error of the server under test.
    pub(crate) fn call(&mut self, sent: &mut Instant) -> io::Result<u16> {
        let reused = self.stream.is_some();
        *sent = Instant::now();
        match self.exchange() {
            Ok(Some(status)) => Ok(status),
            Ok(None) if reused => {
                self.stream = None;
                *sent = Instant::now();
                self.exchange()?
                    .ok_or_else(|| invalid("closed before answering"))
            }
            Ok(None) => Err(invalid("closed before answering")),
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    /// `Ok(None)`: the connection was closed before any byte of a response.
    fn exchange(&mut self) -> io::Result<Option<u16>> {
        let request = Arc::clone(&self.request);
        let stream = self.connect()?;
        if stream.write_all(&request).is_err() {
            self.stream = None;
            return Ok(None);
        }
        let mut len = 0;
        let head = loop {
            let stream = self.stream.as_mut().expect("connected");
            let n = match stream.read(&mut self.buf[len..]) {
                Ok(n) => n,
                Err(e) if len == 0 && e.kind() == io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.stream = None;
                return if len == 0 {
                    Ok(None)
                } else {
                    Err(invalid("closed inside a response head"))
                };
            }
            len += n;
            if let Some(h) = parse_head(&self.buf[..len])? {
                break h;
            }
            if len == BUF {
                return Err(invalid("response head too large"));
            }
        };
        let framing = match head.length {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        };
        // The body is only skipped, so it is read over the same buffer.
        let mut have = len - head.body_start;
        loop {
            let done = match framing {
                Framing::Length(n) => have >= n,
                Framing::UntilClose => false,
            };
            if done {
                break;
            }
            let stream = self.stream.as_mut().expect("connected");
            let n = stream.read(&mut self.buf[..])?;
            if n == 0 {
                if matches!(framing, Framing::UntilClose) {
                    self.stream = None;
                    return Ok(Some(head.status));
                }
                self.stream = None;
                return Err(invalid("closed inside a response body"));
            }
            have += n;
        }
        if head.close || matches!(framing, Framing::UntilClose) {
            self.stream = None;
        }
        Ok(Some(head.status))
    }
}

fn micros(since: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(since).as_micros() as u64
}

/// Closed-loop load that runs until stopped: `connections` threads, each with its own
/// keep-alive connection, sending the next request as soon as the last is answered.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<(Vec<Sample>, u64, u64)>>,
    started: Instant,
}

/// What a [`Load`] saw.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Every answer (and failed attempt, status 0), sorted by completion time.
    pub samples: Vec<Sample>,
    /// HTTP answers, counted even when not recorded.
    pub answers: u64,
    /// Connections opened, beyond the first per thread.
    pub reconnects: u64,
    pub seconds: f64,
}

impl Load {
    /// Starts the load. With `record` false nothing is kept (background load), so it can
    /// run for as long as needed without growing.
    pub fn start(
        addr: SocketAddr,
        path: &str,
        token: &str,
        connections: usize,
        record: bool,
    ) -> Load {
        let request = request_bytes(addr, path, token);
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let threads = (0..connections)
            .map(|_| {
                let request = Arc::clone(&request);
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut conn = Conn::new(addr, request);
                    let mut samples = Vec::with_capacity(if record { 1 << 16 } else { 0 });
                    let mut sent = started;
                    let mut answers = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let status = match conn.call(&mut sent) {
                            Ok(s) => {
                                answers += 1;
                                s
                            }
                            Err(_) => {
                                // Refused or broken connections would otherwise spin.
                                std::thread::sleep(Duration::from_millis(1));
                                0
                            }
                        };
                        if record {
                            samples.push(Sample {
                                sent_us: micros(started, sent),
                                done_us: micros(started, Instant::now()),
                                status,
                            });
                        }
                    }
                    (samples, answers, conn.reconnects.saturating_sub(1))
                })
            })
            .collect();
        Load {
            stop,
            threads,
            started,
        }
    }

    /// The instant the samples' times count from.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Stops every connection (each finishes the request it has in flight) and gathers
    /// what they saw.
    pub fn stop(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        let seconds = self.started.elapsed().as_secs_f64();
        let mut out = LoadResult {
            seconds,
            ..LoadResult::default()
        };
        for t in self.threads {
            let (samples, answers, reconnects) = t.join().expect("a load thread panicked");
            out.samples.extend(samples);
            out.answers += answers;
            out.reconnects += reconnects;
        }
        out.samples.sort_unstable_by_key(|s| s.done_us);
        out
    }
}

/// Closed-loop load for `duration`, every answer recorded.
pub fn run(
    addr: SocketAddr,
    path: &str,
    token: &str,
    connections: usize,
    duration: Duration,
) -> LoadResult {
    let load = Load::start(addr, path, token, connections, true);
    std::thread::sleep(duration);
    load.stop()
}

/// Connections that poll continuously and, once armed with a status, note the first time
/// each of them sees it.
///
/// Arming is one atomic word (generation << 16 | status) that every poller reads after each
/// answer, so arming costs the pollers nothing and a trial needs no thread hand-off.
pub struct Poller {
    stop: Arc<AtomicBool>,
    shared: Arc<PollShared>,
    threads: Vec<JoinHandle<()>>,
}

struct PollShared {
    epoch: Instant,
    armed: AtomicU64,
    /// Per connection: the generation it last saw the armed status in, and when (ns since
    /// `epoch`).
    seen_gen: Vec<AtomicU64>,
    seen_at: Vec<AtomicU64>,
    polls: Vec<AtomicU64>,
    errors: Vec<AtomicU64>,
    reconnects: Vec<AtomicU64>,
}

impl Poller {
    /// Opens `connections` polling connections, one after another so that a balancer that
    /// counts connections (Envoy's exact_balance) spreads them evenly, and waits until every
    /// one has had an answer.
    pub fn start(addr: SocketAddr, path: &str, token: &str, connections: usize) -> Poller {
        let request = request_bytes(addr, path, token);
        let shared = Arc::new(PollShared {
            epoch: Instant::now(),
            armed: AtomicU64::new(0),
            seen_gen: (0..connections).map(|_| AtomicU64::new(0)).collect(),
            seen_at: (0..connections).map(|_| AtomicU64::new(0)).collect(),
            polls: (0..connections).map(|_| AtomicU64::new(0)).collect(),
            errors: (0..connections).map(|_| AtomicU64::new(0)).collect(),
            reconnects: (0..connections).map(|_| AtomicU64::new(0)).collect(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..connections {
            let mut conn = Conn::new(addr, Arc::clone(&request));
            conn.connect()
                .unwrap_or_else(|e| panic!("poller connect to {addr}: {e}"));
            let (stop, shared) = (Arc::clone(&stop), Arc::clone(&shared));
            threads.push(std::thread::spawn(move || {
                let mut sent = shared.epoch;
                while !stop.load(Ordering::Relaxed) {
                    let status = match conn.call(&mut sent) {
                        Ok(s) => s,
                        Err(_) => {
                            shared.errors[i].fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                    };
                    let at = shared.epoch.elapsed().as_nanos() as u64;
                    shared.polls[i].fetch_add(1, Ordering::Relaxed);
                    shared.reconnects[i].store(conn.reconnects - 1, Ordering::Relaxed);
                    let armed = shared.armed.load(Ordering::Acquire);
                    let gen = armed >> 16;
                    if gen != 0
                        && status == (armed & 0xffff) as u16
                        && shared.seen_gen[i].load(Ordering::Relaxed) != gen
                    {
                        shared.seen_at[i].store(at, Ordering::Relaxed);
                        shared.seen_gen[i].store(gen, Ordering::Release);
                    }
                }
            }));
        }
        let poller = Poller {
            stop,
            shared,
            threads,
        };
        let t = Instant::now();
        while poller.polls().contains(&0) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "pollers got no answer in 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        poller
    }

    /// From now on, each connection notes the first answer with `status`; returns the
    /// instant of arming. Answers to requests already in flight count: the observation is
    /// what is timed, not the request.
    pub fn arm(&self, status: u16) -> Instant {
        let gen = (self.shared.armed.load(Ordering::Relaxed) >> 16) + 1;
        let at = Instant::now();
        self.shared
            .armed
            .store(gen << 16 | u64::from(status), Ordering::Release);
        at
    }

    /// Waits until every connection has seen the armed status and returns when each did,
    /// or `None` after `timeout`.
    pub fn wait_all(&self, timeout: Duration) -> Option<Vec<Instant>> {
        let gen = self.shared.armed.load(Ordering::Relaxed) >> 16;
        let t = Instant::now();
        loop {
            if self
                .shared
                .seen_gen
                .iter()
                .all(|g| g.load(Ordering::Acquire) == gen)
            {
                let epoch = self.shared.epoch;
                return Some(
                    self.shared
                        .seen_at
                        .iter()
                        .map(|a| epoch + Duration::from_nanos(a.load(Ordering::Relaxed)))
                        .collect(),
                );
            }
            if t.elapsed() > timeout {
                return None;
            }
            // Short enough not to matter next to what is measured; the instants come from
            // the pollers, not from this loop.
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Answers so far, per connection.
    pub fn polls(&self) -> Vec<u64> {
        load_all(&self.shared.polls)
    }

    /// Failed attempts so far, per connection.
    pub fn errors(&self) -> Vec<u64> {
        load_all(&self.shared.errors)
    }

    /// Connections re-opened so far, per connection (a re-opened one may land on another
    /// worker).
    pub fn reconnects(&self) -> Vec<u64> {
        load_all(&self.shared.reconnects)
    }
}

fn load_all(v: &[AtomicU64]) -> Vec<u64> {
    v.iter().map(|a| a.load(Ordering::Relaxed)).collect()
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn head_parsing_reads_status_length_and_close() {
        let raw =
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 12\r\nConnection: close\r\n\r\n{}";
        let h = parse_head(raw).unwrap().unwrap();
        assert_eq!((h.status, h.length, h.close), (429, Some(12), true));
        assert_eq!(h.body_start, raw.len() - 2);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le")
            .unwrap()
            .is_none());
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length:3\r\n\r\n").unwrap();
        assert_eq!(h.unwrap().length, Some(3));
    }

    #[test]
    fn head_parsing_refuses_what_it_cannot_frame() {
        assert!(parse_head(b"HTTP/1.1 2x0 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }

    /// A server that answers two requests per connection, the body split over two writes,
    /// then closes: the client must frame by length and reconnect.
    #[test]
    fn keeps_alive_frames_by_length_and_reconnects_on_close() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut s = stream.unwrap();
                let mut buf = [0u8; 1024];
                for i in 0..2 {
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf).unwrap();
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    assert!(got.starts_with(b"GET /x HTTP/1.1\r\n"));
                    let close = if i == 1 { "connection: close\r\n" } else { "" };
                    let head = format!("HTTP/1.1 20{i} OK\r\ncontent-length: 6\r\n{close}\r\nab");
                    s.write_all(head.as_bytes()).unwrap();
                    s.flush().unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                    s.write_all(b"cdef").unwrap();
                }
            }
        });
        let mut conn = Conn::new(addr, request_bytes(addr, "/x", "t"));
        let mut sent = Instant::now();
        let got: Vec<u16> = (0..5).map(|_| conn.call(&mut sent).unwrap()).collect();
        assert_eq!(got, [200, 201, 200, 201, 200]);
        assert_eq!(conn.reconnects, 3);
    }
}
