//! The filter's stats: one definition of their names and of which refusal counts where, for
//! both data-plane flavors, so that the mapping is tested natively; each flavor only defines
//! these names with Envoy and adds to what this module picks. Low cardinality on purpose:
//! never one metric per token.

use crate::authorize::Denial;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    Allowed,
    MissingToken,
    InvalidToken,
    TokenExpired,
    TokenSuspended,
    RateLimited,
    QuotaExceeded,
    StateUnavailable,
    InsufficientScope,
    SyncSuccess,
    SyncFailure,
    UsageReports,
    UsageFailures,
    UsageDropped,
    /// A hook of the native module panicked and answered 503 (a panic in the wasm filter
    /// traps its VM instead, which Envoy counts itself).
    Panics,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gauge {
    Tokens,
    StateVersion,
}

impl Counter {
    pub const ALL: [Counter; 15] = [
        Counter::Allowed,
        Counter::MissingToken,
        Counter::InvalidToken,
        Counter::TokenExpired,
        Counter::TokenSuspended,
        Counter::RateLimited,
        Counter::QuotaExceeded,
        Counter::StateUnavailable,
        Counter::InsufficientScope,
        Counter::SyncSuccess,
        Counter::SyncFailure,
        Counter::UsageReports,
        Counter::UsageFailures,
        Counter::UsageDropped,
        Counter::Panics,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::Allowed => "tokengate.allowed",
            Counter::MissingToken => "tokengate.denied.missing_token",
            Counter::InvalidToken => "tokengate.denied.invalid_token",
            Counter::TokenExpired => "tokengate.denied.token_expired",
            Counter::TokenSuspended => "tokengate.denied.token_suspended",
            Counter::RateLimited => "tokengate.denied.rate_limited",
            Counter::QuotaExceeded => "tokengate.denied.quota_exceeded",
            Counter::StateUnavailable => "tokengate.denied.token_state_unavailable",
            Counter::InsufficientScope => "tokengate.denied.insufficient_scope",
            Counter::SyncSuccess => "tokengate.sync.success",
            Counter::SyncFailure => "tokengate.sync.failure",
            Counter::UsageReports => "tokengate.usage.reports",
            Counter::UsageFailures => "tokengate.usage.failures",
            Counter::UsageDropped => "tokengate.usage.dropped",
            Counter::Panics => "tokengate.panics",
        }
    }

    /// Position in [`Counter::ALL`], for hosts that keep counts in an array.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The counter of a refusal: `tokengate.denied.<the error code the client gets>`.
    pub fn denied(d: Denial) -> Counter {
        match d {
            Denial::MissingToken => Counter::MissingToken,
            Denial::InvalidToken => Counter::InvalidToken,
            Denial::TokenExpired => Counter::TokenExpired,
            Denial::TokenSuspended => Counter::TokenSuspended,
            Denial::RateLimited { .. } => Counter::RateLimited,
            Denial::QuotaExceeded { .. } => Counter::QuotaExceeded,
            Denial::StateUnavailable => Counter::StateUnavailable,
            Denial::InsufficientScope => Counter::InsufficientScope,
        }
    }
}

impl Gauge {
    pub const ALL: [Gauge; 2] = [Gauge::Tokens, Gauge::StateVersion];

    pub fn name(self) -> &'static str {
        match self {
            Gauge::Tokens => "tokengate.tokens",
            Gauge::StateVersion => "tokengate.state_version",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response;
    use std::collections::BTreeSet;

    const DENIALS: [Denial; 8] = [
        Denial::MissingToken,
        Denial::InvalidToken,
        Denial::TokenExpired,
        Denial::TokenSuspended,
        Denial::RateLimited {
            retry_after_secs: 1,
            max_rps: 5,
            burst: 5,
        },
        Denial::QuotaExceeded {
            retry_after_secs: 1,
            limit: 10,
            window_secs: 3_600,
        },
        Denial::StateUnavailable,
        Denial::InsufficientScope,
    ];

    #[test]
    fn each_refusal_counts_under_the_error_code_its_client_gets() {
        for d in DENIALS {
            let code = response::refusal(d).code;
            assert_eq!(
                Counter::denied(d).name(),
                format!("tokengate.denied.{code}"),
                "{d:?}"
            );
        }
        // Each refusal its own counter: no two share one.
        let counters: BTreeSet<&str> = DENIALS.iter().map(|d| Counter::denied(*d).name()).collect();
        assert_eq!(counters.len(), DENIALS.len());
        assert_eq!(Counter::Allowed.name(), "tokengate.allowed");
    }

    #[test]
    fn indexes_follow_the_lists_and_names_are_distinct() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index(), i, "{c:?}");
        }
        for (i, g) in Gauge::ALL.iter().enumerate() {
            assert_eq!(g.index(), i, "{g:?}");
        }
        let names: BTreeSet<_> = Counter::ALL
            .iter()
            .map(|c| c.name())
            .chain(Gauge::ALL.iter().map(|g| g.name()))
            .collect();
        assert_eq!(names.len(), Counter::ALL.len() + Gauge::ALL.len());
        assert!(names.iter().all(|n| n.starts_with("tokengate.")));
        assert_eq!(
            [
                Counter::SyncSuccess,
                Counter::SyncFailure,
                Counter::UsageReports,
                Counter::UsageFailures,
                Counter::UsageDropped,
                Counter::Panics
            ]
            .map(Counter::name),
            [
                "tokengate.sync.success",
                "tokengate.sync.failure",
                "tokengate.usage.reports",
                "tokengate.usage.failures",
                "tokengate.usage.dropped",
                "tokengate.panics"
            ]
        );
        assert_eq!(
            Gauge::ALL.map(Gauge::name),
            ["tokengate.tokens", "tokengate.state_version"]
        );
    }
}
