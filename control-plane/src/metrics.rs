//! `GET /metrics`: the control plane's own figures in the Prometheus text format. Labels are
//! fixed words only (a route template, a method, a status, a store operation, an outcome, a
//! kind of credential, a reason): never a token, a token id or name, an owner, a credential
//! or a client address.

use crate::store::{
    AuditEntry, AuditQuery, AuditRecord, Changes, Delivery, DeliveryOutcome, DemandOf, DemandRow,
    Dump, Event, Expiring, ListQuery, Page, ProxySeen, QuotaDecision, QuotaSpent, QuotaWrite,
    ScopeDeletion, ScopeRow, ScopeSet, SessionRow, Store, StoreError, TokenRow, WarningRecord,
};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokengate_wire::{TokenDemand, UsageEntry};
use tokio::sync::watch;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if s <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }
}

/// Which credential a failed check presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// An admin credential in `Authorization: Bearer`.
    Admin,
    /// The sync credential (`/v1/sync`, `/v1/usage`).
    Sync,
    /// An admin credential at the console's sign-in (`POST /v1/session`).
    SignIn,
}

impl Credential {
    /// The throttle allowance it counts against: admin credentials share one.
    pub fn pool(self) -> crate::throttle::Pool {
        match self {
            Credential::Admin | Credential::SignIn => crate::throttle::Pool::Admin,
            Credential::Sync => crate::throttle::Pool::Sync,
        }
    }

    pub const ALL: [Credential; 3] = [Credential::Admin, Credential::Sync, Credential::SignIn];

    pub fn as_str(self) -> &'static str {
        match self {
            Credential::Admin => "admin",
            Credential::Sync => "sync",
            Credential::SignIn => "sign_in",
        }
    }
}

/// Why the server closed a connection on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No complete request head within `--header-read-timeout`.
    HeaderTimeout,
    /// No request within `--idle-timeout` after the last one.
    IdleTimeout,
    /// Closed while idle to make room under `--max-connections`.
    Evicted,
    /// A request body not received within `--body-read-timeout` (answered 408).
    BodyTimeout,
}

impl Closed {
    pub const ALL: [Closed; 4] = [
        Closed::HeaderTimeout,
        Closed::IdleTimeout,
        Closed::Evicted,
        Closed::BodyTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::Evicted => "evicted",
            Closed::BodyTimeout => "body_timeout",
        }
    }
}

/// How a sync answer went.
#[derive(Debug, Clone, Copy)]
pub enum SyncAnswer {
    Changes,
    NoChange,
    Snapshot,
}

/// Counters and gauges, updated where things happen.
#[derive(Default)]
pub struct Metrics {
    auth_failures: [AtomicU64; 3],
    auth_throttled: AtomicU64,
    connections_open: AtomicU64,
    connections_accepted: AtomicU64,
    connections_closed: [AtomicU64; 4],
    polls_held: AtomicI64,
    sync_changes: AtomicU64,
    sync_no_change: AtomicU64,
    sync_snapshot: AtomicU64,
    webhook_delivered: AtomicU64,
    webhook_retried: AtomicU64,
    webhook_gave_up: AtomicU64,
    jobs_runs: AtomicU64,
    purge_runs: AtomicU64,
    store: Mutex<BTreeMap<&'static str, Histogram>>,
    store_errors: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    http: Mutex<BTreeMap<(String, String, u16), u64>>,
}

/// Counts a held long-poll while it lives.
pub struct HeldPoll<'a>(&'a Metrics);

