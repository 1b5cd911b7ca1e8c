//! The audit trail's shape: which fields of a token it records, and how a change is reduced
//! to the fields that moved. Secrets and their hashes are never among them.

use super::TokenRow;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

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

pub fn rfc3339(t: i64) -> String {
    DateTime::<Utc>::from_timestamp(t, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The audited fields of a token.
pub fn fields(r: &TokenRow) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("name".into(), r.name.clone().into());
    m.insert("kind".into(), r.kind.as_str().into());
    m.insert("owner".into(), r.owner.clone().into());
    m.insert("status".into(), r.status.as_str().into());
    m.insert("max_rps".into(), r.max_rps.into());
    m.insert("burst".into(), r.burst.into());
    m.insert("expires_at".into(), r.expires_at.map(rfc3339).into());
    m.insert("rotated_at".into(), r.rotated_at.map(rfc3339).into());
    let grace = r.retired.iter().map(|s| s.until).max();
    m.insert("old_secret_valid_until".into(), grace.map(rfc3339).into());
    m
}

/// Reduces two versions of a token to the fields that differ.
pub fn diff(before: &TokenRow, after: &TokenRow) -> (Value, Value) {
    let (b, a) = (fields(before), fields(after));
    let mut old = Map::new();
    let mut new = Map::new();
    for (k, v) in &a {
        if b.get(k) != Some(v) {
            old.insert(k.clone(), b.get(k).cloned().unwrap_or(Value::Null));
            new.insert(k.clone(), v.clone());
        }
    }
    (Value::Object(old), Value::Object(new))
}
