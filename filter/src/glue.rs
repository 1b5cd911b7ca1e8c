//! The thin proxy-wasm layer: host calls in, decisions out. Every host call's error is
//! handled (a trapped VM would answer 503 to everything until reloaded).

use crate::abi;
use crate::authorize::{self, Denial, Outcome, Verdict};
use crate::config::Config;
use crate::forward;
use crate::grpc;
use crate::host::{self, Headers, Level};
use crate::metrics::{self, Counter, Gauge};
use crate::response;
use crate::store::{Clock, SharedStore, StoreError};
use crate::sync::{Phase, SyncClient, SyncFailure};
use crate::timefmt;
use crate::usage::{self, Reporter, Tally};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MetricType};
use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::new()) });
}}

const MAX_SYNC_BODY_BYTES: usize = 64 << 20;

struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        host::shared_get(key).map_err(|_| StoreError::Host)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        host::shared_set(key, value, cas).map_err(|e| match e {
            host::SetError::CasMismatch => StoreError::CasMismatch,
            host::SetError::Host => StoreError::Host,
        })
    }
}

struct HostClock;

impl Clock for HostClock {
    fn now_nanos(&self) -> u64 {
        host::now_nanos().unwrap_or(0)
    }
}

fn log(level: Level, message: &str) {
    host::log(level, message);
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

    fn counter(&self, c: Counter) -> Option<u32> {
        self.counters.get(c.index()).copied().flatten()
    }

    fn gauge(&self, g: Gauge) -> Option<u32> {
        self.gauges.get(g.index()).copied().flatten()
    }
}

fn bump(metric: Option<u32>) {
    add(metric, 1);
}

fn add(metric: Option<u32>, n: u64) {
    if let (Some(id), Ok(n)) = (metric, i64::try_from(n)) {
        if n > 0 {
            let _ = hostcalls::increment_metric(id, n);
        }
    }
}

/// The shared queue through which workers hand their counts to the sync leader.
const USAGE_QUEUE: &str = "tokengate.usage";
/// Most batches the leader takes off the queue per tick, so a tick stays short.
const USAGE_BATCHES_PER_TICK: usize = 256;
/// Most entries per queued batch, so one batch stays small.
const USAGE_BATCH_ENTRIES: usize = 500;

fn record(metric: Option<u32>, value: u64) {
    if let Some(id) = metric {
        let _ = hostcalls::record_metric(id, value);
    }
}

/// What the root context shares with each request context.
struct Shared {
    config: Config,
    metrics: Metrics,
    identity_headers: [String; 4],
    /// This worker's request counts since its last tick.
    usage: RefCell<Tally>,
    /// Allowed and denied requests since this worker's last tick: counted here and handed
    /// to Envoy once per tick, which saves a host call on every request.
    outcomes: Pending,
}

/// Counter increments kept in the VM until the next flush: (metric id, count).
#[derive(Default)]
struct Pending(RefCell<Vec<(u32, u64)>>);

impl Pending {
    fn bump(&self, metric: Option<u32>) {
        let Some(id) = metric else { return };
        let mut counts = self.0.borrow_mut();
        match counts.iter_mut().find(|(m, _)| *m == id) {
            Some((_, n)) => *n += 1,
            None => counts.push((id, 1)),
        }
    }

    fn flush(&self) {
        for (id, n) in self.0.borrow_mut().iter_mut() {
            add(Some(*id), std::mem::take(n));
        }
    }
}

struct Root {
    shared: Option<Rc<Shared>>,
    sync: SyncClient,
    proxy_id: String,
    pending: Option<u32>,
    usage_queue: Option<u32>,
    /// The leader's counts gathered from every worker, waiting for the next report.
    usage_pending: Tally,
    reporter: Reporter,
    usage_call: Option<u32>,
}

impl Root {
    fn new() -> Root {
        // std's RandomState is seeded from the host's random source (WASI random_get), so
        // each worker's root context gets its own lease identity.
        let holder = RandomState::new().build_hasher().finish();
        Root {
            shared: None,
            sync: SyncClient::new(holder),
            proxy_id: String::new(),
            pending: None,
            usage_queue: None,
            usage_pending: Tally::default(),
            reporter: Reporter::new(),
            usage_call: None,
        }
    }

