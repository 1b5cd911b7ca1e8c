//! `GET /v1/sync`: the filters' long-poll. Semantics are documented in `tokengate_wire::sync`.

use super::{blocking, ApiError, AppState};
use crate::store::{Status, TokenRow};
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use std::time::Duration;
use tokengate_wire::{SyncRecord, SyncResponse, SyncStatus};

#[derive(Deserialize)]
pub struct SyncQuery {
    since: Option<String>,
    store_id: Option<String>,
    cursor: Option<String>,
    wait: Option<String>,
    /// Identifies the proxy; accepted now so that fleet-aware limits can count proxies later.
    #[allow(dead_code)]
    proxy_id: Option<String>,
}

fn to_wire(r: TokenRow) -> SyncRecord {
    SyncRecord {
        hash: r.hash,
        id: r.id,
        name: r.name,
        owner: r.owner,
        kind: r.kind,
        status: match r.status {
            Status::Active => SyncStatus::Active,
            Status::Suspended => SyncStatus::Suspended,
            Status::Revoked => SyncStatus::Revoked,
        },
        max_rps: r.max_rps,
        burst: r.burst,
        expires_at: r.expires_at,
        version: r.version,
    }
}

fn number(field: &str, v: Option<&str>) -> Result<Option<u64>, ApiError> {
    v.map(|s| {
        s.parse::<u64>()
            .map_err(|_| ApiError::field(field, "must be a non-negative integer"))
    })
    .transpose()
}

/// Snapshot cursors carry the snapshot's version and the last id sent: `<version>:<id>`.
fn parse_cursor(c: &str) -> Result<(u64, String), ApiError> {
    let bad = || ApiError::field("cursor", "is not a cursor this server handed out");
    let (v, id) = c.split_once(':').ok_or_else(bad)?;
    Ok((v.parse().map_err(|_| bad())?, id.to_string()))
}

async fn snapshot(
    state: &AppState,
    version: u64,
    after: Option<String>,
) -> Result<SyncResponse, ApiError> {
    let page = state.sync_page_size;
    let (rows, count) = blocking(state, move |s| {
        let rows = s.snapshot_page(after.as_deref(), page + 1)?;
        Ok((rows, s.live_count()?))
    })
    .await?;
    let mut rows = rows;
    let next_cursor = if rows.len() > page as usize {
        rows.truncate(page as usize);
        rows.last().map(|r| format!("{version}:{}", r.id))
    } else {
        None
    };
    Ok(SyncResponse {
        store_id: state.store.store_id().to_string(),
        version,
        snapshot: true,
        changes: rows.into_iter().map(to_wire).collect(),
        next_cursor,
        token_count: count,
    })
}

async fn changes(state: &AppState, since: u64) -> Result<SyncResponse, ApiError> {
    let page = state.sync_page_size;
    let (rows, count) = blocking(state, move |s| {
        Ok((s.changes_since(since, page)?, s.live_count()?))
    })
    .await?;
    Ok(SyncResponse {
        store_id: state.store.store_id().to_string(),
        version: rows.last().map_or(since, |r| r.version),
        snapshot: false,
        changes: rows.into_iter().map(to_wire).collect(),
        next_cursor: None,
        token_count: count,
    })
}

pub async fn sync(
    State(state): State<AppState>,
    Query(q): Query<SyncQuery>,
) -> Result<Json<SyncResponse>, ApiError> {
    let since = number("since", q.since.as_deref())?.unwrap_or(0);
    let wait = number("wait", q.wait.as_deref())?
        .map_or(state.sync_max_wait, Duration::from_secs)
        .min(state.sync_max_wait);
    if let Some(c) = &q.cursor {
        let (version, after) = parse_cursor(c)?;
        return Ok(Json(snapshot(&state, version, Some(after)).await?));
    }
    // Subscribe before reading the version so that no change can slip between the two.
    let mut changed = state.store.subscribe();
    let current = *changed.borrow_and_update();
    let foreign = q
        .store_id
        .as_deref()
        .is_some_and(|id| id != state.store.store_id());
    // A client that names this store holds its state, even an empty one at version 0.
    let fresh = since == 0 && q.store_id.is_none();
    if fresh || since > current || foreign {
        return Ok(Json(snapshot(&state, current, None).await?));
    }
    if since == current {
        let mut shutdown = state.shutdown.clone();
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            tokio::select! {
                r = changed.changed() => {
                    if r.is_err() || *changed.borrow_and_update() > since {
                        break;
                    }
                }
                r = shutdown.changed() => {
                    if r.is_err() {
                        break;
                    }
                }
                _ = &mut deadline => break,
            }
        }
    }
    Ok(Json(changes(&state, since).await?))
}
