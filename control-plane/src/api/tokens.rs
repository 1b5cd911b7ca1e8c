//! `/v1/tokens`: create, list, get, update, suspend, reactivate, rotate, revoke.

use super::auth::Actor;
use super::body::{nullable, parse_json, JsonBody, Params, TokenId};
use super::{ApiError, AppState};
use crate::domain::rfc3339;
use crate::domain::tokens::{Expiry, NewToken, Patch, MAX_EXPIRY};
use crate::duration;
use crate::store::{parse_kind, ListQuery, Status, TokenRow};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokengate_wire::{Kind, LimitScope};
use utoipa::{IntoParams, ToSchema};

/// A token as the API shows it (never its secret or hash).
#[derive(Serialize, ToSchema)]
pub struct TokenView {
    id: String,
    name: String,
    /// `user` (acts for a person, the owner) or `service` (acts for an automation owned by
    /// a group).
    #[schema(value_type = String, example = "user")]
    kind: Kind,
    owner: String,
    /// `active` or `suspended`.
    status: &'static str,
    max_rps: Option<u32>,
    burst: Option<u32>,
    /// `fleet`: `max_rps` and `burst` are one limit shared by every proxy; `proxy`: each
    /// proxy's.
    #[schema(value_type = String, example = "fleet")]
    limit_scope: &'static str,
    /// `GET /v1/tokens/{id}` of a fleet-limited token: the live fleet view.
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet: Option<FleetJson>,
    created_at: String,
    expires_at: Option<String>,
    /// True once `expires_at` has passed (the filter refuses it with `token_expired`).
    expired: bool,
    last_used_at: Option<String>,
    /// Requests the filters let through, as reported by `POST /v1/usage`.
    requests_allowed: u64,
    /// Requests the filters refused (expired, suspended, rate limited).
    requests_denied: u64,
    rotated_at: Option<String>,
    /// While a rotation's grace period runs, the old secret works until this time.
    old_secret_valid_until: Option<String>,
    updated_at: String,
    version: u64,
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
        }
    }
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

fn view(r: TokenRow) -> Json<TokenView> {
    Json(TokenView::new(r, Utc::now().timestamp()))
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    name: Option<String>,
    /// `user` (default) or `service`.
    kind: Option<String>,
    /// The person (user tokens; defaults to the admin credential's name) or the group
    /// (service tokens; required).
    owner: Option<String>,
    /// Requests per second; absent or null: unlimited.
    max_rps: Option<u32>,
    /// Requests allowed at once; defaults to one second's worth.
    burst: Option<u32>,
    /// `fleet` (default): `max_rps` and `burst` are one limit for every proxy together;
    /// `proxy`: a limit per proxy.
    limit_scope: Option<String>,
    expires_in_seconds: Option<u64>,
    /// RFC 3339.
    expires_at: Option<String>,
}

/// A token with its secret, shown this once.
#[derive(Serialize, ToSchema)]
pub struct WithSecret {
    #[serde(flatten)]
    token: TokenView,
    /// The secret. It is not stored and cannot be shown again.
    #[serde(rename = "token")]
    secret: String,
}

#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", security(("admin" = [])),
    request_body = CreateBody,
    responses((status = 201, description = "Created; the secret is in `token`, this once", body = WithSecret),
        (status = 400, description = "A field is invalid or breaks the expiry policy", body = super::error::ErrorBody),
        (status = 413, description = "The body is over 64 kB", body = super::error::ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = super::error::ErrorBody),
        (status = 401, description = "No or wrong admin credential", body = super::error::ErrorBody)))]
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
        (Some(0), None) => {
            return Err(ApiError::field(
                "expires_in_seconds",
                "must be a positive number of seconds",
            ))
        }
        (Some(s), None) => Expiry {
            // Saturated past the latest expiry, which the domain refuses.
            at: Some(
                now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX))
                    .min(MAX_EXPIRY + 1),
            ),
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
    next_cursor: Option<String>,
}

