//! Persistence behind one trait, so that a PostgreSQL backend for several replicas is an
//! addition: versions come from the database and the change signal from the store.

mod audit;
#[cfg(test)]
mod contract;
mod postgres;
mod sqlite;

pub use audit::{rfc3339, AuditEntry, AuditQuery};
pub use postgres::{newer_schema, redacted, PgSettings, PostgresStore};
use serde::{Deserialize, Serialize};
pub use sqlite::{SqliteStore, SYSTEM};
use tokengate_wire::{Kind, UsageEntry};
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

pub fn parse_kind(s: &str) -> Option<Kind> {
    match s {
        "user" => Some(Kind::User),
        "service" => Some(Kind::Service),
        _ => None,
    }
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
    /// Names containing this, ignoring ASCII case.
    pub name_contains: Option<String>,
    /// Newest first (in creation order) instead of by id.
    pub newest_first: bool,
    /// With `newest_first`: tokens created before the token with this id.
    pub before: Option<String>,
    pub limit: u32,
}

/// Who made a change and what it was, for the audit trail.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    pub actor: &'a str,
    pub action: &'static str,
}

/// An expiry warning issued (once per token, expiry time and lead time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub token: TokenRow,
    pub lead_seconds: i64,
}

/// A webhook delivery waiting in the outbox.
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

/// Builds a webhook event (id, type, payload) for a warning; `None` when no webhook is set.
pub type WebhookEvent<'a> = Option<&'a (dyn Fn(&Warning) -> (String, String, String) + Sync)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    NotFound,
    Conflict(String),
    /// An edit refused the change; names the API field.
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The database cannot be reached (or did not answer in time): try again later.
    Unavailable(String),
    Backend(String),
}

/// Applies a change to a row; returns false when nothing changed (no new version).
pub type Edit<'a> = &'a (dyn Fn(&mut TokenRow) -> Result<bool, StoreError> + Sync);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::NotFound => write!(f, "not found"),
            StoreError::Conflict(m) | StoreError::Backend(m) => write!(f, "{m}"),
            StoreError::Unavailable(m) => write!(f, "store unavailable: {m}"),
            StoreError::Invalid { field, message } => write!(f, "{field}: {message}"),
        }
    }
}

pub trait Store: Send + Sync + 'static {
    /// Identifies this database; filters holding another store's state resnapshot.
    fn store_id(&self) -> &str;
    /// Inserts a new token; `row.version` is assigned by the store. Audited.
    fn create(&self, row: TokenRow, change: Change<'_>) -> Result<TokenRow, StoreError>;
    /// A live (not revoked) token.
    fn get(&self, id: &str) -> Result<TokenRow, StoreError>;
    /// Live tokens by id; revoked ones never.
    fn list(&self, q: &ListQuery) -> Result<Vec<TokenRow>, StoreError>;
    /// Runs `edit` on a live token in one transaction; a change gets a new version and an
    /// audit entry in the same transaction.
    fn update(
        &self,
        id: &str,
        now: i64,
        change: Change<'_>,
        edit: Edit<'_>,
    ) -> Result<TokenRow, StoreError>;
    /// The latest version handed out (0 for an empty store).
    fn version(&self) -> Result<u64, StoreError>;
    /// Every row (tombstones included) changed after `since`, by version.
    fn changes_since(&self, since: u64, limit: u32) -> Result<Vec<TokenRow>, StoreError>;
    /// Every row (tombstones included) by id, after `after_id`.
    fn snapshot_page(
        &self,
        after_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<TokenRow>, StoreError>;
    /// Tokens that are not revoked.
    fn live_count(&self) -> Result<u64, StoreError>;
    /// The latest committed version, published after every write.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// Highest version of any purged row: a client holding an older version resnapshots.
    fn horizon(&self) -> Result<u64, StoreError>;
    /// Adds reported request counts; no new version. Returns how many ids matched.
    fn record_usage(&self, now: i64, entries: &[UsageEntry]) -> Result<usize, StoreError>;
    /// Audit entries, newest first.
    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;
    /// Deletes tokens revoked or expired at or before `cutoff`, auditing each.
    fn purge(&self, now: i64, cutoff: i64) -> Result<Vec<TokenRow>, StoreError>;
    /// Issues the expiry warnings due at `now` for the given lead times (seconds), each once
    /// per token, expiry time and lead, auditing each and queueing its webhook event.
    fn warn_expiring(
        &self,
        now: i64,
        leads: &[i64],
        webhook: WebhookEvent<'_>,
    ) -> Result<Vec<Warning>, StoreError>;
    /// Outbox entries due for a delivery attempt.
    fn due_deliveries(&self, now: i64, limit: u32) -> Result<Vec<Delivery>, StoreError>;
    fn delivery_result(&self, id: i64, outcome: &DeliveryOutcome) -> Result<(), StoreError>;
}
