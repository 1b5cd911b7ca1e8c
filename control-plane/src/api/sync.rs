//! `GET /v1/sync`: the filters' long-poll. Semantics are documented in `tokengate_wire::sync`.

use super::body::Params;
use super::openapi::{BadQuery, Store, SyncCredential};
use super::schema::{self, described, Pattern};
use super::{ApiError, AppState};
use crate::domain::feed::Answer;
use crate::metrics::SyncAnswer;
use crate::store::{ScopeSet, Status, TokenRow};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;
use tokengate_wire::{SyncRecord, SyncResponse, SyncScope, SyncStatus};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

/// Snapshot cursors carry the snapshot's version and the last id sent: `<version>:<id>`.
static CURSOR: Pattern = Pattern::new("^[0-9]{1,19}:");

/// `tokengate_wire::SyncResponse`, as the document shows it.
pub struct SyncBody;

impl PartialSchema for SyncBody {
    fn schema() -> RefOr<Schema> {
        let kinds = crate::store::KINDS.map(tokengate_wire::Kind::as_str);
        let record = schema::answer(
            json!({
                "hash": described(schema::matching("^[0-9a-f]{64}$"), "sha256 of the secret, lower-case hex"),
                "id": {"type": "string"},
                "name": {"type": "string"},
                "owner": {"type": "string"},
                "kind": schema::one_of(&kinds),
                "status": schema::one_of(&["active", "suspended", "revoked"]),
                "max_rps": schema::nullable(schema::integer(&crate::domain::tokens::MAX_RPS)),
                "burst": schema::nullable(schema::integer(&crate::domain::tokens::BURST)),
                "expires_at": described(schema::nullable(schema::signed()), "Unix seconds; null: never"),
                "version": schema::unsigned(),
            }),
            &[
                "hash",
                "id",
                "name",
                "owner",
                "kind",
                "status",
                "max_rps",
                "burst",
                "expires_at",
                "version",
            ],
        );
        let answer = schema::answer(
            json!({
                "store_id": {"type": "string"},
                "version": schema::unsigned(),
                "snapshot": {"type": "boolean"},
                "changes": {"type": "array", "items": record},
                "next_cursor": described(CURSOR.schema(),
                    "Snapshot paging: ask again with this cursor before holding `version`"),
                "token_count": schema::unsigned(),
            }),
            &["store_id", "version", "snapshot", "changes", "token_count"],
        );
        schema::from_json(Value::Object(answer))
    }
}

impl ToSchema for SyncBody {
    fn name() -> Cow<'static, str> {
        "SyncResponse".into()
    }
}

#[derive(Default)]
struct SyncQuery {
    since: Option<String>,
    store_id: Option<String>,
    cursor: Option<String>,
    wait: Option<String>,
    /// Identifies the proxy: counted among the live ones in a snapshot's `proxies`.
    proxy_id: Option<String>,
}

impl SyncQuery {
    /// Unknown parameters are ignored, unlike on the admin API: a newer filter may send one
    /// that this control plane does not know yet, and the poll must keep working.
    fn from_params(params: Vec<(String, String)>) -> SyncQuery {
        let mut q = SyncQuery::default();
        for (name, value) in params {
            let slot = match name.as_str() {
                "since" => &mut q.since,
                "store_id" => &mut q.store_id,
                "cursor" => &mut q.cursor,
                "wait" => &mut q.wait,
                "proxy_id" => &mut q.proxy_id,
                _ => continue,
            };
            *slot = Some(value);
        }
        q
    }
}

/// A token's records: its secret's, and one per rotated-out secret still on record. An old
/// secret expires with its grace, so the filters refuse it then even if the control plane is
/// unreachable; once the grace is over it travels as a tombstone in changes. A snapshot
/// leaves such tombstones out: whatever a snapshot does not mention is gone.
fn to_wire(r: TokenRow, now: i64, snapshot: bool, out: &mut Vec<SyncRecord>) {
    let status = match r.status {
        Status::Active => SyncStatus::Active,
        Status::Suspended => SyncStatus::Suspended,
        Status::Revoked => SyncStatus::Revoked,
    };
    let record = |hash: String, status, expires_at| SyncRecord {
        hash,
        id: r.id.clone(),
        name: r.name.clone(),
        owner: r.owner.clone(),
        kind: r.kind,
        status,
        max_rps: r.max_rps,
        burst: r.burst,
        limit_scope: r.limit_scope,
        expires_at,
        scopes: r.scopes.clone(),
        quota: r.quota,
        version: r.version,
    };
    for old in &r.retired {
        let status = if old.until > now {
            status
        } else if snapshot {
            continue;
        } else {
            SyncStatus::Revoked
        };
        let expires_at = Some(r.expires_at.map_or(old.until, |t| t.min(old.until)));
        out.push(record(old.hash.clone(), status, expires_at));
    }
    out.push(record(r.hash.clone(), status, r.expires_at));
}

