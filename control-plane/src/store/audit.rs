//! The audit trail as stored: append-only entries, each written in the transaction of the
//! change it records. What an entry says is the domain's (`crate::domain::audit`).

use serde_json::Value;

/// An entry to append.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Unix seconds.
    pub at: i64,
    pub actor: String,
    pub action: &'static str,
    pub token_id: String,
    pub token_name: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub seq: u64,
    /// Unix seconds.
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub token_id: String,
    pub token_name: String,
    /// The fields that changed, as they were (`None` for a creation).
    pub before: Option<Value>,
    /// The fields that changed, as they became (`None` for a purge).
    pub after: Option<Value>,
}

#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub token_id: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    /// Unix seconds, inclusive.
    pub since: Option<i64>,
    /// Unix seconds, exclusive.
    pub until: Option<i64>,
    /// Entries with a smaller sequence number (the previous page's last).
    pub before_seq: Option<u64>,
    pub limit: u32,
}
