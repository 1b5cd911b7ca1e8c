//! `POST /v1/usage`: request counts reported by each Envoy's sync leader. Semantics are
//! documented in `tokengate_wire::usage`.

use super::body::{no_nul, parse_json, JsonBody, USAGE_BODY_LIMIT};
use super::openapi::{BadBody, Store, SyncCredential};
use super::schema::{self, described};
use super::{ApiError, AppState};
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use serde_json::{json, Value};
use std::borrow::Cow;
use tokengate_wire::usage::{UsageReport, MAX_ENTRIES};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

/// `tokengate_wire::UsageReport`, as the document shows it.
pub struct Report;

impl PartialSchema for Report {
    fn schema() -> RefOr<Schema> {
        let entry = schema::object(
            json!({
                "id": described(super::body::text_schema(), "Token id, never the secret or its hash"),
                "allowed": described(schema::unsigned(), "Requests let through since the previous report"),
                "denied": described(schema::unsigned(), "Requests refused since the previous report"),
                "last_used_at": described(schema::signed(), "Unix seconds of the latest request counted"),
            }),
            &["id", "allowed", "denied", "last_used_at"],
        );
        let mut report = schema::object(
            json!({
                "proxy_id": described(super::body::text_schema(), "Identifies the proxy"),
                "entries": {"type": "array", "maxItems": MAX_ENTRIES, "items": entry,
                    "description": "More than this is a 413"},
            }),
            &["entries"],
        );
        report.insert(
            "examples".into(),
            json!([{"proxy_id": "envoy-1", "entries": [{"id": "tok_Xb3kR9sPq2LmN8vC",
                    "allowed": 120, "denied": 3, "last_used_at": 1_900_000_000}]}]),
        );
        schema::from_json(Value::Object(report))
    }
}

impl ToSchema for Report {
    fn name() -> Cow<'static, str> {
        "UsageReport".into()
    }
}

#[utoipa::path(post, path = "/v1/usage", tag = "filters", operation_id = "report_usage",
    summary = "Report request counts",
    security(("sync" = [])),
    request_body(content = Report, description = "Counts since the previous report; unknown ids are ignored"),
    responses((status = 204, description = "Counted"),
        BadBody, SyncCredential, Store))]
pub async fn report(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<USAGE_BODY_LIMIT>,
) -> Result<StatusCode, ApiError> {
    let report: UsageReport = parse_json(&body)?;
    no_nul("proxy_id", &report.proxy_id)?;
    for (i, e) in report.entries.iter().enumerate() {
        no_nul(&format!("entries[{i}].id"), &e.id)?;
    }
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
