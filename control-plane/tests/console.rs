//! The web console's server side over HTTP: the embedded page, the session cookie, CSRF,
//! and what a session may and may not do. The page itself is driven in a real browser by
//! `tests/tests/console.rs`.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokengate::api::ConsoleSettings;
use tokengate::domain::sessions::Limits;
use tokengate::policy::{KindPolicy, Policy};

#[test]
fn the_page_and_its_assets_are_served_with_a_strict_policy() {
    let app = spawn_app(100);
    let page = app.request("GET", "/", &[], None);
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text.contains("<title>Access tokens"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(
        !page.text.contains("<script>"),
        "no inline script (the policy forbids it)"
    );
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    for (path, kind) in [
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
        ("/console/icon.svg", "image/svg+xml"),
    ] {
        let r = app.request("GET", path, &[], None);
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
        assert!(page.text.contains(path), "the page refers to {path}");
    }
    // Nothing is fetched from anywhere else: the console works offline.
    for asset in ["/", "/console/app.js", "/console/app.css"] {
        let text = app.request("GET", asset, &[], None).text;
        assert!(
            !text.contains("https://") && !text.contains("http://"),
            "{asset}"
        );
    }
}

#[test]
fn the_console_can_be_switched_off() {
    let off = ConsoleSettings {
        enabled: false,
        ..ConsoleSettings::default()
    };
    let app = spawn_app_console(100, Policy::default(), off, Limits::default());
    let r = app.request("GET", "/", &[], None);
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (404, Some("no_route"))
    );
    assert_eq!(app.request("GET", "/console/app.js", &[], None).status, 404);
}

