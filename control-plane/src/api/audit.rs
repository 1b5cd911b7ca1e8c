//! `GET /v1/audit`: the append-only trail of every change, newest first.

use super::body::Params;
use super::{ApiError, AppState};
use crate::domain::audit::ACTIONS;
use crate::domain::rfc3339;
use crate::store::{AuditEntry, AuditQuery};
use axum::extract::State;
use axum::Json;
use chrono::DateTime;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Serialize, ToSchema)]
pub struct AuditView {
    seq: u64,
    at: String,
    /// The admin credential's name, or `system` for the control plane's own jobs.
    actor: String,
    action: String,
    token_id: String,
    token_name: String,
    /// The fields that changed, as they were (null for a creation).
    #[schema(value_type = Option<Object>)]
    before: Option<serde_json::Value>,
    /// The fields that changed, as they became (null for a purge).
    #[schema(value_type = Option<Object>)]
    after: Option<serde_json::Value>,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> AuditView {
        AuditView {
            seq: e.seq,
            at: rfc3339(e.at),
            actor: e.actor,
            action: e.action,
            token_id: e.token_id,
            token_name: e.token_name,
            before: e.before,
            after: e.after,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    entries: Vec<AuditView>,
    /// Pass as `cursor` for older entries; null on the last page.
    next_cursor: Option<String>,
}

/// Query parameters of `GET /v1/audit` (documentation; parsing is strict).
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct AuditParams {
    /// Token id.
    token: Option<String>,
    actor: Option<String>,
    /// One of the actions, e.g. `token.suspended`.
    action: Option<String>,
    /// RFC 3339, inclusive.
    since: Option<String>,
    /// RFC 3339, exclusive.
    until: Option<String>,
    /// 1 to 1000, default 100.
    limit: Option<u32>,
    cursor: Option<String>,
}

fn time(field: &str, v: &str) -> Result<i64, ApiError> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp())
        .map_err(|_| {
            ApiError::field(
                field,
                "must be an RFC 3339 time such as 2030-01-31T12:00:00Z",
            )
        })
}

#[utoipa::path(get, path = "/v1/audit", tag = "audit", security(("admin" = [])),
    params(AuditParams),
    responses((status = 200, description = "A page of audit entries, newest first", body = AuditPage),
        (status = 400, description = "Unknown or invalid query parameter", body = super::error::ErrorBody),
        (status = 401, description = "No or wrong admin credential", body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Params(params): Params,
) -> Result<Json<AuditPage>, ApiError> {
    let mut q = AuditQuery {
        limit: 100,
        ..Default::default()
    };
    for (k, v) in params {
        match k.as_str() {
            "token" => q.token_id = Some(v),
            "actor" => q.actor = Some(v),
            "action" => {
                if !ACTIONS.contains(&v.as_str()) {
                    return Err(ApiError::field(
                        "action",
                        format!("must be one of {}", ACTIONS.join(", ")),
                    ));
                }
                q.action = Some(v)
            }
            "since" => q.since = Some(time("since", &v)?),
            "until" => q.until = Some(time("until", &v)?),
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::field("limit", "must be between 1 and 1000"))?
            }
            "cursor" => {
                q.before_seq = Some(v.parse().map_err(|_| {
                    ApiError::field("cursor", "is not a cursor this server handed out")
                })?)
            }
            other => return Err(ApiError::field(other, "is not a known query parameter")),
        }
    }
    let limit = q.limit as usize;
    q.limit += 1;
    let mut entries = state.tokens.audit(&q).await?;
    let next_cursor = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|e| e.seq.to_string())
    } else {
        None
    };
    Ok(Json(AuditPage {
        entries: entries.into_iter().map(AuditView::from).collect(),
        next_cursor,
    }))
}
