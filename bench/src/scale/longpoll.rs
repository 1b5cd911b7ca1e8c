//! Many filters waiting on one control plane: `polls` long-polls held at once, the control
//! plane's memory while they wait, and how long one change takes to answer all of them.

use super::control_plane::ControlPlane;
use crate::procstat::rss_kib;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One poll's end: when its answer was complete, its status, whether it named the change.
struct Answer {
    at: Instant,
    status: u16,
    has_change: bool,
}

/// Open file descriptors of `pid` (its sockets, here), 0 if unreadable.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Threads of `pid` (the blocking pool grows with concurrent store calls), 0 if unreadable.
fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The soft `Max open files` of this process, from `/proc/self/limits`.
pub fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_file_limit(&text)
}

pub fn parse_open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.trim_start_matches("Max open files").split_whitespace();
    soft.into_iter().next()?.parse().ok()
}

/// The status code and, once the whole response is in, its body; `None` while incomplete.
pub fn complete_response(raw: &[u8]) -> Option<(u16, &[u8])> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })?;
    let body = &raw[end + 4..];
    (body.len() >= len).then(|| (status, &body[..len]))
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    // A thousand connects at once can overflow the listen backlog; a refused one retries.
    let mut tries = 0;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) if tries >= 20 => return Err(e),
            Err(_) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn poll(addr: SocketAddr, request: &str, sent: &AtomicUsize, change_id: &str) -> Option<Answer> {
    let mut stream = connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    sent.fetch_add(1, Ordering::SeqCst);
    let mut raw = Vec::with_capacity(2048);
    let mut buf = [0u8; 4096];
    loop {
        if let Some((status, body)) = complete_response(&raw) {
            let at = Instant::now();
            let has_change = String::from_utf8_lossy(body).contains(change_id);
            return Some(Answer {
                at,
                status,
                has_change,
            });
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
}

/// Opens `polls` long-polls on `cp` at its current version, checks that they are held,
/// waits `hold`, then changes `token_id` (`action`: `suspend` or `reactivate`) and times
/// every answer. A thread per poll, each with a small stack.
pub fn fan_out(
    cp: &ControlPlane,
    polls: usize,
    hold: Duration,
    token_id: &str,
    action: &str,
) -> Value {
    let (store_id, version, _) = cp.sync_state();
    let request = format!(
        "GET /v1/sync?since={version}&store_id={store_id}&wait={wait} HTTP/1.1\r\n\
         Host: {addr}\r\nAuthorization: Bearer {sync}\r\nConnection: close\r\n\r\n",
        wait = super::control_plane::SYNC_MAX_WAIT_SECONDS,
        addr = cp.addr(),
        sync = cp.sync_token,
    );
    let pid = cp.pid();
    // Lets the socket of the call above close, so that it is not counted as a poll's.
    std::thread::sleep(Duration::from_millis(200));
    let rss_before = rss_kib(pid);
    let fds_before = open_fds(pid);
    let threads_before = threads(pid);
    let sent = Arc::new(AtomicUsize::new(0));
    let request = Arc::new(request);
    let change_id = Arc::new(token_id.to_string());
    let addr = cp.addr();
    let handles: Vec<_> = (0..polls)
        .map(|_| {
            let (sent, request, change_id) = (sent.clone(), request.clone(), change_id.clone());
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || poll(addr, &request, &sent, &change_id))
                .expect("spawn a poll thread")
        })
        .collect();

    // Held = every request written, the server holding a socket for each (give or take
    // the odd unrelated descriptor), and a second later still no answer.
    let open_start = Instant::now();
    while (sent.load(Ordering::SeqCst) < polls || open_fds(pid) + polls / 100 < fds_before + polls)
        && open_start.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let open_seconds = open_start.elapsed().as_secs_f64();
    std::thread::sleep(hold);
    let answered_early = handles.iter().filter(|h| h.is_finished()).count();
    let held = sent.load(Ordering::SeqCst) - answered_early;
    let rss_held = rss_kib(pid);
    let fds_held = open_fds(pid);
    let threads_held = threads(pid);

    let requested = Instant::now();
    let r = cp
        .admin("POST", &format!("/v1/tokens/{token_id}/{action}"), None)
        .unwrap_or_else(|e| panic!("{action}: {e}"));
    let acked = Instant::now();
    assert_eq!(r.status, 200, "{action} answered {}", r.status);

    let answers: Vec<Option<Answer>> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or(None))
        .collect();
    // Each woken poll reads the store through `spawn_blocking`, so the blocking pool grows.
    let threads_after = threads(pid);
    let ok: Vec<&Answer> = answers
        .iter()
        .flatten()
        .filter(|a| a.status == 200 && a.has_change)
        .collect();
    let mut from_ack: Vec<f64> = ok
        .iter()
        .map(|a| a.at.saturating_duration_since(acked).as_secs_f64() * 1e3)
        .collect();
    let mut from_request: Vec<f64> = ok
        .iter()
        .map(|a| a.at.saturating_duration_since(requested).as_secs_f64() * 1e3)
        .collect();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    json!({
        "polls": polls,
        "hold_seconds": hold.as_secs_f64(),
        "held": held,
        "answered_before_change": answered_early,
        "answered_with_change": ok.len(),
        "failed": polls - ok.len(),
        "open_seconds": open_seconds,
        "control_plane_fds_before": fds_before,
        "control_plane_fds_held": fds_held,
        "control_plane_threads_before": threads_before,
        "control_plane_threads_held": threads_held,
        "control_plane_threads_after": threads_after,
        "rss_before_kib": rss_before,
        "rss_held_kib": rss_held,
        "api_ms": acked.duration_since(requested).as_secs_f64() * 1e3,
        "fanout_from_ack_ms": {
            "median": crate::median(&mut from_ack),
            "p99": crate::percentile(&mut from_ack, 0.99),
            "max": max(&from_ack),
        },
        "fanout_from_request_ms": {
            "median": crate::median(&mut from_request),
            "max": max(&from_request),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_complete_only_with_its_whole_body() {
        let full =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 4\r\n\r\n{}{}";
        assert_eq!(complete_response(full), Some((200, &b"{}{}"[..])));
        assert_eq!(complete_response(&full[..full.len() - 1]), None);
        assert_eq!(complete_response(b"HTTP/1.1 200 OK\r\ncontent-le"), None);
        // No length: a long-poll answer always has one, so this never counts as complete.
        assert_eq!(complete_response(b"HTTP/1.1 200 OK\r\n\r\n{}"), None);
    }

    #[test]
    fn the_soft_open_file_limit_is_read() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             63545                63545                processes\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_open_file_limit(limits), Some(1024));
        assert_eq!(parse_open_file_limit("nothing"), None);
    }
}
