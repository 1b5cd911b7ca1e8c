//! Two credentials with separate powers: the admin one for the token API, the sync one
//! only for `/v1/sync` (it sits in every proxy's configuration).

use super::error::ApiError;
use super::AppState;
use crate::secrets::same_secret;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

fn presented(req: &Request) -> Option<&[u8]> {
    let v = req.headers().get(AUTHORIZATION)?.as_bytes();
    if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
        Some(v[7..].trim_ascii())
    } else {
        None
    }
}

/// Lets the request through only with the credential `expected` picks from the state.
async fn require(
    state: &AppState,
    expected: fn(&AppState) -> &str,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match presented(&req) {
        Some(c) if same_secret(c, expected(state).as_bytes()) => Ok(next.run(req).await),
        _ => Err(ApiError::Unauthorized),
    }
}

pub async fn require_admin(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    require(&state, |s| &s.admin_token, req, next).await
}

pub async fn require_sync(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    require(&state, |s| &s.sync_token, req, next).await
}
