//! `POST /v1/usage`: request counts reported by each Envoy's sync leader. Semantics are
//! documented in `tokengate_wire::usage`.

use super::body::{parse_json, JsonBody, USAGE_BODY_LIMIT};
use super::{ApiError, AppState};
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use tokengate_wire::usage::{UsageReport, MAX_ENTRIES};

#[utoipa::path(post, path = "/v1/usage", tag = "filters", security(("sync" = [])),
    request_body(content = Object, description = "`{\"proxy_id\": str, \"entries\": [{\"id\", \"allowed\", \"denied\", \"last_used_at\"}]}`: counts since the previous report"),
    responses((status = 204, description = "Counted"),
        (status = 400, description = "Malformed report", body = super::error::ErrorBody),
        (status = 401, description = "No or wrong sync credential", body = super::error::ErrorBody),
        (status = 413, description = "More entries than one report may carry, or a body over 2 MB", body = super::error::ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = super::error::ErrorBody)))]
pub async fn report(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<USAGE_BODY_LIMIT>,
) -> Result<StatusCode, ApiError> {
    let report: UsageReport = parse_json(&body)?;
    if report.entries.len() > MAX_ENTRIES {
        return Err(ApiError::TooLarge(format!(
            "A report may carry at most {MAX_ENTRIES} entries."
        )));
    }
    let now = Utc::now().timestamp();
    let matched = state.tokens.record_usage(&report.entries, now).await?;
    tracing::debug!(matched, "usage recorded");
    Ok(StatusCode::NO_CONTENT)
}
