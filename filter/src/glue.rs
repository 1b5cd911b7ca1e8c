//! The thin proxy-wasm layer: host calls in, decisions out. Every host call's error is
//! handled (a trapped VM would answer 503 to everything until reloaded).

use crate::authorize::{self, Denial, Outcome, Verdict};
use crate::config::Config;
use crate::metrics::{self, Counter, Gauge};
use crate::request_header;
use crate::response;
use crate::store::{Clock, SharedStore, StoreError};
use crate::sync::{Phase, SyncClient, SyncFailure};
use crate::timefmt;
use crate::usage::{self, Reporter, Tally};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::new()) });
}}

const MAX_SYNC_BODY_BYTES: usize = 64 << 20;

struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((value, cas)) => Ok((value, cas.unwrap_or(0))),
            Err(_) => Err(StoreError::Host),
        }
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let cas = if cas == 0 { None } else { Some(cas) };
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Host),
        }
    }
}

struct HostClock;

impl Clock for HostClock {
    fn now_nanos(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
            .unwrap_or(0)
    }
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
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
                    LogLevel::Warn,
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
    hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
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
                    LogLevel::Warn,
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
                log(LogLevel::Error, &e.to_string());
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
    request_header::get(name)
}

fn refuse(d: Denial, expires_at: Option<&str>) {
    let r = response::refusal(d);
    let mut headers: Vec<(&str, &str)> = r.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    if let Some(t) = expires_at {
        headers.push((EXPIRES_HEADER, t));
    }
    let _ = hostcalls::send_http_response(r.status, headers, Some(r.body.as_bytes()));
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            refuse(Denial::StateUnavailable, None);
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
        shared.outcomes.bump(
            shared
                .metrics
                .counter(metrics::for_outcome(&verdict.outcome)),
        );
        match verdict.outcome {
            Outcome::Allow(identity) => {
                for name in &cfg.token_headers {
                    let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
                }
                if cfg.bearer
                    && header("authorization")
                        .is_some_and(|v| authorize::bearer_token(&v).is_some())
                {
                    let _ =
                        hostcalls::remove_map_value(MapType::HttpRequestHeaders, "authorization");
                }
                let values: [&[u8]; 4] = [
                    &identity.id,
                    &identity.name,
                    &identity.owner,
                    identity.kind.as_str().as_bytes(),
                ];
                for (name, value) in shared.identity_headers.iter().zip(values) {
                    // Replacing removes every client-sent copy before setting ours (Envoy's
                    // setCopy; the first-copy-only behaviour was removed from Envoy long
                    // ago), in one host call rather than a remove and an add.
                    let _ = hostcalls::set_map_value_bytes(
                        MapType::HttpRequestHeaders,
                        name,
                        Some(value),
                    );
                }
                Action::Continue
            }
            Outcome::Deny(d) => {
                // Only a caller who may retry later learns when its token ends.
                let announce = match d {
                    Denial::RateLimited { .. } => self.expires_at.take(),
                    _ => None,
                };
                self.expires_at = None;
                refuse(d, announce.as_deref());
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(t) = self.expires_at.take() {
            let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, EXPIRES_HEADER, &t);
        }
        Action::Continue
    }
}
