//! `POST /v1/usage`: request counts per token, reported in batches by each Envoy's sync leader.
//!
//! Request: `POST /v1/usage` with `Authorization: Bearer <sync credential>` and a JSON
//! [`UsageReport`]. Answer: 204. Counts are deltas since the previous report from the same
//! proxy; the control plane adds them up and keeps the latest `last_used_at`. Unknown or
//! purged ids are ignored. A lost report loses only its counts, never blocks traffic.

use serde::{Deserialize, Serialize};

/// Most entries one report may carry; the control plane refuses larger bodies.
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageEntry {
    /// Token id (`tok_...`), never the secret or its hash.
    pub id: String,
    /// Requests let through since the previous report.
    pub allowed: u64,
    /// Requests refused (expired, suspended, rate limited) since the previous report.
    pub denied: u64,
    /// Unix seconds of the latest request counted here.
    pub last_used_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    #[serde(default)]
    pub proxy_id: String,
    pub entries: Vec<UsageEntry>,
}