fn to_wire_all(rows: Vec<TokenRow>, snapshot: bool) -> Vec<SyncRecord> {
    let now = chrono::Utc::now().timestamp();
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        to_wire(r, now, snapshot, &mut out);
    }
    out
}

/// The whole scope set as the filters receive it: `(scopes, scopes_version)`.
fn scopes_to_wire(set: ScopeSet) -> (Option<Vec<SyncScope>>, Option<u64>) {
    let scopes = set
        .scopes
        .into_iter()
        .map(|s| SyncScope {
            name: s.name,
            rules: s.rules,
            version: s.version,
        })
        .collect();
    (Some(scopes), Some(set.version))
}

fn number(field: &str, v: Option<&str>) -> Result<Option<u64>, ApiError> {
    v.map(|s| {
        s.parse::<u64>()
            .map_err(|_| ApiError::field(field, "must be a non-negative integer"))
    })
    .transpose()
}

fn parse_cursor(c: &str) -> Result<(u64, String), ApiError> {
    let bad = || ApiError::field("cursor", "is not a cursor this server handed out");
    let (v, id) = Some(c)
        .filter(|c| CURSOR.matches(c))
        .and_then(|c| c.split_once(':'))
        .ok_or_else(bad)?;
    Ok((v.parse().map_err(|_| bad())?, id.to_string()))
}

async fn snapshot(
    state: &AppState,
    version: u64,
    after: Option<String>,
    poller: Option<&str>,
) -> Result<SyncResponse, ApiError> {
    let size = state.sync_page_size;
    let mut page = state
        .store
        .snapshot_page(after.as_deref(), size + 1)
        .await?;
    let next_cursor = if page.rows.len() > size as usize {
        page.rows.truncate(size as usize);
        page.rows.last().map(|r| format!("{version}:{}", r.id))
    } else {
        None
    };
    let (scopes, scopes_version) = scopes_to_wire(page.scopes);
    Ok(SyncResponse {
        store_id: state.store.store_id().to_string(),
        version,
        snapshot: true,
        changes: to_wire_all(page.rows, true),
        next_cursor,
        token_count: page.live,
        proxies: Some(
            state
                .fleet
                .live_count(poller, chrono::Utc::now().timestamp_millis())
                .await?,
        ),
        scopes,
        scopes_version,
    })
}

/// A shared answer as JSON, serialised by the first poll that sends it.
fn rendered(state: &AppState, answer: &Answer) -> Result<Arc<[u8]>, ApiError> {
    if let Some(body) = answer.rendered.get() {
        return Ok(body.clone());
    }
    let rows = answer.changes.rows.clone();
    let (scopes, scopes_version) = answer
        .changes
        .scopes
        .clone()
        .map_or((None, None), scopes_to_wire);
    let body = serde_json::to_vec(&SyncResponse {
        store_id: state.store.store_id().to_string(),
        version: answer.version,
        snapshot: false,
        changes: to_wire_all(rows, false),
        next_cursor: None,
        token_count: answer.changes.live,
        proxies: None,
        scopes,
        scopes_version,
    })
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(answer.rendered.get_or_init(|| body.into()).clone())
}

fn json(body: Arc<[u8]>) -> Response {
    (
        [(CONTENT_TYPE, "application/json")],
        Body::from(Bytes::from_owner(body)),
    )
        .into_response()
}

async fn answer_snapshot(
    state: &AppState,
    version: u64,
    after: Option<String>,
    poller: Option<&str>,
) -> Result<Response, ApiError> {
    let page = snapshot(state, version, after, poller).await?;
    state.metrics.sync_answer(SyncAnswer::Snapshot);
    Ok(Json(page).into_response())
}

