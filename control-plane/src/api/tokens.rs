//! `/v1/tokens`: create, list, get, update, suspend, reactivate, rotate, revoke.

use super::auth::Actor;
use super::body::{self, nullable, parse_json, JsonBody, Params, TokenId};
use super::error::ErrorBody;
use super::openapi::{AdminCredential, BadBody, BadQuery, Csrf, Store, TokenNotFound};
use super::schema::{self, described, Pattern};
use super::scopes::token_scopes_schema;
use super::{ApiError, AppState};
use crate::domain::quota::Usage;
use crate::domain::rfc3339;
use crate::domain::tokens::{
    Expiry, NewToken, Patch, QuotaInput, BURST, EXPIRES_IN_SECONDS, MAX_RPS,
};
use crate::duration;
use crate::rotation::MAX_GRACE_SECONDS;
use crate::store::{parse_kind, ListQuery, Status, TokenRow, KINDS};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokengate_wire::quota::{Quota, MAX_LIMIT};
use tokengate_wire::{Kind, LimitScope};
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{IntoParams, PartialSchema, ToSchema};

/// The statuses the API shows (a revoked token is not shown).
const SHOWN: [Status; 2] = [Status::Active, Status::Suspended];

fn kind_schema() -> Value {
    schema::one_of(&KINDS.map(Kind::as_str))
}

fn status_schema() -> Value {
    schema::one_of(&SHOWN.map(Status::as_str))
}

fn max_rps_schema() -> Value {
    schema::nullable(schema::integer(&MAX_RPS))
}

fn burst_schema() -> Value {
    schema::nullable(schema::integer(&BURST))
}

fn limit_scope_schema() -> Value {
    schema::one_of(&[LimitScope::Fleet, LimitScope::Proxy].map(LimitScope::as_str))
}

fn limit_scope_field() -> RefOr<Schema> {
    schema::from_json(described(
        limit_scope_schema(),
        "`fleet`: `max_rps` and `burst` are one limit shared by every proxy; `proxy`: each \
         proxy's own.",
    ))
}

/// The periods the API documents (a test server also takes `"<n>s"`).
const PERIODS: [&str; 3] = ["hour", "day", "month"];

/// A quota as a client sets it.
fn quota_schema() -> Value {
    schema::object(
        json!({
            "limit": described(schema::integer(&(1..=MAX_LIMIT)), "Requests per period, across the fleet."),
            "period": described(schema::one_of(&PERIODS),
                "UTC hours, days or calendar months: the count starts over at each boundary."),
        }),
        &["limit", "period"],
    )
    .into()
}

fn quota_field() -> RefOr<Schema> {
    schema::from_json(described(
        schema::nullable(quota_schema()),
        "At most `limit` requests per `period`, counted across the fleet; null: none.",
    ))
}

fn quota_usage_field() -> RefOr<Schema> {
    schema::from_json(described(
        schema::nullable(schema::answer(
            json!({
                "used": described(schema::unsigned(), "Requests the proxies admitted in the current period, as they last reported"),
                "remaining": described(schema::unsigned(), "The limit less `used`"),
                "resets_at": described(schema::date_time(), "The end of the current period (UTC)"),
            }),
            &["used", "remaining", "resets_at"],
        ).into()),
        "The quota in the current period; null without a quota.",
    ))
}

// For `#[schema(schema_with = ...)]`, which takes a function without arguments.
fn kind_field() -> RefOr<Schema> {
    schema::from_json(described(
        kind_schema(),
        "`user` (acts for a person, the owner) or `service` (acts for an automation owned by \
         a group).",
    ))
}

fn status_field() -> RefOr<Schema> {
    schema::from_json(described(
        status_schema(),
        "`active` or `suspended` (an expired token keeps its status; see `expired`).",
    ))
}

fn max_rps_field() -> RefOr<Schema> {
    schema::from_json(described(
        max_rps_schema(),
        "Requests per second; null: unlimited.",
    ))
}

fn burst_field() -> RefOr<Schema> {
    schema::from_json(described(
        burst_schema(),
        "Requests allowed at once; null: one second's worth.",
    ))
}

fn scopes_field() -> RefOr<Schema> {
    schema::from_json(described(
        token_scopes_schema(),
        "Scope names: the token may make only the requests one of them covers; null: \
         unrestricted; `[]`: none.",
    ))
}

