//! The API served by `app(state)` on a real socket, driven over HTTP.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn create_shows_the_secret_once_and_get_list_never_do() {
    let app = spawn_app(100);
    let v = app.create(r#"{"name":"reports","kind":"service","owner":"data","max_rps":5,"expires_in_seconds":3600}"#);
    let secret = v["token"].as_str().unwrap();
    assert!(tokengate_wire::token::is_well_formed(secret.as_bytes()));
    assert_eq!(v["kind"], "service");
    assert_eq!(v["owner"], "data");
    assert_eq!(v["status"], "active");
    assert_eq!(v["max_rps"], 5);
    assert!(v["burst"].is_null());
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(v["last_used_at"].is_null());
    let id = v["id"].as_str().unwrap();
    let (s, got) = app.admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!(s, 200);
    assert!(got.get("token").is_none());
    assert!(!got.to_string().contains(secret));
    let (_, list) = app.admin("GET", "/v1/tokens", None);
    assert!(!list.to_string().contains(secret));
    assert_eq!(list["tokens"].as_array().unwrap().len(), 1);
    // Defaults.
    let d = app.create(r#"{"name":"x"}"#);
    assert_eq!(
        (d["kind"].as_str(), d["owner"].as_str()),
        (Some("user"), Some("admin"))
    );
    assert!(d["expires_at"].is_null() && d["max_rps"].is_null());
}

#[test]
fn bad_bodies_are_400s_naming_the_field() {
    let app = spawn_app(100);
    let cases = [
        (r#"{}"#, "name"),
        (r#"{"name":""}"#, "name"),
        (r#"{"name":"a\u0007b"}"#, "name"),
        (r#"{"name":"x","kind":"robot"}"#, "kind"),
        (r#"{"name":"x","max_rps":0}"#, "max_rps"),
        (r#"{"name":"x","max_rps":"ten"}"#, "max_rps"),
        (r#"{"name":"x","max_rps":-3}"#, "max_rps"),
        (r#"{"name":"x","burst":5}"#, "burst"),
        (
            r#"{"name":"x","expires_in_seconds":0}"#,
            "expires_in_seconds",
        ),
        (r#"{"name":"x","expires_at":"tomorrow"}"#, "expires_at"),
        (
            r#"{"name":"x","expires_at":"2001-01-01T00:00:00Z"}"#,
            "expires_at",
        ),
        (
            r#"{"name":"x","expires_at":"2099-01-01T00:00:00Z","expires_in_seconds":5}"#,
            "expires_at",
        ),
        (r#"{"name":"x","colour":"red"}"#, "colour"),
    ];
    for (body, field) in cases {
        let (s, v) = app.admin("POST", "/v1/tokens", Some(body));
        assert_eq!(s, 400, "{body}: {v}");
        assert_eq!(v["error"], "invalid_field", "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "{body}: {v}"
        );
    }
    let (s, v) = app.admin("POST", "/v1/tokens", Some("{not json"));
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_body")));
    let id = app.create(r#"{"name":"x"}"#)["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A burst is fine in itself; this token has no max_rps to go with it: a conflict with
    // the token, which the request can settle by bringing max_rps along.
    let (s, v) = app.admin("PATCH", &format!("/v1/tokens/{id}"), Some(r#"{"burst":3}"#));
    assert_eq!(
        (s, v["error"].as_str(), v["field"].as_str()),
        (409, Some("conflict"), Some("burst")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("burst needs max_rps"),
        "{v}"
    );
    let (s, v) = app.admin(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Some(r#"{"burst":3,"max_rps":2}"#),
    );
    assert_eq!((s, v["burst"].as_u64()), (200, Some(3)), "{v}");
    // Clearing max_rps in the same request is the request's own fault.
    let (s, v) = app.admin(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Some(r#"{"burst":3,"max_rps":null}"#),
    );
    assert_eq!((s, v["field"].as_str()), (400, Some("burst")), "{v}");
    let (s, v) = app.admin("PATCH", &format!("/v1/tokens/{id}"), Some("{}"));
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_body")));
    let (s, v) = app.admin("GET", "/v1/tokens?limit=0", None);
    assert_eq!((s, v["field"].as_str()), (400, Some("limit")));
}

#[test]
fn credentials_are_required_and_kept_apart() {
    let app = spawn_app(100);
    for (cred, path) in [
        (None, "/v1/tokens"),
        (Some("wrong-credential-123456"), "/v1/tokens"),
        (Some(SYNC), "/v1/tokens"),
    ] {
        let (s, v) = app.call("GET", path, cred, None);
        assert_eq!(
            (s, v["error"].as_str()),
            (401, Some("unauthorized")),
            "{cred:?}"
        );
    }
    let (s, _) = app.call("GET", "/v1/sync?since=0", Some(ADMIN), None);
    assert_eq!(s, 401);
    let (s, _) = app.call("GET", "/v1/sync?since=0", None, None);
    assert_eq!(s, 401);
    let (s, v) = app.call("GET", "/healthz", None, None);
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = app.admin("GET", "/v1/nothing-here", None);
    assert_eq!((s, v["error"].as_str()), (404, Some("no_route")));
}

#[test]
fn lifecycle_update_suspend_reactivate_revoke() {
    let app = spawn_app(100);
    let id = app.create(r#"{"name":"svc","max_rps":10,"burst":20}"#)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/v1/tokens/{id}");
    let (s, v) = app.admin("PATCH", &path, Some(r#"{"name":"svc2","max_rps":50}"#));
    assert_eq!(s, 200);
    assert_eq!(
        (
            v["name"].as_str(),
            v["max_rps"].as_u64(),
            v["burst"].as_u64()
        ),
        (Some("svc2"), Some(50), Some(20))
    );
    let (_, v) = app.admin("PATCH", &path, Some(r#"{"max_rps":null}"#));
    assert!(
        v["max_rps"].is_null() && v["burst"].is_null(),
        "clearing the limit clears the burst: {v}"
    );
    let (_, v) = app.admin(
        "PATCH",
        &path,
        Some(r#"{"expires_at":"2099-01-01T00:00:00Z"}"#),
    );
    assert_eq!(v["expires_at"], "2099-01-01T00:00:00Z");
    let (_, v) = app.admin("PATCH", &path, Some(r#"{"expires_at":null}"#));
    assert!(v["expires_at"].is_null());
    let (s, v) = app.admin("POST", &format!("{path}/suspend"), None);
    assert_eq!((s, v["status"].as_str()), (200, Some("suspended")));
    let (_, listed) = app.admin("GET", "/v1/tokens?status=suspended", None);
    assert_eq!(listed["tokens"][0]["id"], id.as_str());
    let (s, v) = app.admin("POST", &format!("{path}/reactivate"), None);
    assert_eq!((s, v["status"].as_str()), (200, Some("active")));
    let (s, _) = app.admin("DELETE", &path, None);
    assert_eq!(s, 204);
    for (m, p) in [
        ("GET", path.clone()),
        ("POST", format!("{path}/reactivate")),
    ] {
        assert_eq!(app.admin(m, &p, None).0, 404, "{m} {p}");
    }
    assert_eq!(app.admin("PATCH", &path, Some(r#"{"name":"z"}"#)).0, 404);
}

/// A second revoke is not "no such token": it says the token was already revoked, and when.
#[test]
fn revoking_a_revoked_token_says_so() {
    let app = spawn_app(100);
    let id = app.create(r#"{"name":"twice"}"#)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/v1/tokens/{id}");
    assert_eq!(app.admin("DELETE", &path, None).0, 204);
    let version = app.sync("since=0")["version"].clone();
    let (s, v) = app.admin("DELETE", &path, None);
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("already_revoked")),
        "{v}"
    );
    let at = v["revoked_at"].as_str().unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&format!("already revoked at {at}")),
        "{v}"
    );
    // Nothing changed: no new version.
    assert_eq!(app.sync("since=0")["version"], version);
    // Other calls on it answer 404, saying it was revoked rather than unknown.
    let (s, v) = app.admin("POST", &format!("{path}/suspend"), None);
    assert_eq!((s, v["revoked_at"].as_str()), (404, Some(at)), "{v}");
    assert!(v["message"].as_str().unwrap().contains("revoked"), "{v}");
    let (s, v) = app.admin("DELETE", "/v1/tokens/tok_never_was", None);
    assert_eq!((s, v["error"].as_str()), (404, Some("not_found")), "{v}");
}

/// `status=expired` finds expired tokens; `active` and `suspended` leave them out.
#[test]
fn expired_is_a_status_to_filter_by() {
    use tokengate::store::AuditRecord;
    let app = spawn_app(100);
    let id_of = |v: serde_json::Value| v["id"].as_str().unwrap().to_string();
    let live = id_of(app.create(r#"{"name":"live"}"#));
    let old = id_of(app.create(r#"{"name":"old","expires_in_seconds":3600}"#));
    let old_suspended = id_of(app.create(r#"{"name":"old-suspended","expires_in_seconds":3600}"#));
    let suspended = id_of(app.create(r#"{"name":"suspended"}"#));
    for id in [&old_suspended, &suspended] {
        assert_eq!(
            app.admin("POST", &format!("/v1/tokens/{id}/suspend"), None)
                .0,
            200
        );
    }
    // Expire two of them without waiting for a clock: their expiry moves into the past.
    let now = chrono::Utc::now().timestamp();
    for id in [&old, &old_suspended] {
        let mut row = app.block_on(app.store.token(id)).unwrap().unwrap();
        let version = row.version;
        row.expires_at = Some(now - 60);
        let entry = AuditRecord {
            at: now,
            actor: "test".into(),
            action: "token.updated",
            token_id: id.to_string(),
            token_name: row.name.clone(),
            before: None,
            after: None,
        };
        app.block_on(app.store.replace(row, version, &entry, false))
            .unwrap();
    }
    let ids = |status: &str| {
        let (s, v) = app.admin("GET", &format!("/v1/tokens?status={status}"), None);
        assert_eq!(s, 200, "{v}");
        let mut ids: Vec<String> = v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let sorted = |mut v: Vec<&String>| {
        v.sort();
        v.into_iter().cloned().collect::<Vec<_>>()
    };
    assert_eq!(ids("expired"), sorted(vec![&old, &old_suspended]));
    assert_eq!(ids("active"), vec![live]);
    assert_eq!(ids("suspended"), vec![suspended]);
    let (s, v) = app.admin("GET", "/v1/tokens?status=revoked", None);
    assert_eq!((s, v["field"].as_str()), (400, Some("status")), "{v}");
}

#[test]
fn list_filters_and_cursor_paging() {
    let app = spawn_app(100);
    for i in 0..5 {
        let kind = if i % 2 == 0 { "user" } else { "service" };
        app.create(&format!(
            r#"{{"name":"t{i}","kind":"{kind}","owner":"o{}"}}"#,
            i % 2
        ));
    }
    let (_, page1) = app.admin("GET", "/v1/tokens?limit=2", None);
    let cursor = page1["next_cursor"].as_str().unwrap().to_string();
    let (_, page2) = app.admin("GET", &format!("/v1/tokens?limit=2&cursor={cursor}"), None);
    let (_, page3) = app.admin(
        "GET",
        &format!(
            "/v1/tokens?limit=2&cursor={}",
            page2["next_cursor"].as_str().unwrap()
        ),
        None,
    );
    assert_eq!(page3["tokens"].as_array().unwrap().len(), 1);
    assert!(page3["next_cursor"].is_null());
    let (_, svc) = app.admin("GET", "/v1/tokens?kind=service", None);
    assert_eq!(svc["tokens"].as_array().unwrap().len(), 2);
    let (_, o0) = app.admin("GET", "/v1/tokens?owner=o0", None);
    assert_eq!(o0["tokens"].as_array().unwrap().len(), 3);
}

#[test]
fn sync_snapshot_pages_then_changes_then_long_poll() {
    let app = spawn_app(2);
    let secrets: Vec<String> = (0..5)
        .map(|i| {
            app.create(&format!(r#"{{"name":"t{i}"}}"#))["token"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // Snapshot in pages of two.
    let mut hashes = vec![];
    let first = app.sync("since=0&wait=1");
    assert_eq!(
        (first["snapshot"].as_bool(), first["version"].as_u64()),
        (Some(true), Some(5))
    );
    assert_eq!(first["token_count"], 5);
    let store_id = first["store_id"].as_str().unwrap().to_string();
    let mut page = first;
    loop {
        for c in page["changes"].as_array().unwrap() {
            assert_eq!(c["hash"].as_str().unwrap().len(), 64);
            hashes.push(c["hash"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => page = app.sync(&format!("since=0&cursor={}", c.replace(':', "%3A"))),
            None => break,
        }
    }
    assert_eq!(hashes.len(), 5);
    let body = serde_json::to_string(&hashes).unwrap();
    assert!(
        secrets.iter().all(|s| !body.contains(s.as_str())),
        "only hashes travel"
    );

    // Behind: answered at once with changes in version order.
    let v = app.sync(&format!("since=3&store_id={store_id}&wait=5"));
    assert_eq!(
        (v["snapshot"].as_bool(), v["version"].as_u64()),
        (Some(false), Some(5))
    );
    assert_eq!(v["changes"].as_array().unwrap().len(), 2);
    // Another store's state, or a version from the future: snapshot.
    assert_eq!(
        app.sync("since=3&store_id=st_other&wait=1")["snapshot"],
        true
    );
    assert_eq!(
        app.sync(&format!("since=99&store_id={store_id}&wait=1"))["snapshot"],
        true
    );

    // Up to date: held, then "no change".
    let t = Instant::now();
    let v = app.sync(&format!("since=5&store_id={store_id}&wait=1"));
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        (
            v["version"].as_u64(),
            v["changes"].as_array().unwrap().len()
        ),
        (Some(5), 0)
    );

    // A change is handed out from the next version on (a poll held when it happens is
    // answered at once: `binary.rs`, `a_change_answers_a_held_poll_at_once`).
    let (_, listed) = app.admin("GET", "/v1/tokens?limit=1", None);
    let id = listed["tokens"][0]["id"].as_str().unwrap().to_string();
    app.admin("POST", &format!("/v1/tokens/{id}/suspend"), None);
    let r = app.sync(&format!("since=5&store_id={store_id}&wait=5"));
    assert_eq!(r["version"], 6);
    assert_eq!(r["changes"][0]["status"], "suspended");
    assert_eq!(r["changes"][0]["id"], id.as_str());

    // Revoked tokens travel as tombstones and leave the count.
    app.admin("DELETE", &format!("/v1/tokens/{id}"), None);
    let r = app.sync(&format!("since=6&store_id={store_id}&wait=1"));
    assert_eq!(r["changes"][0]["status"], "revoked");
    assert_eq!(r["token_count"], 4);
    let (s, v) = app.call("GET", "/v1/sync?since=0&cursor=garbage", Some(SYNC), None);
    assert_eq!((s, v["field"].as_str()), (400, Some("cursor")));
}

#[test]
fn an_empty_store_is_long_polled_not_resnapshotted() {
    let app = spawn_app(100);
    let first = app.sync("since=0&wait=1");
    assert_eq!(
        (first["snapshot"].as_bool(), first["version"].as_u64()),
        (Some(true), Some(0))
    );
    let sid = first["store_id"].as_str().unwrap();
    let t = Instant::now();
    let v = app.sync(&format!("since=0&store_id={sid}&wait=1"));
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "held: {:?}",
        t.elapsed()
    );
    assert_eq!(v["snapshot"], false);
}

/// The value of a sample in a Prometheus text exposition (the line that starts with
/// `series`, labels included).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn metrics(app: &TestApp) -> String {
    let r = app.request("GET", "/metrics", &[], None);
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    r.text
}

#[test]
fn every_poll_woken_by_one_change_is_answered_from_one_read() {
    let app = spawn_app(100);
    let store_id = app.sync("since=0")["store_id"]
        .as_str()
        .unwrap()
        .to_string();
    const POLLS: usize = 200;
    let polls: Vec<_> = (0..POLLS)
        .map(|_| app.poll_in_background(&format!("since=0&store_id={store_id}&wait=60")))
        .collect();
    let held = |m: &str| sample(m, "tokengate_sync_polls_held").unwrap_or(0.0);
    let start = Instant::now();
    while held(&metrics(&app)) < POLLS as f64 {
        assert!(start.elapsed() < Duration::from_secs(60), "polls not held");
        std::thread::sleep(Duration::from_millis(10));
    }
    let reads = |m: &str| sample(m, "tokengate_sync_reads_total").unwrap();
    let before = reads(&metrics(&app));
    let t = app.create(r#"{"name":"wakes-everyone"}"#);
    for p in polls {
        let (_, v) = p.join().unwrap();
        assert_eq!(v["changes"][0]["id"], t["id"], "{v}");
        assert_eq!(v["version"], 1);
    }
    let m = metrics(&app);
    assert_eq!(reads(&m) - before, 1.0, "{POLLS} polls, one read");
    assert_eq!(held(&m), 0.0);
    assert_eq!(
        sample(&m, "tokengate_sync_answers_total{kind=\"changes\"}"),
        Some(POLLS as f64)
    );
}

#[test]
fn readiness_and_metrics_name_no_token() {
    let app = spawn_app(100);
    let r = app.request("GET", "/readyz", &[], None);
    assert_eq!((r.status, r.json["status"].as_str()), (200, Some("ready")));
    let t = app.create(r#"{"name":"secret-project-name","owner":"owner-nobody-knows"}"#);
    let id = t["id"].as_str().unwrap();
    app.admin("POST", &format!("/v1/tokens/{id}/suspend"), None);
    app.admin("GET", "/v1/tokens/tok_doesnotexist", None);
    let m = metrics(&app);
    for secret in [
        id,
        t["token"].as_str().unwrap(),
        "secret-project-name",
        "owner-nobody-knows",
        "tok_doesnotexist",
        ADMIN,
        SYNC,
    ] {
        assert!(!m.contains(secret), "{secret} in the metrics:\n{m}");
    }
    for series in [
        "tokengate_ready 1",
        "tokengate_store_info{backend=\"sqlite\"} 1",
        "tokengate_sync_version 2",
        "tokengate_http_requests_total{route=\"/v1/tokens/{id}/suspend\",method=\"POST\",status=\"200\"} 1",
        "tokengate_http_requests_total{route=\"/v1/tokens/{id}\",method=\"GET\",status=\"404\"} 1",
        "tokengate_http_requests_total{route=\"/v1/tokens\",method=\"POST\",status=\"201\"} 1",
    ] {
        assert!(m.contains(series), "{series} missing:\n{m}");
    }
    assert!(
        sample(&m, "tokengate_store_seconds_count{op=\"insert\"}").unwrap() >= 1.0,
        "{m}"
    );
    // Every line is a comment or `name{labels} number`.
    for line in m.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}
