//! The native flavor: tokengate's core on Envoy's dynamic-module ABI. One [`Tokengate`] per
//! filter configuration, shared by every worker: the token records and rate state in
//! [`MemoryStore`], per-worker request and usage counts, and the sync leader, which runs on
//! Envoy's main thread, woken every `tick_ms` through the configuration's scheduler.

use crate::abi::{self, ConfigHandle, FilterHandle, Headers, LogLevel, Plugin, Scheduler};
use crate::store::MemoryStore;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokengate_filter::authorize::Denial;
use tokengate_filter::config::Config;
use tokengate_filter::host::{Call, Host, Level};
use tokengate_filter::leader::{Answer, Leader};
use tokengate_filter::metrics::{Counter, Gauge};
use tokengate_filter::request::{self, IdentityHeaders, Reply, RequestHeaders, EXPIRES_HEADER};
use tokengate_filter::scopes::ScopeCache;

use tokengate_filter::timefmt;
use tokengate_filter::usage::Tally;

/// The scheduler event that runs the leader's tick.
const TICK: u64 = 1;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while a lock was held was caught at the boundary; the data is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// One worker's counts, on its own cache lines so that workers do not contend.
#[repr(align(128))]
struct Worker {
    /// Requests by counter since the leader's last tick.
    counts: [AtomicU64; Counter::ALL.len()],
    /// Requests by token since the leader's last tick.
    usage: Mutex<Tally>,
    /// Fleet demand (requests that met a fleet-limited bucket) since then.
    fleet: Mutex<Tally>,
    /// This worker's compiled scope set: its own, so that the lock is never contended.
    scopes: ScopeCache,
}

impl Worker {
    fn new(cap: u32) -> Worker {
        Worker {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            usage: Mutex::new(Tally::new(cap)),
            fleet: Mutex::new(Tally::new(cap)),
            scopes: ScopeCache::new(),
        }
    }
}

/// Wakes the main thread every tick: the configuration's scheduler may be committed from any
/// thread, and this one does nothing else.
struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    /// Deleted only after the thread that commits it has ended.
    scheduler: Arc<Scheduler>,
}

impl Ticker {
    fn start(envoy: ConfigHandle, period: Duration) -> Result<Ticker, String> {
        let scheduler = Arc::new(envoy.scheduler().ok_or("Envoy gave no scheduler")?);
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let (stop, scheduler) = (Arc::clone(&stop), Arc::clone(&scheduler));
            thread::Builder::new()
                .name("tokengate-tick".into())
                .spawn(move || {
                    let (flag, wake) = &*stop;
                    let mut stopped = lock(flag);
                    while !*stopped {
                        scheduler.commit(TICK);
                        stopped = wake
                            .wait_timeout(stopped, period)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                })
                .map_err(|e| format!("cannot start the tick thread: {e}"))?
        };
        Ok(Ticker {
            stop,
            thread: Some(thread),
            scheduler,
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (flag, wake) = &*self.stop;
        *lock(flag) = true;
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // `scheduler` is deleted after this, when its last reference goes.
        let _ = &self.scheduler;
    }
}

pub struct Tokengate {
    config: Config,
    identity: IdentityHeaders,
    store: MemoryStore,
    workers: Box<[Worker]>,
    counters: [Option<usize>; Counter::ALL.len()],
    gauges: [Option<usize>; Gauge::ALL.len()],
    leader: Mutex<Leader>,
    /// For a request whose worker index has no [`Worker`] (never expected).
    scopes: ScopeCache,
    /// Panics caught outside any worker's request, since the last tick.
    panics: AtomicU64,
    ticker: Mutex<Option<Ticker>>,
}

/// Per stream: the expiry to announce on the response.
pub struct Stream {
    expires_at: Option<i64>,
}

/// The machine's host name: `proxy_id`'s default here, because the filter ABI does not give
/// Envoy's node id (in Kubernetes, the pod's name).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Tokengate {
    fn host_log(&self, level: Level, message: &str) {
        abi::log(
            match level {
                Level::Info => LogLevel::Info,
                Level::Warn => LogLevel::Warn,
                Level::Error => LogLevel::Error,
            },
            message,
        );
    }

    fn worker(&self, index: u32) -> Option<&Worker> {
        self.workers.get(index as usize % self.workers.len().max(1))
    }

    fn host(&self, envoy: ConfigHandle) -> NativeHost<'_> {
        NativeHost {
            plugin: self,
            envoy,
        }
    }

    /// Hands the workers' request counts to Envoy's counters.
    fn flush_counts(&self, host: &NativeHost<'_>) {
        for w in self.workers.iter() {
            for (c, n) in Counter::ALL.iter().zip(&w.counts) {
                host.count(*c, n.swap(0, Ordering::Relaxed));
            }
        }
        host.count(Counter::Panics, self.panics.swap(0, Ordering::Relaxed));
    }
}

