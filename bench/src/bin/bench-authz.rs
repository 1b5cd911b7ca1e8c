//! The ext_authz service of bench variant E: what a team would write to check tokengate's
//! tokens from Envoy's ext_authz (HTTP) without a filter of its own. It loads the control
//! plane's snapshot once at start and then answers each check with the same lookup as the
//! filter: sha256 of the token → record → status and expiry, 200 with the identity headers.
//!
//! `bench-authz --listen 127.0.0.1:PORT --control-plane 127.0.0.1:PORT`, with the sync
//! credential in `TOKENGATE_SYNC_TOKEN` (not on the command line, where `ps` shows it).
//! Ready when `GET /healthz` answers 200. One tokio runtime with its default worker count
//! (one per core), as a service would ship.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokengate_e2e::http;
use tokengate_wire::sync::{SyncRecord, SyncResponse, SyncStatus};

/// Header values built once per record, so that a check only clones them.
struct Identity {
    active: bool,
    expires_at: Option<i64>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

type Table = HashMap<String, Identity>;

fn identity(record: &SyncRecord) -> Option<Identity> {
    let value = |s: &str| HeaderValue::from_str(s).ok();
    let headers = vec![
        (
            HeaderName::from_static("x-tokengate-token-id"),
            value(&record.id)?,
        ),
        (
            HeaderName::from_static("x-tokengate-token-name"),
            value(&record.name)?,
        ),
        (
            HeaderName::from_static("x-tokengate-token-owner"),
            value(&record.owner)?,
        ),
        (
            HeaderName::from_static("x-tokengate-token-kind"),
            value(record.kind.as_str())?,
        ),
        // Envoy drops the credential before the request goes upstream, as the filter does.
        (
            HeaderName::from_static("x-envoy-auth-headers-to-remove"),
            HeaderValue::from_static("x-api-token, authorization"),
        ),
    ];
    Some(Identity {
        active: record.status == SyncStatus::Active,
        expires_at: record.expires_at,
        headers,
    })
}

/// Pages through the full snapshot (`since=0`). Revoked tokens are left out: unknown and
/// revoked get the same answer.
fn load(control_plane: SocketAddr, sync_token: &str) -> Result<Table, String> {
    let auth = format!("Bearer {sync_token}");
    let mut table = Table::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/sync?since=0&cursor={c}"),
            None => "/v1/sync?since=0".to_string(),
        };
        let r = http(
            control_plane,
            "GET",
            &path,
            &[("Authorization", auth.as_str())],
            None,
        )
        .map_err(|e| format!("GET /v1/sync: {e}"))?;
        if r.status != 200 {
            return Err(format!("GET /v1/sync: status {}", r.status));
        }
        let page: SyncResponse =
            serde_json::from_str(&r.body).map_err(|e| format!("GET /v1/sync: {e}"))?;
        for record in &page.changes {
            if record.status == SyncStatus::Revoked {
                table.remove(&record.hash);
            } else if let Some(id) = identity(record) {
                table.insert(record.hash.clone(), id);
            }
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(table),
        }
    }
}

fn credential(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("x-api-token") {
        return Some(v.as_bytes());
    }
    let auth = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().as_bytes())
}

fn hash_hex(token: &[u8]) -> String {
    let mut out = String::with_capacity(64);
    for b in Sha256::digest(token) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn decide(table: &Table, headers: &HeaderMap, now: i64) -> Response {
    let unauthorized = || {
        (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer error=\"invalid_token\"")],
        )
            .into_response()
    };
    let Some(token) = credential(headers) else {
        return (StatusCode::UNAUTHORIZED, [("www-authenticate", "Bearer")]).into_response();
    };
    let Some(found) = table.get(&hash_hex(token)) else {
        return unauthorized();
    };
    if found.expires_at.is_some_and(|t| t <= now) {
        return unauthorized();
    }
    if !found.active {
        return StatusCode::FORBIDDEN.into_response();
    }
    let mut response = StatusCode::OK.into_response();
    response.headers_mut().extend(found.headers.iter().cloned());
    response
}

async fn check(State(table): State<Arc<Table>>, headers: HeaderMap) -> Response {
    decide(&table, &headers, now_secs())
}

fn usage() -> ! {
    eprintln!("usage: bench-authz --listen ADDR --control-plane ADDR (TOKENGATE_SYNC_TOKEN set)");
    std::process::exit(2);
}

fn main() {
    let mut listen: Option<SocketAddr> = None;
    let mut control_plane: Option<SocketAddr> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let slot = match arg.as_str() {
            "--listen" => &mut listen,
            "--control-plane" => &mut control_plane,
            _ => usage(),
        };
        *slot = Some(
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage()),
        );
    }
    let (Some(listen), Some(control_plane)) = (listen, control_plane) else {
        usage()
    };
    let Ok(sync_token) = std::env::var("TOKENGATE_SYNC_TOKEN") else {
        usage()
    };
    let table = load(control_plane, &sync_token).unwrap_or_else(|e| {
        eprintln!("bench-authz: loading the snapshot failed: {e}");
        std::process::exit(1);
    });
    eprintln!("bench-authz: {} tokens, listening on {listen}", table.len());
    let app = Router::new()
        .route("/healthz", get(|| async { StatusCode::OK }))
        .fallback(check)
        .with_state(Arc::new(table));
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| {
                eprintln!("bench-authz: bind {listen}: {e}");
                std::process::exit(1);
            });
        axum::serve(listener, app).await.expect("serve");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengate_wire::sync::Kind;

    fn record(status: SyncStatus, expires_at: Option<i64>) -> SyncRecord {
        SyncRecord {
            scopes: None,
            quota: None,
            hash: hash_hex(b"tg_secret"),
            id: "tok_1".into(),
            name: "ci".into(),
            owner: "team".into(),
            kind: Kind::Service,
            status,
            max_rps: None,
            burst: None,
            limit_scope: Default::default(),
            expires_at,
            version: 1,
        }
    }

    fn answer(rec: &SyncRecord, headers: &[(&'static str, &'static str)]) -> Response {
        let mut table = Table::new();
        table.insert(rec.hash.clone(), identity(rec).unwrap());
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.insert(*n, HeaderValue::from_static(v));
        }
        decide(&table, &map, 1_000)
    }

    #[test]
    fn a_known_active_token_is_allowed_with_its_identity() {
        let r = answer(
            &record(SyncStatus::Active, None),
            &[("x-api-token", "tg_secret")],
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-tokengate-token-id"], "tok_1");
        assert_eq!(r.headers()["x-tokengate-token-kind"], "service");
        let bearer = answer(
            &record(SyncStatus::Active, Some(2_000)),
            &[("authorization", "Bearer tg_secret")],
        );
        assert_eq!(bearer.status(), StatusCode::OK);
    }

    #[test]
    fn missing_unknown_expired_and_suspended_tokens_are_refused() {
        let active = record(SyncStatus::Active, None);
        assert_eq!(answer(&active, &[]).status(), StatusCode::UNAUTHORIZED);
        let other = answer(&active, &[("x-api-token", "tg_other")]);
        assert_eq!(other.status(), StatusCode::UNAUTHORIZED);
        let expired = record(SyncStatus::Active, Some(1_000));
        let r = answer(&expired, &[("x-api-token", "tg_secret")]);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let suspended = record(SyncStatus::Suspended, None);
        let r = answer(&suspended, &[("x-api-token", "tg_secret")]);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
}
