//! Governance through the API: kinds, expiry policy, audit, usage, rotation, expiry warnings
//! with webhooks, purge, and the OpenAPI document agreeing with the routes.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use tokengate::domain::housekeeping::{run_once, Jobs};
use tokengate::policy::{KindPolicy, Policy};
use tokengate::secrets::sha256_hex;
use tokengate::webhook::{self, Webhook};

const DAY: i64 = 86_400;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn field_error(v: &Value) -> (&str, &str) {
    (
        v["field"].as_str().unwrap_or(""),
        v["message"].as_str().unwrap_or(""),
    )
}

#[test]
fn kinds_owners_and_filters() {
    let app = spawn_app(100);
    // A user token acts for a person: by default the admin credential's name.
    let (s, mine) = app.call(
        "POST",
        "/v1/tokens",
        Some(OPS),
        Some(r#"{"name":"laptop"}"#),
    );
    assert_eq!(s, 201, "{mine}");
    assert_eq!(
        (mine["kind"].as_str(), mine["owner"].as_str()),
        (Some("user"), Some("ops"))
    );
    // A service token is owned by a group, which must be named.
    let (s, v) = app.admin(
        "POST",
        "/v1/tokens",
        Some(r#"{"name":"etl","kind":"service"}"#),
    );
    assert_eq!((s, field_error(&v).0), (400, "owner"));
    app.create(r#"{"name":"etl","kind":"service","owner":"data-eng"}"#);
    let (_, list) = app.admin("GET", "/v1/tokens?kind=service", None);
    let names: Vec<_> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["owner"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["data-eng"]);
    let (_, list) = app.admin("GET", "/v1/tokens?kind=user&owner=ops", None);
    assert_eq!(list["tokens"].as_array().unwrap().len(), 1);
}

#[test]
fn expiry_policy_per_kind_is_enforced_on_create_and_update() {
    let policy = Policy {
        user: KindPolicy {
            max_lifetime: Some(90 * DAY as u64),
            require_expiry: false,
        },
        service: KindPolicy {
            max_lifetime: None,
            require_expiry: true,
        },
    };
    let app = spawn_app_with(100, policy);
    let refused = |body: &str| {
        let (s, v) = app.admin("POST", "/v1/tokens", Some(body));
        assert_eq!(s, 400, "{body}: {v}");
        let (f, m) = field_error(&v);
        (f.to_string(), m.to_string())
    };
    let (f, m) = refused(r#"{"name":"a"}"#);
    assert_eq!(f, "expires_in_seconds");
    assert!(m.contains("90d") && m.contains("7776000"), "{m}");
    let (f, m) = refused(&format!(
        r#"{{"name":"a","expires_in_seconds":{}}}"#,
        91 * DAY
    ));
    assert_eq!(f, "expires_in_seconds");
    assert!(m.contains("at most 90d"), "{m}");
    let far = chrono::DateTime::from_timestamp(now() + 100 * DAY, 0)
        .unwrap()
        .to_rfc3339();
    assert_eq!(
        refused(&format!(r#"{{"name":"a","expires_at":"{far}"}}"#)).0,
        "expires_at"
    );
    let (f, m) = refused(r#"{"name":"s","kind":"service","owner":"g"}"#);
    assert_eq!(f, "expires_in_seconds");
    assert!(m.contains("service tokens must have an expiry"), "{m}");
    app.create(r#"{"name":"s","kind":"service","owner":"g","expires_in_seconds":31536000}"#);

    let t = app.create(&format!(
        r#"{{"name":"a","expires_in_seconds":{}}}"#,
        30 * DAY
    ));
    let path = format!("/v1/tokens/{}", id(&t));
    // Extending is allowed within the policy, counted from now; never beyond, never `never`.
    let ok = chrono::DateTime::from_timestamp(now() + 60 * DAY, 0)
        .unwrap()
        .to_rfc3339();
    let (s, v) = app.admin("PATCH", &path, Some(&format!(r#"{{"expires_at":"{ok}"}}"#)));
    assert_eq!(s, 200, "{v}");
    let (s, v) = app.admin(
        "PATCH",
        &path,
        Some(&format!(r#"{{"expires_at":"{far}"}}"#)),
    );
    assert_eq!((s, field_error(&v).0), (400, "expires_at"));
    let (s, v) = app.admin("PATCH", &path, Some(r#"{"expires_at":null}"#));
    assert_eq!((s, field_error(&v).0), (400, "expires_at"));
    // Nothing half-written: the refused updates left the accepted expiry.
    let (_, v) = app.admin("GET", &path, None);
    assert_eq!(v["expires_at"].as_str().unwrap(), ok.replace("+00:00", "Z"));
}

#[test]
fn expiring_within_lists_only_tokens_inside_the_window() {
    let app = spawn_app(100);
    let soon = app.create(r#"{"name":"soon","expires_in_seconds":3600}"#);
    app.create(&format!(
        r#"{{"name":"later","expires_in_seconds":{}}}"#,
        10 * DAY
    ));
    app.create(r#"{"name":"never"}"#);
    let (_, v) = app.admin("GET", "/v1/tokens?expiring_within=7d", None);
    let ids: Vec<_> = v["tokens"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(ids, [id(&soon)]);
    let (s, v) = app.admin("GET", "/v1/tokens?expiring_within=soonish", None);
    assert_eq!((s, field_error(&v).0), (400, "expiring_within"));
}

#[test]
fn the_audit_trail_names_the_actor_and_what_changed_and_never_a_secret() {
    let app = spawn_app(100);
    let t = app.create(r#"{"name":"ci","max_rps":5}"#);
    let secret = t["token"].as_str().unwrap().to_string();
    let tid = id(&t);
    let (s, _) = app.call(
        "POST",
        &format!("/v1/tokens/{tid}/suspend"),
        Some(OPS),
        None,
    );
    assert_eq!(s, 200);
    app.admin(
        "PATCH",
        &format!("/v1/tokens/{tid}"),
        Some(r#"{"max_rps":50,"name":"ci-2"}"#),
    );
    let (_, rotated) = app.call(
        "POST",
        &format!("/v1/tokens/{tid}/rotate"),
        Some(OPS),
        Some(r#"{"grace_seconds":60}"#),
    );
    let new_secret = rotated["token"].as_str().unwrap().to_string();
    app.admin("DELETE", &format!("/v1/tokens/{tid}"), None);

    let (s, page) = app.admin("GET", &format!("/v1/audit?token={tid}"), None);
    assert_eq!(s, 200, "{page}");
    let entries = page["entries"].as_array().unwrap();
    let summary: Vec<_> = entries
        .iter()
        .map(|e| (e["actor"].as_str().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    assert_eq!(
        summary,
        [
            ("admin", "token.revoked"),
            ("ops", "token.rotated"),
            ("admin", "token.updated"),
            ("ops", "token.suspended"),
            ("admin", "token.created"),
        ]
    );
    assert_eq!(entries[2]["before"], json!({"name": "ci", "max_rps": 5}));
    assert_eq!(entries[2]["after"], json!({"name": "ci-2", "max_rps": 50}));
    assert_eq!(entries[0]["after"], json!({"status": "revoked"}));
    assert!(entries[1]["after"]["old_secret_valid_until"].is_string());
    assert_eq!(entries[4]["token_name"], "ci");

    let (_, by_ops) = app.admin("GET", "/v1/audit?actor=ops", None);
    assert_eq!(by_ops["entries"].as_array().unwrap().len(), 2);
    let (_, suspends) = app.admin("GET", "/v1/audit?action=token.suspended", None);
    assert_eq!(suspends["entries"].as_array().unwrap().len(), 1);
    let (_, p1) = app.admin("GET", "/v1/audit?limit=3", None);
    let cursor = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = app.admin("GET", &format!("/v1/audit?limit=3&cursor={cursor}"), None);
    assert_eq!(p2["entries"].as_array().unwrap().len(), 2);
    assert!(p2["next_cursor"].is_null());
    let (_, future) = app.admin("GET", "/v1/audit?since=2999-01-01T00:00:00Z", None);
    assert!(future["entries"].as_array().unwrap().is_empty());
    let (_, past) = app.admin("GET", "/v1/audit?until=2000-01-01T00:00:00Z", None);
    assert!(past["entries"].as_array().unwrap().is_empty());
    for bad in [
        "action=token.exploded",
        "since=yesterday",
        "cursor=x",
        "colour=red",
    ] {
        let (s, _) = app.admin("GET", &format!("/v1/audit?{bad}"), None);
        assert_eq!(s, 400, "{bad}");
    }
    let (s, _) = app.call("GET", "/v1/audit", Some(SYNC), None);
    assert_eq!(s, 401);

    let (_, all) = app.admin("GET", "/v1/audit?limit=1000", None);
    let text = all.to_string();
    for secret in [&secret, &new_secret] {
        assert!(!text.contains(secret.as_str()));
        assert!(!text.contains(&sha256_hex(secret.as_bytes())));
    }
}

#[test]
fn usage_reports_add_up_without_a_new_version() {
    let app = spawn_app(100);
    let t = app.create(r#"{"name":"ci"}"#);
    let tid = id(&t);
    let version = t["version"].as_u64().unwrap();
    let report = |cred: &str, body: &str| app.call("POST", "/v1/usage", Some(cred), Some(body)).0;
    let seen = now() - 5;
    let body = json!({"proxy_id": "p1", "entries": [
        {"id": tid, "allowed": 7, "denied": 2, "last_used_at": seen},
        {"id": "tok_unknown", "allowed": 1, "denied": 0, "last_used_at": seen},
    ]})
    .to_string();
    assert_eq!(report(SYNC, &body), 204);
    assert_eq!(report(SYNC, &body), 204);
    assert_eq!(report(ADMIN, &body), 401);
    assert_eq!(report(SYNC, r#"{"entries":[{"id":"x"}]}"#), 400);
    let many: Vec<Value> = (0..10_001)
        .map(|i| json!({"id": format!("tok_{i}"), "allowed": 1, "denied": 0, "last_used_at": seen}))
        .collect();
    assert_eq!(report(SYNC, &json!({"entries": many}).to_string()), 413);
    let (_, v) = app.admin("GET", &format!("/v1/tokens/{tid}"), None);
    assert_eq!(
        (
            v["requests_allowed"].as_u64(),
            v["requests_denied"].as_u64()
        ),
        (Some(14), Some(4))
    );
    assert_eq!(v["last_used_at"], tokengate::domain::rfc3339(seen));
    assert_eq!(v["version"].as_u64(), Some(version));
    let (_, listed) = app.admin("GET", "/v1/tokens", None);
    assert_eq!(listed["tokens"][0]["requests_allowed"].as_u64(), Some(14));
}

fn records_for(sync: &Value, tid: &str) -> Vec<Value> {
    sync["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["id"] == tid)
        .cloned()
        .collect()
}

#[test]
fn rotation_keeps_the_id_and_honours_the_old_secret_for_its_grace_only() {
    let app = spawn_app(100);
    let t = app.create(r#"{"name":"ci","max_rps":5}"#);
    let tid = id(&t);
    let first = t["token"].as_str().unwrap().to_string();
    let v0 = t["version"].as_u64().unwrap();
    let store_id = app.sync("since=0")["store_id"]
        .as_str()
        .unwrap()
        .to_string();

    let (s, r) = app.admin(
        "POST",
        &format!("/v1/tokens/{tid}/rotate"),
        Some(r#"{"grace_seconds":3600}"#),
    );
    assert_eq!(s, 200, "{r}");
    let second = r["token"].as_str().unwrap().to_string();
    assert_ne!(first, second);
    assert_eq!((id(&r), r["max_rps"].as_u64()), (tid.clone(), Some(5)));
    assert!(r["old_secret_valid_until"].is_string());
    let changes = app.sync(&format!("since={v0}&store_id={store_id}"));
    let recs = records_for(&changes, &tid);
    let old = recs
        .iter()
        .find(|r| r["hash"] == sha256_hex(first.as_bytes()))
        .unwrap();
    let new = recs
        .iter()
        .find(|r| r["hash"] == sha256_hex(second.as_bytes()))
        .unwrap();
    assert_eq!(
        (old["status"].as_str(), new["status"].as_str()),
        (Some("active"), Some("active"))
    );
    let grace_end = old["expires_at"].as_i64().unwrap();
    assert!((grace_end - (now() + 3600)).abs() <= 2, "{old}");
    assert!(new["expires_at"].is_null());

    // A second rotation cuts the first secret's grace short; with no grace the second
    // secret is refused at once too.
    let v1 = changes["version"].as_u64().unwrap();
    let (_, r) = app.admin("POST", &format!("/v1/tokens/{tid}/rotate"), None);
    let third = r["token"].as_str().unwrap().to_string();
    assert!(r["old_secret_valid_until"].is_null());
    let recs = records_for(&app.sync(&format!("since={v1}&store_id={store_id}")), &tid);
    let status_of = |secret: &str| {
        recs.iter()
            .find(|r| r["hash"] == sha256_hex(secret.as_bytes()))
            .map(|r| r["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status_of(&first).as_deref(), Some("revoked"));
    assert_eq!(status_of(&second).as_deref(), Some("revoked"));
    assert_eq!(status_of(&third).as_deref(), Some("active"));

    let (s, v) = app.admin(
        "POST",
        &format!("/v1/tokens/{tid}/rotate"),
        Some(r#"{"grace_seconds":99999999}"#),
    );
    assert_eq!((s, field_error(&v).0), (400, "grace_seconds"));
    let (s, v) = app.admin(
        "POST",
        &format!("/v1/tokens/{tid}/rotate"),
        Some(r#"{"grace":1}"#),
    );
    assert_eq!((s, field_error(&v).0), (400, "grace"));
    let (s, _) = app.admin("POST", "/v1/tokens/tok_nope/rotate", None);
    assert_eq!(s, 404);
}

/// A webhook receiver that fails its first `fail_first` deliveries with 500.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>>,
}

fn receiver(fail_first: usize) -> Receiver {
    use axum::routing::post;
    let got: Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>> = Arc::default();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let state = got.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/hook",
                post(move |headers: axum::http::HeaderMap, body: String| {
                    let (state, calls) = (state.clone(), calls.clone());
                    async move {
                        if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail_first {
                            return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        state.lock().unwrap().push((headers, body));
                        axum::http::StatusCode::NO_CONTENT
                    }
                }),
            );
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    Receiver {
        url: format!("http://{}/hook", rx.recv().unwrap()),
        got,
    }
}

#[test]
fn expiry_warnings_are_audited_listed_and_delivered_signed_once_with_retries() {
    let app = spawn_app(100);
    let hook = receiver(1);
    let jobs = Jobs {
        warning_leads: vec![DAY, 7 * DAY],
        retention: None,
        purge_interval: i64::MAX,
        webhook: Some(Webhook {
            url: hook.url.clone(),
            secret: "webhook-secret-0123456789".into(),
            max_attempts: 5,
            timeout: std::time::Duration::from_secs(5),
        }),
    };
    let t = app.create(
        r#"{"name":"nightly","kind":"service","owner":"data","expires_in_seconds":172800}"#,
    );
    let tid = id(&t);
    app.create(r#"{"name":"forever"}"#);
    let t0 = now();
    // The first delivery attempt gets a 500; the warning is issued and queued regardless.
    let r = app
        .block_on(run_once(app.store.as_ref(), &jobs, t0, false))
        .unwrap();
    assert_eq!((r.warned, r.delivered, r.failed), (1, 0, 1));
    assert!(hook.got.lock().unwrap().is_empty());
    // Not yet due for a retry; then retried and delivered; never issued twice.
    let r = app
        .block_on(run_once(app.store.as_ref(), &jobs, t0, false))
        .unwrap();
    assert_eq!((r.warned, r.delivered), (0, 0));
    let r = app
        .block_on(run_once(app.store.as_ref(), &jobs, t0 + 1, false))
        .unwrap();
    assert_eq!((r.warned, r.delivered), (0, 1));
    let r = app
        .block_on(run_once(app.store.as_ref(), &jobs, t0 + 2, false))
        .unwrap();
    assert_eq!(r, Default::default());

    let got = hook.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let (headers, body) = &got[0];
    let sig = headers[webhook::SIGNATURE_HEADER].to_str().unwrap();
    assert!(webhook::verify(
        "webhook-secret-0123456789",
        sig,
        body.as_bytes(),
        now(),
        300
    ));
    assert!(!webhook::verify(
        "another-secret-0123456789",
        sig,
        body.as_bytes(),
        now(),
        300
    ));
    let payload: Value = serde_json::from_str(body).unwrap();
    assert_eq!(payload["type"], "token.expiring");
    assert_eq!(headers[webhook::EVENT_HEADER], "token.expiring");
    assert_eq!(
        headers[webhook::DELIVERY_HEADER].to_str().unwrap(),
        payload["id"].as_str().unwrap()
    );
    assert_eq!(payload["data"]["token"]["id"], tid.as_str());
    assert_eq!(payload["data"]["token"]["owner"], "data");
    assert_eq!(payload["data"]["warning_lead_seconds"], 7 * DAY);
    assert!(!body.contains(t["token"].as_str().unwrap()));

    // A day before expiry the tighter lead fires.
    let r = app
        .block_on(run_once(app.store.as_ref(), &jobs, t0 + DAY + 10, false))
        .unwrap();
    assert_eq!((r.warned, r.delivered), (1, 1));
    let (_, audit) = app.admin("GET", "/v1/audit?action=token.expiry_warning", None);
    let leads: Vec<_> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["after"]["warning_lead_seconds"].as_i64().unwrap())
        .collect();
    assert_eq!(leads, [DAY, 7 * DAY]);
    assert_eq!(audit["entries"][0]["actor"], "system");
}

#[test]
fn purge_removes_old_revoked_and_expired_tokens_from_lists_and_sync() {
    let app = spawn_app(100);
    let gone = app.create(r#"{"name":"old"}"#);
    let short = app.create(r#"{"name":"short","expires_in_seconds":60}"#);
    let kept = app.create(r#"{"name":"kept"}"#);
    let store_id = app.sync("since=0")["store_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _) = app.admin("DELETE", &format!("/v1/tokens/{}", id(&gone)), None);
    assert_eq!(s, 204);
    let jobs = Jobs {
        warning_leads: vec![],
        retention: Some(30 * DAY),
        purge_interval: 3600,
        webhook: None,
    };
    let r = app
        .block_on(run_once(app.store.as_ref(), &jobs, now() + 29 * DAY, true))
        .unwrap();
    assert_eq!(r.purged, 0);
    let r = app
        .block_on(run_once(app.store.as_ref(), &jobs, now() + 31 * DAY, true))
        .unwrap();
    assert_eq!(r.purged, 2);
    let (s, _) = app.admin("GET", &format!("/v1/tokens/{}", id(&short)), None);
    assert_eq!(s, 404);
    let (_, list) = app.admin("GET", "/v1/tokens", None);
    let ids: Vec<_> = list["tokens"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(ids, [id(&kept)]);
    // A filter that had not yet seen the revocation starts over from a snapshot.
    let old = app.sync(&format!("since=1&store_id={store_id}"));
    assert_eq!(old["snapshot"], true);
    let ids: Vec<_> = old["changes"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(ids, [id(&kept)]);
    let (_, purges) = app.admin("GET", "/v1/audit?action=token.purged", None);
    assert_eq!(purges["entries"].as_array().unwrap().len(), 2);
}

/// The document is generated from the routes; this checks it from the outside: every
/// documented operation is served (never the no-route fallback or a 405), and every route
/// the server is known to serve is documented.
#[test]
fn the_openapi_document_and_the_routes_agree() {
    let app = spawn_app(100);
    let (s, doc) = app.call("GET", "/v1/openapi.json", None, None);
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = vec![];
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.push(format!("{} {path}", method.to_uppercase()));
            let cred = match op["security"][0]
                .as_object()
                .and_then(|o| o.keys().next().cloned())
                .as_deref()
            {
                Some("admin") => Some(ADMIN),
                Some("sync") => Some(SYNC),
                _ => None,
            };
            let url = path
                .replace("{id}", "tok_missing")
                .replace("{name}", "missing");
            let body = matches!(method.as_str(), "post" | "patch").then_some("{}");
            let (status, v) = if op["security"][0].get("session").is_some() {
                let session = app.sign_in(ADMIN);
                let r = app.in_session(&session, true, &method.to_uppercase(), &url, body);
                (r.status, r.json)
            } else {
                app.call(&method.to_uppercase(), &url, cred, body)
            };
            assert_ne!(
                v["error"], "no_route",
                "{method} {path} is documented but not routed"
            );
            assert_ne!(status, 405, "{method} {path}");
            assert_ne!(
                status, 401,
                "{method} {path}: documented security does not match"
            );
            let listed: Vec<String> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            assert!(
                listed.contains(&status.to_string()),
                "{method} {path} answered {status}, documented {listed:?}"
            );
        }
    }
    let mut served = vec![
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /v1/openapi.json",
        "POST /v1/tokens",
        "GET /v1/tokens",
        "GET /v1/tokens/{id}",
        "PATCH /v1/tokens/{id}",
        "DELETE /v1/tokens/{id}",
        "POST /v1/tokens/{id}/suspend",
        "POST /v1/tokens/{id}/reactivate",
        "POST /v1/tokens/{id}/rotate",
        "POST /v1/scopes",
        "GET /v1/scopes",
        "GET /v1/scopes/{name}",
        "PATCH /v1/scopes/{name}",
        "DELETE /v1/scopes/{name}",
        "GET /v1/audit",
        "GET /v1/sync",
        "POST /v1/usage",
        "POST /v1/fleet",
        "POST /v1/session",
        "GET /v1/session",
        "DELETE /v1/session",
    ];
    served.sort();
    documented.sort();
    assert_eq!(documented, served);
    // And an undocumented path is the fallback.
    let (s, v) = app.admin("GET", "/v1/tokens/x/explode", None);
    assert_eq!((s, v["error"].as_str()), (404, Some("no_route")));
}

#[test]
fn rapid_rotations_leave_one_old_secret_and_no_pile_up() {
    let app = spawn_app(1000);
    let t = app.create(r#"{"name":"spinning"}"#);
    let tid = id(&t);
    let first = t["token"].as_str().unwrap().to_string();
    let start = app.sync("since=0");
    let store_id = start["store_id"].as_str().unwrap().to_string();
    let v0 = start["version"].as_u64().unwrap();

    let mut secrets = vec![first];
    let mut before_last = 0;
    for _ in 0..200 {
        let (s, r) = app.admin(
            "POST",
            &format!("/v1/tokens/{tid}/rotate"),
            Some(r#"{"grace_seconds":600}"#),
        );
        assert_eq!(s, 200, "{r}");
        before_last = r["version"].as_u64().unwrap() - 1;
        secrets.push(r["token"].as_str().unwrap().to_string());
    }
    let hash = |i: usize| sha256_hex(secrets[i].as_bytes());
    let status_in = |recs: &[Value], i: usize| {
        recs.iter()
            .find(|r| r["hash"] == hash(i))
            .map(|r| r["status"].as_str().unwrap().to_string())
    };

    // A snapshot holds the secret and the one old secret still in its grace.
    let snapshot = app.sync("since=0");
    let recs = records_for(&snapshot, &tid);
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert_eq!(status_in(&recs, 200).as_deref(), Some("active"));
    assert_eq!(status_in(&recs, 199).as_deref(), Some("active"));

    // A poller one rotation behind learns that the grace it knew of was cut short.
    let changes = app.sync(&format!("since={before_last}&store_id={store_id}"));
    assert_eq!(changes["snapshot"], false, "{changes}");
    let recs = records_for(&changes, &tid);
    assert!(recs.len() <= 3, "{recs:#?}");
    assert_eq!(status_in(&recs, 198).as_deref(), Some("revoked"));
    assert_eq!(status_in(&recs, 199).as_deref(), Some("active"));

    // A poller that missed the rotations cannot be told about every secret it may hold, so
    // it starts over from a snapshot, which mentions none of them.
    let behind = app.sync(&format!("since={v0}&store_id={store_id}"));
    assert_eq!(behind["snapshot"], true, "{behind}");
    let recs = records_for(&behind, &tid);
    assert!((0..199).all(|i| status_in(&recs, i).is_none()), "{recs:#?}");
}

/// A receiver that answers with a redirect does not get to send signed events elsewhere:
/// the redirect is a failed attempt, retried later at the configured URL.
#[test]
fn webhook_redirects_are_not_followed() {
    let app = spawn_app(100);
    let elsewhere = receiver(0);
    let (tx, rx) = std::sync::mpsc::channel();
    let target = elsewhere.url.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let redirect = move |code: u16| {
                let target = target.clone();
                axum::routing::post(move || async move {
                    (
                        axum::http::StatusCode::from_u16(code).unwrap(),
                        [(axum::http::header::LOCATION, target)],
                    )
                })
            };
            let app = axum::Router::new()
                .route("/307", redirect(307))
                .route("/302", redirect(302))
                .route("/308", redirect(308));
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    app.create(r#"{"name":"soon","expires_in_seconds":3600}"#);
    let t0 = now();
    for (i, code) in [307, 302, 308].into_iter().enumerate() {
        let jobs = Jobs {
            warning_leads: vec![DAY],
            retention: None,
            purge_interval: i64::MAX,
            webhook: Some(Webhook {
                url: format!("http://{addr}/{code}"),
                secret: "webhook-secret-0123456789".into(),
                max_attempts: 5,
                timeout: std::time::Duration::from_secs(5),
            }),
        };
        // Each run is the next attempt of the one event (the backoff has passed by then).
        let r = app
            .block_on(run_once(
                app.store.as_ref(),
                &jobs,
                t0 + 1000 * i as i64,
                false,
            ))
            .unwrap();
        assert_eq!((r.delivered, r.failed), (0, 1), "{code}: {r:?}");
    }
    assert!(elsewhere.got.lock().unwrap().is_empty());
}
