//! Quotas through the API: the token field, the exchange on `POST /v1/fleet` as two or three
//! proxies, usage in the token record, the reset at a period's end (a test period of a few
//! seconds), the exhaustion recorded once, and the same on two PostgreSQL replicas.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tokengate::app::Database;
use tokengate::policy::Policy;
use tokengate::secrets::sha256_hex;
use tokengate::webhook::Webhook;
use tokengate_wire::quota::Period;

fn report(app: &TestApp, proxy: &str, quotas: Value) -> Value {
    let body = json!({"proxy_id": proxy, "interval_ms": 1000, "tokens": [], "quotas": quotas});
    let r = app.request(
        "POST",
        "/v1/fleet",
        &[
            ("authorization", &format!("Bearer {SYNC}")),
            ("content-type", "application/json"),
        ],
        Some(&body.to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    r.json
}

fn held(hash: &str, period_start: i64, spent: u64, allowed: u64) -> Value {
    json!({"hash": hash, "period_start": period_start, "spent": spent, "allowed": allowed})
}

/// The grant for `hash` in an answer.
fn grant(answer: &Value, hash: &str) -> Option<u64> {
    answer["quotas"]
        .as_array()?
        .iter()
        .find(|g| g["hash"] == hash)
        .map(|g| g["allowed"].as_u64().unwrap())
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Waits until at least `margin` seconds of `period`'s current window are left, and
/// returns the window.
fn window_with(period: Period, margin: i64) -> (i64, i64) {
    loop {
        let w = period.window(now());
        if w.1 - now() > margin {
            return w;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn token_with_quota(app: &TestApp, quota: &str) -> (String, String) {
    let t = app.create(&format!(r#"{{"name":"q","quota":{quota}}}"#));
    let hash = sha256_hex(t["token"].as_str().unwrap().as_bytes());
    (t["id"].as_str().unwrap().to_string(), hash)
}

#[test]
fn the_quota_field_is_checked_naming_the_field_and_synced() {
    let app = spawn_app(100);
    let t = app.create(r#"{"name":"q","quota":{"limit":1000,"period":"day"}}"#);
    assert_eq!(t["quota"], json!({"limit": 1000, "period": "day"}));
    assert_eq!(t["quota_usage"]["used"], 0);
    assert_eq!(t["quota_usage"]["remaining"], 1000);
    let (_, end) = Period::Day.window(now());
    assert_eq!(
        t["quota_usage"]["resets_at"],
        tokengate::domain::rfc3339(end)
    );
    let id = t["id"].as_str().unwrap();
    for (body, field) in [
        (
            r#"{"name":"x","quota":{"limit":0,"period":"day"}}"#,
            "quota.limit",
        ),
        (
            r#"{"name":"x","quota":{"limit":1000000000001,"period":"day"}}"#,
            "quota.limit",
        ),
        (
            r#"{"name":"x","quota":{"limit":-1,"period":"day"}}"#,
            "quota.limit",
        ),
        (
            r#"{"name":"x","quota":{"limit":"5","period":"day"}}"#,
            "quota.limit",
        ),
        (r#"{"name":"x","quota":{"period":"day"}}"#, "quota.limit"),
        (
            r#"{"name":"x","quota":{"limit":5,"period":"week"}}"#,
            "quota.period",
        ),
        (
            r#"{"name":"x","quota":{"limit":5,"period":"0s"}}"#,
            "quota.period",
        ),
        (r#"{"name":"x","quota":{"limit":5}}"#, "quota.period"),
        (
            r#"{"name":"x","quota":{"limit":5,"period":3600}}"#,
            "quota.period",
        ),
    ] {
        let (s, b) = app.admin("POST", "/v1/tokens", Some(body));
        assert_eq!((s, b["field"].as_str()), (400, Some(field)), "{body}: {b}");
    }
    let (s, b) = app.admin(
        "POST",
        "/v1/tokens",
        Some(r#"{"name":"x","quota":{"limit":5,"period":"day","x":1}}"#),
    );
    assert_eq!(s, 400, "{b}");
    let (s, b) = app.admin("POST", "/v1/tokens", Some(r#"{"name":"x","quota":5}"#));
    assert_eq!((s, b["field"].as_str()), (400, Some("quota")), "{b}");
    // A change is a token change: a new version, in the sync feed and the audit trail.
    let version = t["version"].as_u64().unwrap();
    let (s, b) = app.admin(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Some(r#"{"quota":{"limit":5,"period":"month"}}"#),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["quota"], json!({"limit": 5, "period": "month"}));
    assert!(b["version"].as_u64().unwrap() > version);
    let feed = app.sync("since=0");
    let record = feed["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap();
    assert_eq!(record["quota"], json!({"limit": 5, "period": "month"}));
    let (s, b) = app.admin(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Some(r#"{"quota":{"limit":5,"period":"year"}}"#),
    );
    assert_eq!((s, b["field"].as_str()), (400, Some("quota.period")), "{b}");
    let (s, b) = app.admin(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Some(r#"{"quota":null}"#),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["quota"].clone(), b["quota_usage"].clone()),
        (Value::Null, Value::Null)
    );
    let (_, audit) = app.admin("GET", &format!("/v1/audit?token={id}"), None);
    let changes: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "token.updated")
        .collect();
    assert_eq!(changes.len(), 2, "{audit}");
    assert_eq!(changes[0]["after"]["quota"], Value::Null);
}

#[test]
fn a_test_period_is_refused_without_the_test_setting() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 100, Policy::default());
    config.test_quota_periods = false;
    let app = spawn(config, dir);
    let (s, b) = app.admin(
        "POST",
        "/v1/tokens",
        Some(r#"{"name":"x","quota":{"limit":5,"period":"5s"}}"#),
    );
    assert_eq!((s, b["field"].as_str()), (400, Some("quota.period")), "{b}");
    let (s, _) = app.admin(
        "POST",
        "/v1/tokens",
        Some(r#"{"name":"x","quota":{"limit":5,"period":"hour"}}"#),
    );
    assert_eq!(s, 201);
}

#[test]
fn proxies_get_ceilings_within_the_quota_and_the_record_counts_what_they_spent() {
    let app = spawn_app(100);
    let (id, hash) = token_with_quota(&app, r#"{"limit":3000,"period":"hour"}"#);
    let (start, end) = window_with(Period::Hour, 30);
    // Three live proxies; a is busy.
    for p in ["a", "b", "c"] {
        report(&app, p, json!([]));
    }
    // Past the age of the fleet's cached view of the live proxies.
    std::thread::sleep(Duration::from_millis(300));
    let a = report(&app, "a", json!([held(&hash, start, 500, 1000)]));
    assert_eq!(a["proxies"], 3);
    let ga = grant(&a, &hash).unwrap();
    assert!((500..=1000).contains(&ga), "{a}");
    // b and c have not reported the token: they are told a small ceiling.
    let gb = grant(&report(&app, "b", json!([])), &hash).unwrap();
    let gc = grant(&report(&app, "c", json!([])), &hash).unwrap();
    assert!(gb < 1000 && gc < 1000, "{gb} {gc}");
    // They confirm it; a, still busy, grows into the room they left.
    report(&app, "b", json!([held(&hash, start, 0, gb)]));
    report(&app, "c", json!([held(&hash, start, 0, gc)]));
    std::thread::sleep(Duration::from_millis(300));
    let a = report(&app, "a", json!([held(&hash, start, 1000, ga)]));
    let ga = grant(&a, &hash).unwrap();
    assert!(ga > 1000, "{a}");
    assert!(ga + gb + gc <= 3000, "{ga} {gb} {gc}");
    // The record shows what the proxies spent.
    let (_, t) = app.admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!(t["quota_usage"]["used"], 1000, "{t}");
    assert_eq!(t["quota_usage"]["remaining"], 2000);
    assert_eq!(
        t["quota_usage"]["resets_at"],
        tokengate::domain::rfc3339(end)
    );
    let (_, list) = app.admin("GET", "/v1/tokens", None);
    assert_eq!(list["tokens"][0]["quota_usage"]["used"], 1000, "{list}");
    // Another period's counts, or a secret no token has, count nothing.
    report(
        &app,
        "b",
        json!([
            held(&hash, start - 3600, 900, 900),
            held(&"f".repeat(64), start, 900, 900)
        ]),
    );
    let (_, t) = app.admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!(t["quota_usage"]["used"], 1000, "{t}");
}

#[test]
fn a_period_ends_and_the_count_starts_over_and_exhaustion_is_told_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 100, Policy::default());
    config.jobs.webhook = Some(Webhook {
        url: "http://127.0.0.1:9/hook".into(),
        secret: "s".into(),
        max_attempts: 1,
        timeout: Duration::from_secs(1),
    });
    let app = spawn(config, dir);
    let period = Period::Seconds(6);
    let (id, hash) = token_with_quota(&app, r#"{"limit":10,"period":"6s"}"#);
    let (start, end) = window_with(period, 3);
    report(&app, "a", json!([]));
    let a = report(&app, "a", json!([held(&hash, start, 10, 10)]));
    assert_eq!(grant(&a, &hash), Some(10), "{a}");
    report(&app, "a", json!([held(&hash, start, 10, 10)]));
    let (_, t) = app.admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!(
        (
            t["quota_usage"]["used"].as_u64(),
            t["quota_usage"]["remaining"].as_u64()
        ),
        (Some(10), Some(0))
    );
    let (_, audit) = app.admin("GET", "/v1/audit?action=token.quota_exhausted", None);
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!(entries[0]["token_id"], id.as_str());
    assert_eq!(
        entries[0]["after"]["resets_at"],
        tokengate::domain::rfc3339(end)
    );
    let dump = app.block_on(app.store.export()).unwrap();
    let events: Vec<_> = dump
        .outbox
        .iter()
        .filter(|o| o.event_type == "token.quota_exhausted")
        .collect();
    assert_eq!(events.len(), 1);
    let payload: Value = serde_json::from_str(&events[0].payload).unwrap();
    assert_eq!(payload["data"]["token"]["id"], id.as_str());
    assert_eq!(
        payload["data"]["resets_at"],
        tokengate::domain::rfc3339(end)
    );
    assert_eq!(
        payload["data"]["quota"],
        json!({"limit": 10, "period": "6s"})
    );
    assert!(!events[0].payload.contains(&hash));
    // The next period: nothing used, a new reset time, and the proxy starts over.
    while now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, t) = app.admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!(t["quota_usage"]["used"], 0, "{t}");
    assert_ne!(
        t["quota_usage"]["resets_at"],
        tokengate::domain::rfc3339(end)
    );
    let next = period.window(now()).0;
    let a = report(&app, "a", json!([held(&hash, next, 0, 10)]));
    assert!(grant(&a, &hash).unwrap() > 0, "{a}");
    // Housekeeping forgets the ended period.
    app.block_on(app.store.forget_quotas(now())).unwrap();
    let used = app
        .block_on(app.store.quota_spent(std::slice::from_ref(&id), start))
        .unwrap();
    assert!(used.iter().all(|u| u.period_start != start), "{used:?}");
}

#[test]
fn hostile_quota_entries_change_nothing_they_should_not() {
    let app = spawn_app(100);
    let (id, hash) = token_with_quota(&app, r#"{"limit":100,"period":"hour"}"#);
    let (other, other_hash) = token_with_quota(&app, r#"{"limit":100,"period":"hour"}"#);
    let (start, _) = window_with(Period::Hour, 30);
    let post = |body: String| {
        app.request(
            "POST",
            "/v1/fleet",
            &[
                ("authorization", &format!("Bearer {SYNC}")),
                ("content-type", "application/json"),
            ],
            Some(&body),
        )
    };
    let fleet =
        |q: &str| format!(r#"{{"proxy_id":"p","interval_ms":1000,"tokens":[],"quotas":{q}}}"#);
    for (q, status, field) in [
        (
            format!(r#"[{{"hash":"{hash}","period_start":{start},"spent":-1,"allowed":1}}]"#),
            400,
            Some("quotas[0].spent"),
        ),
        (
            format!(
                r#"[{{"hash":"{hash}","period_start":{start},"spent":1,"allowed":18446744073709551616}}]"#
            ),
            400,
            Some("quotas[0].allowed"),
        ),
        (
            format!(
                r#"[{{"hash":"{}","period_start":{start},"spent":1,"allowed":1}}]"#,
                hash.to_uppercase()
            ),
            400,
            Some("quotas.hash"),
        ),
        (
            format!(r#"[{{"hash":"xyz","period_start":{start},"spent":1,"allowed":1}}]"#),
            400,
            Some("quotas.hash"),
        ),
        (
            format!(r#"[{{"hash":"{hash}","period_start":"x","spent":1,"allowed":1}}]"#),
            400,
            Some("quotas[0].period_start"),
        ),
        (
            format!(r#"[{{"hash":"{hash}","period_start":{start},"spent":1}}]"#),
            400,
            None,
        ),
        (
            format!(r#"[{{"hash":"{hash}","period_start":{start},"spent":1,"allowed":1,"x":1}}]"#),
            400,
            None,
        ),
        (r#""x""#.to_string(), 400, Some("quotas")),
    ] {
        let r = post(fleet(&q));
        assert_eq!(r.status, status, "{q}: {}", r.text);
        if let Some(f) = field {
            assert_eq!(r.json["field"], f, "{q}: {}", r.text);
        }
    }
    let entry = format!(
        r#"{{"hash":"{}","period_start":{start},"spent":1,"allowed":1}}"#,
        "0".repeat(64)
    );
    let many = fleet(&format!("[{}]", vec![entry.as_str(); 10_001].join(",")));
    assert_eq!(post(many).status, 413);
    // 10,000 secrets no token has, in the wrong period, and absurd counts of one: counted
    // only for that one's own token, and capped.
    let mut entries = vec![entry.clone(); 9_997];
    entries.push(format!(
        r#"{{"hash":"{hash}","period_start":{},"spent":50,"allowed":50}}"#,
        start + 1
    ));
    entries.push(format!(r#"{{"hash":"{hash}","period_start":{start},"spent":18446744073709551615,"allowed":18446744073709551615}}"#));
    entries.push(format!(
        r#"{{"hash":"{hash}","period_start":{start},"spent":3,"allowed":3}}"#
    ));
    let r = post(fleet(&format!("[{}]", entries.join(","))));
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, t) = app.admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!(t["quota_usage"]["used"], 1_000_000_000_000u64, "{t}");
    assert_eq!(t["quota_usage"]["remaining"], 0);
    let (_, o) = app.admin("GET", &format!("/v1/tokens/{other}"), None);
    assert_eq!(o["quota_usage"]["used"], 0, "{o}");
    // The absurd count leaves no room for more, but takes none from the other token.
    assert_eq!(grant(&r.json, &hash), Some(1_000_000_000_000), "{}", r.text);
    assert_eq!(grant(&r.json, &other_hash), None, "{}", r.text);
    let r = post(fleet(&format!(
        r#"[{{"hash":"{other_hash}","period_start":{start},"spent":1,"allowed":100}}]"#
    )));
    let g = grant(&r.json, &other_hash).unwrap();
    assert!((1..=100).contains(&g), "{}", r.text);
}

/// Two replicas on one PostgreSQL: reports through either keep one account.
#[test]
fn replicas_share_one_account_of_a_quota() {
    let url = tokengate_pgtest::shared().fresh_database();
    let replica = || {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), 100, Policy::default());
        config.database = Database::Postgres(url.clone());
        spawn(config, dir)
    };
    let (r1, r2) = (replica(), replica());
    let (id, hash) = token_with_quota(&r1, r#"{"limit":1000,"period":"hour"}"#);
    let (start, _) = window_with(Period::Hour, 30);
    report(&r1, "a", json!([]));
    report(&r2, "b", json!([]));
    let mut ceilings = std::collections::BTreeMap::new();
    for round in 0..4u64 {
        for (app, p) in [(&r1, "a"), (&r2, "b")] {
            let spent = round * 100;
            let allowed = ceilings.get(p).copied().unwrap_or(500).max(spent);
            let answer = report(app, p, json!([held(&hash, start, spent, allowed)]));
            ceilings.insert(p, grant(&answer, &hash).unwrap());
        }
        assert!(ceilings.values().sum::<u64>() <= 1000, "{ceilings:?}");
    }
    let (_, t) = r2.admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!(t["quota_usage"]["used"], 600, "{t}");
}