impl Drop for HeldPoll<'_> {
    fn drop(&mut self) {
        self.0.polls_held.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere mid-update of plain counters.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the exposition reads from the store and the feed at the moment it is rendered.
pub struct Live {
    pub ready: bool,
    pub backend: &'static str,
    pub version: u64,
    /// Pool figures: (open, idle, waiting, most allowed).
    pub pool: Option<(usize, usize, usize, usize)>,
    pub feed_reads: u64,
}

impl Live {
    pub fn of(store: &dyn Store, feed_reads: u64, ready: bool) -> Live {
        Live {
            ready,
            backend: store.backend(),
            version: *store.subscribe().borrow(),
            pool: store.pool(),
            feed_reads,
        }
    }
}

impl Metrics {
    pub fn auth_failure(&self, c: Credential) {
        self.auth_failures[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn auth_throttled(&self) {
        self.auth_throttled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_ended(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self, why: Closed) {
        self.connections_closed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn hold_poll(&self) -> HeldPoll<'_> {
        self.polls_held.fetch_add(1, Ordering::Relaxed);
        HeldPoll(self)
    }

    pub fn sync_answer(&self, a: SyncAnswer) {
        let c = match a {
            SyncAnswer::Changes => &self.sync_changes,
            SyncAnswer::NoChange => &self.sync_no_change,
            SyncAnswer::Snapshot => &self.sync_snapshot,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn webhooks(&self, delivered: usize, retried: usize, gave_up: usize) {
        self.webhook_delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
        self.webhook_retried
            .fetch_add(retried as u64, Ordering::Relaxed);
        self.webhook_gave_up
            .fetch_add(gave_up as u64, Ordering::Relaxed);
    }

    /// A periodic job this replica claimed and ran.
    pub fn job_run(&self, purge: bool) {
        let c = if purge {
            &self.purge_runs
        } else {
            &self.jobs_runs
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn http(&self, route: &str, method: &str, status: u16) {
        *lock(&self.http)
            .entry((route.to_string(), method.to_string(), status))
            .or_default() += 1;
    }

    fn store_call(&self, op: &'static str, took: Duration, error: Option<&StoreError>) {
        lock(&self.store).entry(op).or_default().observe(took);
        let kind = match error {
            None | Some(StoreError::NotFound | StoreError::Stale | StoreError::Conflict(_)) => {
                return
            }
            Some(StoreError::Unavailable(_)) => "unavailable",
            Some(StoreError::Backend(_)) => "error",
        };
        *lock(&self.store_errors).entry((op, kind)).or_default() += 1;
    }

    /// The exposition (Prometheus text, version 0.0.4): these counters plus what the store
    /// and the feed know right now.
    pub fn render(&self, live: &Live) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        metric(
            "tokengate_auth_failures_total",
            "counter",
            "Credentials refused, by the kind of credential presented.",
            &Credential::ALL.map(|c| {
                (
                    format!("{{credential=\"{}\"}}", c.as_str()),
                    get(&self.auth_failures[c as usize]).to_string(),
                )
            }),
        );
        metric(
            "tokengate_auth_throttled_total",
            "counter",
            "Requests answered 429 because their address failed too many credential checks.",
            &one(get(&self.auth_throttled).to_string()),
        );
        metric(
            "tokengate_connections_open",
            "gauge",
            "Client connections open now.",
            &one(get(&self.connections_open).to_string()),
        );
        metric(
            "tokengate_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            &one(get(&self.connections_accepted).to_string()),
        );
        metric(
            "tokengate_connections_closed_total",
            "counter",
            "Connections the server closed on its own, by reason.",
            &Closed::ALL.map(|why| {
                (
                    format!("{{reason=\"{}\"}}", why.as_str()),
                    get(&self.connections_closed[why as usize]).to_string(),
                )
            }),
        );
        metric(
            "tokengate_ready",
            "gauge",
            "1 while the store answers (as /readyz).",
            &one(u8::from(live.ready).to_string()),
        );
        metric(
            "tokengate_store_info",
            "gauge",
            "The store backend in use.",
            &[(format!("{{backend=\"{}\"}}", live.backend), "1".into())],
        );
        metric(
            "tokengate_sync_version",
            "gauge",
            "The latest committed version this replica knows of.",
            &one(live.version.to_string()),
        );
        metric(
            "tokengate_sync_polls_held",
            "gauge",
            "Long-polls held open right now.",
            &one(self.polls_held.load(Ordering::Relaxed).to_string()),
        );
        metric(
            "tokengate_sync_answers_total",
            "counter",
            "Answers to /v1/sync by kind.",
            &[
                ("changes", &self.sync_changes),
                ("no_change", &self.sync_no_change),
                ("snapshot", &self.sync_snapshot),
            ]
            .map(|(k, c)| {
                (
                    format!("{{kind=\"{k}\"}}"),
                    c.load(Ordering::Relaxed).to_string(),
                )
            }),
        );
        metric(
            "tokengate_sync_reads_total",
            "counter",
            "Database reads made to answer long-polls (one per version for all polls woken by it).",
            &one(live.feed_reads.to_string()),
        );
        let histograms = lock(&self.store).clone();
        let mut lines = vec![];
        for (op, h) in &histograms {
            for (i, le) in BUCKETS.iter().enumerate() {
                lines.push((
                    format!("_bucket{{op=\"{op}\",le=\"{le}\"}}"),
                    h.counts[i].to_string(),
                ));
            }
            lines.push((
                format!("_bucket{{op=\"{op}\",le=\"+Inf\"}}"),
                h.count.to_string(),
            ));
            lines.push((format!("_sum{{op=\"{op}\"}}"), format!("{:.6}", h.sum)));
            lines.push((format!("_count{{op=\"{op}\"}}"), h.count.to_string()));
        }
        metric(
            "tokengate_store_seconds",
            "histogram",
            "Store call latency by operation.",
            &lines,
        );
        let errors: Vec<_> = lock(&self.store_errors)
            .iter()
            .map(|((op, kind), n)| (format!("{{op=\"{op}\",error=\"{kind}\"}}"), n.to_string()))
            .collect();
        metric(
            "tokengate_store_errors_total",
            "counter",
            "Failed store calls by operation and kind (unavailable: the database did not answer).",
            &errors,
        );
        if let Some((size, idle, waiting, max)) = live.pool {
            metric(
                "tokengate_db_pool_connections",
                "gauge",
                "Database connections of this replica's pool by state.",
                &[
                    ("{state=\"open\"}".into(), size.to_string()),
                    ("{state=\"idle\"}".into(), idle.to_string()),
                    ("{state=\"max\"}".into(), max.to_string()),
                ],
            );
            metric(
                "tokengate_db_pool_waiting",
                "gauge",
                "Store calls waiting for a database connection.",
                &one(waiting.to_string()),
            );
        }
        metric(
            "tokengate_webhook_deliveries_total",
            "counter",
            "Webhook delivery attempts by outcome.",
            &[
                ("delivered", &self.webhook_delivered),
                ("retry", &self.webhook_retried),
                ("gave_up", &self.webhook_gave_up),
            ]
            .map(|(k, c)| {
                (
                    format!("{{outcome=\"{k}\"}}"),
                    c.load(Ordering::Relaxed).to_string(),
                )
            }),
        );
        metric(
            "tokengate_job_runs_total",
            "counter",
            "Periodic jobs this replica claimed and ran (each period runs on one replica).",
            &[("jobs", &self.jobs_runs), ("purge", &self.purge_runs)].map(|(k, c)| {
                (
                    format!("{{job=\"{k}\"}}"),
                    c.load(Ordering::Relaxed).to_string(),
                )
            }),
        );
        let http: Vec<_> = lock(&self.http)
            .iter()
            .map(|((route, method, status), n)| {
                (
                    format!("{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}}"),
                    n.to_string(),
                )
            })
            .collect();
        metric(
            "tokengate_http_requests_total",
            "counter",
            "API requests by route template, method and status.",
            &http,
        );
        out
    }
}

/// A store that times every call into the metrics.
pub struct Metered {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Metered {
        Metered { inner, metrics }
    }
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let r = $call.await;
        $self
            .metrics
            .store_call($op, started.elapsed(), r.as_ref().err());
        r
    }};
}

#[async_trait]
impl Store for Metered {
    fn store_id(&self) -> &str {
        self.inner.store_id()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.subscribe()
    }
    fn hearing(&self) -> watch::Receiver<bool> {
        self.inner.hearing()
    }
    fn pool(&self) -> Option<(usize, usize, usize, usize)> {
        self.inner.pool()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        timed!(self, "ping", self.inner.ping())
    }
    async fn close(&self) {
        self.inner.close().await
    }
    async fn insert(&self, row: TokenRow, audit: &AuditRecord) -> Result<TokenRow, StoreError> {
        timed!(self, "insert", self.inner.insert(row, audit))
    }
    async fn token(&self, id: &str) -> Result<Option<TokenRow>, StoreError> {
        timed!(self, "token", self.inner.token(id))
    }
    async fn list(&self, q: &ListQuery) -> Result<Vec<TokenRow>, StoreError> {
        timed!(self, "list", self.inner.list(q))
    }
    async fn replace(
        &self,
        row: TokenRow,
        expected_version: u64,
        audit: &AuditRecord,
        raise_horizon: bool,
    ) -> Result<TokenRow, StoreError> {
        timed!(
            self,
            "replace",
            self.inner
                .replace(row, expected_version, audit, raise_horizon)
        )
    }
    async fn record_usage(&self, now: i64, entries: &[UsageEntry]) -> Result<usize, StoreError> {
        timed!(self, "record_usage", self.inner.record_usage(now, entries))
    }
    async fn fleet_report(
        &self,
        proxy_id: &str,
        interval_ms: u32,
        now_ms: i64,
        forget_ms: i64,
        tokens: &[TokenDemand],
    ) -> Result<(), StoreError> {
        timed!(
            self,
            "fleet_report",
            self.inner
                .fleet_report(proxy_id, interval_ms, now_ms, forget_ms, tokens)
        )
    }
    async fn fleet_proxies(&self, since_ms: i64) -> Result<Vec<ProxySeen>, StoreError> {
        timed!(self, "fleet_proxies", self.inner.fleet_proxies(since_ms))
    }
    async fn fleet_demand(
        &self,
        of: DemandOf<'_>,
        since_ms: i64,
    ) -> Result<Vec<DemandRow>, StoreError> {
        timed!(self, "fleet_demand", self.inner.fleet_demand(of, since_ms))
    }
    async fn insert_scope(
        &self,
        row: ScopeRow,
        audit: &AuditRecord,
    ) -> Result<ScopeRow, StoreError> {
        timed!(self, "insert_scope", self.inner.insert_scope(row, audit))
    }
    async fn scope(&self, name: &str) -> Result<Option<ScopeRow>, StoreError> {
        timed!(self, "scope", self.inner.scope(name))
    }
    async fn scopes(&self) -> Result<ScopeSet, StoreError> {
        timed!(self, "scopes", self.inner.scopes())
    }
    async fn replace_scope(
        &self,
        row: ScopeRow,
        expected_version: u64,
        audit: &AuditRecord,
    ) -> Result<ScopeRow, StoreError> {
        timed!(
            self,
            "replace_scope",
            self.inner.replace_scope(row, expected_version, audit)
        )
    }
    async fn delete_scope(
        &self,
        name: &str,
        expected_version: u64,
        audit: &AuditRecord,
    ) -> Result<ScopeDeletion, StoreError> {
        timed!(
            self,
            "delete_scope",
            self.inner.delete_scope(name, expected_version, audit)
        )
    }
    async fn quota_exchange(
        &self,
        hashes: &[String],
        now_s: i64,
        proxies_since_ms: i64,
        max_tokens: usize,
        decide: Arc<QuotaDecision>,
    ) -> Result<QuotaWrite, StoreError> {
        timed!(
            self,
            "quota_exchange",
            self.inner
                .quota_exchange(hashes, now_s, proxies_since_ms, max_tokens, decide)
        )
    }
    async fn quota_spent(
        &self,
        token_ids: &[String],
        now_s: i64,
    ) -> Result<Vec<QuotaSpent>, StoreError> {
        timed!(
            self,
            "quota_spent",
            self.inner.quota_spent(token_ids, now_s)
        )
    }
    async fn forget_quotas(&self, now_s: i64) -> Result<u64, StoreError> {
        timed!(self, "forget_quotas", self.inner.forget_quotas(now_s))
    }
    async fn tokens_by_id(&self, ids: &[String]) -> Result<Vec<TokenRow>, StoreError> {
        timed!(self, "tokens_by_id", self.inner.tokens_by_id(ids))
    }
    async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        timed!(self, "audit", self.inner.audit(q))
    }
    async fn version(&self) -> Result<u64, StoreError> {
        timed!(self, "version", self.inner.version())
    }
    async fn changes_since(&self, since: u64, limit: u32) -> Result<Changes, StoreError> {
        timed!(
            self,
            "changes_since",
            self.inner.changes_since(since, limit)
        )
    }
    async fn snapshot_page(&self, after_id: Option<&str>, limit: u32) -> Result<Page, StoreError> {
        timed!(
            self,
            "snapshot_page",
            self.inner.snapshot_page(after_id, limit)
        )
    }
    async fn claim_period(&self, job: &str, now: i64, period: i64) -> Result<bool, StoreError> {
        timed!(
            self,
            "claim_period",
            self.inner.claim_period(job, now, period)
        )
    }
    async fn period_runs(&self, job: &str) -> Result<u64, StoreError> {
        timed!(self, "period_runs", self.inner.period_runs(job))
    }
    async fn expiring(&self, now: i64, until: i64) -> Result<Vec<Expiring>, StoreError> {
        timed!(self, "expiring", self.inner.expiring(now, until))
    }
    async fn record_warning(
        &self,
        warning: &WarningRecord,
        audit: &AuditRecord,
        event: Option<&Event>,
    ) -> Result<bool, StoreError> {
        timed!(
            self,
            "record_warning",
            self.inner.record_warning(warning, audit, event)
        )
    }
    async fn purgeable(&self, cutoff: i64, limit: u32) -> Result<Vec<TokenRow>, StoreError> {
        timed!(self, "purgeable", self.inner.purgeable(cutoff, limit))
    }
    async fn purge(&self, row: &TokenRow, audit: &AuditRecord) -> Result<bool, StoreError> {
        timed!(self, "purge", self.inner.purge(row, audit))
    }
    async fn prune_outbox(&self, cutoff: i64) -> Result<u64, StoreError> {
        timed!(self, "prune_outbox", self.inner.prune_outbox(cutoff))
    }
    async fn claim_deliveries(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        timed!(
            self,
            "claim_deliveries",
            self.inner.claim_deliveries(now, lease_until, limit)
        )
    }
    async fn delivery_result(&self, id: i64, outcome: &DeliveryOutcome) -> Result<(), StoreError> {
        timed!(
            self,
            "delivery_result",
            self.inner.delivery_result(id, outcome)
        )
    }
    async fn insert_session(&self, s: &SessionRow, max: usize) -> Result<(), StoreError> {
        timed!(self, "insert_session", self.inner.insert_session(s, max))
    }
    async fn touch_session(
        &self,
        key: &str,
        now: i64,
        idle_after: i64,
        started_after: i64,
    ) -> Result<Option<SessionRow>, StoreError> {
        timed!(
            self,
            "touch_session",
            self.inner
                .touch_session(key, now, idle_after, started_after)
        )
    }
    async fn delete_session(&self, key: &str) -> Result<(), StoreError> {
        timed!(self, "delete_session", self.inner.delete_session(key))
    }
    async fn session_count(&self) -> Result<u64, StoreError> {
        timed!(self, "session_count", self.inner.session_count())
    }
    async fn export(&self) -> Result<Dump, StoreError> {
        timed!(self, "export", self.inner.export())
    }
    async fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        timed!(self, "import", self.inner.import(dump))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> Live {
        Live {
            ready: true,
            backend: "sqlite",
            version: 7,
            pool: None,
            feed_reads: 3,
        }
    }

    #[test]
    fn every_family_has_its_header_and_samples() {
        let m = Metrics::default();
        m.auth_failure(Credential::Sync);
        m.auth_failure(Credential::Sync);
        m.connection_opened();
        m.connection_closed(Closed::Evicted);
        m.http("/v1/tokens/{id}", "GET", 404);
        let text = m.render(&live());
        assert!(text.contains("tokengate_auth_failures_total{credential=\"sync\"} 2\n"));
        assert!(text.contains("tokengate_auth_failures_total{credential=\"admin\"} 0\n"));
        assert!(text.contains("tokengate_connections_open 1\n"));
        assert!(text.contains("tokengate_connections_closed_total{reason=\"evicted\"} 1\n"));
        assert!(text.contains("tokengate_sync_version 7\n"));
        assert!(text.contains("tokengate_sync_reads_total 3\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
                .unwrap_or(name);
            assert!(text.contains(&format!("# TYPE {family} ")), "{line}");
        }
    }

    #[test]
    fn histograms_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_millis(30));
        assert_eq!(h.counts[0], 0);
        assert_eq!(h.counts[1], 1, "le 0.001");
        assert_eq!(h.counts[BUCKETS.len() - 1], 2);
        assert_eq!(h.count, 2);
    }
}
