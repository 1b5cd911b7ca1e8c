//! Credential guessing is slowed per client address: after a few refused credentials an
//! address is answered 429 with Retry-After, whatever it presents, while other addresses
//! carry on. Clients here connect from different loopback addresses (127.0.0.x).

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::time::Duration;
use tokengate::throttle;

struct Reply {
    status: u16,
    retry_after: Option<u64>,
    json: Value,
}

/// One request over a new connection from `source` (an address on the loopback).
fn from(
    app: &TestApp,
    source: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> Reply {
    let server: std::net::SocketAddr = app.url.trim_start_matches("http://").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(server).await.unwrap()
    });
    let mut stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    if let Some(b) = bearer {
        req.push_str(&format!("authorization: Bearer {b}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str("content-type: application/json\r\n");
    }
    req.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(req.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let retry_after = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("retry-after")
            .then(|| value.trim().parse().unwrap())
    });
    Reply {
        status,
        retry_after,
        json: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

const WRONG: &str = "wrong-credential-f81d4fae7dec11d0";

fn strict() -> throttle::Settings {
    throttle::Settings {
        burst: 5,
        interval: Duration::from_secs(60),
    }
}

fn metric(app: &TestApp, line_start: &str) -> u64 {
    let text = app.request("GET", "/metrics", &[], None).text;
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .unwrap_or_else(|| panic!("{line_start} not in {text}"))
        .trim()
        .parse()
        .unwrap()
}

fn throttled(r: &Reply) {
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (429, Some("too_many_failures")),
        "{}",
        r.json
    );
    let wait = r.retry_after.expect("Retry-After");
    assert!((1..=60).contains(&wait), "Retry-After: {wait}");
}

#[test]
fn wrong_admin_credentials_turn_into_429_for_that_address_only() {
    let app = spawn_app_throttled(strict());
    for _ in 0..5 {
        let r = from(&app, "127.0.0.2", "GET", "/v1/tokens", Some(WRONG), None);
        assert_eq!(r.status, 401, "{}", r.json);
    }
    // From now on even the right credential gets a 429 from that address, so a lucky guess
    // cannot be told from a wrong one.
    throttled(&from(
        &app,
        "127.0.0.2",
        "GET",
        "/v1/tokens",
        Some(WRONG),
        None,
    ));
    throttled(&from(
        &app,
        "127.0.0.2",
        "GET",
        "/v1/tokens",
        Some(ADMIN),
        None,
    ));
    // Another address is unaffected, with the right credential and with a wrong one.
    let r = from(&app, "127.0.0.3", "GET", "/v1/tokens", Some(ADMIN), None);
    assert_eq!(r.status, 200, "{}", r.json);
    let r = from(&app, "127.0.0.3", "GET", "/v1/tokens", Some(WRONG), None);
    assert_eq!(r.status, 401, "{}", r.json);
    assert_eq!(
        metric(&app, "tokengate_auth_failures_total{credential=\"admin\"}"),
        6
    );
    assert_eq!(metric(&app, "tokengate_auth_throttled_total"), 2);
}

#[test]
fn console_sign_in_and_the_sync_credential_are_throttled_too() {
    let app = spawn_app_throttled(strict());
    let wrong = format!(r#"{{"credential":"{WRONG}"}}"#);
    let right = format!(r#"{{"credential":"{ADMIN}"}}"#);
    for _ in 0..5 {
        let r = from(&app, "127.0.0.4", "POST", "/v1/session", None, Some(&wrong));
        assert_eq!(r.status, 401, "{}", r.json);
    }
    throttled(&from(
        &app,
        "127.0.0.4",
        "POST",
        "/v1/session",
        None,
        Some(&right),
    ));
    let r = from(&app, "127.0.0.5", "POST", "/v1/session", None, Some(&right));
    assert_eq!(r.status, 201, "{}", r.json);

    for _ in 0..5 {
        let r = from(
            &app,
            "127.0.0.6",
            "GET",
            "/v1/sync?since=0",
            Some(WRONG),
            None,
        );
        assert_eq!(r.status, 401, "{}", r.json);
    }
    throttled(&from(
        &app,
        "127.0.0.6",
        "GET",
        "/v1/sync?since=0",
        Some(SYNC),
        None,
    ));
    let r = from(
        &app,
        "127.0.0.7",
        "GET",
        "/v1/sync?since=0",
        Some(SYNC),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.json);
    // Admin and sync credentials have separate allowances: guessing at one does not stop
    // the other from that address. Sign-ins and Bearer admin credentials share theirs.
    let r = from(&app, "127.0.0.6", "GET", "/v1/tokens", Some(ADMIN), None);
    assert_eq!(r.status, 200, "{}", r.json);
    let r = from(
        &app,
        "127.0.0.4",
        "GET",
        "/v1/sync?since=0",
        Some(SYNC),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.json);
    throttled(&from(
        &app,
        "127.0.0.4",
        "GET",
        "/v1/tokens",
        Some(ADMIN),
        None,
    ));

    assert_eq!(
        metric(
            &app,
            "tokengate_auth_failures_total{credential=\"sign_in\"}"
        ),
        5
    );
    assert_eq!(
        metric(&app, "tokengate_auth_failures_total{credential=\"sync\"}"),
        5
    );
}