fn time_field() -> RefOr<Schema> {
    schema::from_json(schema::date_time())
}

fn optional_time_field() -> RefOr<Schema> {
    schema::from_json(described(
        schema::nullable(schema::date_time()),
        "null: not set.",
    ))
}

fn secret_field() -> RefOr<Schema> {
    use tokengate_wire::token::{CHECKSUM_LEN, PREFIX, RANDOM_LEN};
    schema::from_json(described(
        schema::matching(&format!(
            "^{PREFIX}[0-9A-Za-z]{{{}}}$",
            RANDOM_LEN + CHECKSUM_LEN
        )),
        "The secret. It is not stored and cannot be shown again.",
    ))
}

/// An expiry as a client sets it. Only the future is accepted, which JSON Schema cannot say.
fn expiry_schema() -> Value {
    described(
        schema::nullable(schema::date_time()),
        "An RFC 3339 time in the future, at most 9999-12-31T23:59:59Z; null: never (where \
         the expiry policy allows it).",
    )
}

/// A token as the API shows it (never its secret or hash).
#[derive(Serialize, ToSchema)]
pub struct TokenView {
    /// `tok_` and 16 letters and digits.
    #[schema(example = "tok_Xb3kR9sPq2LmN8vC")]
    id: String,
    name: String,
    #[schema(schema_with = kind_field)]
    kind: Kind,
    owner: String,
    #[schema(schema_with = status_field)]
    status: &'static str,
    #[schema(required = true, schema_with = max_rps_field)]
    max_rps: Option<u32>,
    #[schema(required = true, schema_with = burst_field)]
    burst: Option<u32>,
    #[schema(schema_with = limit_scope_field)]
    limit_scope: &'static str,
    /// `GET /v1/tokens/{id}` of a fleet-limited token: the live fleet view.
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet: Option<FleetJson>,
    #[schema(schema_with = time_field)]
    created_at: String,
    #[schema(required = true, schema_with = optional_time_field)]
    expires_at: Option<String>,
    /// True once `expires_at` has passed (the filter refuses it with `token_expired`).
    expired: bool,
    #[schema(required = true, schema_with = optional_time_field)]
    last_used_at: Option<String>,
    /// Requests the filters let through, as reported by `POST /v1/usage`.
    requests_allowed: u64,
    /// Requests the filters refused (expired, suspended, rate limited).
    requests_denied: u64,
    #[schema(required = true, schema_with = optional_time_field)]
    rotated_at: Option<String>,
    /// While a rotation's grace period runs, the old secret works until this time.
    #[schema(required = true, schema_with = optional_time_field)]
    old_secret_valid_until: Option<String>,
    #[schema(schema_with = time_field)]
    updated_at: String,
    /// The version of the token's last change (as `/v1/sync` hands it out).
    version: u64,
    /// The scopes the token is limited to; null: unrestricted.
    #[schema(required = true, schema_with = scopes_field)]
    scopes: Option<Vec<String>>,
    #[schema(required = true, schema_with = quota_field)]
    quota: Option<Quota>,
    #[schema(required = true, schema_with = quota_usage_field)]
    quota_usage: Option<UsageJson>,
}

/// A quota in the current period.
#[derive(Serialize)]
pub struct UsageJson {
    used: u64,
    remaining: u64,
    resets_at: String,
}

impl From<Usage> for UsageJson {
    fn from(u: Usage) -> UsageJson {
        UsageJson {
            used: u.used,
            remaining: u.remaining,
            resets_at: rfc3339(u.resets_at),
        }
    }
}

impl TokenView {
    pub fn new(r: TokenRow, now: i64) -> TokenView {
        let grace = r.retired.iter().map(|s| s.until).filter(|t| *t > now).max();
        TokenView {
            expired: r.is_expired(now),
            id: r.id,
            name: r.name,
            kind: r.kind,
            owner: r.owner,
            status: r.status.as_str(),
            max_rps: r.max_rps,
            burst: r.burst,
            limit_scope: r.limit_scope.as_str(),
            fleet: None,
            created_at: rfc3339(r.created_at),
            expires_at: r.expires_at.map(rfc3339),
            last_used_at: r.last_used_at.map(rfc3339),
            requests_allowed: r.requests_allowed,
            requests_denied: r.requests_denied,
            rotated_at: r.rotated_at.map(rfc3339),
            old_secret_valid_until: grace.map(rfc3339),
            updated_at: rfc3339(r.updated_at),
            version: r.version,
            scopes: r.scopes,
            quota_usage: r.quota.map(|q| {
                let (_, end) = q.period.window(now);
                UsageJson::from(Usage {
                    used: 0,
                    remaining: q.limit,
                    resets_at: end,
                })
            }),
            quota: r.quota,
        }
    }
}

