//! The HTTP API: `app(state)` builds the whole router, so tests serve exactly what runs.

mod audit;
mod auth;
mod body;
mod error;
mod openapi;
mod session;
mod sync;
mod tokens;
mod usage;

pub use error::ApiError;

use crate::domain::{Sessions, Tokens};
use crate::store::Store;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// A named admin credential; the name is the audit trail's actor.
#[derive(Clone, Debug)]
pub struct Admin {
    pub name: Arc<str>,
    pub secret: String,
}

#[derive(Clone)]
pub struct AppState {
    /// Read directly only by the sync long-poll and the readiness check; every decision goes
    /// through `tokens` and `sessions`.
    pub store: Arc<dyn Store>,
    pub tokens: Arc<Tokens>,
    pub sessions: Arc<Sessions>,
    pub admins: Arc<[Admin]>,
    pub sync_token: Arc<str>,
    /// Longest a `/v1/sync` long-poll is held (also its default).
    pub sync_max_wait: Duration,
    pub sync_page_size: u32,
    /// Turns true when the server is shutting down: waiting long-polls answer at once.
    pub shutdown: watch::Receiver<bool>,
    pub console: ConsoleSettings,
}

/// The web console's settings.
#[derive(Clone, Debug)]
pub struct ConsoleSettings {
    /// Serve the console's page at `/` (the session API is always there).
    pub enabled: bool,
    /// Mark the session cookie `Secure` (set when browsers reach tokengate over HTTPS).
    pub secure_cookies: bool,
    /// Expiries closer than this are highlighted.
    pub expiry_warning_seconds: i64,
}

impl Default for ConsoleSettings {
    fn default() -> ConsoleSettings {
        ConsoleSettings {
            enabled: true,
            secure_cookies: false,
            expiry_warning_seconds: 7 * 86_400,
        }
    }
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

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The server is up", content_type = "application/json")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn no_route() -> ApiError {
    ApiError::NoRoute
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Every documented route with its handler; `/v1/openapi.json` is generated from this, so
/// the document and the routes come from one list.
fn routes(state: &AppState) -> OpenApiRouter<AppState> {
    let admin = OpenApiRouter::new()
        .routes(routes!(tokens::create, tokens::list))
        .routes(routes!(tokens::get, tokens::update, tokens::revoke))
        .routes(routes!(tokens::suspend))
        .routes(routes!(tokens::reactivate))
        .routes(routes!(tokens::rotate))
        .routes(routes!(audit::list))
        .routes(routes!(session::sign_out))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    let filters = OpenApiRouter::new()
        .routes(routes!(sync::sync))
        .routes(routes!(usage::report))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_sync,
        ));
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(session::sign_in, session::current))
        .merge(admin)
        .merge(filters)
}

/// The API description, as served at `/v1/openapi.json`.
pub fn openapi_document(state: &AppState) -> utoipa::openapi::OpenApi {
    let mut doc = routes(state).into_openapi();
    openapi::add_self(&mut doc);
    doc
}

pub fn app(state: AppState) -> Router {
    let doc = Arc::new(openapi_document(&state));
    let (router, _) = routes(&state).split_for_parts();
    let router = if state.console.enabled {
        router.merge(crate::console::routes())
    } else {
        router
    };
    router
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}