    fn now_ms() -> u64 {
        HostClock.now_nanos() / 1_000_000
    }

    fn dispatch(&mut self, shared: &Shared, path: &str) {
        let cfg = &shared.config;
        let auth = format!("Bearer {}", cfg.sync_token);
        let headers = vec![
            (":method", "GET"),
            (":path", path),
            (":authority", cfg.control_plane_authority.as_str()),
            ("authorization", auth.as_str()),
            ("accept", "application/json"),
        ];
        let timeout = Duration::from_secs(u64::from(cfg.sync_wait_seconds) + 5);
        match hostcalls::dispatch_http_call(
            &cfg.control_plane_cluster,
            headers,
            None,
            vec![],
            timeout,
        ) {
            Ok(token) => self.pending = Some(token),
            Err(status) => {
                bump(shared.metrics.counter(Counter::SyncFailure));
                log(
                    Level::Warn,
                    &format!(
                        "cannot call cluster `{}` ({status:?}); retrying with backoff",
                        cfg.control_plane_cluster
                    ),
                );
                self.sync.on_dispatch_failed(cfg, Self::now_ms());
            }
        }
    }
}

impl Root {
    /// Every worker: hands this tick's counts to the queue.
    fn flush_usage(&mut self, shared: &Shared) {
        let Some(queue) = self.usage_queue else {
            return;
        };
        let (entries, dropped) = {
            let mut tally = shared.usage.borrow_mut();
            (tally.drain(), tally.take_dropped())
        };
        add(shared.metrics.counter(Counter::UsageDropped), dropped);
        for batch in entries.chunks(USAGE_BATCH_ENTRIES) {
            if hostcalls::enqueue_shared_queue(queue, Some(&usage::encode_batch(batch))).is_err() {
                add(
                    shared.metrics.counter(Counter::UsageDropped),
                    usage::requests(batch),
                );
            }
        }
    }

