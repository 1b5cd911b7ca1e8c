//! Two kinds of credential with separate powers: named admin credentials for the token and
//! audit API, and the sync credential (it sits in every proxy's configuration) that may only
//! read `/v1/sync` and report `/v1/usage`.

use super::error::ApiError;
use super::AppState;
use crate::secrets::same_secret;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;

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

pub async fn require_admin(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(c) = presented(&req) else {
        return Err(ApiError::Unauthorized);
    };
    // Compare against every credential so timing does not tell which one was close.
    let mut who = None;
    for admin in state.admins.iter() {
        if same_secret(c, admin.secret.as_bytes()) {
            who = Some(admin.name.clone());
        }
    }
    let who = who.ok_or(ApiError::Unauthorized)?;
    req.extensions_mut().insert(Actor(who));
    Ok(next.run(req).await)
}

pub async fn require_sync(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match presented(&req) {
        Some(c) if same_secret(c, state.sync_token.as_bytes()) => Ok(next.run(req).await),
        _ => Err(ApiError::Unauthorized),
    }
}
