//! The HTTP/1.1 server under the API, with limits for slow and idle clients, so that
//! sockets held open by someone who never finishes a request cannot lock the filters and
//! the admins out:
//!
//! * a new connection must deliver a complete request head within `header_read`, and so
//!   must a request that has started arriving on a kept-alive connection;
//! * a kept-alive connection with no request for `idle` is closed;
//! * a request body must arrive within `body_read` of its head (else 408);
//! * at most `max_connections` are open; when a new client arrives at the cap, the
//!   connection that has waited longest without a request in progress is closed for it.
//!
//! A request being answered is never idle, so a held `/v1/sync` long-poll keeps its
//! connection however long it waits.

use crate::metrics::{Closed, Metrics};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_read: Duration,
    pub idle: Duration,
    pub body_read: Duration,
    pub max_connections: usize,
}

/// File descriptors kept back from connections: the database and its journal, the
/// listener, log files, webhook calls.
const RESERVED_FDS: u64 = 64;

/// The default cap: the process's open-file limit less what the rest of the process needs,
/// so that accepting never fails for want of a file descriptor.
pub fn default_max_connections() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let usable = limit.map_or(u64::MAX, |n| n.saturating_sub(RESERVED_FDS));
    usize::try_from(usable.clamp(16, 1_000_000)).unwrap_or(1_000_000)
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(75),
            body_read: Duration::from_secs(30),
            max_connections: default_max_connections(),
        }
    }
}

/// The error a request body gives when it did not arrive in time.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimeout {}

