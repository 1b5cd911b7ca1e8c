//! The control plane as one value: `Application::build(config)` opens the store, builds the
//! domain services and the API state, and starts the background jobs; `serve` answers on a
//! listener until a shutdown signal, then waits for the background jobs and closes the
//! store. `tokengate serve` and the tests build it the same way.

use crate::api::{app, Admin, AppState, ConsoleSettings};
use crate::connections::{self, Limits as ConnectionLimits};
use crate::domain::housekeeping::{self, Jobs};
use crate::domain::sessions::Limits;
use crate::domain::{Feed, Fleet, Scopes, Sessions, Tokens};
use crate::metrics::{Metered, Metrics};
use crate::policy::Policy;
use crate::store::{PgSettings, PostgresStore, SqliteStore, Store};
use crate::throttle::{self, Throttle};
use axum::Router;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where the tokens live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Database {
    /// `postgres://...` or `postgresql://...`; `sqlite://PATH`; anything else is a path.
    pub fn parse(s: &str) -> Result<Database, String> {
        let s = s.trim();
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(Database::Postgres(s.to_string()));
        }
        let path = s.strip_prefix("sqlite://").unwrap_or(s);
        if path.is_empty() {
            return Err("--db is empty: give a SQLite file or a postgres:// URL".into());
        }
        if path.contains("://") {
            return Err(format!(
                "--db {path}: unknown scheme; use a file path, sqlite://PATH or postgres://..."
            ));
        }
        Ok(Database::Sqlite(PathBuf::from(path)))
    }

    /// Opens (and migrates) the store.
    pub async fn open(&self, settings: PgSettings) -> Result<Arc<dyn Store>, String> {
        let shown = self.to_string();
        let opened: Result<Arc<dyn Store>, String> = match self {
            Database::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|s| Arc::new(s) as Arc<dyn Store>)
                    .map_err(|e| e.to_string())
            }
            Database::Postgres(url) => PostgresStore::open(url, settings)
                .await
                .map(|s| Arc::new(s) as Arc<dyn Store>)
                .map_err(|e| e.to_string()),
        };
        opened.map_err(|e| format!("cannot open database {shown}: {e}"))
    }
}

/// Never shows a password.
impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "{}", path.display()),
            Database::Postgres(url) => write!(f, "{}", crate::store::redacted(url)),
        }
    }
}

/// Everything the control plane runs with, checked (`tokengate serve` builds it from its
/// options).
#[derive(Clone)]
pub struct Config {
    pub database: Database,
    pub postgres: PgSettings,
    pub admins: Vec<Admin>,
    pub sync_token: String,
    pub policy: Policy,
    /// Longest a `/v1/sync` long-poll is held (also its default).
    pub sync_max_wait: Duration,
    pub sync_page_size: u32,
    pub jobs: Jobs,
    pub jobs_interval: Duration,
    pub console: ConsoleSettings,
    pub sessions: Limits,
    /// Client connections: deadlines and the cap.
    pub connections: ConnectionLimits,
    /// How many refused credentials an address may present.
    pub throttle: throttle::Settings,
    /// Quotas may have periods of seconds (tests only).
    pub test_quota_periods: bool,
}

pub struct Application {
    state: AppState,
    connections: ConnectionLimits,
    shutdown: watch::Sender<bool>,
    jobs: Vec<JoinHandle<()>>,
}

impl Application {
    pub async fn build(config: Config) -> Result<Application, String> {
        let metrics = Arc::new(Metrics::default());
        let store: Arc<dyn Store> = Arc::new(Metered::new(
            config.database.open(config.postgres).await?,
            metrics.clone(),
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let state = AppState {
            feed: Arc::new(Feed::new(store.clone(), config.sync_page_size)),
            metrics: metrics.clone(),
            tokens: Arc::new(
                Tokens::new(store.clone(), config.policy)
                    .with_test_quota_periods(config.test_quota_periods),
            ),
            sessions: Arc::new(Sessions::new(store.clone(), config.sessions)),
            fleet: Arc::new(
                Fleet::new(store.clone()).with_quota_events(config.jobs.webhook.is_some()),
            ),
            scopes: Arc::new(Scopes::new(store.clone())),
            store: store.clone(),
            admins: config.admins.into(),
            sync_token: config.sync_token.into(),
            sync_max_wait: config.sync_max_wait,
            sync_page_size: config.sync_page_size,
            shutdown: shutdown_rx.clone(),
            console: config.console,
            throttle: Arc::new(Throttle::new(config.throttle)),
        };
        let jobs = vec![tokio::spawn(housekeeping::run(
            store,
            config.jobs,
            config.jobs_interval,
            metrics,
            shutdown_rx,
        ))];
        Ok(Application {
            state,
            connections: config.connections,
            shutdown,
            jobs,
        })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.state.store.clone()
    }

    pub fn router(&self) -> Router {
        app(self.state.clone())
    }

    /// Serves until `signal` completes; then held long-polls answer at once, the server
    /// drains, the background jobs finish their round and the store closes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), String> {
        let router = self.router();
        let shutdown = self.shutdown.clone();
        connections::serve(
            listener,
            router,
            self.connections,
            self.state.metrics.clone(),
            async move {
                signal.await;
                tracing::info!("shutting down: releasing long-polls");
                let _ = shutdown.send(true);
            },
        )
        .await;
        self.stop().await;
        Ok(())
    }

    /// Stops the background jobs (a round in progress finishes) and closes the store.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for job in self.jobs {
            let _ = job.await;
        }
        self.state.store.close().await;
        tracing::info!("stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        assert_eq!(
            Database::parse("tokengate.db").unwrap(),
            Database::Sqlite("tokengate.db".into())
        );
        assert_eq!(
            Database::parse("sqlite:///var/lib/t.db").unwrap(),
            Database::Sqlite("/var/lib/t.db".into())
        );
        let pg =
            Database::parse("postgres://app:s3cret@db:5432/tokengate?sslmode=disable").unwrap();
        assert_eq!(pg.to_string(), "postgres://app@db:5432/tokengate");
        assert!(Database::parse("mysql://x").is_err());
        assert!(Database::parse("sqlite://").is_err());
    }
}
