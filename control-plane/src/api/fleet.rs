//! `POST /v1/fleet`: a proxy's fleet demand in, its shares of fleet-wide limits out.
//! Semantics are documented in `tokengate_wire::fleet`; the shares are the domain's
//! (`crate::domain::fleet`).

use super::body::{parse_json, JsonBody, USAGE_BODY_LIMIT};
use super::openapi::{BadBody, Store, SyncCredential};
use super::schema::{self, described};
use super::{ApiError, AppState};
use crate::domain::fleet::{MAX_COUNT, MAX_TOKEN_ID};
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use std::borrow::Cow;
use tokengate_wire::fleet::{
    FleetAnswer, FleetReport, MAX_INTERVAL_MS, MAX_PROXY_ID, MAX_TOKENS, MIN_INTERVAL_MS,
};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

/// Text without control characters (what `char::is_control` refuses), `1..=max` characters.
fn plain_text(max: usize) -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": max,
           "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"})
}

/// `tokengate_wire::fleet::FleetReport`, as the document shows it.
pub struct Report;

impl PartialSchema for Report {
    fn schema() -> RefOr<Schema> {
        let count = |what: &str| described(schema::integer(&(0..=MAX_COUNT)), what);
        let entry = schema::object(
            json!({
                "id": described(plain_text(MAX_TOKEN_ID), "Token id, never the secret or its hash"),
                "admitted": count("Requests let through during the interval"),
                "refused": count("Requests refused during the interval"),
            }),
            &["id", "admitted", "refused"],
        );
        let quota_count = |what: &str| described(schema::integer(&(0..=u64::MAX)), what);
        let held = schema::object(
            json!({
                "hash": described(schema::matching("^[0-9a-f]{64}$"),
                    "sha256 of the secret, lower-case hex"),
                "period_start": described(
                    json!({"type": "integer", "minimum": i64::MIN, "maximum": i64::MAX}),
                    "Unix seconds: the start of the period the counts are for"),
                "spent": quota_count("Requests this proxy admitted with the secret in the period \
                    (counted as at most 1,000,000,000,000)"),
                "allowed": quota_count("The ceiling of `spent` this proxy enforces"),
            }),
            &["hash", "period_start", "spent", "allowed"],
        );
        let mut report = schema::object(
            json!({
                "proxy_id": described(plain_text(MAX_PROXY_ID), "The proxy's stable id"),
                "interval_ms": described(schema::integer(&(MIN_INTERVAL_MS..=MAX_INTERVAL_MS)),
                    "The interval the counts cover, and the proxy's report period"),
                "tokens": {"type": "array", "maxItems": MAX_TOKENS, "items": entry,
                    "description": "More than this is a 413. A token named twice counts once, \
                        with the counts added; no token counts as more than 100,000,000 \
                        requests a second"},
                "quotas": {"type": "array", "maxItems": MAX_TOKENS, "items": held,
                    "description": "The quota state this proxy holds, per secret, for the \
                        current period (and every secret named in its last answer). More than \
                        this is a 413. A secret no quota token has, or a period other than the \
                        token's current one, counts nothing; a secret named twice for one \
                        period counts at the larger figures"},
            }),
            &["proxy_id", "interval_ms", "tokens"],
        );
        report.insert(
            "examples".into(),
            json!([{"proxy_id": "envoy-1", "interval_ms": 1000,
                    "tokens": [{"id": "tok_Xb3kR9sPq2LmN8vC", "admitted": 18, "refused": 3}],
                    "quotas": [{"hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                                "period_start": 1_800_000_000_i64, "spent": 120, "allowed": 400}]}]),
        );
        schema::from_json(Value::Object(report))
    }
}

impl ToSchema for Report {
    fn name() -> Cow<'static, str> {
        "FleetReport".into()
    }
}

/// `tokengate_wire::fleet::FleetAnswer`, as the document shows it.
pub struct Answer;

impl PartialSchema for Answer {
    fn schema() -> RefOr<Schema> {
        let share = schema::answer(
            json!({
                "hash": described(schema::matching("^[0-9a-f]{64}$"),
                    "sha256 of the secret, lower-case hex: the rate state the share applies to"),
                "max_rps": described(schema::unsigned(), "The token's limit the share was computed from"),
                "burst": described(schema::unsigned(), "The token's burst the share was computed from"),
                "rate_milli": described(schema::unsigned(), "This proxy's rate, in thousandths of a request per second"),
                "share_burst": described(schema::unsigned(), "This proxy's burst, at least 1"),
            }),
            &["hash", "max_rps", "burst", "rate_milli", "share_burst"],
        );
        let grant = schema::answer(
            json!({
                "hash": described(schema::matching("^[0-9a-f]{64}$"),
                    "sha256 of the secret, lower-case hex"),
                "period_start": described(json!({"type": "integer"}),
                    "The period the ceiling is for; a proxy in another period ignores it"),
                "limit": described(schema::unsigned(), "The quota limit the grant was computed from"),
                "allowed": described(schema::unsigned(),
                    "The most requests this proxy may admit with the secret in the period, all told"),
            }),
            &["hash", "period_start", "limit", "allowed"],
        );
        let answer = schema::answer(
            json!({
                "proxies": described(schema::unsigned(), "Proxies counted as live, this one included"),
                "ttl_ms": described(schema::unsigned(), "How long the shares hold without a newer answer"),
                "shares": {"type": "array", "items": share},
                "quotas": {"type": "array", "items": grant,
                    "description": "New quota ceilings: for every quota secret this proxy \
                        reported, and the current secret of every token whose quota is in use \
                        this period. Absent when there is none"},
            }),
            &["proxies", "ttl_ms", "shares"],
        );
        schema::from_json(Value::Object(answer))
    }
}

impl ToSchema for Answer {
    fn name() -> Cow<'static, str> {
        "FleetAnswer".into()
    }
}

#[utoipa::path(post, path = "/v1/fleet", tag = "filters", operation_id = "report_fleet_demand",
    summary = "Report fleet demand, get this proxy's shares",
    security(("sync" = [])),
    request_body(content = Report, description = "The fleet-limited tokens with traffic in the \
        last interval (none: a heartbeat, which keeps the proxy counted as live)"),
    responses((status = 200, description = "This proxy's shares of its fleet-limited tokens", body = Answer),
        BadBody, SyncCredential, Store))]
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
    if report.quotas.len() > MAX_TOKENS {
        return Err(ApiError::TooLarge(format!(
            "A report may carry at most {MAX_TOKENS} quota entries."
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
