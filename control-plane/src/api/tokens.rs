//! `/v1/tokens`: create, list, get, update, suspend, reactivate, revoke.

use super::body::{nullable, parse_json};
use super::{blocking, ApiError, AppState};
use crate::secrets;
use crate::store::{parse_kind, ListQuery, Status, StoreError, TokenRow};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tokengate_wire::Kind;

const MAX_RPS: u32 = 1_000_000;
const MAX_BURST: u32 = 10_000_000;

fn rfc3339(t: i64) -> String {
    DateTime::<Utc>::from_timestamp(t, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A token as the API shows it (never with its hash).
#[derive(Serialize)]
pub struct TokenView {
    id: String,
    name: String,
    kind: Kind,
    owner: String,
    status: &'static str,
    max_rps: Option<u32>,
    burst: Option<u32>,
    created_at: String,
    expires_at: Option<String>,
    last_used_at: Option<String>,
    updated_at: String,
    version: u64,
}

impl From<TokenRow> for TokenView {
    fn from(r: TokenRow) -> TokenView {
        TokenView {
            id: r.id,
            name: r.name,
            kind: r.kind,
            owner: r.owner,
            status: r.status.as_str(),
            max_rps: r.max_rps,
            burst: r.burst,
            created_at: rfc3339(r.created_at),
            expires_at: r.expires_at.map(rfc3339),
            last_used_at: r.last_used_at.map(rfc3339),
            updated_at: rfc3339(r.updated_at),
            version: r.version,
        }
    }
}

fn check_text(field: &str, v: &str) -> Result<(), ApiError> {
    let n = v.chars().count();
    if n == 0 || n > 128 {
        return Err(ApiError::field(field, "must be 1 to 128 characters"));
    }
    if v.chars().any(char::is_control) {
        return Err(ApiError::field(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn check_max_rps(v: Option<u32>) -> Result<(), ApiError> {
    match v {
        Some(n) if n == 0 || n > MAX_RPS => Err(ApiError::field(
            "max_rps",
            format!("must be between 1 and {MAX_RPS}, or null for unlimited"),
        )),
        _ => Ok(()),
    }
}

fn check_burst(burst: Option<u32>, max_rps: Option<u32>) -> Result<(), ApiError> {
    match burst {
        Some(n) if n == 0 || n > MAX_BURST => Err(ApiError::field(
            "burst",
            format!("must be between 1 and {MAX_BURST}"),
        )),
        Some(_) if max_rps.is_none() => Err(ApiError::field(
            "burst",
            "needs max_rps: an unlimited token has no burst",
        )),
        _ => Ok(()),
    }
}

fn parse_future_time(field: &str, v: &str, now: i64) -> Result<i64, ApiError> {
    let t = DateTime::parse_from_rfc3339(v)
        .map_err(|_| {
            ApiError::field(
                field,
                "must be an RFC 3339 time such as 2030-01-31T12:00:00Z",
            )
        })?
        .timestamp();
    if t <= now {
        return Err(ApiError::field(field, "must be in the future"));
    }
    Ok(t)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: Option<String>,
    kind: Option<String>,
    owner: Option<String>,
    max_rps: Option<u32>,
    burst: Option<u32>,
    expires_in_seconds: Option<u64>,
    expires_at: Option<String>,
}

#[derive(Serialize)]
struct Created {
    #[serde(flatten)]
    token: TokenView,
    /// The secret, shown this once.
    #[serde(rename = "token")]
    secret: String,
}

pub async fn create(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let b: CreateBody = parse_json(&body)?;
    let now = Utc::now().timestamp();
    let name = b
        .name
        .ok_or_else(|| ApiError::field("name", "is required"))?;
    check_text("name", &name)?;
    let kind = match b.kind.as_deref() {
        None => Kind::User,
        Some(k) => {
            parse_kind(k).ok_or_else(|| ApiError::field("kind", "must be `user` or `service`"))?
        }
    };
    let owner = b.owner.unwrap_or_else(|| "admin".to_string());
    check_text("owner", &owner)?;
    check_max_rps(b.max_rps)?;
    check_burst(b.burst, b.max_rps)?;
    let expires_at = match (b.expires_in_seconds, b.expires_at) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "expires_at",
                "give either expires_in_seconds or expires_at, not both",
            ))
        }
        (Some(0), None) => {
            return Err(ApiError::field(
                "expires_in_seconds",
                "must be a positive number of seconds",
            ))
        }
        (Some(s), None) => Some(now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX))),
        (None, Some(t)) => Some(parse_future_time("expires_at", &t, now)?),
        (None, None) => None,
    };
    let secret = secrets::new_token();
    let row = TokenRow {
        id: secrets::new_id(),
        hash: secrets::sha256_hex(secret.as_bytes()),
        name,
        kind,
        owner,
        status: Status::Active,
        max_rps: b.max_rps,
        burst: b.burst,
        created_at: now,
        updated_at: now,
        expires_at,
        last_used_at: None,
        version: 0,
    };
    let row = blocking(&state, move |s| s.create(row)).await?;
    Ok((
        StatusCode::CREATED,
        Json(Created {
            token: row.into(),
            secret,
        }),
    ))
}

