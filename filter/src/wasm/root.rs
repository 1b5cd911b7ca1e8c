//! The root context: one per worker's VM. Every root context is a candidate sync leader
//! (the lease in shared data picks one) and flushes its worker's counts on each tick.

use super::calls::{self, Headers};
use super::request::Request;
use crate::config::Config;
use crate::host::{Call, Host, Level};
use crate::leader::{Answer, Leader};
use crate::metrics::{Counter, Gauge};
use crate::record::STATE_KEY;
use crate::request::IdentityHeaders;
use crate::scopes::ScopeCache;
use crate::store::{Clock, SharedStore, StoreError};
use crate::usage::{self, Tally};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, MetricType};
use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::Duration;

/// Proxy-wasm shared data: process-wide, guarded by one mutex, copied on every read.
pub struct HostStore;

impl SharedStore for HostStore {
    type Value = Vec<u8>;
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        calls::shared_get(key).map_err(|_| StoreError::Host)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        calls::shared_set(key, value, cas).map_err(|e| match e {
            calls::SetError::CasMismatch => StoreError::CasMismatch,
            calls::SetError::Host => StoreError::Host,
        })
    }
}

pub struct HostClock;

impl Clock for HostClock {
    fn now_nanos(&self) -> u64 {
        calls::now_nanos().unwrap_or(0)
    }
}

pub fn log(level: Level, message: &str) {
    calls::log(
        match level {
            Level::Info => calls::Level::Info,
            Level::Warn => calls::Level::Warn,
            Level::Error => calls::Level::Error,
        },
        message,
    );
}

/// Counter and gauge ids, defined once per VM; Envoy merges them by name across workers.
struct Metrics {
    counters: [Option<u32>; Counter::ALL.len()],
    gauges: [Option<u32>; Gauge::ALL.len()],
}

impl Metrics {
    fn define() -> Metrics {
        Metrics {
            counters: Counter::ALL
                .map(|c| hostcalls::define_metric(MetricType::Counter, c.name()).ok()),
            gauges: Gauge::ALL.map(|g| hostcalls::define_metric(MetricType::Gauge, g.name()).ok()),
        }
    }

    fn add(&self, c: Counter, n: u64) {
        let id = self.counters.get(c.index()).copied().flatten();
        if let (Some(id), Ok(n)) = (id, i64::try_from(n)) {
            if n > 0 {
                let _ = hostcalls::increment_metric(id, n);
            }
        }
    }

    fn record(&self, g: Gauge, value: u64) {
        if let Some(id) = self.gauges.get(g.index()).copied().flatten() {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// Request counts kept in the VM and handed to Envoy once per tick, which saves a host call
/// on every request.
#[derive(Default)]
pub struct Pending(RefCell<[u64; Counter::ALL.len()]>);

impl Pending {
    pub fn bump(&self, c: Counter) {
        if let Some(n) = self.0.borrow_mut().get_mut(c.index()) {
            *n += 1;
        }
    }

    fn flush(&self, metrics: &Metrics) {
        for (c, n) in Counter::ALL.iter().zip(self.0.borrow_mut().iter_mut()) {
            metrics.add(*c, std::mem::take(n));
        }
    }
}

/// What the root context shares with each request context.
pub struct Shared {
    pub config: Config,
    pub identity: IdentityHeaders,
    metrics: Metrics,
    /// This worker's request counts by token since its last tick.
    pub usage: RefCell<Tally>,
    /// This worker's fleet demand (requests that met a fleet-limited bucket) since then.
    pub fleet: RefCell<Tally>,
    pub outcomes: Pending,
    /// This VM's compiled scope set: compiled when the state's scope stamp moves.
    pub scopes: ScopeCache,
    /// The state key (loaded or not, snapshot generation) as of this worker's last tick.
    state: RefCell<Option<Vec<u8>>>,
}

/// Shared data as the request path reads it: the state key from the copy this worker
/// refreshes on each tick, everything else from shared data. The bench's waterfall showed
/// the state key read on every request to be a tenth of what the filter adds to a request
/// (a copy out of shared data under its process-wide lock). The state key only says whether
/// a snapshot is loaded and which generation it is: until one is loaded this worker reads
/// shared data on every request, so it serves as soon as the leader has loaded one; a later
/// snapshot's generation reaches it at its next tick, within `tick_ms`.
pub struct RequestStore<'a>(pub &'a Shared);

impl SharedStore for RequestStore<'_> {
    type Value = Vec<u8>;
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        if key == STATE_KEY {
            if let Some(state) = self.0.state.borrow().as_ref() {
                return Ok((Some(state.clone()), 0));
            }
            let (value, cas) = HostStore.get(key)?;
            self.0.state.borrow_mut().clone_from(&value);
            return Ok((value, cas));
        }
        HostStore.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        HostStore.set(key, value, cas)
    }
}

