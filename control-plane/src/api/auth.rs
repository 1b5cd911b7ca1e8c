//! Two kinds of credential with separate powers: named admin credentials for the token and
//! audit API, and the sync credential (it sits in every proxy's configuration) that may only
//! read `/v1/sync` and report `/v1/usage`. The web console's session cookie stands for the
//! admin credential it was signed in with, and must bring its CSRF token on every change.
//! Every presented credential goes through `guarded`, which slows guessing per address.

use super::error::ApiError;
use super::{client_ip, AppState};
use crate::domain::sessions::{now_ms, Session};
use crate::metrics::Credential;
use crate::secrets::same_secret;
use crate::throttle::retry_after_secs;
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, COOKIE as COOKIE_HEADER};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// The console's session cookie.
pub const COOKIE: &str = "tokengate_session";
/// The header that carries a session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The name of the admin credential a request presented; the audit trail's actor.
#[derive(Debug, Clone)]
pub struct Actor(pub Arc<str>);

fn presented(req: &Request) -> Option<&[u8]> {
    let v = req.headers().get(AUTHORIZATION)?.as_bytes();
    if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
        Some(v[7..].trim_ascii())
    } else {
        None
    }
}

/// The session cookie's value, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get_all(COOKIE_HEADER)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let (name, value) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
            (name == COOKIE.as_bytes() && value.len() > 1).then(|| &value[1..])
        })
}

/// The name of the admin credential `c` is, if it is one.
pub fn admin_named_by(state: &AppState, c: &[u8]) -> Option<Arc<str>> {
    // Compare against every credential so timing does not tell which one was close.
    let mut who = None;
    for admin in state.admins.iter() {
        if same_secret(c, admin.secret.as_bytes()) {
            who = Some(admin.name.clone());
        }
    }
    who
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Compares a presented credential, unless its address has failed too often: then 429,
/// whether the credential is right or not. A refusal is counted and logged with the
/// address and the kind of credential, never the credential.
pub fn guarded<T>(
    state: &AppState,
    client: IpAddr,
    kind: Credential,
    verify: impl FnOnce() -> Option<T>,
) -> Result<T, ApiError> {
    let now = Instant::now();
    if let Err(wait) = state.throttle.check(client, kind.pool(), now) {
        state.metrics.auth_throttled();
        return Err(ApiError::Throttled {
            retry_after_secs: retry_after_secs(wait),
        });
    }
    if let Some(ok) = verify() {
        return Ok(ok);
    }
    state.metrics.auth_failure(kind);
    tracing::warn!(%client, credential = kind.as_str(), "credential refused");
    if let Some(wait) = state.throttle.failed(client, kind.pool(), now) {
        tracing::warn!(
            %client,
            retry_after_s = retry_after_secs(wait),
            "too many refused credentials: this address gets 429 until then"
        );
    }
    Err(ApiError::Unauthorized)
}

/// An admin credential in `Authorization: Bearer`, or a console session cookie (with its
/// CSRF token on anything but a read).
pub async fn require_admin(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let who = if let Some(c) = presented(&req) {
        guarded(
            &state,
            client_ip(req.extensions()),
            Credential::Admin,
            || admin_named_by(&state, c),
        )?
    } else {
        console_session(&state, req.headers(), req.method())
            .await?
            .actor
    };
    req.extensions_mut().insert(Actor(who));
    Ok(next.run(req).await)
}

/// The live console session a request's cookie names, with its CSRF token on anything but
/// a read; else 401 (no or no live session) or 403 (no or a wrong CSRF token).
pub async fn console_session(
    state: &AppState,
    headers: &HeaderMap,
    method: &Method,
) -> Result<Session, ApiError> {
    let id = session_cookie(headers).ok_or(ApiError::Unauthorized)?;
    let session = state
        .sessions
        .touch(id, now_ms())
        .await?
        .ok_or(ApiError::Unauthorized)?;
    if changes_state(method) {
        let csrf = headers.get(CSRF_HEADER).map(|v| v.as_bytes());
        if !csrf.is_some_and(|t| session.csrf_matches(t)) {
            return Err(ApiError::Csrf);
        }
    }
    Ok(session)
}

pub async fn require_sync(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let c = presented(&req).ok_or(ApiError::Unauthorized)?;
    guarded(
        &state,
        client_ip(req.extensions()),
        Credential::Sync,
        || same_secret(c, state.sync_token.as_bytes()).then_some(()),
    )?;
    Ok(next.run(req).await)
}
