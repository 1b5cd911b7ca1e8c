//! Persistence behind one trait, and nothing else: what to write is decided by the domain
//! layer (`crate::domain`), which both backends share. A store assigns versions (in commit
//! order, so that no poller can miss a change), keeps each write and its audit entry in one
//! transaction, and publishes the latest committed version to its subscribers.

mod audit;
#[cfg(test)]
mod contract;
mod postgres;
mod sqlite;

use async_trait::async_trait;
pub use audit::{AuditEntry, AuditQuery, AuditRecord};
pub use postgres::{redacted, PgSettings, PostgresStore};
use serde::{Deserialize, Serialize};
pub use sqlite::SqliteStore;
use tokengate_wire::quota::{Period, Quota};
use tokengate_wire::{Kind, LimitScope, Rule, TokenDemand, UsageEntry};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Suspended,
    /// Kept as a tombstone so filters learn of the revocation; invisible to the admin API.
    Revoked,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Suspended => "suspended",
            Status::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "active" => Some(Status::Active),
            "suspended" => Some(Status::Suspended),
            "revoked" => Some(Status::Revoked),
            _ => None,
        }
    }
}

/// Every kind of token, as the API and the database spell them (`Kind::as_str`).
pub const KINDS: [Kind; 2] = [Kind::User, Kind::Service];

pub fn parse_kind(s: &str) -> Option<Kind> {
    KINDS.into_iter().find(|k| k.as_str() == s)
}

/// Unix seconds throughout; the API layer renders RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    /// Lower-hex sha256 of the secret.
    pub hash: String,
    pub name: String,
    pub kind: Kind,
    pub owner: String,
    pub status: Status,
    pub max_rps: Option<u32>,
    pub burst: Option<u32>,
    /// Whether `max_rps` and `burst` are the whole fleet's or each proxy's.
    pub limit_scope: LimitScope,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub version: u64,
    /// Requests counted by the filters (`POST /v1/usage`); never bump the version.
    pub requests_allowed: u64,
    pub requests_denied: u64,
    pub rotated_at: Option<i64>,
    /// Secrets replaced by a rotation, still honoured until their grace ends.
    pub retired: Vec<RetiredSecret>,
    /// Names of the scopes the token is limited to; `None`: unrestricted.
    pub scopes: Option<Vec<String>>,
    /// Requests per period, counted across the fleet.
    pub quota: Option<Quota>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredSecret {
    pub hash: String,
    /// Unix seconds; the old secret is refused from then on.
    pub until: i64,
}

impl TokenRow {
    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<Status>,
    pub owner: Option<String>,
    pub kind: Option<Kind>,
    /// Ids strictly greater than this.
    pub after: Option<String>,
    /// Tokens expiring after now and at or before this time.
    pub expiring: Option<(i64, i64)>,
    /// `(true, now)`: only tokens expired at `now`; `(false, now)`: only tokens that are not.
    pub expired: Option<(bool, i64)>,
    /// Names containing this, ignoring ASCII case.
    pub name_contains: Option<String>,
    /// Newest first (in creation order) instead of by id.
    pub newest_first: bool,
    /// With `newest_first`: tokens created before the token with this id.
    pub before: Option<String>,
    pub limit: u32,
}

/// Rows changed after a version, read in one snapshot with what a sync answer needs beside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// By version, at most the limit asked for.
    pub rows: Vec<TokenRow>,
    /// Highest version of any purged row or dropped secret: a client holding an older
    /// version resnapshots.
    pub horizon: u64,
    /// Tokens that are not revoked.
    pub live: u64,
    /// Every scope, when one was created, changed or deleted after the version asked for.
    pub scopes: Option<ScopeSet>,
}

/// One page of a full snapshot (tombstones included), by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub rows: Vec<TokenRow>,
    pub live: u64,
    /// Every scope, read with the page.
    pub scopes: ScopeSet,
}

/// A scope: a named set of method and path rules. Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeRow {
    pub name: String,
    /// Empty: none.
    pub description: String,
    pub rules: Vec<Rule>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The version of its last change, from the same sequence as tokens' changes.
    pub version: u64,
}