/// Tokens as the API shows them, with what they used of their quotas.
async fn views(
    state: &AppState,
    rows: Vec<TokenRow>,
    now: i64,
) -> Result<Vec<TokenView>, ApiError> {
    let usage = state.tokens.quota_usage(&rows, now).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let used = usage.get(&r.id).copied();
            let mut v = TokenView::new(r, now);
            if let Some(u) = used {
                v.quota_usage = Some(u.into());
            }
            v
        })
        .collect())
}

async fn view_of(state: &AppState, row: TokenRow, now: i64) -> Result<TokenView, ApiError> {
    let mut all = views(state, vec![row], now).await?;
    all.pop()
        .ok_or_else(|| ApiError::from(crate::domain::DomainError::NotFound))
}

/// A fleet-limited token as the fleet enforces it now.
#[derive(Serialize, ToSchema)]
pub struct FleetJson {
    /// Proxies reporting to the control plane now.
    proxies_live: u32,
    /// Live proxies that saw the token in the last 30 seconds.
    proxies_seen: u32,
    /// Requests per second the proxies let through, over their last report interval.
    admitted_rps: f64,
    refused_rps: f64,
    /// Each proxy's share of `max_rps` and `burst`, by demand.
    shares: Vec<ProxyShareJson>,
}

#[derive(Serialize, ToSchema)]
pub struct ProxyShareJson {
    proxy_id: String,
    admitted_rps: f64,
    refused_rps: f64,
    share_rps: f64,
    share_burst: u32,
    /// When the proxy last reported the token.
    seen_at: String,
}

impl FleetJson {
    fn new(v: crate::domain::fleet::FleetView) -> FleetJson {
        let round = |x: f64| (x * 1_000.0).round() / 1_000.0;
        FleetJson {
            proxies_live: v.proxies_live,
            proxies_seen: v.proxies_seen,
            admitted_rps: round(v.admitted_rps),
            refused_rps: round(v.refused_rps),
            shares: v
                .parts
                .into_iter()
                .map(|p| ProxyShareJson {
                    proxy_id: p.proxy_id,
                    admitted_rps: round(p.admitted_rps),
                    refused_rps: round(p.refused_rps),
                    share_rps: round(p.share_rps),
                    share_burst: p.share_burst,
                    seen_at: crate::domain::audit::rfc3339_ms(p.seen_at_ms),
                })
                .collect(),
        }
    }
}

/// `fleet` or `proxy`.
fn parse_scope(v: &str) -> Result<LimitScope, ApiError> {
    LimitScope::parse(v).ok_or_else(|| ApiError::field("limit_scope", "must be `fleet` or `proxy`"))
}

async fn view(state: &AppState, r: TokenRow) -> Result<Json<TokenView>, ApiError> {
    Ok(Json(view_of(state, r, Utc::now().timestamp()).await?))
}

/// A quota as the body gives it; the domain checks its values.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaBody {
    limit: Option<u64>,
    period: Option<String>,
}

impl QuotaBody {
    fn input(self) -> Result<QuotaInput, ApiError> {
        Ok(QuotaInput {
            limit: self
                .limit
                .ok_or_else(|| ApiError::field("quota.limit", "is required"))?,
            period: self
                .period
                .ok_or_else(|| ApiError::field("quota.period", "is required"))?,
        })
    }
}

/// An RFC 3339 time; whether it may be an expiry is the domain's to say.
fn parse_time(field: &str, v: &str) -> Result<i64, ApiError> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp())
        .map_err(|_| {
            ApiError::field(
                field,
                "must be an RFC 3339 time such as 2030-01-31T12:00:00Z",
            )
        })
}

