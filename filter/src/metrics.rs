//! The filter's stats: one definition of their names and of which outcome counts where, for
//! both data-plane flavors. Low cardinality on purpose: never one metric per token.

use crate::authorize::{Denial, Outcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    pub const ALL: [Counter; 13] = [
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
            Counter::StateUnavailable => "tokengate.denied.token_state_unavailable",
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

    /// The counter a request's outcome goes to.
    pub fn of(outcome: Outcome) -> Counter {
        match outcome {
            Outcome::Allow => Counter::Allowed,
            Outcome::Deny(d) => Counter::denied(d),
        }
    }

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

    #[test]
    fn every_denial_counts_under_its_client_visible_code() {
        let denials = [
            Denial::MissingToken,
            Denial::InvalidToken,
            Denial::TokenExpired,
            Denial::TokenSuspended,
            Denial::RateLimited {
                retry_after_secs: 1,
                max_rps: 1,
                burst: 1,
            },
            Denial::StateUnavailable,
        ];
        for d in denials {
            let name = Counter::of(Outcome::Deny(d)).name();
            assert_eq!(
                name,
                format!("tokengate.denied.{}", response::refusal(d).code),
                "{d:?}"
            );
        }
        assert_eq!(Counter::of(Outcome::Allow).name(), "tokengate.allowed");
    }

    #[test]
    fn indexes_follow_the_lists_and_names_are_distinct() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        for (i, g) in Gauge::ALL.iter().enumerate() {
            assert_eq!(g.index(), i);
        }
        let names: std::collections::BTreeSet<_> = Counter::ALL
            .iter()
            .map(|c| c.name())
            .chain(Gauge::ALL.iter().map(|g| g.name()))
            .collect();
        assert_eq!(names.len(), Counter::ALL.len() + Gauge::ALL.len());
    }
}