/// The shared queues through which workers hand their counts to the sync leader.
const USAGE_QUEUE: &str = "tokengate.usage";
const FLEET_QUEUE: &str = "tokengate.fleet";
/// Most batches the leader takes off the queue per tick, so a tick stays short.
const USAGE_BATCHES_PER_TICK: usize = 256;
/// Most entries per queued batch, so one batch stays small.
const USAGE_BATCH_ENTRIES: usize = 500;

/// The leader's host: proxy-wasm host calls.
struct WasmHost<'a> {
    shared: &'a Shared,
    queue: Option<u32>,
    fleet_queue: Option<u32>,
}

/// Takes the workers' batches off `queue` into `into`.
fn gather(queue: Option<u32>, into: &mut Tally, dropped: impl Fn(u64)) {
    let Some(queue) = queue else { return };
    for _ in 0..USAGE_BATCHES_PER_TICK {
        match hostcalls::dequeue_shared_queue(queue) {
            Ok(Some(bytes)) => match usage::decode_batch(&bytes) {
                Some(entries) => into.merge(entries),
                None => dropped(1),
            },
            _ => break,
        }
    }
}

impl Host for WasmHost<'_> {
    type Store = HostStore;
    fn store(&self) -> &HostStore {
        &HostStore
    }
    fn now_ms(&self) -> u64 {
        HostClock.now_nanos() / 1_000_000
    }
    fn send(&self, call: &Call<'_>) -> Result<u64, String> {
        hostcalls::dispatch_http_call(
            call.cluster,
            call.headers().to_vec(),
            call.body,
            vec![],
            Duration::from_millis(call.timeout_ms),
        )
        .map(u64::from)
        .map_err(|status| format!("{status:?}"))
    }
    fn gather_usage(&self, into: &mut Tally) {
        gather(self.queue, into, |n| self.count(Counter::UsageDropped, n));
    }
    fn gather_fleet(&self, into: &mut Tally) {
        // Lost demand only makes a share lag; it is no request's count.
        gather(self.fleet_queue, into, |_| {});
    }
    fn count(&self, counter: Counter, n: u64) {
        self.shared.metrics.add(counter, n);
    }
    fn record(&self, gauge: Gauge, value: u64) {
        self.shared.metrics.record(gauge, value);
    }
    fn log(&self, level: Level, message: &str) {
        log(level, message);
    }
}

pub struct Root {
    shared: Option<Rc<Shared>>,
    leader: Option<Leader>,
    usage_queue: Option<u32>,
    fleet_queue: Option<u32>,
}

impl Root {
    pub fn new() -> Root {
        Root {
            shared: None,
            leader: None,
            usage_queue: None,
            fleet_queue: None,
        }
    }