/// Whether a body read failed because of the body deadline.
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<BodyTimeout>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A request body that fails with `BodyTimeout` once its deadline has passed.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    metrics: Arc<Metrics>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.metrics.connection_closed(Closed::BodyTimeout);
                Poll::Ready(Some(Err(Box::new(BodyTimeout))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One connection's state, shared by its task, its socket wrapper and its requests.
struct Conn {
    /// Requests whose answer is not ready yet.
    in_flight: AtomicUsize,
    /// Whether a request has begun on this connection.
    served: AtomicBool,
    /// Bytes of a request head have arrived since the last request began.
    head_started: AtomicBool,
    /// Milliseconds after `Server::epoch` since when it has waited for a request: the
    /// accept, the end of the last answer, or the first byte of a head after idling.
    waiting_since: AtomicU64,
    /// Chosen to be closed (when idle) to make room for a new client.
    evict: AtomicBool,
    /// Wakes its task when a deadline may have moved earlier, or it was chosen.
    wake: Notify,
}

impl Conn {
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// When the connection is due to be closed, and why; `None` while a request runs.
    fn due(&self, limits: &Limits, epoch: Instant) -> Option<(Instant, Closed)> {
        if !self.idle() {
            return None;
        }
        let since = epoch + Duration::from_millis(self.waiting_since.load(Ordering::Acquire));
        if self.evict.load(Ordering::Acquire) {
            return Some((since, Closed::Evicted));
        }
        if self.head_started.load(Ordering::Acquire) || !self.served.load(Ordering::Acquire) {
            Some((since + limits.header_read, Closed::HeaderTimeout))
        } else {
            Some((since + limits.idle, Closed::IdleTimeout))
        }
    }
}

/// Ends the request's part in keeping the connection busy when dropped.
struct InFlight {
    conn: Arc<Conn>,
    epoch: Instant,
}

impl InFlight {
    fn begin(conn: &Arc<Conn>, epoch: Instant) -> InFlight {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        conn.served.store(true, Ordering::Release);
        conn.head_started.store(false, Ordering::Release);
        InFlight {
            conn: conn.clone(),
            epoch,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn
            .waiting_since
            .store(millis(self.epoch), Ordering::Release);
        if self.conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn.wake.notify_one();
        }
    }
}

fn millis(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The socket, noting when the bytes of a new request head start to arrive.
struct Watched {
    stream: TcpStream,
    conn: Arc<Conn>,
    epoch: Instant,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before
            && this.conn.idle()
            && !this.conn.head_started.swap(true, Ordering::AcqRel)
        {
            // A new connection's deadline runs from the accept; a kept-alive one's from
            // the first byte of its next request.
            if this.conn.served.load(Ordering::Acquire) {
                this.conn
                    .waiting_since
                    .store(millis(this.epoch), Ordering::Release);
            }
            this.conn.wake.notify_one();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The open connections.
struct Registry {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Signalled whenever a connection ends.
    ended: Notify,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Chooses the connection that has waited longest without a request in progress, and
    /// tells it to close. False when every connection is busy.
    fn evict_one(&self) -> bool {
        let conns = self.lock();
        let victim = conns
            .values()
            .filter(|c| c.idle() && !c.evict.load(Ordering::Acquire))
            .min_by_key(|c| c.waiting_since.load(Ordering::Acquire));
        match victim {
            Some(c) => {
                c.evict.store(true, Ordering::Release);
                c.wake.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Waits until the connection is due to close, and says why.
async fn due(conn: &Conn, limits: &Limits, epoch: Instant) -> Closed {
    loop {
        match conn.due(limits, epoch) {
            None => conn.wake.notified().await,
            Some((at, why)) if at <= Instant::now() => return why,
            Some((at, _)) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = conn.wake.notified() => {}
                }
            }
        }
    }
}

struct Server {
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    registry: Registry,
    epoch: Instant,
}

impl Server {
    /// Takes a slot for a connection just accepted; it counts against the cap from now.
    fn register(&self, id: u64) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            head_started: AtomicBool::new(false),
            waiting_since: AtomicU64::new(millis(self.epoch)),
            evict: AtomicBool::new(false),
            wake: Notify::new(),
        });
        self.registry.lock().insert(id, conn.clone());
        self.metrics.connection_opened();
        conn
    }

    async fn connection(
        self: Arc<Self>,
        id: u64,
        conn: Arc<Conn>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: watch::Receiver<bool>,
    ) {
        // The connection's whole life at trace: enough to follow one client's sockets
        // without logging anything it sent.
        tracing::trace!(client = %peer, connection = id, "connection opened");
        // The socket lives inside `drive`: it is closed before the slot is given back.
        self.clone().drive(conn, stream, peer, stop).await;
        tracing::trace!(client = %peer, connection = id, "connection closed");
        self.registry.lock().remove(&id);
        self.metrics.connection_ended();
        self.registry.ended.notify_waiters();
    }

    async fn drive(
        self: Arc<Self>,
        conn: Arc<Conn>,
        stream: TcpStream,
        peer: SocketAddr,
        mut stop: watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(Watched {
            stream,
            conn: conn.clone(),
            epoch: self.epoch,
        });
        let server = self.clone();
        let busy = conn.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = InFlight::begin(&busy, server.epoch);
            let deadline = Instant::now() + server.limits.body_read;
            let metrics = server.metrics.clone();
            let mut req = req.map(|inner| {
                Body::new(DeadlineBody {
                    inner,
                    deadline,
                    sleep: None,
                    metrics,
                })
            });
            req.extensions_mut().insert(ConnectInfo(peer));
            let router = server.router.clone();
            async move {
                let resp = router.oneshot(req).await;
                drop(guard);
                resp
            }
        });
        let http = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
        tokio::pin!(http);
        let due = due(&conn, &self.limits, self.epoch);
        tokio::pin!(due);
        let mut stopping = *stop.borrow();
        if stopping {
            http.as_mut().graceful_shutdown();
        }
        loop {
            tokio::select! {
                r = http.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(client = %peer.ip(), error = %e, "connection ended");
                    }
                    break;
                }
                why = &mut due => {
                    // Dropping the connection closes the socket.
                    tracing::debug!(client = %peer.ip(), reason = why.as_str(), "closing connection");
                    self.metrics.connection_closed(why);
                    break;
                }
                r = stop.changed(), if !stopping => {
                    stopping = true;
                    if r.is_ok() {
                        http.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// Accept errors that mean "out of file descriptors" (or memory) rather than a bad client.
fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
            || code == rustix::io::Errno::NOBUFS.raw_os_error()
            || code == rustix::io::Errno::NOMEM.raw_os_error()
    )
}

/// Serves `router` on `listener` until `shutdown` completes, then lets the connections
/// finish their current answers (closing them as they go idle) and returns once all are
/// closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let server = Arc::new(Server {
        router,
        limits,
        metrics,
        registry: Registry {
            conns: Mutex::new(HashMap::new()),
            ended: Notify::new(),
        },
        epoch: Instant::now(),
    });
    let (stop_tx, stop) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut next_id = 0u64;
    'accept: loop {
        // At the cap, make room before accepting: close the idlest connection, or wait
        // for one to end when every connection is busy.
        while server.registry.len() >= limits.max_connections.max(1) {
            let ended = server.registry.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            server.registry.evict_one();
            tokio::select! {
                _ = &mut ended => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = &mut shutdown => break 'accept,
            }
        }
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    if is_exhaustion(&e) {
                        tracing::warn!(error = %e, open = server.registry.len(),
                            "cannot accept: out of file descriptors; closing an idle connection (lower --max-connections or raise the open-file limit)");
                        server.registry.evict_one();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        next_id += 1;
        let conn = server.register(next_id);
        tokio::spawn(
            server
                .clone()
                .connection(next_id, conn, stream, peer, stop.clone()),
        );
    }
    drop(listener);
    let _ = stop_tx.send(true);
    loop {
        let ended = server.registry.ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if server.registry.len() == 0 {
            break;
        }
        ended.await;
    }
}