#[derive(Serialize)]
struct Listing {
    tokens: Vec<TokenView>,
    next_cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut query = ListQuery {
        limit: 100,
        ..Default::default()
    };
    for (k, v) in q {
        match k.as_str() {
            "status" => {
                query.status = match Status::parse(&v) {
                    Some(s @ (Status::Active | Status::Suspended)) => Some(s),
                    _ => return Err(ApiError::field("status", "must be `active` or `suspended`")),
                }
            }
            "owner" => query.owner = Some(v),
            "kind" => {
                query.kind = Some(
                    parse_kind(&v)
                        .ok_or_else(|| ApiError::field("kind", "must be `user` or `service`"))?,
                )
            }
            "limit" => {
                query.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::field("limit", "must be between 1 and 1000"))?
            }
            "cursor" => query.after = Some(v),
            other => return Err(ApiError::field(other, "is not a known query parameter")),
        }
    }
    let limit = query.limit as usize;
    // One extra row tells whether another page exists.
    query.limit += 1;
    let mut rows = blocking(&state, move |s| s.list(&query)).await?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| r.id.clone())
    } else {
        None
    };
    let listing = Listing {
        tokens: rows.into_iter().map(TokenView::from).collect(),
        next_cursor,
    };
    Ok(Json(
        serde_json::to_value(listing).map_err(|e| ApiError::Internal(e.to_string()))?,
    ))
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    Ok(Json(blocking(&state, move |s| s.get(&id)).await?.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    max_rps: Option<Option<u32>>,
    #[serde(default, deserialize_with = "nullable")]
    burst: Option<Option<u32>>,
    #[serde(default, deserialize_with = "nullable")]
    expires_at: Option<Option<String>>,
}

pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<TokenView>, ApiError> {
    let p: PatchBody = parse_json(&body)?;
    let now = Utc::now().timestamp();
    if p.name.is_none() && p.max_rps.is_none() && p.burst.is_none() && p.expires_at.is_none() {
        return Err(ApiError::Body(
            "Give at least one of name, max_rps, burst, expires_at.".into(),
        ));
    }
    if let Some(name) = &p.name {
        check_text("name", name)?;
    }
    if let Some(max_rps) = p.max_rps {
        check_max_rps(max_rps)?;
    }
    let expires_at = match &p.expires_at {
        Some(Some(t)) => Some(Some(parse_future_time("expires_at", t, now)?)),
        Some(None) => Some(None),
        None => None,
    };
    let row = blocking(&state, move |s| {
        s.update(&id, now, &|row: &mut TokenRow| {
            let before = row.clone();
            if let Some(name) = &p.name {
                row.name = name.clone();
            }
            if let Some(max_rps) = p.max_rps {
                row.max_rps = max_rps;
                if max_rps.is_none() {
                    row.burst = None;
                }
            }
            if let Some(burst) = p.burst {
                row.burst = burst;
            }
            if let Some(e) = expires_at {
                row.expires_at = e;
            }
            check_burst(row.burst, row.max_rps).map_err(|e| match e {
                ApiError::Field { message, .. } => StoreError::Invalid {
                    field: "burst",
                    message,
                },
                other => StoreError::Backend(format!("{other:?}")),
            })?;
            Ok(*row != before)
        })
    })
    .await?;
    Ok(Json(row.into()))
}

async fn set_status(state: AppState, id: String, to: Status) -> Result<Json<TokenView>, ApiError> {
    let now = Utc::now().timestamp();
    let row = blocking(&state, move |s| {
        s.update(&id, now, &|row: &mut TokenRow| {
            let changed = row.status != to;
            row.status = to;
            Ok(changed)
        })
    })
    .await?;
    Ok(Json(row.into()))
}

pub async fn suspend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    set_status(state, id, Status::Suspended).await
}

pub async fn reactivate(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    set_status(state, id, Status::Active).await
}

pub async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let _revoked = set_status(state, id, Status::Revoked).await?;
    Ok(StatusCode::NO_CONTENT)
}