/// `POST /v1/tokens`. An optional field may also be null, which means the same as absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    name: Option<String>,
    kind: Option<String>,
    owner: Option<String>,
    max_rps: Option<u32>,
    burst: Option<u32>,
    /// `fleet` (default): `max_rps` and `burst` are one limit for every proxy together;
    /// `proxy`: a limit per proxy.
    limit_scope: Option<String>,
    expires_in_seconds: Option<u64>,
    expires_at: Option<String>,
    scopes: Option<Vec<String>>,
    quota: Option<QuotaBody>,
}

impl PartialSchema for CreateBody {
    fn schema() -> RefOr<Schema> {
        let mut o = schema::object(
            json!({
                "name": schema::text(),
                "kind": described(schema::nullable(kind_schema()), "`user` (the default) or `service`."),
                "owner": described(schema::nullable(schema::text()),
                    "The person (user tokens; defaults to the admin credential's name) or the \
                     group (service tokens: required)."),
                "max_rps": described(max_rps_schema(), "Requests per second; null: unlimited."),
                "burst": described(burst_schema(),
                    "Requests allowed at once (only with max_rps); null: one second's worth."),
                "limit_scope": described(schema::nullable(limit_scope_schema()),
                    "`fleet` (the default): `max_rps` and `burst` are one limit for every proxy \
                     together; `proxy`: a limit per proxy."),
                "expires_in_seconds": described(schema::nullable(schema::integer(&EXPIRES_IN_SECONDS)),
                    "The token expires this long from now (not with expires_at)."),
                "expires_at": described(expiry_schema(), "Not with expires_in_seconds. An RFC 3339 \
                    time in the future, at most 9999-12-31T23:59:59Z."),
                "scopes": described(token_scopes_schema(),
                    "Names of existing scopes: the token may make only the requests one of them \
                     covers (a name given twice counts once). null or absent: unrestricted; \
                     `[]`: no request at all."),
                "quota": described(schema::nullable(quota_schema()),
                    "At most `limit` requests per `period` (UTC), counted across the fleet; \
                     null: none."),
            }),
            &["name"],
        );
        o.insert(
            "examples".into(),
            json!([{"name": "nightly-export", "owner": "data-eng", "max_rps": 20, "burst": 40,
                    "expires_in_seconds": 2_592_000,
                    "quota": {"limit": 100_000, "period": "day"}}]),
        );
        o.insert(
            "allOf".into(),
            json!([
                {"if": schema::present(&[("burst", "integer")]),
                 "then": schema::present(&[("max_rps", "integer")])},
                {"not": schema::present(&[("expires_in_seconds", "integer"), ("expires_at", "string")])},
                {"if": {"required": ["kind"], "properties": {"kind": {"const": "service"}}},
                 "then": schema::present(&[("owner", "string")])},
            ]),
        );
        schema::from_json(Value::Object(o))
    }
}

impl ToSchema for CreateBody {}

/// A token with its secret, shown this once.
#[derive(Serialize, ToSchema)]
pub struct WithSecret {
    #[serde(flatten)]
    token: TokenView,
    #[serde(rename = "token")]
    #[schema(schema_with = secret_field)]
    secret: String,
}

/// A created token's id, for the links to the calls that take it.
const BY_ID: &str = "$response.body#/id";

#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", operation_id = "create_token",
    summary = "Create a token",
    security(("admin" = []), ("session" = [], "csrf" = [])),
    request_body = CreateBody,
    responses((status = 201, description = "Created; the secret is in `token`, this once", body = WithSecret,
            links(
                ("get" = (operation_id = "get_token", parameters(("id" = BY_ID)))),
                ("update" = (operation_id = "update_token", parameters(("id" = BY_ID)))),
                ("suspend" = (operation_id = "suspend_token", parameters(("id" = BY_ID)))),
                ("reactivate" = (operation_id = "reactivate_token", parameters(("id" = BY_ID)))),
                ("rotate" = (operation_id = "rotate_token", parameters(("id" = BY_ID)))),
                ("revoke" = (operation_id = "revoke_token", parameters(("id" = BY_ID)))),
            )),
        BadBody, AdminCredential, Csrf, Store))]
