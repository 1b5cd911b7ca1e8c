//! `GET /v1/sync` messages.
//!
//! Request: `GET /v1/sync?since=V[&store_id=S][&cursor=C][&wait=SECONDS][&proxy_id=P]`
//! with `Authorization: Bearer <sync credential>`.
//!
//! * `since=0` without a `store_id` (a client with no state), a `since` newer than the
//!   store's version, a `since` older than the newest purged change (the client might have
//!   missed a revocation that is no longer on record), or a `store_id` that is not the
//!   store's: the answer is a full snapshot
//!   (`snapshot: true`), paged. A client holding state always sends its `store_id`, so an
//!   empty store at version 0 is long-polled like any other. While `next_cursor` is
//!   set, the client asks again with `cursor=` and the same `since`; only after the last page
//!   does it hold `version`. Records it held that no page mentioned are gone.
//! * otherwise the answer holds the changes after `since` in version order, at most one page;
//!   `version` is the last change's version, so asking again with it fetches the rest at once.
//!   With no change, the server holds the request up to `wait` seconds and then answers with
//!   no changes and the same version.
//! * A token may travel as several records with the same id: its secret's, one for the
//!   rotated-out secret in its grace period (it expires when the grace ends), and, in
//!   changes, a `revoked` record for a secret whose grace a later rotation cut short.

use crate::quota::Quota;
use crate::scope::SyncScope;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    User,
    Service,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Service => "service",
        }
    }
}

/// Whose limit `max_rps` and `burst` are: the whole fleet's (every proxy holds a share; the
/// default) or each proxy's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    #[default]
    Fleet,
    Proxy,
}

impl LimitScope {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitScope::Fleet => "fleet",
            LimitScope::Proxy => "proxy",
        }
    }

    pub fn parse(s: &str) -> Option<LimitScope> {
        match s {
            "fleet" => Some(LimitScope::Fleet),
            "proxy" => Some(LimitScope::Proxy),
            _ => None,
        }
    }
}

/// Status as the filter needs it: revoked tokens travel as tombstones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncStatus {
    Active,
    Suspended,
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// Lower-case hex `sha256(token)`; the secret itself never travels.
    pub hash: String,
    pub id: String,
    pub name: String,
    pub owner: String,
    pub kind: Kind,
    pub status: SyncStatus,
    /// `None`: unlimited.
    pub max_rps: Option<u32>,
    /// `None`: one second's worth (`max_rps`).
    pub burst: Option<u32>,
    /// Absent (an older control plane): the fleet's.
    #[serde(default)]
    pub limit_scope: LimitScope,
    /// Unix seconds; `None`: never expires.
    pub expires_at: Option<i64>,
    /// Scope names; `None`: unrestricted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// Identifies the database; a client holding state from another store resnapshots.
    pub store_id: String,
    pub version: u64,
    pub snapshot: bool,
    pub changes: Vec<SyncRecord>,
    /// Snapshot paging only: ask again with this cursor before holding `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Tokens that are not revoked, for the filter's gauge.
    pub token_count: u64,
    /// Snapshot answers only: the proxies the control plane counts as live (the poller
    /// included), so that a fresh proxy divides fleet limits before its first fleet answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies: Option<u32>,
    /// Every scope there is, replacing what the client held: on each page of a snapshot,
    /// and in a changes answer when a scope was created, changed or deleted after `since`.
    /// Absent: the client's scopes still hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<SyncScope>>,
    /// With `scopes`: the version of the last scope change (a deletion included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes_version: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_round_trips_with_snake_case_enums() {
        let r = SyncResponse {
            store_id: "s1".into(),
            version: 7,
            snapshot: false,
            changes: vec![SyncRecord {
                hash: "ab".repeat(32),
                id: "tok_1".into(),
                name: "ci".into(),
                owner: "team".into(),
                kind: Kind::Service,
                status: SyncStatus::Revoked,
                max_rps: Some(5),
                burst: None,
                limit_scope: Default::default(),
                expires_at: Some(1_900_000_000),
                scopes: None,
                quota: None,
                version: 7,
            }],
            next_cursor: None,
            token_count: 3,
            proxies: None,
            scopes: None,
            scopes_version: None,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""kind":"service""#));
        assert!(json.contains(r#""status":"revoked""#));
        assert!(!json.contains("next_cursor"));
        assert_eq!(serde_json::from_str::<SyncResponse>(&json).unwrap(), r);
    }

    #[test]
    fn a_kind_reads_as_it_travels() {
        for (kind, text) in [(Kind::User, "user"), (Kind::Service, "service")] {
            assert_eq!(kind.as_str(), text);
            assert_eq!(serde_json::to_value(kind).unwrap(), text);
        }
    }
}
