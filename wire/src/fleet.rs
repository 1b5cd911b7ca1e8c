//! `POST /v1/fleet`: fleet-wide rate limits. Each Envoy's sync leader reports, once per
//! interval, how many requests its workers admitted and refused per fleet-limited token, and
//! gets back its share of each such token's `max_rps` and burst.
//!
//! Request: `POST /v1/fleet` with `Authorization: Bearer <sync credential>` and a JSON
//! [`FleetReport`]; sent every interval even with no token in it, which keeps the proxy
//! counted as live. Answer: 200 and a [`FleetAnswer`]. A share holds until `ttl_ms` after the
//! answer; past it the proxy falls back to `max_rps / proxies` (the last `proxies` it heard).
//!
//! Quotas ride on the same exchange. A proxy reports, for every secret of a quota-limited
//! token it holds quota state for in the current period (and every one named in its last
//! answer), [`QuotaHeld`]: what it admitted this period and the ceiling it enforces. The
//! answer's [`QuotaGrant`]s set new ceilings. The control plane keeps the ceilings of all
//! holders within the quota, counting each holder at the larger of the ceiling it last
//! granted and the one the holder last said it enforces (an answer may be lost), and each
//! live proxy it has not heard of in the period at `limit / proxies`: what a proxy enforces
//! before its first grant of a period (or while the control plane is away at a period's
//! start).

use serde::{Deserialize, Serialize};

/// Most tokens one report may carry; the control plane refuses larger reports.
pub const MAX_TOKENS: usize = 10_000;
/// Longest `proxy_id` the control plane accepts.
pub const MAX_PROXY_ID: usize = 128;
/// Report intervals the control plane accepts, in milliseconds.
pub const MIN_INTERVAL_MS: u32 = 100;
pub const MAX_INTERVAL_MS: u32 = 60_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenDemand {
    /// Token id (`tok_...`), never the secret or its hash.
    pub id: String,
    /// Requests let through during the interval.
    pub admitted: u64,
    /// Requests refused during the interval.
    pub refused: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetReport {
    pub proxy_id: String,
    /// The interval the counts cover, and the proxy's report period.
    pub interval_ms: u32,
    /// Fleet-limited tokens with traffic in the interval only.
    pub tokens: Vec<TokenDemand>,
    /// Quota state this proxy holds (see the module's documentation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<QuotaHeld>,
}

/// One secret's quota state on the reporting proxy, for the period starting `period_start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaHeld {
    /// Lower-hex `sha256` of the secret.
    pub hash: String,
    /// Unix seconds: the start of the period the counts are for.
    pub period_start: i64,
    /// Requests this proxy admitted with the secret in the period.
    pub spent: u64,
    /// The ceiling of `spent` this proxy enforces.
    pub allowed: u64,
}

/// A new ceiling for one secret's quota state on the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaGrant {
    pub hash: String,
    /// The period the ceiling is for; a proxy in another period ignores it.
    pub period_start: i64,
    /// The token's quota limit the grant was computed from; a proxy holding another (the
    /// token changed meanwhile) ignores the grant.
    pub limit: u64,
    /// The most requests this proxy may admit with the secret in the period, all told.
    pub allowed: u64,
}

/// One secret's share of its token's limit (a token in a rotation's grace period has two).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Lower-hex `sha256` of the secret: the rate state it applies to.
    pub hash: String,
    /// The token's limit the share was computed from; a proxy holding another (the token
    /// changed meanwhile) ignores the share.
    pub max_rps: u32,
    pub burst: u32,
    /// This proxy's rate, in thousandths of a request per second.
    pub rate_milli: u64,
    /// This proxy's burst, at least 1.
    pub share_burst: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetAnswer {
    /// Proxies the control plane counts as live, this one included.
    pub proxies: u32,
    /// How long the shares hold without a newer answer.
    pub ttl_ms: u32,
    pub shares: Vec<Share>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<QuotaGrant>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_refuses_unknown_fields_and_round_trips() {
        let r = FleetReport {
            proxy_id: "envoy-1".into(),
            interval_ms: 1_000,
            tokens: vec![TokenDemand {
                id: "tok_1".into(),
                admitted: 10,
                refused: 2,
            }],
            quotas: vec![QuotaHeld {
                hash: "ab".repeat(32),
                period_start: 1_800_000_000,
                spent: 5,
                allowed: 9,
            }],
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<FleetReport>(&json).unwrap(), r);
        assert!(serde_json::from_str::<FleetReport>(
            r#"{"proxy_id":"p","interval_ms":1000,"tokens":[],"x":1}"#
        )
        .is_err());
    }
}