pub async fn create(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    JsonBody(body): JsonBody,
) -> Result<impl IntoResponse, ApiError> {
    let b: CreateBody = parse_json(&body)?;
    let now = Utc::now().timestamp();
    let name = b
        .name
        .ok_or_else(|| ApiError::field("name", "is required"))?;
    let kind = match b.kind.as_deref() {
        None => Kind::User,
        Some(k) => {
            parse_kind(k).ok_or_else(|| ApiError::field("kind", "must be `user` or `service`"))?
        }
    };
    let expiry = match (b.expires_in_seconds, b.expires_at) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "expires_at",
                "cannot be given with expires_in_seconds: give one or the other",
            ))
        }
        (Some(s), None) if !EXPIRES_IN_SECONDS.contains(&s) => {
            return Err(ApiError::field(
                "expires_in_seconds",
                format!(
                    "must be between {} and {} (100 years)",
                    EXPIRES_IN_SECONDS.start(),
                    EXPIRES_IN_SECONDS.end()
                ),
            ))
        }
        (Some(s), None) => Expiry {
            at: Some(now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX))),
            field: "expires_in_seconds",
        },
        (None, Some(t)) => Expiry {
            at: Some(parse_time("expires_at", &t)?),
            field: "expires_at",
        },
        (None, None) => Expiry {
            at: None,
            field: "expires_in_seconds",
        },
    };
    let created = state
        .tokens
        .create(
            &actor.0,
            NewToken {
                name,
                kind,
                owner: b.owner,
                max_rps: b.max_rps,
                burst: b.burst,
                limit_scope: b
                    .limit_scope
                    .as_deref()
                    .map(parse_scope)
                    .transpose()?
                    .unwrap_or_default(),
                expiry,
                scopes: b.scopes,
                quota: b.quota.map(QuotaBody::input).transpose()?,
            },
            now,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(WithSecret {
            token: TokenView::new(created.token, now),
            secret: created.secret,
        }),
    ))
}

#[derive(Serialize, ToSchema)]
pub struct Listing {
    tokens: Vec<TokenView>,
    /// Pass as `cursor` for the next page; null on the last page.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// `status` filters, as the listing shows them: an expired token is `expired`, whether or
/// not it was suspended, and is neither `active` nor `suspended`.
const STATUS_FILTERS: [(&str, Option<Status>, bool); 3] = [
    ("active", Some(Status::Active), false),
    ("suspended", Some(Status::Suspended), false),
    ("expired", None, true),
];

/// `order`: whether the listing is newest first.
const ORDERS: [(&str, bool); 2] = [("id", false), ("newest", true)];

/// `expiring_within`: a positive whole number (at most 12 digits) of seconds, minutes, hours
/// or days.
static EXPIRING_WITHIN: Pattern = Pattern::new("^[1-9][0-9]{0,11}[smhd]$");

/// Query parameters of `GET /v1/tokens`.
pub struct ListParams;

impl IntoParams for ListParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            schema::query(
                "status",
                "`active`, `suspended` (both: not expired) or `expired` (whether suspended or not)",
                schema::one_of(&STATUS_FILTERS.map(|(n, _, _)| n)),
            ),
            schema::query("owner", "Tokens of this owner", body::text_schema()),
            schema::query("kind", "Tokens of this kind", kind_schema()),
            schema::query(
                "expiring_within",
                "Tokens that expire within this duration from now: `3600s`, `90m`, `12h`, `7d`",
                EXPIRING_WITHIN.schema(),
            ),
            schema::query(
                "name_contains",
                "Tokens whose name contains this (ASCII letters match either case)",
                body::text_schema(),
            ),
            schema::query(
                "order",
                "`id` (the default) or `newest` (most recently created first)",
                schema::one_of(&ORDERS.map(|(n, _)| n)),
            ),
            schema::query("limit", "Tokens per page", body::limit_schema()),
            schema::query(
                "cursor",
                "The previous page's `next_cursor`",
                body::text_schema(),
            ),
        ]
    }
}

#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", operation_id = "list_tokens",
    summary = "List tokens",
    security(("admin" = []), ("session" = [])),
    params(ListParams),
    responses((status = 200, description = "A page of tokens, by id (or newest first)", body = Listing),
        BadQuery, AdminCredential, Store))]
