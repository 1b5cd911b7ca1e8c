//! `GET /v1/audit`: the append-only trail of every change, newest first.

use super::body::{self, Params};
use super::openapi::{AdminCredential, BadQuery, Store};
use super::schema::{self, Pattern};
use super::{ApiError, AppState};
use crate::domain::audit::ACTIONS;
use crate::domain::rfc3339;
use crate::store::{AuditEntry, AuditQuery};
use axum::extract::State;
use axum::Json;
use chrono::DateTime;
use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{IntoParams, ToSchema};

fn action_schema() -> Value {
    schema::one_of(ACTIONS)
}

// For `#[schema(schema_with = ...)]`, which takes a function without arguments.
fn time_field() -> RefOr<Schema> {
    schema::from_json(schema::date_time())
}

fn action_field() -> RefOr<Schema> {
    schema::from_json(action_schema())
}

/// A page's `next_cursor`: the sequence number of its last entry (19 digits hold any).
static CURSOR: Pattern = Pattern::new("^[0-9]{1,19}$");

#[derive(Serialize, ToSchema)]
pub struct AuditView {
    seq: u64,
    #[schema(schema_with = time_field)]
    at: String,
    /// The admin credential's name, or `system` for the control plane's own jobs.
    actor: String,
    #[schema(schema_with = action_field)]
    action: String,
    /// Empty for a scope's entry.
    token_id: String,
    /// Empty for a scope's entry.
    token_name: String,
    /// The scope a `scope.*` entry is about; absent on the others.
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    /// The fields that changed, as they were (null for a creation).
    #[schema(required = true, value_type = Option<Object>)]
    before: Option<serde_json::Value>,
    /// The fields that changed, as they became (null for a purge).
    #[schema(required = true, value_type = Option<Object>)]
    after: Option<serde_json::Value>,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> AuditView {
        // A scope's entry keeps the scope's name where a token's keeps the token's.
        let (token_name, scope) = if crate::domain::audit::is_scope_action(&e.action) {
            (String::new(), Some(e.token_name))
        } else {
            (e.token_name, None)
        };
        AuditView {
            scope,
            seq: e.seq,
            at: rfc3339(e.at),
            actor: e.actor,
            action: e.action,
            token_id: e.token_id,
            token_name,
            before: e.before,
            after: e.after,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    entries: Vec<AuditView>,
    /// Pass as `cursor` for older entries; null on the last page.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// Query parameters of `GET /v1/audit`.
pub struct AuditParams;

impl IntoParams for AuditParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            schema::query("token", "Entries about this token id", body::text_schema()),
            schema::query("actor", "Entries by this actor", body::text_schema()),
            schema::query("action", "Entries of this action", action_schema()),
            schema::query(
                "since",
                "Entries at or after this time",
                schema::date_time(),
            ),
            schema::query("until", "Entries before this time", schema::date_time()),
            schema::query("limit", "Entries per page", body::limit_schema()),
            schema::query(
                "cursor",
                "The previous page's `next_cursor`",
                CURSOR.schema(),
            ),
        ]
    }
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

#[utoipa::path(get, path = "/v1/audit", tag = "audit", operation_id = "list_audit",
    summary = "Read the audit trail",
    security(("admin" = []), ("session" = [])),
    params(AuditParams),
    responses((status = 200, description = "A page of audit entries, newest first", body = AuditPage),
        BadQuery, AdminCredential, Store))]
pub async fn list(
    State(state): State<AppState>,
    Params(params): Params,
) -> Result<Json<AuditPage>, ApiError> {
    let mut q = AuditQuery {
        limit: body::DEFAULT_LIMIT,
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
            "limit" => q.limit = body::limit(&v)?,
            "cursor" => {
                q.before_seq = Some(
                    Some(&v)
                        .filter(|v| CURSOR.matches(v))
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| {
                            ApiError::field("cursor", "is not a cursor this server handed out")
                        })?,
                )
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