#[test]
fn sign_in_sets_an_http_only_same_site_cookie_and_never_echoes_the_credential() {
    let app = spawn_app(100);
    let body = serde_json::json!({ "credential": OPS }).to_string();
    let r = app.request("POST", "/v1/session", &[], Some(&body));
    assert_eq!(r.status, 201, "{}", r.text);
    let cookie = r.header("set-cookie").unwrap();
    for attr in [
        "tokengate_session=",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=43200",
    ] {
        assert!(cookie.contains(attr), "{attr} missing from {cookie}");
    }
    assert!(!cookie.contains("Secure"), "not asked for");
    assert!(!r.text.contains(OPS) && !cookie.contains(OPS));
    assert_eq!(r.json["actor"], "ops");
    assert_eq!(r.json["expiry_warning_seconds"], 7 * 86_400);
    assert_eq!(r.json["idle_timeout_seconds"], 1800);

    for (body, status, field) in [
        (
            r#"{"credential": "wrong-credential-0123456789"}"#,
            401,
            None,
        ),
        (&*format!(r#"{{"credential": "{SYNC}"}}"#), 401, None),
        (r#"{"credential": ""}"#, 400, Some("credential")),
        (r#"{}"#, 400, Some("credential")),
        (
            r#"{"credential": "x", "remember": true}"#,
            400,
            Some("remember"),
        ),
        ("credential=x", 400, None),
    ] {
        let r = app.request("POST", "/v1/session", &[], Some(body));
        assert_eq!(r.status, status, "{body}: {}", r.text);
        assert_eq!(r.json["field"].as_str(), field, "{body}");
        assert!(r.header("set-cookie").is_none(), "{body}");
    }

    let secure = ConsoleSettings {
        secure_cookies: true,
        ..ConsoleSettings::default()
    };
    let app = spawn_app_console(100, Policy::default(), secure, Limits::default());
    let body = serde_json::json!({ "credential": ADMIN }).to_string();
    let r = app.request("POST", "/v1/session", &[], Some(&body));
    assert!(r.header("set-cookie").unwrap().ends_with("; Secure"));
}

#[test]
fn a_session_reads_freely_but_changes_only_with_its_csrf_token() {
    let app = spawn_app(100);
    let s = app.sign_in(OPS);
    let r = app.in_session(&s, false, "GET", "/v1/tokens", None);
    assert_eq!(r.status, 200, "reads need no CSRF token");
    let r = app.in_session(&s, false, "GET", "/v1/session", None);
    assert_eq!(
        (r.status, r.json["csrf_token"].as_str()),
        (200, Some(s.csrf.as_str()))
    );

    let create = r#"{"name": "from-the-console"}"#;
    let r = app.in_session(&s, false, "POST", "/v1/tokens", Some(create));
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (403, Some("csrf_failed"))
    );
    let forged = ConsoleSession {
        cookie: s.cookie.clone(),
        csrf: "forged".into(),
    };
    let r = app.in_session(&forged, true, "POST", "/v1/tokens", Some(create));
    assert_eq!(r.status, 403);
    // Another session's token is not this one's.
    let other = app.sign_in(ADMIN);
    let mixed = ConsoleSession {
        cookie: s.cookie.clone(),
        csrf: other.csrf.clone(),
    };
    assert_eq!(
        app.in_session(&mixed, true, "POST", "/v1/tokens", Some(create))
            .status,
        403
    );
    let (_, list) = app.admin("GET", "/v1/tokens", None);
    assert_eq!(
        list["tokens"].as_array().unwrap().len(),
        0,
        "nothing written"
    );

    let r = app.in_session(&s, true, "POST", "/v1/tokens", Some(create));
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json["id"].as_str().unwrap().to_string();
    for (method, path, body) in [
        ("POST", format!("/v1/tokens/{id}/suspend"), None),
        (
            "PATCH",
            format!("/v1/tokens/{id}"),
            Some(r#"{"max_rps": 5}"#),
        ),
        ("DELETE", format!("/v1/tokens/{id}"), None),
    ] {
        let r = app.in_session(&s, false, method, &path, body);
        assert_eq!(r.status, 403, "{method} {path} without CSRF");
        let r = app.in_session(&s, true, method, &path, body);
        assert!(
            r.status == 200 || r.status == 204,
            "{method} {path}: {}",
            r.text
        );
    }
    // The session's admin name is the actor of what it did.
    let (_, audit) = app.admin("GET", &format!("/v1/audit?token={id}"), None);
    let actors: Vec<_> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["actor"].as_str().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actors,
        [
            ("ops", "token.revoked"),
            ("ops", "token.updated"),
            ("ops", "token.suspended"),
            ("ops", "token.created")
        ]
    );
    // A session is not the sync credential.
    let r = app.in_session(&s, true, "GET", "/v1/sync?since=0&wait=0", None);
    assert_eq!(r.status, 401);
    let r = app.in_session(
        &s,
        true,
        "POST",
        "/v1/usage",
        Some(r#"{"proxy_id":"p","entries":[]}"#),
    );
    assert_eq!(r.status, 401);
}

#[test]
fn sign_out_ends_the_session_and_clears_the_cookie() {
    let app = spawn_app(100);
    let s = app.sign_in(ADMIN);
    let r = app.in_session(&s, false, "DELETE", "/v1/session", None);
    assert_eq!(r.status, 403, "signing out needs the CSRF token too");
    let r = app.in_session(&s, true, "DELETE", "/v1/session", None);
    assert_eq!(r.status, 204);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    for path in ["/v1/session", "/v1/tokens"] {
        assert_eq!(
            app.in_session(&s, true, "GET", path, None).status,
            401,
            "{path}"
        );
    }
    // A made-up cookie is no session either.
    let fake = ConsoleSession {
        cookie: "tokengate_session=made-up".into(),
        csrf: "x".into(),
    };
    assert_eq!(
        app.in_session(&fake, true, "GET", "/v1/tokens", None)
            .status,
        401
    );
}

/// Sign-out ends the session its cookie names: an admin credential has none to end, so it
/// is refused rather than answered 204 for nothing (and a session is still not ended by
/// another's cookie).
#[test]
fn sign_out_takes_the_session_not_an_admin_credential() {
    let app = spawn_app(100);
    let s = app.sign_in(ADMIN);
    let r = app.request(
        "DELETE",
        "/v1/session",
        &[("authorization", &format!("Bearer {ADMIN}"))],
        None,
    );
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (401, Some("unauthorized")),
        "{}",
        r.text
    );
    assert!(r.header("set-cookie").is_none());
    // The session is untouched, and signs out with its cookie and CSRF token.
    assert_eq!(
        app.in_session(&s, false, "GET", "/v1/session", None).status,
        200
    );
    assert_eq!(
        app.in_session(&s, true, "DELETE", "/v1/session", None)
            .status,
        204
    );
    assert_eq!(
        app.in_session(&s, false, "GET", "/v1/session", None).status,
        401
    );
}

#[test]
fn an_idle_session_ends() {
    let idle = Duration::from_secs(1);
    let limits = Limits {
        idle,
        absolute: Duration::from_secs(600),
    };
    let app = spawn_app_console(100, Policy::default(), ConsoleSettings::default(), limits);
    // Used within `idle` of the sign-in (by the clock around both calls), a session is
    // alive. A machine too busy to make the two calls in time tries again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (s, last_use) = loop {
        let signing_in = Instant::now();
        let s = app.sign_in(ADMIN);
        let status = app.in_session(&s, false, "GET", "/v1/tokens", None).status;
        let answered = Instant::now();
        if answered - signing_in < idle {
            assert_eq!(
                status,
                200,
                "used {:?} after sign-in",
                answered - signing_in
            );
            break (s, answered);
        }
        assert!(
            Instant::now() < deadline,
            "never managed to use a session within {idle:?} of signing in (last {:?})",
            answered - signing_in
        );
    };
    // Unused for longer than `idle` since its last use was answered: ended.
    while last_use.elapsed() <= idle {
        std::thread::sleep(idle - last_use.elapsed() + Duration::from_millis(10));
    }
    assert_eq!(
        app.in_session(&s, false, "GET", "/v1/tokens", None).status,
        401
    );
}

#[test]
fn the_session_tells_the_page_the_expiry_policy() {
    let policy = Policy {
        user: KindPolicy {
            max_lifetime: Some(90 * 86_400),
            require_expiry: false,
        },
        service: KindPolicy {
            max_lifetime: None,
            require_expiry: true,
        },
    };
    let app = spawn_app_with(100, policy);
    let s = app.sign_in(ADMIN);
    let v = app.in_session(&s, false, "GET", "/v1/session", None).json;
    assert_eq!(v["user"]["max_lifetime_seconds"], 90 * 86_400);
    assert_eq!(
        v["user"]["require_expiry"], true,
        "a maximum implies an expiry"
    );
    assert_eq!(
        v["service"]["max_lifetime_seconds"],
        serde_json::Value::Null
    );
    assert_eq!(v["service"]["require_expiry"], true);
}

#[test]
fn the_list_searches_names_and_can_show_the_newest_first() {
    let app = spawn_app(100);
    for name in ["alpha-export", "beta", "Gamma-EXPORT", "delta"] {
        app.create(&format!(r#"{{"name": "{name}"}}"#));
    }
    let names = |q: &str| -> Vec<String> {
        let (s, v) = app.admin("GET", &format!("/v1/tokens?{q}"), None);
        assert_eq!(s, 200, "{v}");
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names("order=newest&name_contains=export"),
        ["Gamma-EXPORT", "alpha-export"]
    );
    assert_eq!(
        names("order=newest"),
        ["delta", "Gamma-EXPORT", "beta", "alpha-export"]
    );
    // Paging newest-first: the cursor carries on where the page ended.
    let (_, page) = app.admin("GET", "/v1/tokens?order=newest&limit=3", None);
    let cursor = page["next_cursor"].as_str().unwrap();
    assert_eq!(
        names(&format!("order=newest&limit=3&cursor={cursor}")),
        ["alpha-export"]
    );
    let (s, v) = app.admin("GET", "/v1/tokens?order=oldest", None);
    assert_eq!((s, v["field"].as_str()), (400, Some("order")));
}

/// The console's Scopes view and the scopes field of its token dialogs call these routes
/// with the session cookie: reads freely, changes only with the CSRF token, and the API's
/// refusals come back with the field the page shows them at.
#[test]
fn scopes_are_managed_in_a_session_with_its_csrf_token() {
    let app = spawn_app(100);
    let s = app.sign_in(OPS);
    let create = r#"{"name": "orders:read", "description": "Read orders",
        "rules": [{"methods": ["GET", "HEAD"], "path": "/orders/**"}]}"#;
    let r = app.in_session(&s, false, "POST", "/v1/scopes", Some(create));
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (403, Some("csrf_failed"))
    );
    let (_, list) = app.admin("GET", "/v1/scopes", None);
    assert_eq!(list["scopes"], serde_json::json!([]), "nothing written");
    let r = app.in_session(&s, true, "POST", "/v1/scopes", Some(create));
    assert_eq!(r.status, 201, "{}", r.text);
    let r = app.in_session(&s, false, "GET", "/v1/scopes", None);
    assert_eq!(r.status, 200, "reads need no CSRF token");
    assert_eq!(r.json["scopes"][0]["name"], "orders:read");

    // What the page shows next to a field: a taken name (409, no field: the page puts it at
    // the name), the rule at fault by its index, a lower-case method.
    let r = app.in_session(&s, true, "POST", "/v1/scopes", Some(create));
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (409, Some("conflict"))
    );
    for (body, field) in [
        (
            r#"{"name": "x", "rules": [{"path": "/a"}, {"path": "/b"}, {"path": "c"}]}"#,
            "rules[2].path",
        ),
        (
            r#"{"name": "x", "rules": [{"methods": ["get"], "path": "/a"}]}"#,
            "rules[0].methods",
        ),
        (r#"{"name": "X Y", "rules": [{"path": "/a"}]}"#, "name"),
        (r#"{"name": "x", "rules": []}"#, "rules"),
    ] {
        let r = app.in_session(&s, true, "POST", "/v1/scopes", Some(body));
        assert_eq!(
            (r.status, r.json["field"].as_str()),
            (400, Some(field)),
            "{body}: {}",
            r.text
        );
        assert!(r.json["message"].as_str().unwrap().starts_with(field));
    }

    // A token from the generate dialog, limited to the scope; then one unrestricted (null)
    // and one allowed nothing ([]).
    let r = app.in_session(
        &s,
        true,
        "POST",
        "/v1/tokens",
        Some(r#"{"name": "reporting", "scopes": ["orders:read"]}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["scopes"], serde_json::json!(["orders:read"]));
    let id = r.json["id"].as_str().unwrap().to_string();
    let r = app.in_session(
        &s,
        true,
        "POST",
        "/v1/tokens",
        Some(r#"{"name": "nothing", "scopes": ["no-such-scope"]}"#),
    );
    assert_eq!(
        (r.status, r.json["field"].as_str()),
        (400, Some("scopes")),
        "{}",
        r.text
    );

    let path = "/v1/scopes/orders:read";
    let patch = r#"{"rules": [{"methods": ["GET"], "path": "/orders/**"}]}"#;
    let r = app.in_session(&s, false, "PATCH", path, Some(patch));
    assert_eq!(r.status, 403, "PATCH without CSRF");
    let r = app.in_session(&s, true, "PATCH", path, Some(patch));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["rules"][0]["methods"], serde_json::json!(["GET"]));

    // In use: the page shows the 409's message in the confirmation.
    assert_eq!(app.in_session(&s, false, "DELETE", path, None).status, 403);
    let r = app.in_session(&s, true, "DELETE", path, None);
    assert_eq!(
        (r.status, r.json["error"].as_str(), &r.json["tokens"]),
        (409, Some("scope_in_use"), &serde_json::json!(1)),
        "{}",
        r.text
    );
    // The edit dialog's "unrestricted" sends null; then the scope can go.
    let token = format!("/v1/tokens/{id}");
    let r = app.in_session(&s, false, "PATCH", &token, Some(r#"{"scopes": null}"#));
    assert_eq!(r.status, 403);
    let r = app.in_session(&s, true, "PATCH", &token, Some(r#"{"scopes": null}"#));
    assert_eq!(
        (r.status, &r.json["scopes"]),
        (200, &serde_json::Value::Null),
        "{}",
        r.text
    );
    let r = app.in_session(&s, true, "PATCH", &token, Some(r#"{"scopes": []}"#));
    assert_eq!(
        (r.status, &r.json["scopes"]),
        (200, &serde_json::json!([])),
        "{}",
        r.text
    );
    assert_eq!(app.in_session(&s, true, "DELETE", path, None).status, 204);
    assert_eq!(app.in_session(&s, false, "GET", path, None).status, 404);

    // The trail names the session's admin for the scope's changes, and the scope by name.
    let (_, audit) = app.admin("GET", "/v1/audit?action=scope.deleted", None);
    let e = &audit["entries"][0];
    assert_eq!(
        (e["actor"].as_str(), e["scope"].as_str()),
        (Some("ops"), Some("orders:read")),
        "{audit}"
    );
}

/// The page knows the Scopes view and the token dialogs' scopes and quota fields (the
/// browser test drives them; this catches a page served without them).
#[test]
fn the_page_has_the_scopes_view_and_the_token_fields() {
    let app = spawn_app(100);
    let page = app.request("GET", "/", &[], None).text;
    for id in [
        "id=\"nav-scopes\"",
        "id=\"scopes-view\"",
        "id=\"scope-form\"",
        "id=\"s-rules\"",
        "id=\"g-scopes\"",
        "id=\"e-scopes\"",
        "id=\"g-quota-limit\"",
        "id=\"e-quota-period\"",
    ] {
        assert!(page.contains(id), "{id}");
    }
    let script = app.request("GET", "/console/app.js", &[], None).text;
    for call in ["'/v1/scopes'", "quota_usage", "scope_in_use"] {
        assert!(script.contains(call), "{call}");
    }
}