    /// The leader: gathers the workers' batches and sends a report when one is due.
    fn report_usage(&mut self, shared: &Shared) {
        let Some(queue) = self.usage_queue else {
            return;
        };
        if !self.sync.is_leader() {
            return;
        }
        for _ in 0..USAGE_BATCHES_PER_TICK {
            match hostcalls::dequeue_shared_queue(queue) {
                Ok(Some(bytes)) => match usage::decode_batch(&bytes) {
                    Some(entries) => self.usage_pending.merge(entries),
                    None => bump(shared.metrics.counter(Counter::UsageDropped)),
                },
                _ => break,
            }
        }
        add(
            shared.metrics.counter(Counter::UsageDropped),
            self.usage_pending.take_dropped(),
        );
        let cfg = &shared.config;
        let now = Self::now_ms();
        let next = self
            .reporter
            .on_tick(cfg, &mut self.usage_pending, &self.proxy_id, now);
        if !matches!(self.reporter.phase(), usage::Phase::Sending { .. }) {
            // The reporter gave up on the call in flight: its late answer must not count.
            self.usage_call = None;
        }
        let Some(body) = next else {
            return;
        };
        let auth = format!("Bearer {}", cfg.sync_token);
        let headers = vec![
            (":method", "POST"),
            (":path", cfg.usage_path.as_str()),
            (":authority", cfg.control_plane_authority.as_str()),
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        let timeout = Duration::from_millis(usage::report_timeout_ms(cfg));
        match hostcalls::dispatch_http_call(
            &cfg.control_plane_cluster,
            headers,
            Some(&body),
            vec![],
            timeout,
        ) {
            Ok(token) => self.usage_call = Some(token),
            Err(_) => {
                bump(shared.metrics.counter(Counter::UsageFailures));
                self.reporter
                    .on_result(cfg, &mut self.usage_pending, false, now);
            }
        }
    }

    fn on_usage_response(&mut self, shared: &Shared, num_headers: usize) {
        self.usage_call = None;
        let ok = num_headers > 0
            && response_status(num_headers).is_some_and(|s| (200..300).contains(&s));
        bump(if ok {
            shared.metrics.counter(Counter::UsageReports)
        } else {
            shared.metrics.counter(Counter::UsageFailures)
        });
        self.reporter
            .on_result(&shared.config, &mut self.usage_pending, ok, Self::now_ms());
    }
}

/// The `:status` of a callout's answer; `None` when it failed without one.
fn response_status(num_headers: usize) -> Option<u32> {
    if num_headers == 0 {
        return None;
    }
    host::map_value(Headers::HttpCallResponse, ":status")
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
        if self.usage_call == Some(token_id) {
            if let Some(shared) = self.shared.clone() {
                self.on_usage_response(&shared, num_headers);
            }
            return;
        }
        if self.pending != Some(token_id) {
            return;
        }
        self.pending = None;
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let status = response_status(num_headers);
        // A body this large is no sync answer (a full page of 100,000 records is ~30 MiB);
        // copying it into the VM could exhaust its memory, so it is refused unread.
        let body = if body_size > MAX_SYNC_BODY_BYTES {
            None
        } else {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
        };
        let (result, next) = self.sync.on_response(
            &shared.config,
            &HostStore,
            &self.proxy_id,
            Self::now_ms(),
            status,
            body.as_deref(),
        );
        match result {
            Ok(applied) => {
                bump(shared.metrics.counter(Counter::SyncSuccess));
                if let Some(state) = applied.state {
                    record(shared.metrics.gauge(Gauge::Tokens), state.token_count);
                    record(shared.metrics.gauge(Gauge::StateVersion), state.version);
                }
            }
            Err(e) => {
                bump(shared.metrics.counter(Counter::SyncFailure));
                let why = match e {
                    SyncFailure::Unreachable => "no answer".to_string(),
                    SyncFailure::Status(code) => format!("HTTP {code}"),
                    SyncFailure::Malformed => "malformed answer".to_string(),
                    SyncFailure::Store => "shared data write failed".to_string(),
                };
                log(
                    Level::Warn,
                    &format!("sync failed ({why}); keeping the current token state, retrying with backoff"),
                );
            }
        }
        if let Some(path) = next {
            self.dispatch(&shared, &path);
        }
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
        self.proxy_id = config.proxy_id.clone().unwrap_or_else(|| {
            hostcalls::get_property(vec!["node", "id"])
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        });
        let p = &config.identity_header_prefix;
        let identity_headers = [
            format!("{p}token-id"),
            format!("{p}token-name"),
            format!("{p}token-owner"),
            format!("{p}token-kind"),
        ];
        let _ = hostcalls::set_tick_period(Duration::from_millis(u64::from(config.tick_ms)));
        if config.usage_reporting {
            // Every worker's VM registers the same name and gets the same queue.
            self.usage_queue = hostcalls::register_shared_queue(USAGE_QUEUE).ok();
        }
        self.usage_pending = Tally::new(config.usage_max_tokens);
        self.shared = Some(Rc::new(Shared {
            usage: RefCell::new(Tally::new(config.usage_max_tokens)),
            config,
            metrics: Metrics::define(),
            identity_headers,
            outcomes: Pending::default(),
        }));
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        shared.outcomes.flush();
        let next = self
            .sync
            .on_tick(&shared.config, &HostStore, &self.proxy_id, Self::now_ms());
        if !matches!(self.sync.phase(), Phase::Polling { .. }) {
            // The machine gave up on the poll in flight: its late answer must not count.
            self.pending = None;
        }
        if let Some(path) = next {
            self.dispatch(&shared, &path);
        }
        self.flush_usage(&shared);
        self.report_usage(&shared);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            shared: self.shared.clone(),
            expires_at: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    /// `None` only if configuration failed, in which case Envoy refuses the filter anyway.
    shared: Option<Rc<Shared>>,
    /// The token's expiry, to announce on the response (inside the warning window only).
    expires_at: Option<String>,
}

const EXPIRES_HEADER: &str = "x-tokengate-token-expires";

fn header(name: &str) -> Option<Vec<u8>> {
    host::request_header(name)
}

/// Whether the request is gRPC, so that its refusal is a gRPC answer.
fn is_grpc() -> bool {
    let content_type = host::map_value(Headers::Request, "content-type")
        .ok()
        .flatten();
    grpc::is_grpc(content_type.as_deref())
}

/// Answers a refused request: the JSON refusal, or for gRPC a trailers-only answer whose
/// `grpc-status` Envoy sets from the code given (with `content-type: application/grpc`);
/// the message and the rest travel as metadata, so the body stays empty.
fn refuse(d: Denial, expires_at: Option<&str>, grpc: bool) {
    let (status, headers, body, grpc_status) = if grpc {
        let g = grpc::refusal(d);
        (
            g.http_status,
            g.metadata,
            String::new(),
            Some(g.code as u32),
        )
    } else {
        let r = response::refusal(d);
        (r.status, r.headers, r.body, None)
    };
    let mut headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
    if let Some(t) = expires_at {
        headers.push((EXPIRES_HEADER, t.as_bytes()));
    }
    if let Err(e) = host::send_local_response(status, &headers, body.as_bytes(), grpc_status) {
        log(
            Level::Warn,
            &format!("cannot send the {status} answer (host status {e})"),
        );
    }
}

/// Readies an admitted request for the upstream: removes the credential headers and any
/// client-sent tokengate header (see `forward`), then sets the identity headers. An error
/// means the upstream could see a secret or a spoofed identity, so the caller refuses.
fn forward_upstream(shared: &Shared, identity: &authorize::Identity) -> Result<(), String> {
    let status = |s| format!("host status {s}");
    let pairs = host::map_pairs(Headers::Request).map_err(status)?;
    let pairs = abi::decode_pairs(&pairs).ok_or("a malformed header map")?;
    let names = pairs.iter().map(|(name, _)| *name);
    for name in forward::headers_to_remove(&shared.config, names, &shared.identity_headers) {
        host::remove(Headers::Request, name).map_err(status)?;
    }
    let values: [&[u8]; 4] = [
        &identity.id,
        &identity.name,
        &identity.owner,
        identity.kind.as_str().as_bytes(),
    ];
    for (name, value) in shared.identity_headers.iter().zip(values) {
        // Replacing removes every client-sent copy before setting ours (Envoy's setCopy;
        // the first-copy-only behaviour was removed from Envoy long ago), in one host call
        // rather than a remove and an add.
        host::replace(Headers::Request, name, value).map_err(status)?;
    }
    Ok(())
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            refuse(Denial::StateUnavailable, None, is_grpc());
            return Action::Pause;
        };
        let cfg = &shared.config;
        let credential = authorize::extract(cfg, header);
        let now = HostClock.now_nanos();
        let verdict = if now == 0 {
            Verdict {
                outcome: Outcome::Deny(Denial::StateUnavailable),
                seen: None,
            }
        } else {
            authorize::judge(cfg, &HostStore, credential.as_deref(), now)
        };
        if let Some(seen) = &verdict.seen {
            if cfg.usage_reporting {
                let allowed = matches!(verdict.outcome, Outcome::Allow(_));
                let secs = (now / 1_000_000_000) as i64;
                shared.usage.borrow_mut().count(&seen.id, allowed, secs);
            }
            self.expires_at =
                authorize::expiry_to_announce(cfg, Some(seen), now).map(timefmt::rfc3339);
        }
        match verdict.outcome {
            Outcome::Allow(identity) => {
                if let Err(why) = forward_upstream(&shared, &identity) {
                    log(
                        Level::Warn,
                        &format!("cannot edit the request's headers ({why}); refusing it"),
                    );
                    self.expires_at = None;
                    let refusal = Denial::StateUnavailable;
                    shared
                        .outcomes
                        .bump(shared.metrics.counter(metrics::denied(refusal)));
                    refuse(refusal, None, is_grpc());
                    return Action::Pause;
                }
                shared
                    .outcomes
                    .bump(shared.metrics.counter(Counter::Allowed));
                Action::Continue
            }
            Outcome::Deny(d) => {
                shared
                    .outcomes
                    .bump(shared.metrics.counter(metrics::denied(d)));
                // Only a caller who may retry later learns when its token ends.
                let announce = match d {
                    Denial::RateLimited { .. } => self.expires_at.take(),
                    _ => None,
                };
                self.expires_at = None;
                refuse(d, announce.as_deref(), is_grpc());
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(t) = self.expires_at.take() {
            // Only a courtesy to the client: nothing to undo if the host refuses it.
            let _ = host::add(Headers::Response, EXPIRES_HEADER, t.as_bytes());
        }
        Action::Continue
    }
}