    fn host<'a>(&self, shared: &'a Shared) -> WasmHost<'a> {
        WasmHost {
            shared,
            queue: self.usage_queue,
            fleet_queue: self.fleet_queue,
        }
    }

    /// Every worker: hands this tick's counts to the queues.
    fn flush_usage(&self, shared: &Shared) {
        if let Some(queue) = self.usage_queue {
            let dropped = flush(&shared.usage, queue);
            shared.metrics.add(Counter::UsageDropped, dropped);
        }
        if let Some(queue) = self.fleet_queue {
            flush(&shared.fleet, queue);
        }
    }
}

/// Moves a worker's tally onto `queue`; returns the requests it could not hand over.
fn flush(tally: &RefCell<Tally>, queue: u32) -> u64 {
    let (entries, mut dropped) = {
        let mut tally = tally.borrow_mut();
        (tally.drain(), tally.take_dropped())
    };
    for batch in entries.chunks(USAGE_BATCH_ENTRIES) {
        if hostcalls::enqueue_shared_queue(queue, Some(&usage::encode_batch(batch))).is_err() {
            dropped += usage::requests(batch);
        }
    }
    dropped
}

/// The `:status` of a callout's answer; `None` when it failed without one.
fn response_status(num_headers: usize) -> Option<u32> {
    if num_headers == 0 {
        return None;
    }
    calls::map_value(Headers::HttpCallResponse, ":status")
        .ok()
        .flatten()
        .and_then(|v| {
            std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse::<u32>().ok())
        })
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let host = self.host(&shared);
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        let answer = Answer {
            status: response_status(num_headers),
            body_len: body_size,
        };
        leader.on_answer(&shared.config, &host, u64::from(token_id), answer, || {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
        });
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match Config::parse(&raw) {
            Ok(c) => c,
            Err(e) => {
                log(Level::Error, &e.to_string());
                return false;
            }
        };
        // Envoy's node id cannot be read yet while the plugin is configured: the first
        // ticks read it (see `on_tick`).
        let proxy_id = config.proxy_id.clone().unwrap_or_default();
        // std's RandomState is seeded from the host's random source (WASI random_get), so
        // each worker's root context gets its own lease identity.
        let holder = RandomState::new().build_hasher().finish();
        self.leader = Some(Leader::new(&config, holder, proxy_id));
        let _ = hostcalls::set_tick_period(Duration::from_millis(u64::from(config.tick_ms)));
        if config.usage_reporting {
            // Every worker's VM registers the same name and gets the same queue.
            self.usage_queue = hostcalls::register_shared_queue(USAGE_QUEUE).ok();
        }
        self.fleet_queue = hostcalls::register_shared_queue(FLEET_QUEUE).ok();
        self.shared = Some(Rc::new(Shared {
            usage: RefCell::new(Tally::new(config.usage_max_tokens)),
            fleet: RefCell::new(Tally::new(config.usage_max_tokens)),
            identity: IdentityHeaders::new(&config),
            config,
            metrics: Metrics::define(),
            outcomes: Pending::default(),
            scopes: ScopeCache::new(),
            state: RefCell::new(HostStore.get(STATE_KEY).ok().and_then(|(v, _)| v)),
        }));
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        shared.outcomes.flush(&shared.metrics);
        // This worker's counts first, so that the leader reports its own in the same tick.
        self.flush_usage(&shared);
        let host = self.host(&shared);
        if let Some(leader) = self.leader.as_mut() {
            if leader.proxy_id().is_empty() {
                // `node` is the proxy-wasm name; Envoy's attribute is `xds.node`.
                let node = [vec!["node", "id"], vec!["xds", "node", "id"]]
                    .into_iter()
                    .find_map(|path| hostcalls::get_property(path).ok().flatten());
                if let Some(id) = node.filter(|id| !id.is_empty()) {
                    leader.set_proxy_id(String::from_utf8_lossy(&id).into_owned());
                }
            }
            leader.on_tick(&shared.config, &host);
        }
        // A state the host cannot read is no state: requests fail closed until it can.
        *shared.state.borrow_mut() = HostStore.get(STATE_KEY).ok().and_then(|(v, _)| v);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request::new(self.shared.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
