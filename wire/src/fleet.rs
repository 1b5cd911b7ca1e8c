//! `POST /v1/fleet`: fleet-wide rate limits. Each Envoy's sync leader reports, once per
//! interval, how many requests its workers admitted and refused per fleet-limited token, and
//! gets back its share of each such token's `max_rps` and burst.
//!
//! Request: `POST /v1/fleet` with `Authorization: Bearer <sync credential>` and a JSON
//! [`FleetReport`]; sent every interval even with no token in it, which keeps the proxy
//! counted as live. Answer: 200 and a [`FleetAnswer`]. A share holds until `ttl_ms` after the
//! answer; past it the proxy falls back to `max_rps / proxies` (the last `proxies` it heard).

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
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<FleetReport>(&json).unwrap(), r);
        assert!(serde_json::from_str::<FleetReport>(
            r#"{"proxy_id":"p","interval_ms":1000,"tokens":[],"x":1}"#
        )
        .is_err());
    }
}