/// A refusal, in the client's protocol ([`request::answer`]): Envoy's local reply for HTTP
/// clients; for gRPC clients a trailers-only answer sent as headers, because Envoy's local
/// reply would pick its own `grpc-status` for the HTTP status.
fn refuse(
    envoy: &FilterHandle<'_>,
    d: Denial,
    expires_at: Option<i64>,
    needed_scopes: Option<&str>,
) {
    let a = request::answer(&EnvoyHeaders(envoy), d, expires_at, needed_scopes);
    let metadata = a.headers.iter().map(|(n, v)| (*n, v.as_str()));
    match a.grpc {
        None => {
            let headers: Vec<(&str, &str)> = metadata.collect();
            envoy.send_response(a.status, &headers, a.body.as_bytes(), a.code);
        }
        Some(code) => {
            let code = (code as u32).to_string();
            let mut headers = vec![
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", code.as_str()),
            ];
            headers.extend(metadata);
            envoy.send_headers_only(&headers);
        }
    }
}

/// The request's headers, borrowed from Envoy.
struct EnvoyHeaders<'h, 'a>(&'h FilterHandle<'a>);

impl<'a> RequestHeaders for EnvoyHeaders<'_, 'a> {
    type Value = &'a [u8];
    fn get(&self, name: &str) -> Option<&'a [u8]> {
        match self.0.request_header(name) {
            // Sent more than once: no copy may pass for the credential (a later hop could read
            // another); read as the values joined, which is never a token.
            (Some(_), n) if n > 1 => Some(b","),
            (value, _) => value,
        }
    }
    fn remove_where(&mut self, doomed: &dyn Fn(&[u8]) -> bool) -> Result<(), String> {
        // The names are Envoy's: all are picked before any is removed. A request has a
        // handful to remove at most, kept on the stack; more (hostile) spill to the heap.
        const STACK: usize = 16;
        let mut on_stack: [&[u8]; STACK] = [&[]; STACK];
        let mut picked = 0;
        let mut spilled: Vec<&[u8]> = Vec::new();
        let listed = self.0.for_each_request_header_name(|name| {
            if !doomed(name) {
                return;
            }
            let seen = on_stack.get(..picked).unwrap_or_default();
            if seen.contains(&name) || spilled.contains(&name) {
                return;
            }
            match on_stack.get_mut(picked) {
                Some(slot) => {
                    *slot = name;
                    picked += 1;
                }
                None => spilled.push(name),
            }
        });
        if !listed {
            return Err("Envoy did not list the request headers".into());
        }
        let names = on_stack.get(..picked).unwrap_or_default();
        for name in names.iter().chain(&spilled) {
            if !self.0.remove_request_header(name) {
                return Err("Envoy refused to remove a header".into());
            }
        }
        Ok(())
    }
    fn set(&mut self, name: &str, value: &[u8]) -> Result<(), String> {
        if self.0.set_request_header(name, value) {
            Ok(())
        } else {
            Err(format!("Envoy refused to set {name}"))
        }
    }
}

impl Plugin for Tokengate {
    type Stream = Stream;

    fn configure(envoy: ConfigHandle, _name: &[u8], config: &[u8]) -> Option<Self> {
        let config = match Config::parse(config) {
            Ok(c) => c,
            Err(e) => {
                abi::log(LogLevel::Error, &e.to_string());
                return None;
            }
        };
        let counters = Counter::ALL.map(|c| envoy.define_counter(c.name()));
        let gauges = Gauge::ALL.map(|g| envoy.define_gauge(g.name()));
        let workers = (0..abi::concurrency().max(1) + 1)
            .map(|_| Worker::new(config.usage_max_tokens))
            .collect();
        let proxy_id = config.proxy_id.clone().unwrap_or_else(host_name);
        // Seeded from the OS's random source. There is one candidate per configuration, so
        // the lease is always this one's; the identity only has to be its own.
        let holder = RandomState::new().build_hasher().finish();
        let leader = Mutex::new(Leader::new(&config, holder, proxy_id));
        // `envoy --mode validate` only checks the configuration: nothing is started.
        let ticker = if abi::is_validation_mode() {
            None
        } else {
            match Ticker::start(envoy, Duration::from_millis(u64::from(config.tick_ms))) {
                Ok(t) => Some(t),
                Err(e) => {
                    abi::log(LogLevel::Error, &format!("tokengate: {e}"));
                    return None;
                }
            }
        };
        Some(Tokengate {
            identity: IdentityHeaders::new(&config),
            config,
            store: MemoryStore::new(),
            workers,
            counters,
            gauges,
            leader,
            scopes: ScopeCache::new(),
            panics: AtomicU64::new(0),
            ticker: Mutex::new(ticker),
        })
    }

