//! `tokengate serve`: options, start-up (migrations, credentials) and graceful shutdown.

use crate::api::{app, AppState};
use crate::store::SqliteStore;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on
    #[arg(long, env = "TOKENGATE_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: String,
    /// SQLite database file (created, and migrated, at start)
    #[arg(long, env = "TOKENGATE_DB", default_value = "tokengate.db")]
    pub db: PathBuf,
    /// Admin credential for the token API
    #[arg(long, env = "TOKENGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File holding the admin credential (used when --admin-token is not given)
    #[arg(long, env = "TOKENGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Sync credential: lets the filters read /v1/sync and nothing else
    #[arg(long, env = "TOKENGATE_SYNC_TOKEN", hide_env_values = true)]
    pub sync_token: Option<String>,
    /// File holding the sync credential (used when --sync-token is not given)
    #[arg(long, env = "TOKENGATE_SYNC_TOKEN_FILE")]
    pub sync_token_file: Option<PathBuf>,
    /// Longest time a /v1/sync long-poll is held before answering "no change"
    #[arg(long, env = "TOKENGATE_SYNC_MAX_WAIT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub sync_max_wait_seconds: u64,
    /// Records per /v1/sync answer (snapshot pages and change batches)
    #[arg(long, env = "TOKENGATE_SYNC_PAGE_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub sync_page_size: u32,
}

fn credential(
    name: &str,
    value: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<String, String> {
    let (secret, source) = match (value, file) {
        (Some(v), _) => (v.clone(), format!("--{name}")),
        (None, Some(path)) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --{name}-file {}: {e}", path.display()))?,
            format!("--{name}-file"),
        ),
        (None, None) => {
            let env = name.to_uppercase().replace('-', "_");
            return Err(format!(
                "the {name} is required: set TOKENGATE_{env} or TOKENGATE_{env}_FILE"
            ));
        }
    };
    let secret = secret.trim().to_string();
    if secret.len() < 16 {
        return Err(format!("{source} must be at least 16 characters"));
    }
    Ok(secret)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

pub async fn run(args: ServeArgs) -> Result<(), String> {
    let admin_token = credential("admin-token", &args.admin_token, &args.admin_token_file)?;
    let sync_token = credential("sync-token", &args.sync_token, &args.sync_token_file)?;
    if admin_token == sync_token {
        return Err("the admin and sync credentials must differ".into());
    }
    let store = SqliteStore::open(&args.db)
        .map_err(|e| format!("cannot open database {}: {e}", args.db.display()))?;
    let (shutdown_tx, shutdown) = watch::channel(false);
    let state = AppState {
        store: Arc::new(store),
        admin_token: admin_token.into(),
        sync_token: sync_token.into(),
        sync_max_wait: Duration::from_secs(args.sync_max_wait_seconds),
        sync_page_size: args.sync_page_size,
        shutdown,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, db = %args.db.display(), "listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: releasing long-polls");
            let _ = shutdown_tx.send(true);
            // Keep the sender alive until the server has drained.
            std::mem::forget(shutdown_tx);
        })
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}
