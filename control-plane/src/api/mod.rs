//! The HTTP API: `app(state)` builds the whole router, so tests serve exactly what runs.

mod audit;
mod auth;
mod body;
mod error;
mod fleet;
mod openapi;
pub mod schema;
mod scopes;
mod session;
mod sync;
mod tokens;
mod usage;

pub use error::ApiError;

use crate::domain::{Feed, Fleet, Scopes, Sessions, Tokens};
use crate::metrics::{Live, Metrics};
use crate::store::Store;
use crate::throttle::Throttle;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
    /// Fleet-wide limits: the proxies' reports and their shares.
    pub fleet: Arc<Fleet>,
    pub scopes: Arc<Scopes>,
    /// Answers woken long-polls, one read per version.
    pub feed: Arc<Feed>,
    pub metrics: Arc<Metrics>,
    pub admins: Arc<[Admin]>,
    pub sync_token: Arc<str>,
    /// Longest a `/v1/sync` long-poll is held (also its default).
    pub sync_max_wait: Duration,
    pub sync_page_size: u32,
    /// Turns true when the server is shutting down: waiting long-polls answer at once.
    pub shutdown: watch::Receiver<bool>,
    pub console: ConsoleSettings,
    /// Failed credential checks per client address.
    pub throttle: Arc<Throttle>,
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

/// The route template a request matched (`/v1/tokens/{id}`), carried out to the access log.
#[derive(Clone)]
struct Route(String);

async fn tag_route(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| Route(p.as_str().to_string()));
    let mut resp = next.run(req).await;
    if let Some(r) = route {
        resp.extensions_mut().insert(r);
    }
    resp
}

/// The client's address: the TCP peer (without one, as in a test that serves the router
/// directly, the unspecified address).
pub fn client_ip(extensions: &axum::http::Extensions) -> IpAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

/// One line per request, and the request counted by route template and status. The path
/// only: queries and headers may carry what must not be logged.
async fn access_log(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let client = client_ip(req.extensions());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let route = resp
        .extensions()
        .get::<Route>()
        .map_or("unmatched", |r| r.0.as_str());
    state.metrics.http(route, method.as_str(), status);
    tracing::info!(
        %method,
        %path,
        status,
        ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        %client,
        "request"
    );
    resp
}

/// What `/healthz` and `/readyz` answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Health {
    /// `ok` (`/healthz`) or `ready` (`/readyz`).
    #[schema(schema_with = health_status)]
    status: &'static str,
}

fn health_status() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
    schema::from_json(schema::one_of(&["ok", "ready"]))
}

#[utoipa::path(get, path = "/healthz", tag = "operations", operation_id = "healthz",
    summary = "Liveness",
    responses((status = 200, description = "The process answers (liveness): `ok`", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// How long a readiness probe waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

async fn store_ready(state: &AppState) -> Result<(), ApiError> {
    if *state.shutdown.borrow() {
        return Err(ApiError::ShuttingDown);
    }
    match tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ApiError::StoreUnavailable(format!(
            "no answer within {READY_TIMEOUT:?}"
        ))),
    }
}

#[utoipa::path(get, path = "/readyz", tag = "operations", operation_id = "readyz",
    summary = "Readiness",
    responses((status = 200, description = "The store answers: this replica can serve (`ready`)", body = Health),
        (status = 503, description = "The store does not answer within 2 s (`store_unavailable`, with \
            `Retry-After`), or the server is shutting down (`shutting_down`)", body = error::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait (`store_unavailable` only)")))))]
async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    store_ready(&state).await?;
    Ok(Json(Health { status: "ready" }))
}

#[utoipa::path(get, path = "/metrics", tag = "operations", operation_id = "metrics",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text (no token ids, names, credentials or client addresses in labels): credential checks refused and throttled, connections, long-polls, sync answers and reads, the version, store latency and errors, the database pool, webhook outcomes, job runs, requests by route and status", body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> Response {
    let ready = store_ready(&state).await.is_ok();
    let live = Live::of(state.store.as_ref(), state.feed.reads(), ready);
    let body = state.metrics.render(&live);
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
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
        .routes(routes!(scopes::create, scopes::list))
        .routes(routes!(scopes::get, scopes::update, scopes::delete))
        .routes(routes!(audit::list))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    let filters = OpenApiRouter::new()
        .routes(routes!(sync::sync))
        .routes(routes!(usage::report))
        .routes(routes!(fleet::report))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_sync,
        ));
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(
            session::sign_in,
            session::current,
            session::sign_out
        ))
        .merge(admin)
        .merge(filters)
}

/// The API description, as served at `/v1/openapi.json`.
pub fn openapi_document(state: &AppState) -> serde_json::Value {
    let mut doc = routes(state).into_openapi();
    openapi::add_self(&mut doc);
    let mut doc = serde_json::to_value(doc).unwrap_or_default();
    openapi::finish(&mut doc, &state.tokens.policy());
    doc
}

pub fn app(state: AppState) -> Router {
    // Rendered once: it depends only on the configuration.
    let doc =
        axum::body::Bytes::from(serde_json::to_vec(&openapi_document(&state)).unwrap_or_default());
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
                async move { ([(CONTENT_TYPE, "application/json")], doc) }
            }),
        )
        .route_layer(middleware::from_fn(tag_route))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}
