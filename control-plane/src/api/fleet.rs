//! `POST /v1/fleet`: a proxy's fleet demand in, its shares of fleet-wide limits out.
//! Semantics are documented in `tokengate_wire::fleet`; the shares are the domain's
//! (`crate::domain::fleet`).

use super::body::{parse_json, JsonBody, USAGE_BODY_LIMIT};
use super::{ApiError, AppState};
use axum::extract::State;
use axum::Json;
use tokengate_wire::fleet::{FleetAnswer, FleetReport, MAX_TOKENS};

#[utoipa::path(post, path = "/v1/fleet", tag = "filters", security(("sync" = [])),
    request_body(content = Object, description = "`{\"proxy_id\": str, \"interval_ms\": int, \"tokens\": [{\"id\", \"admitted\", \"refused\"}]}`: the fleet-limited tokens with traffic in the last interval (none: a heartbeat)"),
    responses((status = 200, description = "`{\"proxies\": int, \"ttl_ms\": int, \"shares\": [{\"hash\", \"max_rps\", \"burst\", \"rate_milli\", \"share_burst\"}]}`: this proxy's shares", content_type = "application/json"),
        (status = 400, description = "Malformed report (the field is named)", body = super::error::ErrorBody),
        (status = 401, description = "No or wrong sync credential", body = super::error::ErrorBody),
        (status = 413, description = "More tokens than one report may carry, or a body over 2 MB", body = super::error::ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = super::error::ErrorBody)))]
pub async fn report(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<USAGE_BODY_LIMIT>,
) -> Result<Json<FleetAnswer>, ApiError> {
    let report: FleetReport = parse_json(&body)?;
    if report.tokens.len() > MAX_TOKENS {
        return Err(ApiError::TooLarge(format!(
            "A report may carry at most {MAX_TOKENS} tokens."
        )));
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    let answer = state.fleet.report(&report, now_ms).await?;
    tracing::debug!(
        tokens = report.tokens.len(),
        shares = answer.shares.len(),
        proxies = answer.proxies,
        "fleet report answered"
    );
    Ok(Json(answer))
}
