//! The HTTP API: `app(state)` builds the whole router, so tests serve exactly what runs.

mod auth;
mod body;
mod error;
mod sync;
mod tokens;

pub use error::ApiError;

use crate::store::{Store, StoreError};
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub admin_token: Arc<str>,
    pub sync_token: Arc<str>,
    /// Longest a `/v1/sync` long-poll is held (also its default).
    pub sync_max_wait: Duration,
    pub sync_page_size: u32,
    /// Turns true when the server is shutting down: waiting long-polls answer at once.
    pub shutdown: watch::Receiver<bool>,
}

/// Runs a store call off the async workers (SQLite fsyncs on every write).
async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

/// One line per request. The path only: queries and headers may carry what must not be logged.
async fn access_log(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = Instant::now();
    let resp = next.run(req).await;
    tracing::info!(
        %method,
        %path,
        status = resp.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    resp
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

pub fn app(state: AppState) -> Router {
    let admin = Router::new()
        .route("/v1/tokens", post(tokens::create).get(tokens::list))
        .route(
            "/v1/tokens/{id}",
            get(tokens::get)
                .patch(tokens::update)
                .delete(tokens::revoke),
        )
        .route("/v1/tokens/{id}/suspend", post(tokens::suspend))
        .route("/v1/tokens/{id}/reactivate", post(tokens::reactivate))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    let sync = Router::new()
        .route("/v1/sync", get(sync::sync))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_sync,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(admin)
        .merge(sync)
        .fallback(not_found)
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}