pub async fn list(
    State(state): State<AppState>,
    Params(q): Params,
) -> Result<Json<Listing>, ApiError> {
    let now = Utc::now().timestamp();
    let mut query = ListQuery {
        limit: body::DEFAULT_LIMIT,
        ..Default::default()
    };
    let mut cursor = None;
    for (k, v) in q {
        match k.as_str() {
            "status" => {
                let (_, status, expired) = STATUS_FILTERS
                    .into_iter()
                    .find(|(name, _, _)| *name == v)
                    .ok_or_else(|| {
                        ApiError::field("status", "must be `active`, `suspended` or `expired`")
                    })?;
                (query.status, query.expired) = (status, Some((expired, now)));
            }
            "owner" => query.owner = Some(v),
            "name_contains" => query.name_contains = Some(v),
            "kind" => {
                query.kind = Some(
                    parse_kind(&v)
                        .ok_or_else(|| ApiError::field("kind", "must be `user` or `service`"))?,
                )
            }
            "expiring_within" => {
                let secs = Some(&v)
                    .filter(|v| EXPIRING_WITHIN.matches(v))
                    .and_then(|v| duration::parse(v).ok().flatten())
                    .ok_or_else(|| {
                        ApiError::field("expiring_within", "must be a duration such as 12h or 7d")
                    })?;
                let secs = i64::try_from(secs).unwrap_or(i64::MAX);
                query.expiring = Some((now, now.saturating_add(secs)));
            }
            "limit" => query.limit = body::limit(&v)?,
            "order" => {
                (_, query.newest_first) = ORDERS
                    .into_iter()
                    .find(|(name, _)| *name == v)
                    .ok_or_else(|| ApiError::field("order", "must be `id` or `newest`"))?;
            }
            "cursor" => cursor = Some(v),
            other => return Err(ApiError::field(other, "is not a known query parameter")),
        }
    }
    if query.newest_first {
        query.before = cursor;
    } else {
        query.after = cursor;
    }
    let limit = query.limit as usize;
    // One extra row tells whether another page exists.
    query.limit += 1;
    let mut rows = state.tokens.list(&query).await?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(Json(Listing {
        tokens: views(&state, rows, now).await?,
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/tokens/{id}", tag = "tokens", operation_id = "get_token",
    summary = "Show a token",
    security(("admin" = []), ("session" = [])),
    params(("id" = String, Path, description = "Token id, `tok_...`")),
    responses((status = 200, description = "The token", body = TokenView),
        AdminCredential, TokenNotFound, Store))]
pub async fn get(
    State(state): State<AppState>,
    TokenId(id): TokenId,
) -> Result<Json<TokenView>, ApiError> {
    let token = state.tokens.get(&id).await?;
    let now = Utc::now();
    let fleet = state
        .fleet
        .view(&token, now.timestamp_millis())
        .await?
        .map(FleetJson::new);
    let mut v = view_of(&state, token, now.timestamp()).await?;
    v.fleet = fleet;
    Ok(Json(v))
}

/// `PATCH /v1/tokens/{id}`: the fields to change, at least one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchBody {
    #[serde(default, deserialize_with = "nullable")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    max_rps: Option<Option<u32>>,
    #[serde(default, deserialize_with = "nullable")]
    burst: Option<Option<u32>>,
    #[serde(default, deserialize_with = "nullable")]
    limit_scope: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    expires_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    scopes: Option<Option<Vec<String>>>,
    quota: Option<Option<QuotaBody>>,
}

impl PartialSchema for PatchBody {
    fn schema() -> RefOr<Schema> {
        let mut o = schema::object(
            json!({
                "name": described(schema::text(), "Cannot be null: a token always has a name."),
                "max_rps": described(max_rps_schema(), "null: unlimited (which also clears burst)."),
                "burst": described(burst_schema(),
                    "null: one second's worth. A token without max_rps has no burst: setting one \
                     on it is a 409 unless max_rps comes with it."),
                "limit_scope": described(limit_scope_schema(), "`fleet` or `proxy`; cannot be null."),
                "expires_at": expiry_schema(),
                "scopes": described(token_scopes_schema(),
                    "Names of existing scopes, replacing the token's; null: unrestricted; `[]`: \
                     no request at all."),
                "quota": described(schema::nullable(quota_schema()),
                    "null: no quota. A change starts no new period: what was used in this one \
                     still counts."),
            }),
            &[],
        );
        o.insert("minProperties".into(), 1.into());
        o.insert(
            "examples".into(),
            json!([{"name": "nightly-export-2", "max_rps": 50, "burst": 100,
                    "expires_at": "2099-01-31T12:00:00Z",
                    "quota": {"limit": 1_000_000, "period": "month"}}]),
        );
        o.insert(
            "not".into(),
            json!({"required": ["burst", "max_rps"],
                   "properties": {"burst": {"type": "integer"}, "max_rps": {"type": "null"}}}),
        );
        schema::from_json(Value::Object(o))
    }
}

impl ToSchema for PatchBody {}

#[utoipa::path(patch, path = "/v1/tokens/{id}", tag = "tokens", operation_id = "update_token",
    summary = "Change a token's name, limits, expiry or scopes",
    security(("admin" = []), ("session" = [], "csrf" = [])),
    params(("id" = String, Path, description = "Token id")),
    request_body = PatchBody,
    responses((status = 200, description = "The updated token", body = TokenView),
        (status = 409, description = "`conflict`: a burst for a token that has no max_rps \
            (`field`: `burst`), or the token kept changing concurrently", body = ErrorBody),
        BadBody, AdminCredential, Csrf, TokenNotFound, Store))]