/// Every scope, by name, with the version of the last scope change (a deletion included; 0
/// when no scope ever changed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet {
    pub scopes: Vec<ScopeRow>,
    pub version: u64,
}

/// What a scope deletion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeDeletion {
    /// Deleted at this version.
    Deleted(u64),
    /// Refused: this many live (not revoked) tokens still name the scope.
    InUse(u64),
}

/// A token whose expiry is near, with the tightest warning lead already issued for that
/// expiry time (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiring {
    pub token: TokenRow,
    pub warned_lead: Option<i64>,
}

/// An expiry warning to record: once per token, expiry time and lead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarningRecord {
    pub token_id: String,
    pub expires_at: i64,
    pub lead: i64,
    pub at: i64,
}

/// A webhook event to put in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub kind: String,
    pub payload: String,
    pub at: i64,
}

/// A webhook delivery taken from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered { at: i64 },
    Retry { next_attempt_at: i64, error: String },
    GaveUp { error: String },
}

/// A console session as stored: the key is `sha256(session id)`; times in Unix
/// milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub key: String,
    pub actor: String,
    pub started_at: i64,
    pub last_used_at: i64,
}

/// An outbox event as stored, with its delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    pub created_at: i64,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub delivered_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub last_error: Option<String>,
}

/// Everything a store holds but console sessions, to move it into another store
/// (`tokengate migrate`). The store id and the versions move too, so that filters keep their
/// state across the move.
#[derive(Debug, Clone, PartialEq)]
pub struct Dump {
    pub store_id: String,
    pub version: u64,
    pub horizon: u64,
    /// With their creation order.
    pub tokens: Vec<(TokenRow, i64)>,
    pub audit: Vec<AuditEntry>,
    pub warnings: Vec<WarningRecord>,
    pub outbox: Vec<OutboxRow>,
    /// Periodic job claims: name, last run, runs.
    pub jobs: Vec<(String, i64, u64)>,
    /// Every scope, and the version of the last scope change.
    pub scopes: ScopeSet,
}

/// A proxy as its last fleet report left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySeen {
    pub proxy_id: String,
    pub interval_ms: u32,
    /// Unix milliseconds.
    pub seen_at_ms: i64,
}

/// One proxy's last reported demand for one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemandRow {
    pub token_id: String,
    pub proxy_id: String,
    pub admitted: u64,
    pub refused: u64,
    pub interval_ms: u32,
    /// Unix milliseconds.
    pub seen_at_ms: i64,
}

/// Whose demand to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemandOf<'a> {
    /// Every proxy's, for this token.
    Token(&'a str),
    /// Every proxy's, for every token.
    All,
}

/// One holder of a token's quota in one period: a proxy and one of the token's secrets.
/// Counts are what the proxy counts (requests with that secret in the period).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaHolder {
    pub token_id: String,
    pub proxy_id: String,
    pub hash: String,
    /// Unix seconds, `[period_start, period_end)`.
    pub period_start: i64,
    pub period_end: i64,
    /// As the proxy last reported it.
    pub spent: u64,
    /// Spent before the proxy's count started over (a restart) in this period.
    pub carried: u64,
    /// The ceiling the proxy last said it enforces.
    pub held: u64,
    /// The ceiling last granted to it.
    pub granted: u64,
    /// Its recent spending, in thousandths of a request per second.
    pub rate_milli: u64,
    /// Unix milliseconds of its last report of this secret.
    pub seen_at_ms: i64,
}

/// What a quota exchange decides on, read under the lock of every token in it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuotaState {
    /// Tokens with a quota, by id: those holding a secret the report named, and (as many as
    /// the number asked for leaves room for) those with holders in a period that has not
    /// ended.
    pub tokens: Vec<TokenRow>,
    /// Every holder row of those tokens in periods that have not ended.
    pub holders: Vec<QuotaHolder>,
    /// Proxies seen since the time asked for.
    pub proxies: Vec<ProxySeen>,
}

/// A quota's exhaustion in one period, recorded once with its audit entry and event.
#[derive(Debug, Clone, PartialEq)]
pub struct Exhaustion {
    pub token_id: String,
    pub period_start: i64,
    pub period_end: i64,
    pub audit: AuditRecord,
    pub event: Option<Event>,
}