/// Query parameters of `GET /v1/sync`. Unknown ones are ignored (see `SyncQuery`).
pub struct SyncParams;

impl utoipa::IntoParams for SyncParams {
    fn into_params(
        _: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        vec![
            schema::query("since", "The version the filter holds; 0 or absent: none", schema::unsigned()),
            schema::query("store_id", "The store the filter's state came from", super::body::text_schema()),
            schema::query("cursor", "Snapshot paging: the previous page's `next_cursor`", CURSOR.schema()),
            schema::query(
                "wait",
                "Seconds to hold the poll when nothing changed (at most `--sync-max-wait-seconds`, the default)",
                schema::unsigned(),
            ),
            schema::query("proxy_id", "Identifies the proxy", super::body::text_schema()),
        ]
    }
}

#[utoipa::path(get, path = "/v1/sync", tag = "filters", operation_id = "sync",
    summary = "Long-poll for token changes",
    security(("sync" = [])),
    params(SyncParams),
    responses((status = 200, description = "Changes after `since`, or a snapshot page (see `tokengate_wire::sync`)", body = SyncBody),
        BadQuery, SyncCredential, Store))]
pub async fn sync(
    State(state): State<AppState>,
    Params(params): Params,
) -> Result<Response, ApiError> {
    let q = SyncQuery::from_params(params);
    let since = number("since", q.since.as_deref())?.unwrap_or(0);
    let wait = number("wait", q.wait.as_deref())?
        .map_or(state.sync_max_wait, Duration::from_secs)
        .min(state.sync_max_wait);
    if let Some(c) = &q.cursor {
        let (version, after) = parse_cursor(c)?;
        return answer_snapshot(&state, version, Some(after), q.proxy_id.as_deref()).await;
    }
    // Subscribe before reading the version so that no change can slip between the two.
    let mut changed = state.store.subscribe();
    let mut current = *changed.borrow_and_update();
    if since > current {
        // This replica may not have heard yet of a change that another one handed out: ask
        // the database before taking the client for one of another store's. (Were it taken
        // for one, the client would get a snapshot at an older version: a step back.)
        current = state.store.version().await?;
    }
    let foreign = q
        .store_id
        .as_deref()
        .is_some_and(|id| id != state.store.store_id());
    // A client that names this store holds its state, even an empty one at version 0.
    let fresh = since == 0 && q.store_id.is_none();
    if fresh || since > current || foreign {
        return answer_snapshot(&state, current, None, q.proxy_id.as_deref()).await;
    }
    let mut seen = current;
    if since == current {
        let _held = state.metrics.hold_poll();
        tracing::debug!(
            since,
            wait_seconds = wait.as_secs(),
            "sync poll held until a change"
        );
        let mut shutdown = state.shutdown.clone();
        // A replica that cannot hear of other replicas' changes must not hold the poll for
        // them: it answers from the database now (or 503), and the filter polls again,
        // through a replica that hears, once Envoy's health checks have set this one aside.
        let mut hearing = state.store.hearing();
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            tokio::select! {
                r = changed.changed() => {
                    seen = *changed.borrow_and_update();
                    if r.is_err() || seen > since {
                        break;
                    }
                }
                r = shutdown.changed() => {
                    if r.is_err() {
                        break;
                    }
                }
                _ = &mut deadline => break,
                deaf = hearing.wait_for(|h| !*h) => {
                    if deaf.is_ok() {
                        tracing::debug!("sync poll released: this replica hears of no changes");
                    }
                    break;
                }
            }
        }
    }
    // Every poll woken by the same version shares this read.
    let answer = state.feed.changes(since, seen).await?;
    // Purged rows never reach a client that is older than them: it starts over.
    if since < answer.changes.horizon {
        return answer_snapshot(&state, seen.max(current), None, q.proxy_id.as_deref()).await;
    }
    state.metrics.sync_answer(
        if answer.changes.rows.is_empty() && answer.changes.scopes.is_none() {
            SyncAnswer::NoChange
        } else {
            SyncAnswer::Changes
        },
    );
    Ok(json(rendered(&state, &answer)?))
}
