//! The audit trail's shape: which fields of a token it records, how a change is reduced to
//! the fields that moved, and the actions it names. Secrets and their hashes are never among
//! the fields.

use crate::store::{AuditRecord, ScopeRow, TokenRow};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

pub const CREATED: &str = "token.created";
pub const UPDATED: &str = "token.updated";
pub const SUSPENDED: &str = "token.suspended";
pub const REACTIVATED: &str = "token.reactivated";
pub const ROTATED: &str = "token.rotated";
pub const REVOKED: &str = "token.revoked";
pub const EXPIRY_WARNING: &str = "token.expiry_warning";
pub const PURGED: &str = "token.purged";
pub const SCOPE_CREATED: &str = "scope.created";
pub const SCOPE_UPDATED: &str = "scope.updated";
pub const SCOPE_DELETED: &str = "scope.deleted";
pub const QUOTA_EXHAUSTED: &str = "token.quota_exhausted";

/// Every action the trail records.
pub const ACTIONS: &[&str] = &[
    CREATED,
    UPDATED,
    SUSPENDED,
    REACTIVATED,
    ROTATED,
    REVOKED,
    EXPIRY_WARNING,
    PURGED,
    SCOPE_CREATED,
    SCOPE_UPDATED,
    SCOPE_DELETED,
    QUOTA_EXHAUSTED,
];

/// Who the trail names as the actor of the control plane's own jobs.
pub const SYSTEM: &str = "system";

pub fn rfc3339(t: i64) -> String {
    DateTime::<Utc>::from_timestamp(t, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Unix milliseconds as RFC 3339 with milliseconds.
pub fn rfc3339_ms(t: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(t)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
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
    m.insert("limit_scope".into(), r.limit_scope.as_str().into());
    m.insert(
        "quota".into(),
        r.quota
            .and_then(|q| serde_json::to_value(q).ok())
            .unwrap_or(Value::Null),
    );
    m.insert("expires_at".into(), r.expires_at.map(rfc3339).into());
    m.insert("rotated_at".into(), r.rotated_at.map(rfc3339).into());
    let grace = r.retired.iter().map(|s| s.until).max();
    m.insert("old_secret_valid_until".into(), grace.map(rfc3339).into());
    m.insert("scopes".into(), r.scopes.clone().into());
    m
}

/// Reduces two versions of a token to the fields that differ.
pub fn diff(before: &TokenRow, after: &TokenRow) -> (Value, Value) {
    diff_fields(fields(before), fields(after))
}

fn diff_fields(b: Map<String, Value>, a: Map<String, Value>) -> (Value, Value) {
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

/// The entry for a change of `before` into `after`; a creation when `before` is `None`.
pub fn change(
    at: i64,
    actor: &str,
    action: &'static str,
    before: Option<&TokenRow>,
    after: &TokenRow,
) -> AuditRecord {
    let (old, new) = match before {
        Some(b) => {
            let (old, new) = diff(b, after);
            (Some(old), Some(new))
        }
        None => (None, Some(Value::Object(fields(after)))),
    };
    AuditRecord {
        at,
        actor: actor.to_string(),
        action,
        token_id: after.id.clone(),
        token_name: after.name.clone(),
        before: old,
        after: new,
    }
}

/// The entry for a purge: the token's fields as they were.
pub fn purge(at: i64, r: &TokenRow) -> AuditRecord {
    AuditRecord {
        at,
        actor: SYSTEM.to_string(),
        action: PURGED,
        token_id: r.id.clone(),
        token_name: r.name.clone(),
        before: Some(Value::Object(fields(r))),
        after: None,
    }
}

/// The audited fields of a scope.
pub fn scope_fields(s: &ScopeRow) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("description".into(), s.description.clone().into());
    m.insert(
        "rules".into(),
        serde_json::to_value(&s.rules).unwrap_or_default(),
    );
    m
}

/// The entry for a scope's creation (`before` is `None`), change, or deletion (`after` is
/// `None`). Scope entries name no token: `token_id` is empty and `token_name` holds the
/// scope's name (the API shows it as `scope`).
pub fn scope_change(
    at: i64,
    actor: &str,
    action: &'static str,
    before: Option<&ScopeRow>,
    after: Option<&ScopeRow>,
) -> AuditRecord {
    let (old, new) = match (before, after) {
        (Some(b), Some(a)) => {
            let (old, new) = diff_fields(scope_fields(b), scope_fields(a));
            (Some(old), Some(new))
        }
        (b, a) => (
            b.map(|b| Value::Object(scope_fields(b))),
            a.map(|a| Value::Object(scope_fields(a))),
        ),
    };
    let name = after.or(before).map(|s| s.name.clone()).unwrap_or_default();
    AuditRecord {
        at,
        actor: actor.to_string(),
        action,
        token_id: String::new(),
        token_name: name,
        before: old,
        after: new,
    }
}

/// Whether an action is about a scope (its entry names the scope in `token_name`).
pub fn is_scope_action(action: &str) -> bool {
    action.starts_with("scope.")
}