/// What a quota exchange writes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuotaWrite {
    /// Holder rows, inserted or replaced.
    pub holders: Vec<QuotaHolder>,
    /// Exhaustions; one already recorded for its token and period is skipped.
    pub exhausted: Vec<Exhaustion>,
}

/// What one token's holders spent in one period (that has not ended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaSpent {
    pub token_id: String,
    pub period_start: i64,
    pub spent: u64,
}

/// The decision of a quota exchange, taken on what the store read under its locks; called
/// again if the transaction is retried.
pub type QuotaDecision = dyn Fn(&QuotaState) -> QuotaWrite + Send + Sync;

/// A quota as stored: its limit and period text.
pub fn quota_columns(q: Option<Quota>) -> (Option<i64>, Option<String>) {
    match q {
        Some(q) => (
            Some(q.limit.min(i64::MAX as u64) as i64),
            Some(q.period.as_string()),
        ),
        None => (None, None),
    }
}

/// A quota from its columns; `None` when either is missing.
pub fn quota_from_columns(
    limit: Option<i64>,
    period: Option<&str>,
) -> Result<Option<Quota>, String> {
    match (limit, period) {
        (Some(limit), Some(p)) => Ok(Some(Quota {
            limit: limit.max(0) as u64,
            period: Period::parse(p).ok_or_else(|| format!("quota period `{p}`"))?,
        })),
        _ => Ok(None),
    }
}

