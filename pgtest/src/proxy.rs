//! A TCP proxy that can cut one client off from the database: put it between a replica and
//! PostgreSQL and point the replica's URL at it.
//!
//! [`Cut::Open`] forwards bytes both ways. [`Cut::Blackhole`] stops forwarding on every
//! connection, open or new, without closing anything: the silent partition, where only
//! timeouts tell. [`Cut::Reset`] closes every connection and refuses new ones: the loud
//! partition. Back to `Open`, new connections pass again (held ones stay dead, as after a
//! real partition).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    Open,
    Blackhole,
    Reset,
}

struct Shared {
    cut: Mutex<Cut>,
    /// Bumped on every cut, so that connections of an earlier epoch stay dead.
    epoch: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

pub struct TcpProxy {
    pub port: u16,
    shared: Arc<Shared>,
}

fn cut(s: &Shared) -> Cut {
    *s.cut.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies `from` to `to` while the proxy is open and the connection's epoch is current.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>, epoch: u64) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 16 * 1024];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let current = shared.epoch.load(Ordering::SeqCst) == epoch;
        match cut(&shared) {
            Cut::Reset => break,
            Cut::Blackhole => {
                thread::sleep(Duration::from_millis(20));
                continue;
            }
            Cut::Open if !current => {
                // Cut once: this connection never carries anything again.
                thread::sleep(Duration::from_millis(20));
                continue;
            }
            Cut::Open => {}
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("local addr").port();
        let shared = Arc::new(Shared {
            cut: Mutex::new(Cut::Open),
            epoch: AtomicU64::new(0),
            conns: Mutex::new(vec![]),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                match cut(&s) {
                    Cut::Reset => {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    }
                    // A silent partition: the connection is accepted and then nothing.
                    Cut::Blackhole => {
                        s.conns
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(client);
                        continue;
                    }
                    Cut::Open => {}
                }
                let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
                else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let epoch = s.epoch.load(Ordering::SeqCst);
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    let mut conns = s.conns.lock().unwrap_or_else(|p| p.into_inner());
                    conns.push(c2);
                    conns.push(s2);
                }
                let (c, sv) = match (client.try_clone(), server.try_clone()) {
                    (Ok(c), Ok(sv)) => (c, sv),
                    _ => continue,
                };
                let (s1, s2) = (s.clone(), s.clone());
                thread::spawn(move || pump(client, server, s1, epoch));
                thread::spawn(move || pump(sv, c, s2, epoch));
            }
        });
        TcpProxy { port, shared }
    }

    pub fn set(&self, to: Cut) {
        if to != Cut::Open {
            self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        }
        *self.shared.cut.lock().unwrap_or_else(|p| p.into_inner()) = to;
        if to == Cut::Reset {
            let mut conns = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
            for c in conns.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    /// `url` (of the real server) rewritten to go through this proxy.
    pub fn url(&self, url: &str, real_port: u16) -> String {
        url.replace(&format!(":{real_port}/"), &format!(":{}/", self.port))
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut conns = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        for c in conns.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