pub async fn update(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    TokenId(id): TokenId,
    JsonBody(body): JsonBody,
) -> Result<Json<TokenView>, ApiError> {
    let p: PatchBody = parse_json(&body)?;
    let now = Utc::now().timestamp();
    if p.name.is_none()
        && p.max_rps.is_none()
        && p.burst.is_none()
        && p.limit_scope.is_none()
        && p.expires_at.is_none()
        && p.quota.is_none()
        && p.scopes.is_none()
    {
        return Err(ApiError::Body(
            "Give at least one of name, max_rps, burst, limit_scope, expires_at, quota, scopes."
                .into(),
        ));
    }
    let quota = match p.quota {
        Some(Some(q)) => Some(Some(q.input()?)),
        Some(None) => Some(None),
        None => None,
    };
    let limit_scope = match p.limit_scope {
        Some(Some(s)) => Some(parse_scope(&s)?),
        Some(None) => return Err(ApiError::field("limit_scope", "cannot be null")),
        None => None,
    };
    let name = match p.name {
        Some(Some(name)) => Some(name),
        Some(None) => return Err(ApiError::field("name", "cannot be null")),
        None => None,
    };
    let expires_at = match &p.expires_at {
        Some(Some(t)) => Some(Some(parse_time("expires_at", t)?)),
        Some(None) => Some(None),
        None => None,
    };
    let patch = Patch {
        name,
        max_rps: p.max_rps,
        burst: p.burst,
        limit_scope,
        expires_at,
        scopes: p.scopes,
        quota,
    };
    let updated = state.tokens.update(&actor.0, &id, patch, now).await?;
    view(&state, updated).await
}

async fn set_status(
    state: AppState,
    actor: Actor,
    id: String,
    to: Status,
) -> Result<TokenRow, ApiError> {
    let now = Utc::now().timestamp();
    Ok(state.tokens.set_status(&actor.0, &id, to, now).await?)
}

#[utoipa::path(post, path = "/v1/tokens/{id}/suspend", tag = "tokens", operation_id = "suspend_token",
    summary = "Suspend a token",
    security(("admin" = []), ("session" = [], "csrf" = [])),
    params(("id" = String, Path, description = "Token id")),
    responses((status = 200, description = "The token, `status: suspended`; the filters answer 403 from now on", body = TokenView),
        (status = 409, description = "`conflict`: the token kept changing concurrently", body = ErrorBody),
        AdminCredential, Csrf, TokenNotFound, Store))]
pub async fn suspend(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    TokenId(id): TokenId,
) -> Result<Json<TokenView>, ApiError> {
    let row = set_status(state.clone(), actor, id, Status::Suspended).await?;
    view(&state, row).await
}

#[utoipa::path(post, path = "/v1/tokens/{id}/reactivate", tag = "tokens", operation_id = "reactivate_token",
    summary = "Reactivate a suspended token",
    security(("admin" = []), ("session" = [], "csrf" = [])),
    params(("id" = String, Path, description = "Token id")),
    responses((status = 200, description = "The token, `status: active`", body = TokenView),
        (status = 409, description = "`conflict`: the token kept changing concurrently", body = ErrorBody),
        AdminCredential, Csrf, TokenNotFound, Store))]
