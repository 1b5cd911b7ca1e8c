//! Persistence behind one trait, so that a PostgreSQL backend for several replicas is an
//! addition: versions come from the database and the change signal from the store.

mod sqlite;

pub use sqlite::SqliteStore;
use tokengate_wire::Kind;
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
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<Status>,
    pub owner: Option<String>,
    pub kind: Option<Kind>,
    /// Ids strictly greater than this.
    pub after: Option<String>,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    NotFound,
    Conflict(String),
    /// An edit refused the change; names the API field.
    Invalid {
        field: &'static str,
        message: String,
    },
    Backend(String),
}

/// Applies a change to a row; returns false when nothing changed (no new version).
pub type Edit<'a> = &'a (dyn Fn(&mut TokenRow) -> Result<bool, StoreError> + Sync);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::NotFound => write!(f, "not found"),
            StoreError::Conflict(m) | StoreError::Backend(m) => write!(f, "{m}"),
            StoreError::Invalid { field, message } => write!(f, "{field}: {message}"),
        }
    }
}

pub trait Store: Send + Sync + 'static {
    /// Identifies this database; filters holding another store's state resnapshot.
    fn store_id(&self) -> &str;
    /// Inserts a new token; `row.version` and timestamps are assigned by the store.
    fn create(&self, row: TokenRow) -> Result<TokenRow, StoreError>;
    /// A live (not revoked) token.
    fn get(&self, id: &str) -> Result<TokenRow, StoreError>;
    /// Live tokens by id; revoked ones never.
    fn list(&self, q: &ListQuery) -> Result<Vec<TokenRow>, StoreError>;
    /// Runs `edit` on a live token in one transaction; a change gets a new version.
    fn update(&self, id: &str, now: i64, edit: Edit<'_>) -> Result<TokenRow, StoreError>;
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
}