    fn scheduled(&self, envoy: ConfigHandle, event: u64) {
        if event != TICK {
            return;
        }
        let host = self.host(envoy);
        self.flush_counts(&host);
        lock(&self.leader).on_tick(&self.config, &host);
    }

    fn callout_done(&self, envoy: ConfigHandle, callout: u64, answer: &abi::Answer<'_>) {
        let host = self.host(envoy);
        let got = Answer {
            status: answer.status(),
            body_len: answer.body_len(),
        };
        lock(&self.leader).on_answer(&self.config, &host, callout, got, || Some(answer.body()));
    }

    fn shutdown(&self) {
        // Stops the tick thread and deletes the scheduler before Envoy destroys the
        // configuration they point at.
        drop(lock(&self.ticker).take());
    }

    fn new_stream(&self, _envoy: &FilterHandle<'_>) -> Stream {
        Stream { expires_at: None }
    }

    fn request_headers(&self, stream: &mut Stream, envoy: &FilterHandle<'_>) -> Headers {
        #[cfg(feature = "waterfall-return")]
        return Headers::Continue;
        #[allow(unreachable_code)]
        let worker = self.worker(envoy.worker_index());
        let handled = request::handle(
            &self.config,
            &self.identity,
            &self.store,
            worker.map_or(&self.scopes, |w| &w.scopes),
            &mut EnvoyHeaders(envoy),
            now_nanos(),
            |c| {
                if let Some(w) = worker {
                    if c.usage {
                        lock(&w.usage).count(c.id, c.allowed, c.at);
                    }
                    if c.fleet {
                        lock(&w.fleet).count(c.id, c.allowed, c.at);
                    }
                }
            },
        );
        if let Some(trouble) = &handled.trouble {
            self.host_log(Level::Warn, trouble);
        }
        if let Some(n) = worker.and_then(|w| w.counts.get(handled.counter.index())) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        match handled.reply {
            Reply::Allow { expires_at } => {
                stream.expires_at = expires_at;
                Headers::Continue
            }
            Reply::Refuse {
                denial,
                expires_at,
                needed_scopes,
            } => {
                refuse(envoy, denial, expires_at, needed_scopes.as_deref());
                Headers::Stop
            }
        }
    }

    fn response_headers(&self, stream: &mut Stream, envoy: &FilterHandle<'_>) -> Headers {
        if let Some(exp) = stream.expires_at.take() {
            envoy.add_response_header(EXPIRES_HEADER, timefmt::rfc3339(exp).as_bytes());
        }
        Headers::Continue
    }

    fn request_panicked(&self, envoy: &FilterHandle<'_>) {
        self.panics.fetch_add(1, Ordering::Relaxed);
        refuse(envoy, Denial::StateUnavailable, None, None);
    }

    fn panicked(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
    }

    fn refuse_unconfigured(envoy: &FilterHandle<'_>) {
        refuse(envoy, Denial::StateUnavailable, None, None);
    }
}

/// The leader's host: Envoy's callbacks for the configuration, on the main thread.
struct NativeHost<'a> {
    plugin: &'a Tokengate,
    envoy: ConfigHandle,
}

impl Host for NativeHost<'_> {
    type Store = MemoryStore;

    fn store(&self) -> &MemoryStore {
        &self.plugin.store
    }

    fn now_ms(&self) -> u64 {
        now_nanos() / 1_000_000
    }

    fn send(&self, call: &Call<'_>) -> Result<u64, String> {
        let headers = call.headers().map(|(k, v)| (k, v.as_bytes()));
        self.envoy
            .http_callout(
                call.cluster,
                &headers,
                call.body.unwrap_or_default(),
                call.timeout_ms,
            )
            .map_err(|e| e.to_string())
    }

    fn gather_usage(&self, into: &mut Tally) {
        for w in self.plugin.workers.iter() {
            lock(&w.usage).move_into(into);
        }
    }

    fn gather_fleet(&self, into: &mut Tally) {
        for w in self.plugin.workers.iter() {
            lock(&w.fleet).move_into(into);
        }
    }

    fn count(&self, counter: Counter, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(id) = self.plugin.counters.get(counter.index()).copied().flatten() {
            self.envoy.increment_counter(id, n);
        }
    }

    fn record(&self, gauge: Gauge, value: u64) {
        if let Some(id) = self.plugin.gauges.get(gauge.index()).copied().flatten() {
            self.envoy.set_gauge(id, value);
        }
    }

    fn log(&self, level: Level, message: &str) {
        self.plugin.host_log(level, message);
    }
}