pub async fn reactivate(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    TokenId(id): TokenId,
) -> Result<Json<TokenView>, ApiError> {
    let row = set_status(state.clone(), actor, id, Status::Active).await?;
    view(&state, row).await
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", operation_id = "revoke_token",
    summary = "Revoke a token",
    security(("admin" = []), ("session" = [], "csrf" = [])),
    params(("id" = String, Path, description = "Token id")),
    responses((status = 204, description = "Revoked: the filters refuse it from now on"),
        (status = 409, description = "`already_revoked` (with `revoked_at`), or `conflict`: the \
            token kept changing concurrently", body = ErrorBody),
        AdminCredential, Csrf, TokenNotFound, Store))]
pub async fn revoke(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    TokenId(id): TokenId,
) -> Result<StatusCode, ApiError> {
    match set_status(state, actor, id, Status::Revoked).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(ApiError::Revoked { at }) => Err(ApiError::AlreadyRevoked { at }),
        Err(e) => Err(e),
    }
}

/// `POST /v1/tokens/{id}/rotate`; the body is optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    grace_seconds: Option<u64>,
}

impl PartialSchema for RotateBody {
    fn schema() -> RefOr<Schema> {
        let mut o = schema::object(
            json!({
                "grace_seconds": described(
                    schema::nullable(schema::integer(&(0..=MAX_GRACE_SECONDS))),
                    "How long the old secret keeps working (at most 30 days); absent, null or \
                     0: it is refused at once."),
            }),
            &[],
        );
        o.insert("examples".into(), json!([{"grace_seconds": 3600}]));
        schema::from_json(Value::Object(o))
    }
}

impl ToSchema for RotateBody {}

#[utoipa::path(post, path = "/v1/tokens/{id}/rotate", tag = "tokens", operation_id = "rotate_token",
    summary = "Issue a new secret for a token",
    security(("admin" = []), ("session" = [], "csrf" = [])),
    params(("id" = String, Path, description = "Token id")),
    request_body(content = Option<RotateBody>, description = "Optional: no body is `{}`"),
    responses((status = 200, description = "The token with its new secret in `token`, this once", body = WithSecret),
        (status = 409, description = "`conflict`: the token kept changing concurrently", body = ErrorBody),
        BadBody, AdminCredential, Csrf, TokenNotFound, Store))]
pub async fn rotate(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    TokenId(id): TokenId,
    JsonBody(body): JsonBody,
) -> Result<Json<WithSecret>, ApiError> {
    let grace = if body.iter().all(u8::is_ascii_whitespace) {
        0
    } else {
        parse_json::<RotateBody>(&body)?.grace_seconds.unwrap_or(0)
    };
    let now = Utc::now().timestamp();
    let rotated = state.tokens.rotate(&actor.0, &id, grace, now).await?;
    Ok(Json(WithSecret {
        token: view_of(&state, rotated.token, now).await?,
        secret: rotated.secret,
    }))
}

/// The expiry policy (`--user-max-lifetime` and the like) as conditions on
/// `POST /v1/tokens`: a kind that must expire needs `expires_in_seconds` or `expires_at`, and
/// `expires_in_seconds` may not pass the kind's longest lifetime. `None` without a policy.
/// (The same bound on `expires_at`, which depends on the clock, is in the refusal only.)
pub fn policy_rules(policy: &crate::policy::Policy) -> Option<Value> {
    let rules = |kind: Kind| {
        let p = policy.for_kind(kind);
        let mut r = serde_json::Map::new();
        if !policy.allows_never(kind) {
            r.insert(
                "anyOf".into(),
                json!([
                    schema::present(&[("expires_in_seconds", "integer")]),
                    schema::present(&[("expires_at", "string")]),
                ]),
            );
        }
        if let Some(max) = p.max_lifetime {
            r.insert(
                "properties".into(),
                json!({"expires_in_seconds": {"maximum": max.min(*EXPIRES_IN_SECONDS.end())}}),
            );
        }
        r
    };
    let (user, service) = (rules(Kind::User), rules(Kind::Service));
    if user.is_empty() && service.is_empty() {
        return None;
    }
    Some(json!({
        "if": {"required": ["kind"], "properties": {"kind": {"const": Kind::Service.as_str()}}},
        "then": service,
        "else": user,
    }))
}
