//! The domain layer: every decision about tokens, console sessions and the control plane's
//! own jobs, shared by both store backends. The API turns HTTP into calls here and answers
//! into HTTP; a store only persists what is decided here.

pub mod audit;
pub mod feed;
pub mod fleet;
pub mod housekeeping;
pub mod quota;
pub mod scopes;
pub mod sessions;
pub mod tokens;

pub use audit::rfc3339;
pub use feed::Feed;
pub use fleet::Fleet;
pub use scopes::Scopes;
pub use sessions::Sessions;
pub use tokens::Tokens;

use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainError {
    /// No such token (or purged).
    NotFound,
    /// The token was revoked at this time (Unix seconds); it is kept only for the filters.
    Revoked {
        at: i64,
    },
    /// A value is refused; names the API field, and says why in a phrase that follows the
    /// field's name ("must be between 1 and 1000").
    Invalid {
        field: &'static str,
        message: String,
    },
    /// As `Invalid`, for a field within the body (`rules[2].path`).
    InvalidAt {
        field: String,
        message: String,
    },
    /// No such scope.
    NoScope,
    /// A scope that live tokens still name cannot be deleted.
    ScopeInUse {
        name: String,
        tokens: u64,
    },
    Conflict(String),
    /// The request is valid in itself but conflicts with the token's current settings (a
    /// burst for a token that has no max_rps); names the field, as `Invalid` does.
    StateConflict {
        field: &'static str,
        message: String,
    },
    /// The database cannot be reached; try again later.
    Unavailable(String),
    Internal(String),
}

impl DomainError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> DomainError {
        DomainError::Invalid {
            field,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for DomainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainError::NotFound => write!(f, "not found"),
            DomainError::Revoked { at } => write!(f, "revoked at {at}"),
            DomainError::Invalid { field, message }
            | DomainError::StateConflict { field, message } => write!(f, "{field} {message}"),
            DomainError::InvalidAt { field, message } => write!(f, "{field} {message}"),
            DomainError::NoScope => write!(f, "no such scope"),
            DomainError::ScopeInUse { name, tokens } => {
                write!(f, "scope {name} is named by {tokens} tokens")
            }
            DomainError::Conflict(m) | DomainError::Internal(m) => write!(f, "{m}"),
            DomainError::Unavailable(m) => write!(f, "store unavailable: {m}"),
        }
    }
}

impl From<StoreError> for DomainError {
    fn from(e: StoreError) -> DomainError {
        match e {
            StoreError::NotFound => DomainError::NotFound,
            StoreError::Stale => {
                DomainError::Conflict("The token changed meanwhile; try again.".into())
            }
            StoreError::Conflict(m) => DomainError::Conflict(m),
            StoreError::Unavailable(m) => DomainError::Unavailable(m),
            StoreError::Backend(m) => DomainError::Internal(m),
        }
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}