/// Query parameters of `GET /v1/tokens` (documentation; parsing is strict, see `list`).
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ListParams {
    /// `active`, `suspended` (both: not expired) or `expired` (whether suspended or not).
    status: Option<String>,
    owner: Option<String>,
    /// `user` or `service`.
    kind: Option<String>,
    /// Tokens that expire within this duration from now: `3600s`, `12h`, `7d`.
    expiring_within: Option<String>,
    /// Tokens whose name contains this (ASCII letters match either case).
    name_contains: Option<String>,
    /// `id` (default) or `newest` (most recently created first).
    order: Option<String>,
    /// 1 to 1000, default 100.
    limit: Option<u32>,
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", security(("admin" = [])),
    params(ListParams),
    responses((status = 200, description = "A page of tokens, by id", body = Listing),
        (status = 400, description = "Unknown or invalid query parameter", body = super::error::ErrorBody),
        (status = 401, description = "No or wrong admin credential", body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Params(q): Params,
) -> Result<Json<Listing>, ApiError> {
    let now = Utc::now().timestamp();
    let mut query = ListQuery {
        limit: 100,
        ..Default::default()
    };
    let mut cursor = None;
    for (k, v) in q {
        match k.as_str() {
            // Statuses as shown: an expired token is `expired`, whether or not it was
            // suspended, and is neither `active` nor `suspended`.
            "status" => {
                (query.status, query.expired) = match v.as_str() {
                    "active" => (Some(Status::Active), Some((false, now))),
                    "suspended" => (Some(Status::Suspended), Some((false, now))),
                    "expired" => (None, Some((true, now))),
                    _ => {
                        return Err(ApiError::field(
                            "status",
                            "must be `active`, `suspended` or `expired`",
                        ))
                    }
                }
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
                let secs = duration::parse(&v).ok().flatten().ok_or_else(|| {
                    ApiError::field("expiring_within", "must be a duration such as 12h or 7d")
                })?;
                let secs = i64::try_from(secs).unwrap_or(i64::MAX);
                query.expiring = Some((now, now.saturating_add(secs)));
            }
            "limit" => {
                query.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::field("limit", "must be between 1 and 1000"))?
            }
            "order" => {
                query.newest_first = match v.as_str() {
                    "id" => false,
                    "newest" => true,
                    _ => return Err(ApiError::field("order", "must be `id` or `newest`")),
                }
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
        tokens: rows.into_iter().map(|r| TokenView::new(r, now)).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/tokens/{id}", tag = "tokens", security(("admin" = [])),
    params(("id" = String, Path, description = "Token id, `tok_...`")),
    responses((status = 200, description = "The token", body = TokenView),
        (status = 401, description = "No or wrong admin credential", body = super::error::ErrorBody),
        (status = 404, description = "No such token (or revoked, or purged)", body = super::error::ErrorBody)))]
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
    let mut v = TokenView::new(token, now.timestamp());
    v.fleet = fleet;
    Ok(Json(v))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchBody {
    /// Cannot be null: a token always has a name.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    name: Option<Option<String>>,
    /// null: unlimited.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u32>)]
    max_rps: Option<Option<u32>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u32>)]
    burst: Option<Option<u32>>,
    /// `fleet` or `proxy`; cannot be null.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    limit_scope: Option<Option<String>>,
    /// RFC 3339, or null for never (where the policy allows it).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    expires_at: Option<Option<String>>,
}

#[utoipa::path(patch, path = "/v1/tokens/{id}", tag = "tokens", security(("admin" = [])),
    params(("id" = String, Path, description = "Token id")),
    request_body = PatchBody,
    responses((status = 200, description = "The updated token", body = TokenView),
        (status = 400, description = "A field is invalid or breaks the expiry policy", body = super::error::ErrorBody),
        (status = 413, description = "The body is over 64 kB", body = super::error::ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = super::error::ErrorBody),
        (status = 401, description = "No or wrong admin credential", body = super::error::ErrorBody),
        (status = 404, description = "No such token", body = super::error::ErrorBody)))]
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
    {
        return Err(ApiError::Body(
            "Give at least one of name, max_rps, burst, limit_scope, expires_at.".into(),
        ));
    }
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
    };
    Ok(view(state.tokens.update(&actor.0, &id, patch, now).await?))
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

#[utoipa::path(post, path = "/v1/tokens/{id}/suspend", tag = "tokens", security(("admin" = [])),
    params(("id" = String, Path, description = "Token id")),
    responses((status = 200, description = "The token, `status: suspended`; the filters answer 403 from now on", body = TokenView),
        (status = 401, description = "No or wrong admin credential", body = super::error::ErrorBody),
        (status = 404, description = "No such token", body = super::error::ErrorBody)))]
pub async fn suspend(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    TokenId(id): TokenId,
) -> Result<Json<TokenView>, ApiError> {
    Ok(view(set_status(state, actor, id, Status::Suspended).await?))
}

#[utoipa::path(post, path = "/v1/tokens/{id}/reactivate", tag = "tokens", security(("admin" = [])),
    params(("id" = String, Path, description = "Token id")),
    responses((status = 200, description = "The token, `status: active`", body = TokenView),
        (status = 401, description = "No or wrong admin credential", body = super::error::ErrorBody),
        (status = 404, description = "No such token", body = super::error::ErrorBody)))]
pub async fn reactivate(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    TokenId(id): TokenId,
) -> Result<Json<TokenView>, ApiError> {
    Ok(view(set_status(state, actor, id, Status::Active).await?))
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", security(("admin" = [])),
    params(("id" = String, Path, description = "Token id")),
    responses((status = 204, description = "Revoked: the filters refuse it from now on"),
        (status = 401, description = "No or wrong admin credential", body = super::error::ErrorBody),
        (status = 404, description = "No such token", body = super::error::ErrorBody),
        (status = 409, description = "Already revoked (`already_revoked`, with `revoked_at`)", body = super::error::ErrorBody)))]
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// How long the old secret keeps working (default 0: refused at once; at most 30 days).
    grace_seconds: Option<u64>,
}

#[utoipa::path(post, path = "/v1/tokens/{id}/rotate", tag = "tokens", security(("admin" = [])),
    params(("id" = String, Path, description = "Token id")),
    request_body(content = Option<RotateBody>, description = "Optional"),
    responses((status = 200, description = "The token with its new secret in `token`, this once", body = WithSecret),
        (status = 400, description = "Invalid grace_seconds", body = super::error::ErrorBody),
        (status = 413, description = "The body is over 64 kB", body = super::error::ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = super::error::ErrorBody),
        (status = 401, description = "No or wrong admin credential", body = super::error::ErrorBody),
        (status = 404, description = "No such token", body = super::error::ErrorBody)))]
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
        token: TokenView::new(rotated.token, now),
        secret: rotated.secret,
    }))
}
