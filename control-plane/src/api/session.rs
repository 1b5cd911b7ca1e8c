//! `/v1/session`: the web console's sign-in. An admin credential is exchanged for a session
//! cookie (HttpOnly, SameSite=Strict) and a CSRF token that the page sends back in
//! `X-CSRF-Token` with every change; the credential itself never stays in the browser.

use super::auth::{admin_named_by, console_session, guarded, session_cookie, COOKIE};
use super::body::{parse_json, JsonBody};
use super::error::ErrorBody;
use super::openapi::{BadBody, Csrf, SignInCredential, Store};
use super::schema::{self, described};
use super::{ApiError, AppState};
use crate::domain::sessions::now_ms;
use crate::metrics::Credential;
use crate::policy::KindPolicy;
use axum::extract::{ConnectInfo, State};
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

/// `POST /v1/session`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    credential: Option<String>,
}

impl PartialSchema for SignIn {
    fn schema() -> RefOr<Schema> {
        // Anything but whitespace (which is trimmed off): a wrong credential is a 401.
        let not_blank = crate::text::class(true, &[crate::text::WHITESPACE]);
        let mut o = schema::object(
            json!({"credential": described(schema::matching(&not_blank), "An admin credential")}),
            &["credential"],
        );
        o.insert(
            "examples".into(),
            json!([{"credential": "3f9c1e7a0b5d4c2e8f6a1b3c5d7e9f01"}]),
        );
        schema::from_json(Value::Object(o))
    }
}

impl ToSchema for SignIn {}

#[derive(Serialize, ToSchema)]
pub struct KindLimits {
    /// Longest lifetime a token of this kind may be given; null: no limit.
    #[schema(required = true)]
    max_lifetime_seconds: Option<u64>,
    /// `never` is not offered when true.
    require_expiry: bool,
}

impl From<KindPolicy> for KindLimits {
    fn from(p: KindPolicy) -> KindLimits {
        KindLimits {
            max_lifetime_seconds: p.max_lifetime,
            require_expiry: p.require_expiry || p.max_lifetime.is_some(),
        }
    }
}

/// What the console needs to know about the session and the server's settings.
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    /// The admin credential's name (the audit actor of changes made in this session).
    actor: String,
    /// Send back in `X-CSRF-Token` with every POST, PATCH and DELETE.
    csrf_token: String,
    /// Seconds of inactivity after which the session ends.
    idle_timeout_seconds: u64,
    user: KindLimits,
    service: KindLimits,
    /// Expiries closer than this are shown as a warning (the longest expiry-warning lead).
    expiry_warning_seconds: i64,
}

fn view(state: &AppState, actor: &str, csrf: String) -> SessionView {
    SessionView {
        actor: actor.to_string(),
        csrf_token: csrf,
        idle_timeout_seconds: state.sessions.limits().idle.as_secs(),
        user: state.tokens.policy().user.into(),
        service: state.tokens.policy().service.into(),
        expiry_warning_seconds: state.console.expiry_warning_seconds,
    }
}

fn cookie(state: &AppState, value: &str, max_age: u64) -> Result<HeaderValue, ApiError> {
    let secure = if state.console.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .map_err(|e| ApiError::Internal(e.to_string()))
}

#[utoipa::path(post, path = "/v1/session", tag = "console", operation_id = "sign_in",
    summary = "Sign in to the console",
    request_body = SignIn,
    responses((status = 201, description = "Signed in; the session cookie is set", body = SessionView,
            headers(("Set-Cookie" = String, description = "The session cookie (HttpOnly, SameSite=Strict)"))),
        BadBody, SignInCredential, Store))]
pub async fn sign_in(
    State(state): State<AppState>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let b: SignIn = parse_json(&body)?;
    let credential = b
        .credential
        .filter(|c| !c.trim_matches(crate::text::is_whitespace).is_empty())
        .ok_or_else(|| ApiError::field("credential", "is required"))?;
    let client = connect.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0 .0.ip());
    let actor = guarded(&state, client, Credential::SignIn, || {
        admin_named_by(
            &state,
            credential
                .trim_matches(crate::text::is_whitespace)
                .as_bytes(),
        )
    })?;
    let issued = state.sessions.start(&actor, now_ms()).await?;
    tracing::info!(actor = %actor, "console sign-in");
    let max_age = state.sessions.limits().absolute.as_secs();
    let set = cookie(&state, &issued.id, max_age)?;
    let body = Json(view(&state, &actor, issued.csrf));
    Ok((StatusCode::CREATED, [(SET_COOKIE, set)], body).into_response())
}

#[utoipa::path(get, path = "/v1/session", tag = "console", operation_id = "get_session",
    summary = "The console session",
    security(("session" = [])),
    responses((status = 200, description = "The current session", body = SessionView),
        (status = 401, description = "`unauthorized`: not signed in, or the session ended",
            body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        Store))]
pub async fn current(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
) -> Result<Json<SessionView>, ApiError> {
    let s = console_session(&state, &headers, &method).await?;
    Ok(Json(view(&state, &s.actor, s.csrf)))
}

/// Ends the session the cookie names: it takes the cookie and its CSRF token, as every
/// change in a session does. An admin credential has no session to end, so
/// `Authorization` is not read here.
#[utoipa::path(delete, path = "/v1/session", tag = "console", operation_id = "sign_out",
    summary = "Sign out of the console",
    security(("session" = [], "csrf" = [])),
    responses((status = 204, description = "Signed out; the cookie is cleared",
            headers(("Set-Cookie" = String, description = "Clears the session cookie (Max-Age=0)"))),
        (status = 401, description = "`unauthorized`: not signed in, or the session ended",
            body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        Csrf, Store))]
pub async fn sign_out(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let session = console_session(&state, &headers, &method).await?;
    if let Some(id) = session_cookie(&headers) {
        state.sessions.end(id).await?;
    }
    tracing::info!(actor = %session.actor, "console sign-out");
    let clear = cookie(&state, "", 0)?;
    Ok((StatusCode::NO_CONTENT, [(SET_COOKIE, clear)]).into_response())
}
