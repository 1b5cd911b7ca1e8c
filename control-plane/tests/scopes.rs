//! Scopes over the API: `/v1/scopes`, tokens' `scopes`, what `/v1/sync` carries of them,
//! and their audit entries.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn scope(app: &TestApp, body: Value) -> Value {
    let (s, v) = app.admin("POST", "/v1/scopes", Some(&body.to_string()));
    assert_eq!(s, 201, "{v}");
    v
}

fn orders() -> Value {
    json!({"name": "orders:read", "description": "Read orders",
           "rules": [{"methods": ["GET", "HEAD"], "path": "/orders/**"}, {"path": "/health"}]})
}

#[test]
fn a_scope_is_created_listed_shown_changed_and_deleted() {
    let app = spawn_app(100);
    let v = scope(&app, orders());
    assert_eq!(v["name"], "orders:read");
    assert_eq!(v["description"], "Read orders");
    assert_eq!(
        v["rules"][0],
        json!({"methods": ["GET", "HEAD"], "path": "/orders/**"})
    );
    assert_eq!(v["rules"][1], json!({"path": "/health"}), "no methods: any");
    assert_eq!(v["version"], 1);
    assert!(v["created_at"].as_str().unwrap().ends_with('Z'));
    // No description: empty.
    let w = scope(&app, json!({"name": "a", "rules": [{"path": "/"}]}));
    assert_eq!(w["description"], "");

    let (s, list) = app.admin("GET", "/v1/scopes", None);
    assert_eq!(s, 200);
    let names: Vec<&str> = list["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "orders:read"], "by name");
    let (s, got) = app.admin("GET", "/v1/scopes/orders:read", None);
    assert_eq!((s, &got), (200, &v));

    let (s, p) = app.admin(
        "PATCH",
        "/v1/scopes/orders:read",
        Some(r#"{"rules":[{"methods":["GET"],"path":"/orders/*"}]}"#),
    );
    assert_eq!(s, 200, "{p}");
    assert_eq!(
        p["rules"],
        json!([{"methods": ["GET"], "path": "/orders/*"}])
    );
    assert_eq!(p["description"], "Read orders", "kept");
    assert_eq!(p["version"], 3);
    // The same again changes nothing: no new version.
    let (_, same) = app.admin(
        "PATCH",
        "/v1/scopes/orders:read",
        Some(r#"{"rules":[{"methods":["GET"],"path":"/orders/*"}]}"#),
    );
    assert_eq!(same["version"], 3);
    let (_, cleared) = app.admin(
        "PATCH",
        "/v1/scopes/orders:read",
        Some(r#"{"description":null}"#),
    );
    assert_eq!(cleared["description"], "");

    let (s, _) = app.admin("DELETE", "/v1/scopes/orders:read", None);
    assert_eq!(s, 204);
    for (method, body) in [
        ("GET", None),
        ("PATCH", Some(r#"{"description":"x"}"#)),
        ("DELETE", None),
    ] {
        let (s, v) = app.admin(method, "/v1/scopes/orders:read", body);
        assert_eq!(
            (s, v["error"].as_str()),
            (404, Some("not_found")),
            "{method}: {v}"
        );
        assert_eq!(v["message"], "No such scope.");
    }
    // A path that is no scope name at all is a 404 too, U+0000 included.
    for path in ["/v1/scopes/NOPE", "/v1/scopes/%00", "/v1/scopes/%C3%A9"] {
        let (s, _) = app.admin("GET", path, None);
        assert_eq!(s, 404, "{path}");
    }
}

#[test]
fn a_taken_name_is_a_409() {
    let app = spawn_app(100);
    scope(&app, orders());
    let (s, v) = app.admin("POST", "/v1/scopes", Some(&orders().to_string()));
    assert_eq!((s, v["error"].as_str()), (409, Some("conflict")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("orders:read"));
}

#[test]
fn bad_scope_bodies_are_400s_naming_the_field() {
    let app = spawn_app(100);
    let long_path = format!("/{}", "a".repeat(600));
    let many: Vec<Value> = (0..101).map(|_| json!({"path": "/"})).collect();
    let cases = [
        (json!({"rules": [{"path": "/"}]}), "name"),
        (json!({"name": "orders", "rules": []}), "rules"),
        (json!({"name": "orders"}), "rules"),
        (json!({"name": "orders", "rules": many}), "rules"),
        (json!({"name": "Orders", "rules": [{"path": "/"}]}), "name"),
        (json!({"name": "-x", "rules": [{"path": "/"}]}), "name"),
        (json!({"name": "a b", "rules": [{"path": "/"}]}), "name"),
        (
            json!({"name": "a".repeat(65), "rules": [{"path": "/"}]}),
            "name",
        ),
        (
            json!({"name": "o", "description": "x".repeat(501), "rules": [{"path": "/"}]}),
            "description",
        ),
        (
            json!({"name": "o", "description": "a\u{7}b", "rules": [{"path": "/"}]}),
            "description",
        ),
        (
            json!({"name": "o", "rules": [{"path": "/"}, {"path": "/a"}, {"path": "a"}]}),
            "rules[2].path",
        ),
        (
            json!({"name": "o", "rules": [{"path": "/a/../b"}]}),
            "rules[0].path",
        ),
        (
            json!({"name": "o", "rules": [{"path": "/a//b"}]}),
            "rules[0].path",
        ),
        (
            json!({"name": "o", "rules": [{"path": "/**/a"}]}),
            "rules[0].path",
        ),
        (
            json!({"name": "o", "rules": [{"path": "/a%2fb"}]}),
            "rules[0].path",
        ),
        (
            json!({"name": "o", "rules": [{"path": "/a;b"}]}),
            "rules[0].path",
        ),
        (
            json!({"name": "o", "rules": [{"path": long_path}]}),
            "rules[0].path",
        ),
        (
            json!({"name": "o", "rules": [{"methods": ["get"], "path": "/"}]}),
            "rules[0].methods",
        ),
        (
            json!({"name": "o", "rules": [{"methods": [], "path": "/"}]}),
            "rules[0].methods",
        ),
        (
            json!({"name": "o", "rules": [{"methods": "GET", "path": "/"}]}),
            "rules[0].methods",
        ),
        // Left out means any method; null is not another way to say it (schemathesis
        // found it accepted).
        (
            json!({"name": "o", "rules": [{"methods": null, "path": "/"}]}),
            "rules[0].methods",
        ),
        (
            json!({"name": "o", "rules": [{"methods": ["GET"]}]}),
            "rules[0].path",
        ),
        (
            json!({"name": "o", "rules": [{"path": "/", "host": "x"}]}),
            "host",
        ),
        (
            json!({"name": "o", "rules": [{"path": "/"}], "colour": "red"}),
            "colour",
        ),
        (json!({"name": "o", "rules": "/"}), "rules"),
    ];
    for (body, field) in cases {
        let (s, v) = app.admin("POST", "/v1/scopes", Some(&body.to_string()));
        assert_eq!(s, 400, "{body}: {v}");
        assert!(
            v["field"].as_str().is_some_and(|f| f.ends_with(field)),
            "{body}: {v} should name {field}"
        );
    }
    scope(&app, json!({"name": "o", "rules": [{"path": "/"}]}));
    for (body, field) in [
        (json!({"rules": null}), "rules"),
        (json!({"rules": [{"path": "x"}]}), "rules[0].path"),
        (
            json!({"rules": [{"methods": null, "path": "/"}]}),
            "rules[0].methods",
        ),
        (json!({"description": 5}), "description"),
        (json!({"name": "p"}), "name"),
    ] {
        let (s, v) = app.admin("PATCH", "/v1/scopes/o", Some(&body.to_string()));
        assert_eq!(s, 400, "{body}: {v}");
        assert!(v["field"].as_str().unwrap().ends_with(field), "{body}: {v}");
    }
    let (s, v) = app.admin("PATCH", "/v1/scopes/o", Some("{}"));
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_body")));
    let (s, v) = app.admin("GET", "/v1/scopes?limit=5", None);
    assert_eq!((s, v["field"].as_str()), (400, Some("limit")));
    // Nothing of that was written: one scope, at version 1.
    let (_, list) = app.admin("GET", "/v1/scopes", None);
    assert_eq!(list["scopes"].as_array().unwrap().len(), 1);
    assert_eq!(list["scopes"][0]["version"], 1);
}

#[test]
fn scopes_take_the_admin_credential_not_the_sync_one() {
    let app = spawn_app(100);
    scope(&app, orders());
    for (method, path, body) in [
        (
            "POST",
            "/v1/scopes",
            Some(json!({"name": "x", "rules": [{"path": "/"}]}).to_string()),
        ),
        ("GET", "/v1/scopes", None),
        ("GET", "/v1/scopes/orders:read", None),
        (
            "PATCH",
            "/v1/scopes/orders:read",
            Some(r#"{"description":"x"}"#.to_string()),
        ),
        ("DELETE", "/v1/scopes/orders:read", None),
    ] {
        for cred in [None, Some(SYNC), Some("wrong")] {
            let (s, _) = app.call(method, path, cred, body.as_deref());
            assert_eq!(s, 401, "{method} {path} with {cred:?}");
        }
    }
    let (_, got) = app.admin("GET", "/v1/scopes/orders:read", None);
    assert_eq!(got["description"], "Read orders", "unchanged");
}

#[test]
fn tokens_carry_scope_names_that_exist() {
    let app = spawn_app(100);
    scope(&app, orders());
    scope(&app, json!({"name": "b", "rules": [{"path": "/b"}]}));
    let unrestricted = app.create(r#"{"name":"u"}"#);
    assert!(unrestricted["scopes"].is_null(), "default: unrestricted");
    assert!(app.create(r#"{"name":"u","scopes":null}"#)["scopes"].is_null());
    let none = app.create(r#"{"name":"n","scopes":[]}"#);
    assert_eq!(none["scopes"], json!([]), "[] allows nothing, and is kept");
    let t = app.create(r#"{"name":"t","scopes":["orders:read","b","orders:read"]}"#);
    assert_eq!(
        t["scopes"],
        json!(["orders:read", "b"]),
        "duplicates removed"
    );
    let id = t["id"].as_str().unwrap();
    let (_, got) = app.admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!(got["scopes"], json!(["orders:read", "b"]));
    let (_, list) = app.admin("GET", "/v1/tokens", None);
    assert!(list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["scopes"] == json!(["orders:read", "b"])));

    let too_many: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
    for body in [
        json!({"name": "x", "scopes": ["nope"]}),
        json!({"name": "x", "scopes": ["b", "nope"]}),
        json!({"name": "x", "scopes": ["Bad Name"]}),
        json!({"name": "x", "scopes": "b"}),
        json!({"name": "x", "scopes": [1]}),
        json!({"name": "x", "scopes": too_many}),
    ] {
        let (s, v) = app.admin("POST", "/v1/tokens", Some(&body.to_string()));
        assert_eq!(s, 400, "{body}: {v}");
        assert!(
            v["field"].as_str().unwrap().starts_with("scopes"),
            "{body}: {v}"
        );
    }
    let (s, v) = app.admin(
        "POST",
        "/v1/tokens",
        Some(r#"{"name":"x","scopes":["nope"]}"#),
    );
    assert_eq!(s, 400);
    assert!(v["message"].as_str().unwrap().contains("nope"), "{v}");

    // An edit: a new version, an audit entry; null makes it unrestricted again.
    let before = got["version"].as_u64().unwrap();
    let (s, p) = app.admin(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Some(r#"{"scopes":["b"]}"#),
    );
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["scopes"], json!(["b"]));
    assert!(p["version"].as_u64().unwrap() > before);
    let (_, trail) = app.admin("GET", &format!("/v1/audit?token={id}&limit=1"), None);
    let e = &trail["entries"][0];
    assert_eq!(e["action"], "token.updated");
    assert_eq!(e["before"], json!({"scopes": ["orders:read", "b"]}));
    assert_eq!(e["after"], json!({"scopes": ["b"]}));
    let (s, v) = app.admin(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Some(r#"{"scopes":["gone"]}"#),
    );
    assert_eq!((s, v["field"].as_str()), (400, Some("scopes")));
    let (_, p) = app.admin(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Some(r#"{"scopes":null}"#),
    );
    assert!(p["scopes"].is_null());
}

#[test]
fn a_scope_that_live_tokens_name_cannot_be_deleted() {
    let app = spawn_app(100);
    scope(&app, orders());
    let a = app.create(r#"{"name":"a","scopes":["orders:read"]}"#);
    let b = app.create(r#"{"name":"b","scopes":["orders:read"]}"#);
    let (s, v) = app.admin("DELETE", "/v1/scopes/orders:read", None);
    assert_eq!((s, v["error"].as_str()), (409, Some("scope_in_use")), "{v}");
    assert_eq!(v["tokens"], 2);
    assert!(v["message"].as_str().unwrap().contains("2 tokens"), "{v}");
    // A revoked token does not hold it; one taken off it does not either.
    app.admin(
        "DELETE",
        &format!("/v1/tokens/{}", a["id"].as_str().unwrap()),
        None,
    );
    let (_, v) = app.admin("DELETE", "/v1/scopes/orders:read", None);
    assert_eq!(v["tokens"], 1);
    app.admin(
        "PATCH",
        &format!("/v1/tokens/{}", b["id"].as_str().unwrap()),
        Some(r#"{"scopes":[]}"#),
    );
    let (s, _) = app.admin("DELETE", "/v1/scopes/orders:read", None);
    assert_eq!(s, 204);
}

#[test]
fn scope_changes_are_audited() {
    let app = spawn_app(100);
    scope(&app, orders());
    app.admin(
        "PATCH",
        "/v1/scopes/orders:read",
        Some(r#"{"description":"Orders"}"#),
    );
    app.admin("DELETE", "/v1/scopes/orders:read", None);
    let (_, trail) = app.admin("GET", "/v1/audit", None);
    let entries = trail["entries"].as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["scope.deleted", "scope.updated", "scope.created"]);
    for e in entries {
        assert_eq!(e["scope"], "orders:read");
        assert_eq!(
            (e["token_id"].as_str(), e["token_name"].as_str()),
            (Some(""), Some(""))
        );
        assert_eq!(e["actor"], "admin");
    }
    assert_eq!(entries[2]["after"]["rules"], orders()["rules"]);
    assert!(entries[2]["before"].is_null());
    assert_eq!(entries[1]["before"], json!({"description": "Read orders"}));
    assert_eq!(entries[1]["after"], json!({"description": "Orders"}));
    assert!(entries[0]["after"].is_null());
    assert_eq!(entries[0]["before"]["description"], "Orders");
    let (_, only) = app.admin("GET", "/v1/audit?action=scope.updated", None);
    assert_eq!(only["entries"].as_array().unwrap().len(), 1);
}

#[test]
fn sync_carries_the_scope_set_in_snapshots_and_after_scope_changes() {
    let app = spawn_app(2);
    scope(&app, orders());
    scope(&app, json!({"name": "b", "rules": [{"path": "/b"}]}));
    for i in 0..3 {
        app.create(&format!(r#"{{"name":"t{i}","scopes":["b"]}}"#));
    }
    let unrestricted = app.create(r#"{"name":"u"}"#);
    // Every snapshot page carries the whole set and its version.
    let first = app.sync("since=0");
    assert_eq!(first["snapshot"], true);
    assert_eq!(first["version"], 6);
    assert_eq!(first["scopes_version"], 2);
    let names = |v: &Value| -> Vec<String> {
        v["scopes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&first), ["b", "orders:read"]);
    assert_eq!(first["scopes"][1]["rules"], orders()["rules"]);
    assert_eq!(first["scopes"][1]["version"], 1);
    let store_id = first["store_id"].as_str().unwrap().to_string();
    let cursor = first["next_cursor"].as_str().unwrap().replace(':', "%3A");
    let second = app.sync(&format!("since=0&cursor={cursor}"));
    assert_eq!(second["scopes_version"], 2);
    assert_eq!(names(&second), ["b", "orders:read"]);
    let mut records = first["changes"].as_array().unwrap().clone();
    records.extend(second["changes"].as_array().unwrap().iter().cloned());
    let scoped = records
        .iter()
        .filter(|r| r["scopes"] == json!(["b"]))
        .count();
    assert!(scoped >= 1);
    assert!(
        records
            .iter()
            .filter(|r| r["id"] == unrestricted["id"])
            .all(|r| r.get("scopes").is_none()),
        "unrestricted: no scopes field"
    );

    // Token changes alone: no scopes in the answer.
    let v = app.sync(&format!("since=3&store_id={store_id}"));
    assert!(
        v.get("scopes").is_none() && v.get("scopes_version").is_none(),
        "{v}"
    );
    assert_eq!(v["version"], 5, "a full page stops at its last row");

    // A scope edit alone: the set, and the version moves on with no token change.
    app.admin(
        "PATCH",
        "/v1/scopes/b",
        Some(r#"{"rules":[{"path":"/b/**"}]}"#),
    );
    let v = app.sync(&format!("since=6&store_id={store_id}"));
    assert_eq!(v["changes"], json!([]));
    assert_eq!(
        (v["version"].as_u64(), v["scopes_version"].as_u64()),
        (Some(7), Some(7))
    );
    assert_eq!(v["scopes"][0]["rules"], json!([{"path": "/b/**"}]));
    assert_eq!(v["scopes"][0]["version"], 7);
    // A client behind both a token change and the scope change gets both.
    let v = app.sync(&format!("since=5&store_id={store_id}"));
    assert_eq!(v["changes"].as_array().unwrap().len(), 1);
    assert_eq!(
        (v["version"].as_u64(), v["scopes_version"].as_u64()),
        (Some(7), Some(7))
    );

    // A deletion is a scope change too.
    app.admin("DELETE", "/v1/scopes/orders:read", None);
    let v = app.sync(&format!("since=7&store_id={store_id}"));
    assert_eq!(names(&v), ["b"]);
    assert_eq!(
        (v["version"].as_u64(), v["scopes_version"].as_u64()),
        (Some(8), Some(8))
    );
    // Up to date: no scopes again.
    let v = app.sync(&format!("since=8&store_id={store_id}&wait=0"));
    assert!(v.get("scopes").is_none(), "{v}");
}

#[test]
fn a_scope_change_wakes_a_held_poll() {
    let app = spawn_app(100);
    scope(&app, orders());
    let snap = app.sync("since=0");
    let store_id = snap["store_id"].as_str().unwrap().to_string();
    let version = snap["version"].as_u64().unwrap();
    let poll = app.poll_in_background(&format!("since={version}&store_id={store_id}&wait=30"));
    // Give the poll time to be held (it would answer at once with a change otherwise).
    std::thread::sleep(Duration::from_millis(300));
    app.admin(
        "PATCH",
        "/v1/scopes/orders:read",
        Some(r#"{"description":"x"}"#),
    );
    let (took, v) = poll.join().unwrap();
    assert!(
        took < Duration::from_secs(25),
        "woken by the change, not the wait"
    );
    assert_eq!(v["changes"], json!([]));
    assert_eq!(v["version"].as_u64(), Some(version + 1));
    assert_eq!(v["scopes_version"].as_u64(), Some(version + 1));
    assert_eq!(v["scopes"][0]["name"], "orders:read");
}