pub fn parse_scope(s: &str) -> Option<LimitScope> {
    LimitScope::parse(s)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    NotFound,
    /// The row moved on since it was read (another change, maybe on another replica).
    Stale,
    Conflict(String),
    /// The database cannot be reached (or did not answer in time): try again later.
    Unavailable(String),
    Backend(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::NotFound => write!(f, "not found"),
            StoreError::Stale => write!(f, "changed concurrently"),
            StoreError::Conflict(m) | StoreError::Backend(m) => write!(f, "{m}"),
            StoreError::Unavailable(m) => write!(f, "store unavailable: {m}"),
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Identifies this database; filters holding another store's state resnapshot.
    fn store_id(&self) -> &str;
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// The latest committed version this process knows of; only ever moves forward. Published
    /// after every local write, and (PostgreSQL) after other replicas' writes are heard of.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// False while this process cannot hear of changes made by others (a PostgreSQL replica
    /// whose change listener lost its connection): a poll held here would wait for a change
    /// it will not hear of. Always true for a store only this process writes.
    fn hearing(&self) -> watch::Receiver<bool>;
    /// Pool figures for metrics: (connections open, idle, callers waiting, most allowed).
    fn pool(&self) -> Option<(usize, usize, usize, usize)> {
        None
    }
    /// Whether the database answers (a round trip).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Stops the store's background work and waits for it.
    async fn close(&self) {}

    /// Inserts a new token, taking the next version; `Conflict` on a taken id or hash, or
    /// when a scope it names does not exist (checked in the writing transaction).
    async fn insert(&self, row: TokenRow, audit: &AuditRecord) -> Result<TokenRow, StoreError>;
    /// A token by id, tombstones included.
    async fn token(&self, id: &str) -> Result<Option<TokenRow>, StoreError>;
    /// Live (not revoked) tokens.
    async fn list(&self, q: &ListQuery) -> Result<Vec<TokenRow>, StoreError>;
    /// Writes `row` over the stored token if that is still at `expected_version`, taking the
    /// next version and appending `audit` in the same transaction; with `raise_horizon`, the
    /// horizon rises to `expected_version` in it too. `Stale` when the token moved on,
    /// `NotFound` when it is gone, `Conflict` when a live token would name a scope that does
    /// not exist. Usage counters are kept as stored.
    async fn replace(
        &self,
        row: TokenRow,
        expected_version: u64,
        audit: &AuditRecord,
        raise_horizon: bool,
    ) -> Result<TokenRow, StoreError>;
    /// Adds reported request counts (no new version); last use only moves forward and is
    /// capped at `now`. Returns how many entries matched a token.
    async fn record_usage(&self, now: i64, entries: &[UsageEntry]) -> Result<usize, StoreError>;
    /// A proxy's fleet report at `now_ms`: the proxy is seen, and each token's counts
    /// replace that proxy's previous ones; reports and proxies last seen before `forget_ms`
    /// are forgotten.
    async fn fleet_report(
        &self,
        proxy_id: &str,
        interval_ms: u32,
        now_ms: i64,
        forget_ms: i64,
        tokens: &[TokenDemand],
    ) -> Result<(), StoreError>;
    /// Proxies seen at or after `since_ms`.
    async fn fleet_proxies(&self, since_ms: i64) -> Result<Vec<ProxySeen>, StoreError>;
    /// Demand reported at or after `since_ms`.
    async fn fleet_demand(
        &self,
        of: DemandOf<'_>,
        since_ms: i64,
    ) -> Result<Vec<DemandRow>, StoreError>;
    /// Creates a scope, taking the next version (which also becomes the last scope change's);
    /// `Conflict` on a taken name.
    async fn insert_scope(
        &self,
        row: ScopeRow,
        audit: &AuditRecord,
    ) -> Result<ScopeRow, StoreError>;
    /// A scope by name.
    async fn scope(&self, name: &str) -> Result<Option<ScopeRow>, StoreError>;
    /// Every scope, by name, with the last scope change's version.
    async fn scopes(&self) -> Result<ScopeSet, StoreError>;
    /// Writes `row` over the stored scope if that is still at `expected_version`, taking the
    /// next version; `Stale` when it moved on, `NotFound` when it is gone.
    async fn replace_scope(
        &self,
        row: ScopeRow,
        expected_version: u64,
        audit: &AuditRecord,
    ) -> Result<ScopeRow, StoreError>;
    /// Deletes the scope if it is still at `expected_version` and no live token names it (both
    /// checked in the deleting transaction, so that no token can come to name a deleted
    /// scope), taking the next version. `Stale` when it moved on, `NotFound` when it is gone.
    async fn delete_scope(
        &self,
        name: &str,
        expected_version: u64,
        audit: &AuditRecord,
    ) -> Result<ScopeDeletion, StoreError>;

    /// A quota exchange, in one transaction that holds every token in it locked (no other
    /// exchange on those tokens runs meanwhile, on any replica): reads the [`QuotaState`] of
    /// the tokens with a quota holding one of `hashes` (current or retired) and then of those
    /// with holders in a period ending after `now_s`, at most `max_tokens` in all; asks
    /// `decide`; writes what it decided and returns it.
    async fn quota_exchange(
        &self,
        hashes: &[String],
        now_s: i64,
        proxies_since_ms: i64,
        max_tokens: usize,
        decide: std::sync::Arc<QuotaDecision>,
    ) -> Result<QuotaWrite, StoreError>;
    /// What the holders of each of `token_ids` spent, per period ending after `now_s`.
    async fn quota_spent(
        &self,
        token_ids: &[String],
        now_s: i64,
    ) -> Result<Vec<QuotaSpent>, StoreError>;
    /// Forgets holders and exhaustions of periods ended at or before `now_s`.
    async fn forget_quotas(&self, now_s: i64) -> Result<u64, StoreError>;
    /// Tokens by id (tombstones included); unknown ids are left out.
    async fn tokens_by_id(&self, ids: &[String]) -> Result<Vec<TokenRow>, StoreError>;
    /// Audit entries, newest first.
    async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;

    /// The latest committed version (0 for an empty store), read from the database and
    /// published.
    async fn version(&self) -> Result<u64, StoreError>;
    /// Every row (tombstones included) changed after `since`, by version.
    async fn changes_since(&self, since: u64, limit: u32) -> Result<Changes, StoreError>;
    /// Every row (tombstones included) by id, after `after_id`.
    async fn snapshot_page(&self, after_id: Option<&str>, limit: u32) -> Result<Page, StoreError>;

    /// Claims the run of `job` due at `now` when none was claimed in the last `period`
    /// seconds, by any replica: true for exactly one claimant per period.
    async fn claim_period(&self, job: &str, now: i64, period: i64) -> Result<bool, StoreError>;
    /// How often `job` was claimed, by every replica.
    async fn period_runs(&self, job: &str) -> Result<u64, StoreError>;
    /// Live tokens expiring after `now` and at or before `until`, by id.
    async fn expiring(&self, now: i64, until: i64) -> Result<Vec<Expiring>, StoreError>;
    /// Records a warning with its audit entry and (when given) its webhook event; false when
    /// it was already recorded (nothing is written then).
    async fn record_warning(
        &self,
        warning: &WarningRecord,
        audit: &AuditRecord,
        event: Option<&Event>,
    ) -> Result<bool, StoreError>;
    /// Tokens revoked (changed last) or expired at or before `cutoff`.
    async fn purgeable(&self, cutoff: i64, limit: u32) -> Result<Vec<TokenRow>, StoreError>;
    /// Deletes `row` if it is still at its version, with its audit entry, and raises the
    /// horizon to its version; false when it moved on or is gone.
    async fn purge(&self, row: &TokenRow, audit: &AuditRecord) -> Result<bool, StoreError>;
    /// Forgets outbox events finished at or before `cutoff`.
    async fn prune_outbox(&self, cutoff: i64) -> Result<u64, StoreError>;
    /// Takes up to `limit` deliveries due at `now`, each leased until `lease_until` so that no
    /// other replica takes it meanwhile.
    async fn claim_deliveries(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError>;
    async fn delivery_result(&self, id: i64, outcome: &DeliveryOutcome) -> Result<(), StoreError>;

    /// Adds a session; when `max` are held, ended ones go first, then the least recently
    /// used.
    async fn insert_session(&self, s: &SessionRow, max: usize) -> Result<(), StoreError>;
    /// The session with this key, marked as used at `now`, if it was used after
    /// `idle_after` and started after `started_after`; an ended one is deleted.
    async fn touch_session(
        &self,
        key: &str,
        now: i64,
        idle_after: i64,
        started_after: i64,
    ) -> Result<Option<SessionRow>, StoreError>;
    async fn delete_session(&self, key: &str) -> Result<(), StoreError>;
    /// How many sessions are held (ended or not).
    async fn session_count(&self) -> Result<u64, StoreError>;

    /// Everything but sessions, read in one snapshot.
    async fn export(&self) -> Result<Dump, StoreError>;
    /// Writes a dump into this store, which must be empty (`Conflict` otherwise); it takes
    /// the dump's store id and versions.
    async fn import(&self, dump: &Dump) -> Result<(), StoreError>;
}

/// The committed version as one process knows it; only ever moves forward. And whether the
/// process hears of other processes' changes (PostgreSQL: its change listener is connected).
#[derive(Clone)]
pub(crate) struct Published(watch::Sender<u64>, watch::Sender<bool>);

impl Published {
    pub(crate) fn new(version: u64) -> Published {
        Published(watch::channel(version).0, watch::channel(true).0)
    }

    pub(crate) fn set_hearing(&self, hearing: bool) {
        self.1.send_if_modified(|current| {
            let changed = *current != hearing;
            *current = hearing;
            changed
        });
    }

    pub(crate) fn hearing(&self) -> watch::Receiver<bool> {
        self.1.subscribe()
    }

    pub(crate) fn publish(&self, version: u64) {
        self.0.send_if_modified(|current| {
            let newer = version > *current;
            if newer {
                *current = version;
            }
            newer
        });
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// The refusal to run against a database that a newer tokengate has upgraded.
pub fn newer_schema(database: usize, known: usize) -> String {
    format!(
        "the database schema is version {database}, newer than this tokengate ({}) knows \
         (up to version {known}); run a tokengate at least as new as the one that upgraded it",
        env!("CARGO_PKG_VERSION")
    )
}

/// The refusal of a write that would have a live token name scopes that do not exist (one
/// was deleted after the domain checked): `wanted` against those `found`.
pub(crate) fn missing_scopes(wanted: &[String], found: &[String]) -> Option<StoreError> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|w| !found.contains(w))
        .map(String::as_str)
        .collect();
    (!missing.is_empty()).then(|| {
        StoreError::Conflict(format!(
            "The scope {} was deleted meanwhile; try again.",
            missing.join(", ")
        ))
    })
}
