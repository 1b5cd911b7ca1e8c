//! Counters served at `GET /metrics` in Prometheus text. Labels are low-cardinality reasons
//! only: never a token, a token id or name, a credential or a client address.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which credential a failed check presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// An admin credential in `Authorization: Bearer`.
    Admin,
    /// The sync credential (`/v1/sync`, `/v1/usage`).
    Sync,
    /// An admin credential at the console's sign-in (`POST /v1/session`).
    SignIn,
}

impl Credential {
    /// The throttle allowance it counts against: admin credentials share one.
    pub fn pool(self) -> crate::throttle::Pool {
        match self {
            Credential::Admin | Credential::SignIn => crate::throttle::Pool::Admin,
            Credential::Sync => crate::throttle::Pool::Sync,
        }
    }

    pub const ALL: [Credential; 3] = [Credential::Admin, Credential::Sync, Credential::SignIn];

    pub fn as_str(self) -> &'static str {
        match self {
            Credential::Admin => "admin",
            Credential::Sync => "sync",
            Credential::SignIn => "sign_in",
        }
    }
}

/// Why the server closed a connection on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No complete request head within `--header-read-timeout`.
    HeaderTimeout,
    /// No request within `--idle-timeout` after the last one.
    IdleTimeout,
    /// Closed while idle to make room under `--max-connections`.
    Evicted,
    /// A request body not received within `--body-read-timeout` (answered 408).
    BodyTimeout,
}

impl Closed {
    pub const ALL: [Closed; 4] = [
        Closed::HeaderTimeout,
        Closed::IdleTimeout,
        Closed::Evicted,
        Closed::BodyTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::Evicted => "evicted",
            Closed::BodyTimeout => "body_timeout",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    auth_failures: [AtomicU64; 3],
    auth_throttled: AtomicU64,
    connections_open: AtomicU64,
    connections_accepted: AtomicU64,
    connections_closed: [AtomicU64; 4],
}

impl Metrics {
    pub fn auth_failure(&self, c: Credential) {
        self.auth_failures[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn auth_throttled(&self) {
        self.auth_throttled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_ended(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self, why: Closed) {
        self.connections_closed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "tokengate_auth_failures_total",
            "counter",
            "Credentials refused, by the kind of credential presented.",
        );
        for c in Credential::ALL {
            let _ = writeln!(
                out,
                "tokengate_auth_failures_total{{credential=\"{}\"}} {}",
                c.as_str(),
                get(&self.auth_failures[c as usize])
            );
        }
        head(
            &mut out,
            "tokengate_auth_throttled_total",
            "counter",
            "Requests answered 429 because their address failed too many credential checks.",
        );
        let _ = writeln!(
            out,
            "tokengate_auth_throttled_total {}",
            get(&self.auth_throttled)
        );
        head(
            &mut out,
            "tokengate_connections_open",
            "gauge",
            "Client connections open now.",
        );
        let _ = writeln!(
            out,
            "tokengate_connections_open {}",
            get(&self.connections_open)
        );
        head(
            &mut out,
            "tokengate_connections_accepted_total",
            "counter",
            "Client connections accepted.",
        );
        let _ = writeln!(
            out,
            "tokengate_connections_accepted_total {}",
            get(&self.connections_accepted)
        );
        head(
            &mut out,
            "tokengate_connections_closed_total",
            "counter",
            "Connections the server closed on its own, by reason.",
        );
        for why in Closed::ALL {
            let _ = writeln!(
                out,
                "tokengate_connections_closed_total{{reason=\"{}\"}} {}",
                why.as_str(),
                get(&self.connections_closed[why as usize])
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_its_header_and_samples() {
        let m = Metrics::default();
        m.auth_failure(Credential::Sync);
        m.auth_failure(Credential::Sync);
        m.connection_opened();
        m.connection_closed(Closed::Evicted);
        let text = m.render();
        assert!(text.contains("tokengate_auth_failures_total{credential=\"sync\"} 2\n"));
        assert!(text.contains("tokengate_auth_failures_total{credential=\"admin\"} 0\n"));
        assert!(text.contains("tokengate_connections_open 1\n"));
        assert!(text.contains("tokengate_connections_closed_total{reason=\"evicted\"} 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{line}");
        }
    }
}
