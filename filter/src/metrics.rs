//! The filter's Envoy stats: their names, and which counter a request's outcome adds to.
//! Plain Rust so that the mapping from a refusal to its counter is tested natively; the glue
//! only defines these names with Envoy and adds to what this module picks.

use crate::authorize::{Denial, Outcome};

/// Every counter the filter defines (Envoy shows each as `wasmcustom.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Allowed,
    MissingToken,
    InvalidToken,
    TokenExpired,
    TokenSuspended,
    RateLimited,
    StateUnavailable,
    SyncSuccess,
    SyncFailure,
    UsageReports,
    UsageFailures,
    UsageDropped,
}

impl Counter {
    /// In declaration order, so that `ALL[c.index()] == c` and an array of metric ids can be
    /// indexed by counter.
    pub const ALL: [Counter; 12] = [
        Counter::Allowed,
        Counter::MissingToken,
        Counter::InvalidToken,
        Counter::TokenExpired,
        Counter::TokenSuspended,
        Counter::RateLimited,
        Counter::StateUnavailable,
        Counter::SyncSuccess,
        Counter::SyncFailure,
        Counter::UsageReports,
        Counter::UsageFailures,
        Counter::UsageDropped,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Counter::Allowed => "tokengate.allowed",
            Counter::MissingToken => "tokengate.denied.missing_token",
            Counter::InvalidToken => "tokengate.denied.invalid_token",
            Counter::TokenExpired => "tokengate.denied.token_expired",
            Counter::TokenSuspended => "tokengate.denied.token_suspended",
            Counter::RateLimited => "tokengate.denied.rate_limited",
            Counter::StateUnavailable => "tokengate.denied.token_state_unavailable",
            Counter::SyncSuccess => "tokengate.sync.success",
            Counter::SyncFailure => "tokengate.sync.failure",
            Counter::UsageReports => "tokengate.usage.reports",
            Counter::UsageFailures => "tokengate.usage.failures",
            Counter::UsageDropped => "tokengate.usage.dropped",
        }
    }
}

/// Every gauge the filter defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge {
    /// Tokens not revoked, as the control plane last said.
    Tokens,
    /// The version of the token state in force.
    StateVersion,
}

impl Gauge {
    /// In declaration order, as [`Counter::ALL`].
    pub const ALL: [Gauge; 2] = [Gauge::Tokens, Gauge::StateVersion];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Gauge::Tokens => "tokengate.tokens",
            Gauge::StateVersion => "tokengate.state_version",
        }
    }
}

/// The counter that one request with this outcome adds one to.
pub fn for_outcome(outcome: &Outcome) -> Counter {
    match outcome {
        Outcome::Allow(_) => Counter::Allowed,
        Outcome::Deny(d) => denied(*d),
    }
}

/// The counter of a refusal: `tokengate.denied.<the error code the client gets>`.
pub fn denied(d: Denial) -> Counter {
    match d {
        Denial::MissingToken => Counter::MissingToken,
        Denial::InvalidToken => Counter::InvalidToken,
        Denial::TokenExpired => Counter::TokenExpired,
        Denial::TokenSuspended => Counter::TokenSuspended,
        Denial::RateLimited { .. } => Counter::RateLimited,
        Denial::StateUnavailable => Counter::StateUnavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorize::Identity;
    use crate::response;
    use std::collections::HashSet;
    use tokengate_wire::Kind;

    const DENIALS: [Denial; 6] = [
        Denial::MissingToken,
        Denial::InvalidToken,
        Denial::TokenExpired,
        Denial::TokenSuspended,
        Denial::RateLimited {
            retry_after_secs: 1,
            max_rps: 5,
            burst: 5,
        },
        Denial::StateUnavailable,
    ];

    #[test]
    fn each_refusal_counts_under_the_error_code_its_client_gets() {
        for d in DENIALS {
            let code = response::refusal(d).code;
            assert_eq!(
                for_outcome(&Outcome::Deny(d)).name(),
                format!("tokengate.denied.{code}"),
                "{d:?}"
            );
        }
        // Six refusals, six different counters: no two share one.
        let counters: HashSet<&str> = DENIALS.iter().map(|d| denied(*d).name()).collect();
        assert_eq!(counters.len(), DENIALS.len());
    }

    #[test]
    fn an_allowed_request_counts_as_allowed() {
        let identity = Identity {
            id: b"tok_a".to_vec(),
            name: b"a".to_vec(),
            owner: b"o".to_vec(),
            kind: Kind::User,
        };
        assert_eq!(for_outcome(&Outcome::Allow(identity)), Counter::Allowed);
        assert_eq!(Counter::Allowed.name(), "tokengate.allowed");
    }

    #[test]
    fn the_lists_index_by_position_and_names_are_distinct() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index(), i, "{c:?}");
        }
        for (i, g) in Gauge::ALL.iter().enumerate() {
            assert_eq!(g.index(), i, "{g:?}");
        }
        let names: Vec<&str> = Counter::ALL
            .iter()
            .map(|c| c.name())
            .chain(Gauge::ALL.iter().map(|g| g.name()))
            .collect();
        let distinct: HashSet<&str> = names.iter().copied().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("tokengate.")));
        assert_eq!(
            [
                Counter::SyncSuccess,
                Counter::SyncFailure,
                Counter::UsageReports,
                Counter::UsageFailures,
                Counter::UsageDropped
            ]
            .map(Counter::name),
            [
                "tokengate.sync.success",
                "tokengate.sync.failure",
                "tokengate.usage.reports",
                "tokengate.usage.failures",
                "tokengate.usage.dropped"
            ]
        );
        assert_eq!(
            Gauge::ALL.map(Gauge::name),
            ["tokengate.tokens", "tokengate.state_version"]
        );
    }
}
