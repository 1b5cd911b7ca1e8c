//! Hostile input to every route that takes a body, a query or a path id: each is refused with
//! a JSON error that names the field at fault, and nothing is half-written. Also the sync
//! credential's (lack of) powers.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// An answer to a request sent byte for byte as given: no path normalisation, no implied
/// Content-Type.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    text: String,
    json: Value,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `body: None` sends no Content-Length (nor any body); a `transfer-encoding` header in
/// `headers` means `body` is already framed.
fn raw(
    app: &TestApp,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Raw {
    let addr = app.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    let chunked = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
    if let (Some(b), false) = (body, chunked) {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    // The server may answer (413) and close before it has read everything.
    let _ = s.write_all(&bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {target}: no answer: {out:?}"));
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = out[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    let text = String::from_utf8_lossy(&body).to_string();
    Raw {
        status,
        headers,
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..i]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[i + 4 + n..];
    }
    out
}

/// Everything a refused call must leave as it was.
#[derive(Debug, PartialEq)]
struct State {
    list: Value,
    records: Vec<Value>,
    audit_len: usize,
    version: u64,
}

fn state(app: &TestApp) -> State {
    let (s, list) = app.admin("GET", "/v1/tokens?limit=1000", None);
    assert_eq!(s, 200, "{list}");
    let records = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let (s, v) = app.admin(
                "GET",
                &format!("/v1/tokens/{}", t["id"].as_str().unwrap()),
                None,
            );
            assert_eq!(s, 200, "{v}");
            v
        })
        .collect();
    let (s, audit) = app.admin("GET", "/v1/audit?limit=1000", None);
    assert_eq!(s, 200, "{audit}");
    State {
        list,
        records,
        audit_len: audit["entries"].as_array().unwrap().len(),
        version: app.sync("since=0")["version"].as_u64().unwrap(),
    }
}

/// Two tokens, one of them suspended and with every optional field set, and an audit trail.
fn fixture() -> (TestApp, String) {
    let app = spawn_app(100);
    let a = app.create(r#"{"name":"reports","kind":"service","owner":"data","max_rps":5,"burst":10,"expires_in_seconds":86400}"#);
    let id = a["id"].as_str().unwrap().to_string();
    app.create(r#"{"name":"alice's laptop"}"#);
    let (s, v) = app.admin("POST", &format!("/v1/tokens/{id}/suspend"), None);
    assert_eq!(s, 200, "{v}");
    (app, id)
}

#[derive(Clone, Copy)]
enum Who {
    Admin,
    Sync,
    Nobody,
}

/// What a refusal must look like. `field` ending in `*` is a prefix.
struct Case {
    method: &'static str,
    target: String,
    who: Who,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
    extra: Vec<(&'static str, &'static str)>,
    status: u16,
    error: &'static str,
    field: Option<String>,
}

fn case(
    method: &'static str,
    target: &str,
    who: Who,
    body: Option<&[u8]>,
    status: u16,
    error: &'static str,
    field: Option<&str>,
) -> Case {
    Case {
        method,
        target: target.to_string(),
        who,
        content_type: body.map(|_| "application/json"),
        body: body.map(<[u8]>::to_vec),
        extra: vec![],
        status,
        error,
        field: field.map(str::to_string),
    }
}

fn typed(mut c: Case, content_type: Option<&'static str>) -> Case {
    c.content_type = content_type;
    c
}

fn run(app: &TestApp, cases: &[Case]) -> Vec<String> {
    let before = state(app);
    let admin = format!("Bearer {ADMIN}");
    let sync = format!("Bearer {SYNC}");
    let mut table = Vec::new();
    for c in cases {
        let mut headers = vec![];
        match c.who {
            Who::Admin => headers.push(("authorization", admin.as_str())),
            Who::Sync => headers.push(("authorization", sync.as_str())),
            Who::Nobody => {}
        }
        if let Some(t) = c.content_type {
            headers.push(("content-type", t));
        }
        headers.extend(c.extra.iter().copied());
        let r = raw(app, c.method, &c.target, &headers, c.body.as_deref());
        let shown = |b: &[u8]| {
            let s = String::from_utf8_lossy(&b[..b.len().min(60)])
                .escape_debug()
                .to_string();
            if b.len() > 60 {
                format!("{s}... ({} bytes)", b.len())
            } else {
                s
            }
        };
        let what = format!(
            "{} {} [{}] {}",
            c.method,
            &c.target[..c.target.len().min(60)],
            c.content_type.unwrap_or("no type"),
            c.body.as_deref().map(shown).unwrap_or_default()
        );
        assert_eq!(r.status, c.status, "{what}: {}", r.text);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "{what}: not JSON: {:?} {}",
            r.headers,
            r.text
        );
        assert_eq!(r.json["error"], c.error, "{what}: {}", r.text);
        let message = r.json["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {}", r.text));
        assert!(!message.is_empty(), "{what}");
        match &c.field {
            Some(f) if f.ends_with('*') => {
                let got = r.json["field"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: {}", r.text));
                assert!(
                    got.starts_with(f.trim_end_matches('*')),
                    "{what}: {}",
                    r.text
                );
                assert!(message.contains(got), "{what}: {}", r.text);
            }
            Some(f) => {
                assert_eq!(r.json["field"], f.as_str(), "{what}: {}", r.text);
                assert!(message.contains(f.as_str()), "{what}: {}", r.text);
            }
            None => assert!(
                r.json.get("field").is_none_or(Value::is_null),
                "{what}: {}",
                r.text
            ),
        }
        // Nothing leaks back: not the credentials, not a long echo of the input.
        assert!(
            !r.text.contains(ADMIN) && !r.text.contains(SYNC),
            "{what}: {}",
            r.text
        );
        assert!(r.text.len() < 2048, "{what}: {} bytes", r.text.len());
        assert_eq!(state(app), before, "{what} changed something");
        table.push(format!(
            "{what} -> {} {} {}",
            r.status,
            c.error,
            c.field.as_deref().unwrap_or("")
        ));
    }
    table
}

fn print(table: &[String]) {
    for row in table {
        println!("{row}");
    }
}

fn nested(depth: usize) -> String {
    "[".repeat(depth) + &"]".repeat(depth)
}

#[test]
fn token_bodies_refuse_hostile_input_naming_the_field() {
    let (app, id) = fixture();
    let long = "a".repeat(129);
    let long_wide = "é".repeat(129);
    let mut cases = vec![];
    let mut bad = |body: &str, field: Option<&str>| {
        let error = if field.is_some() {
            "invalid_field"
        } else {
            "invalid_body"
        };
        cases.push(case(
            "POST",
            "/v1/tokens",
            Who::Admin,
            Some(body.as_bytes()),
            400,
            error,
            field,
        ));
        // The same fields mean the same on an update, where they exist.
        // Valid as an update: a burst for a limited token, a single name.
        let valid_patch = [r#"{"name":"x","burst":5}"#, r#"{"name":"x","name":"y"}"#];
        let patchable = !["kind", "owner", "expires_in_seconds"]
            .iter()
            .any(|f| body.contains(f))
            && !valid_patch.contains(&body);
        if patchable && body.starts_with(r#"{"name":"x","#) {
            let patch = body.replacen(r#""name":"x","#, "", 1);
            cases.push(case(
                "PATCH",
                &format!("/v1/tokens/{id}"),
                Who::Admin,
                Some(patch.as_bytes()),
                400,
                error,
                field,
            ));
        }
    };
    // Wrong JSON types, field by field.
    for (field, values) in [
        ("name", &["5", "true", "[]", "{}", "1.5"][..]),
        ("kind", &["1", "[]", "{}"]),
        ("owner", &["1", "false", "[\"a\"]"]),
        ("max_rps", &["\"ten\"", "true", "[5]", "{}"]),
        ("burst", &["\"x\"", "false", "[]"]),
        ("expires_in_seconds", &["\"1h\"", "[]", "true"]),
        ("expires_at", &["123", "true", "{}"]),
        ("limit_scope", &["1", "[]", "{}", "true"]),
    ] {
        for v in values {
            let body = if field == "name" {
                format!(r#"{{"name":{v}}}"#)
            } else {
                format!(r#"{{"name":"x","{field}":{v}}}"#)
            };
            bad(&body, Some(field));
        }
    }
    // Numbers out of range: negative, zero, fractional, u32::MAX + 1, 1e30, past i64 and f64.
    for v in [
        "-1",
        "0",
        "1.5",
        "4294967296",
        "1e30",
        "9223372036854775808",
        "1e400",
        "1000001",
    ] {
        bad(&format!(r#"{{"name":"x","max_rps":{v}}}"#), Some("max_rps"));
    }
    for v in [
        "-1",
        "0",
        "2.5",
        "4294967296",
        "1e30",
        "9223372036854775808",
        "10000001",
    ] {
        bad(
            &format!(r#"{{"name":"x","max_rps":5,"burst":{v}}}"#),
            Some("burst"),
        );
    }
    for v in [
        "\"global\"",
        "\"\"",
        "\"FLEET\"",
        "\"fleet \"",
        "\"proxy\\u0000\"",
    ] {
        bad(
            &format!(r#"{{"name":"x","limit_scope":{v}}}"#),
            Some("limit_scope"),
        );
    }
    bad(r#"{"name":"x","burst":5}"#, Some("burst"));
    bad(r#"{"name":"x","max_rps":null,"burst":5}"#, Some("burst"));
    for v in [
        "-1",
        "0",
        "1.5",
        "1e30",
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775807",
    ] {
        bad(
            &format!(r#"{{"name":"x","expires_in_seconds":{v}}}"#),
            Some("expires_in_seconds"),
        );
    }
    for v in [
        "\"tomorrow\"",
        "\"2001-01-01T00:00:00Z\"",
        "\"9999-12-31T23:59:59-23:59\"",
        "\"\"",
    ] {
        bad(
            &format!(r#"{{"name":"x","expires_at":{v}}}"#),
            Some("expires_at"),
        );
    }
    // Text: empty, over 128 characters (however many bytes), control and disguising characters.
    bad(r#"{"name":""}"#, Some("name"));
    bad(r#"{"name":null}"#, Some("name"));
    bad(&format!(r#"{{"name":"{long}"}}"#), Some("name"));
    bad(&format!(r#"{{"name":"{long_wide}"}}"#), Some("name"));
    bad(
        &format!(r#"{{"name":"x","kind":"service","owner":"{long}"}}"#),
        Some("owner"),
    );
    bad(r#"{"name":"x","kind":"service"}"#, Some("owner"));
    bad(r#"{"name":"x","kind":"service","owner":""}"#, Some("owner"));
    for esc in [
        r"\u0000",
        r"\u0007",
        r"\u001b[31m",
        r"\n",
        r"\u007f",
        r"\u0085",
        r"\u2028",
        r"\u202e",
        r"\u2066",
    ] {
        bad(&format!(r#"{{"name":"a{esc}b"}}"#), Some("name"));
    }
    bad(r#"{"name":"x","owner":"a\u0000b"}"#, Some("owner"));
    bad(r#"{"name":"\ud800"}"#, Some("name"));
    bad(r#"{"name":"x","kind":"robot"}"#, Some("kind"));
    bad(r#"{"name":"x","kind":"USER "}"#, Some("kind"));
    // Unknown fields: extra, misspelled, other spelling conventions; and duplicates.
    bad(r#"{"name":"x","colour":"red"}"#, Some("colour"));
    bad(r#"{"nmae":"x"}"#, Some("nmae"));
    bad(r#"{"name":"x","maxRps":5}"#, Some("maxRps"));
    bad(r#"{"name":"x","max_rps":5,"Burst":2}"#, Some("Burst"));
    bad(r#"{"name":"x","token":"tg_x"}"#, Some("token"));
    bad(r#"{"name":"x","id":"tok_mine"}"#, Some("id"));
    bad(r#"{"name":"x","status":"active"}"#, Some("status"));
    bad(r#"{"name":"x","name":"y"}"#, Some("name"));
    // Not one JSON object.
    for body in [
        "",
        "   ",
        r#"{"name":"x""#,
        r#"{"name":"x","#,
        r#"{"name":"x"} trailing"#,
        r#"{"name":"x"}{"name":"y"}"#,
        r#"["x",null,null,null,null,null,null]"#,
        r#""x""#,
        "null",
        "42",
        "{name: 'x'}",
        "{\"name\":\"x\",}",
    ] {
        bad(body, None);
    }
    // Deep nesting: at the top (refused unread) and in a field (refused at its first bracket).
    bad(&nested(30_000), None);
    bad(&format!(r#"{{"name":{}}}"#, nested(30_000)), Some("name"));
    bad(
        &format!(r#"{{"name":"x","max_rps":{}}}"#, nested(30_000)),
        Some("max_rps"),
    );
    let create = |body: &[u8], ct, status, error, field: Option<&str>| {
        typed(
            case(
                "POST",
                "/v1/tokens",
                Who::Admin,
                Some(body),
                status,
                error,
                field,
            ),
            ct,
        )
    };
    // Bytes that are not UTF-8, and raw control characters, inside a string.
    cases.push(create(
        b"{\"name\":\"a\xffb\"}",
        Some("application/json"),
        400,
        "invalid_field",
        Some("name"),
    ));
    cases.push(create(
        b"{\"name\":\"a\xc3\"}",
        Some("application/json"),
        400,
        "invalid_field",
        Some("name"),
    ));
    cases.push(create(
        b"{\"name\":\"a\x00b\"}",
        Some("application/json"),
        400,
        "invalid_field",
        Some("name"),
    ));
    cases.push(create(
        b"{\"name\":\"a\x1bb\"}",
        Some("application/json"),
        400,
        "invalid_field",
        Some("name"),
    ));
    cases.push(create(
        b"\xef\xbb\xbf{\"name\":\"bom\"}",
        Some("application/json"),
        400,
        "invalid_body",
        None,
    ));
    // Sizes: just over the limit (announced, and chunked so it is found while reading); at
    // the limit is read and judged on its content.
    let limit = 64 * 1024;
    let padded = |n: usize| {
        let mut b = br#"{"name":"x","colour":1}"#.to_vec();
        b.resize(n, b' ');
        b
    };
    cases.push(create(
        &padded(limit + 1),
        Some("application/json"),
        413,
        "payload_too_large",
        None,
    ));
    cases.push(create(
        &padded(limit),
        Some("application/json"),
        400,
        "invalid_field",
        Some("colour"),
    ));
    cases.push(create(
        &padded(10 * 1024 * 1024),
        Some("application/json"),
        413,
        "payload_too_large",
        None,
    ));
    let over = padded(limit + 1);
    let mut chunked = Vec::new();
    for piece in over.chunks(8192) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let mut c = create(
        &chunked,
        Some("application/json"),
        413,
        "payload_too_large",
        None,
    );
    c.extra = vec![("transfer-encoding", "chunked")];
    cases.push(c);
    // Content types: JSON ones (with parameters) and none are read; anything else is refused.
    let valid = br#"{"name":"typed"}"#;
    for t in [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/xml",
        "application/json; charset=iso-8859-1",
        "application/jsonx",
        "",
    ] {
        cases.push(create(
            valid,
            Some(t),
            415,
            "unsupported_media_type",
            Some("content-type"),
        ));
        cases.push(typed(
            case(
                "PATCH",
                &format!("/v1/tokens/{id}"),
                Who::Admin,
                Some(valid),
                415,
                "unsupported_media_type",
                Some("content-type"),
            ),
            Some(t),
        ));
    }
    cases.push(create(
        b"name=x",
        Some("application/x-www-form-urlencoded"),
        415,
        "unsupported_media_type",
        Some("content-type"),
    ));
    for t in [
        None,
        Some("application/json; charset=UTF-8"),
        Some("application/merge-patch+json"),
        Some("Application/JSON"),
    ] {
        cases.push(create(
            br#"{"name":""}"#,
            t,
            400,
            "invalid_field",
            Some("name"),
        ));
    }
    // A name is never null, and the update checks it as the creation does.
    for body in [
        r#"{"name":null}"#,
        r#"{"name":5}"#,
        r#"{"name":""}"#,
        r#"{"name":"a\u202eb"}"#,
        r#"{"name":null,"max_rps":7}"#,
    ] {
        cases.push(case(
            "PATCH",
            &format!("/v1/tokens/{id}"),
            Who::Admin,
            Some(body.as_bytes()),
            400,
            "invalid_field",
            Some("name"),
        ));
    }
    let long_patch = format!(r#"{{"name":"{long}"}}"#);
    cases.push(case(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Who::Admin,
        Some(long_patch.as_bytes()),
        400,
        "invalid_field",
        Some("name"),
    ));
    // An update needs something to change, and an id that is a token's.
    cases.push(case(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Who::Admin,
        Some(b"{}"),
        400,
        "invalid_body",
        None,
    ));
    cases.push(case(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Who::Admin,
        Some(b""),
        400,
        "invalid_body",
        None,
    ));
    cases.push(case(
        "PATCH",
        "/v1/tokens/tok_0000000000000000",
        Who::Admin,
        Some(br#"{"name":"y"}"#),
        404,
        "not_found",
        None,
    ));
    let table = run(&app, &cases);
    print(&table);
    // The same bodies, made valid, are taken: the refusals were about what they named.
    let (s, v) = app.admin(
        "POST",
        "/v1/tokens",
        Some(&format!(r#"{{"name":"{}"}}"#, "é".repeat(128))),
    );
    assert_eq!(s, 201, "{v}");
    let r = raw(
        &app,
        "POST",
        "/v1/tokens",
        &[("authorization", &format!("Bearer {ADMIN}"))],
        Some(br#"{"name":"untyped"}"#),
    );
    assert_eq!(
        r.status, 201,
        "a body without a Content-Type is read as JSON: {}",
        r.text
    );
}

#[test]
fn other_bodies_refuse_hostile_input() {
    let (app, id) = fixture();
    let rotate = format!("/v1/tokens/{id}/rotate");
    let mut cases = vec![];
    for v in [
        "-1",
        "\"1h\"",
        "1.5",
        "2592001",
        "18446744073709551616",
        "1e30",
        "null",
    ] {
        let (status, field) = if v == "null" {
            (None, None)
        } else {
            (Some(400), Some("grace_seconds"))
        };
        if let Some(status) = status {
            cases.push(case(
                "POST",
                &rotate,
                Who::Admin,
                Some(format!(r#"{{"grace_seconds":{v}}}"#).as_bytes()),
                status,
                "invalid_field",
                field,
            ));
        }
    }
    cases.push(case(
        "POST",
        &rotate,
        Who::Admin,
        Some(br#"{"grace":5}"#),
        400,
        "invalid_field",
        Some("grace"),
    ));
    cases.push(case(
        "POST",
        &rotate,
        Who::Admin,
        Some(b"[5]"),
        400,
        "invalid_body",
        None,
    ));
    cases.push(case(
        "POST",
        &rotate,
        Who::Admin,
        Some(b"{\"grace_seconds\":5} x"),
        400,
        "invalid_body",
        None,
    ));
    cases.push(typed(
        case(
            "POST",
            &rotate,
            Who::Admin,
            Some(br#"{"grace_seconds":5}"#),
            415,
            "unsupported_media_type",
            Some("content-type"),
        ),
        Some("text/plain"),
    ));
    cases.push(case(
        "POST",
        &rotate,
        Who::Admin,
        Some(&[b' '; 64 * 1024 + 1]),
        413,
        "payload_too_large",
        None,
    ));
    cases.push(case(
        "POST",
        "/v1/tokens/tok_0000000000000000/rotate",
        Who::Admin,
        None,
        404,
        "not_found",
        None,
    ));
    // Sign-in: read before any credential is checked.
    for (body, error, field) in [
        (
            &br#"{"credential":5}"#[..],
            "invalid_field",
            Some("credential"),
        ),
        (
            br#"{"credential":["x"]}"#,
            "invalid_field",
            Some("credential"),
        ),
        (b"{}", "invalid_field", Some("credential")),
        (
            br#"{"credential":"  "}"#,
            "invalid_field",
            Some("credential"),
        ),
        (
            br#"{"credential":"x","user":"y"}"#,
            "invalid_field",
            Some("user"),
        ),
        (
            br#"{"Credential":"x"}"#,
            "invalid_field",
            Some("Credential"),
        ),
        (
            b"{\"credential\":\"a\xffb\"}",
            "invalid_field",
            Some("credential"),
        ),
        (b"[\"x\"]", "invalid_body", None),
        (b"{\"credential\":", "invalid_field", Some("credential")),
        (b"", "invalid_body", None),
    ] {
        cases.push(case(
            "POST",
            "/v1/session",
            Who::Nobody,
            Some(body),
            400,
            error,
            field,
        ));
    }
    cases.push(case(
        "POST",
        "/v1/session",
        Who::Nobody,
        Some(br#"{"credential":"not-an-admin-credential"}"#),
        401,
        "unauthorized",
        None,
    ));
    let form = format!("credential={ADMIN}");
    cases.push(typed(
        case(
            "POST",
            "/v1/session",
            Who::Nobody,
            Some(form.as_bytes()),
            415,
            "unsupported_media_type",
            Some("content-type"),
        ),
        Some("application/x-www-form-urlencoded"),
    ));
    let json_as_text = format!(r#"{{"credential":"{ADMIN}"}}"#);
    cases.push(typed(
        case(
            "POST",
            "/v1/session",
            Who::Nobody,
            Some(json_as_text.as_bytes()),
            415,
            "unsupported_media_type",
            Some("content-type"),
        ),
        Some("text/plain"),
    ));
    let mut big = json_as_text.clone().into_bytes();
    big.resize(64 * 1024 + 1, b' ');
    cases.push(case(
        "POST",
        "/v1/session",
        Who::Nobody,
        Some(&big),
        413,
        "payload_too_large",
        None,
    ));
    // Usage reports (sync credential): strict like the wire type, with a larger limit.
    let entry = |f: &str| {
        format!(r#"{{"entries":[{{"id":"{id}","allowed":1,"denied":0,"last_used_at":1,{f}}}]}}"#)
    };
    for (body, field) in [
        (r#"{"entries":"x"}"#.to_string(), Some("entries")),
        ("{}".to_string(), Some("entries")),
        (r#"{"entries":null}"#.to_string(), Some("entries")),
        (r#"{"entries":[],"extra":1}"#.to_string(), Some("extra")),
        (r#"{"entries":[],"proxy_id":5}"#.to_string(), Some("proxy_id")),
        (r#"{"entries":[{"id":5,"allowed":1,"denied":0,"last_used_at":1}]}"#.to_string(), Some("entries[0].id")),
        (r#"{"entries":[{"id":"x","allowed":-1,"denied":0,"last_used_at":1}]}"#.to_string(), Some("entries[0].allowed")),
        (r#"{"entries":[{"id":"x","allowed":18446744073709551616,"denied":0,"last_used_at":1}]}"#.to_string(), Some("entries[0].allowed")),
        (r#"{"entries":[{"id":"x","allowed":1,"denied":1.5,"last_used_at":1}]}"#.to_string(), Some("entries[0].denied")),
        (r#"{"entries":[{"id":"x","allowed":1,"denied":0,"last_used_at":1e30}]}"#.to_string(), Some("entries[0].last_used_at")),
        (r#"{"entries":[{"id":"x","allowed":1,"denied":0}]}"#.to_string(), Some("entries[0]*")),
        (entry(r#""colour":1"#), Some("entries[0]*")),
        (entry(r#""allowed":2"#), Some("entries[0]*")),
        (format!(r#"{{"entries":{}}}"#, nested(100_000)), Some("entries*")),
        (nested(100_000), None),
        (r#"{"entries":[]"#.to_string(), None),
        (r#"{"entries":[]} []"#.to_string(), None),
    ] {
        let error = if field.is_some() { "invalid_field" } else { "invalid_body" };
        cases.push(case("POST", "/v1/usage", Who::Sync, Some(body.as_bytes()), 400, error, field));
    }
    let report =
        format!(r#"{{"entries":[{{"id":"{id}","allowed":1,"denied":0,"last_used_at":1}}]}}"#);
    cases.push(typed(
        case(
            "POST",
            "/v1/usage",
            Who::Sync,
            Some(report.as_bytes()),
            415,
            "unsupported_media_type",
            Some("content-type"),
        ),
        Some("text/plain"),
    ));
    let mut huge = report.clone().into_bytes();
    huge.resize(2 * 1024 * 1024 + 1, b' ');
    cases.push(case(
        "POST",
        "/v1/usage",
        Who::Sync,
        Some(&huge),
        413,
        "payload_too_large",
        None,
    ));
    // More entries than a report may carry, in a body under the byte limit.
    let many = format!(
        r#"{{"entries":[{}]}}"#,
        vec![r#"{"id":"","allowed":0,"denied":0,"last_used_at":0}"#; 10_001].join(",")
    );
    assert!(many.len() < 2 * 1024 * 1024);
    cases.push(case(
        "POST",
        "/v1/usage",
        Who::Sync,
        Some(many.as_bytes()),
        413,
        "payload_too_large",
        None,
    ));
    // Fleet reports (sync credential): strict like the wire type; the proxy's id, the
    // interval and the counts are checked before anything is recorded.
    let long_proxy = "p".repeat(129);
    let fleet = |f: &str| format!(r#"{{"proxy_id":"envoy-1","interval_ms":1000,"tokens":[],{f}}}"#);
    for (body, field) in [
        (r#"{"proxy_id":"p","interval_ms":1000,"tokens":"x"}"#.to_string(), Some("tokens")),
        (r#"{"proxy_id":5,"interval_ms":1000,"tokens":[]}"#.to_string(), Some("proxy_id")),
        (r#"{"proxy_id":"","interval_ms":1000,"tokens":[]}"#.to_string(), Some("proxy_id")),
        (format!(r#"{{"proxy_id":"{long_proxy}","interval_ms":1000,"tokens":[]}}"#), Some("proxy_id")),
        (r#"{"proxy_id":"envoy\n1","interval_ms":1000,"tokens":[]}"#.to_string(), Some("proxy_id")),
        (r#"{"proxy_id":"envoy\u0007","interval_ms":1000,"tokens":[]}"#.to_string(), Some("proxy_id")),
        (r#"{"proxy_id":"envoy\u001b[31m","interval_ms":1000,"tokens":[]}"#.to_string(), Some("proxy_id")),
        (r#"{"proxy_id":"p","interval_ms":0,"tokens":[]}"#.to_string(), Some("interval_ms")),
        (r#"{"proxy_id":"p","interval_ms":-1,"tokens":[]}"#.to_string(), Some("interval_ms")),
        (r#"{"proxy_id":"p","interval_ms":3600000,"tokens":[]}"#.to_string(), Some("interval_ms")),
        (r#"{"proxy_id":"p","interval_ms":1000,"tokens":[{"id":"tok_x","admitted":18446744073709551615,"refused":0}]}"#.to_string(), Some("tokens.admitted")),
        (r#"{"proxy_id":"p","interval_ms":1000,"tokens":[{"id":"tok_x","admitted":6000000001,"refused":0}]}"#.to_string(), Some("tokens.admitted")),
        (r#"{"proxy_id":"p","interval_ms":1000,"tokens":[{"id":"tok_x","admitted":-1,"refused":0}]}"#.to_string(), Some("tokens[0].admitted")),
        (r#"{"proxy_id":"p","interval_ms":1000,"tokens":[{"id":"","admitted":1,"refused":0}]}"#.to_string(), Some("tokens.id")),
        (fleet(r#""extra":1"#), Some("extra")),
        (format!(r#"{{"proxy_id":"p","interval_ms":1000,"tokens":{}}}"#, nested(100_000)), Some("tokens*")),
        (nested(100_000), None),
        (r#"{"proxy_id":"p","interval_ms":1000,"tokens":[]"#.to_string(), None),
    ] {
        let error = if field.is_some() { "invalid_field" } else { "invalid_body" };
        cases.push(case("POST", "/v1/fleet", Who::Sync, Some(body.as_bytes()), 400, error, field));
    }
    let mut huge_fleet = fleet(r#""x":1"#).into_bytes();
    huge_fleet.resize(2 * 1024 * 1024 + 1, b' ');
    cases.push(case(
        "POST",
        "/v1/fleet",
        Who::Sync,
        Some(&huge_fleet),
        413,
        "payload_too_large",
        None,
    ));
    let many_tokens = format!(
        r#"{{"proxy_id":"p","interval_ms":1000,"tokens":[{}]}}"#,
        vec![r#"{"id":"t","admitted":0,"refused":0}"#; 10_001].join(",")
    );
    assert!(many_tokens.len() < 2 * 1024 * 1024);
    cases.push(case(
        "POST",
        "/v1/fleet",
        Who::Sync,
        Some(many_tokens.as_bytes()),
        413,
        "payload_too_large",
        None,
    ));
    cases.push(case(
        "POST",
        "/v1/fleet",
        Who::Admin,
        Some(br#"{"proxy_id":"p","interval_ms":1000,"tokens":[]}"#),
        401,
        "unauthorized",
        None,
    ));
    cases.push(case(
        "PATCH",
        &format!("/v1/tokens/{id}"),
        Who::Admin,
        Some(br#"{"limit_scope":null}"#),
        400,
        "invalid_field",
        Some("limit_scope"),
    ));
    print(&run(&app, &cases));
    // A well-formed report is answered with the proxy's shares.
    let r = raw(
        &app,
        "POST",
        "/v1/fleet",
        &[
            ("authorization", &format!("Bearer {SYNC}")),
            ("content-type", "application/json"),
        ],
        Some(format!(r#"{{"proxy_id":"envoy-1","interval_ms":1000,"tokens":[{{"id":"{id}","admitted":3,"refused":1}}]}}"#).as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["proxies"], 1, "{}", r.text);
    // A report at the limit, of ids no token has, counts nothing and is taken.
    let mut fits = report.replace(&id, "tok_none").into_bytes();
    fits.resize(2 * 1024 * 1024, b' ');
    let r = raw(
        &app,
        "POST",
        "/v1/usage",
        &[
            ("authorization", &format!("Bearer {SYNC}")),
            ("content-type", "application/json"),
        ],
        Some(&fits),
    );
    assert_eq!(r.status, 204, "{}", r.text);
}

#[test]
fn queries_and_path_ids_refuse_hostile_input() {
    let (app, id) = fixture();
    let mut cases = vec![];
    let mut get = |who, target: String, status, error, field: Option<&str>| {
        cases.push(case("GET", &target, who, None, status, error, field));
    };
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=1001", "limit"),
        ("limit=1.5", "limit"),
        ("limit=abc", "limit"),
        ("limit=", "limit"),
        ("limit=99999999999999999999", "limit"),
        ("limit=1&limit=2", "limit"),
        ("Limit=5", "Limit"),
        ("status=revoked", "status"),
        ("status=ACTIVE", "status"),
        ("kind=robot", "kind"),
        ("order=random", "order"),
        ("expiring_within=forever", "expiring_within"),
        ("expiring_within=99999999999999999999d", "expiring_within"),
        ("expiring_within=5%C3%A9", "expiring_within"),
        ("expiring_within=-1d", "expiring_within"),
        ("bogus=1", "bogus"),
        ("owner=a&owner=b", "owner"),
        ("name=x", "name"),
    ] {
        get(
            Who::Admin,
            format!("/v1/tokens?{q}"),
            400,
            "invalid_field",
            Some(field),
        );
    }
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("since=yesterday", "since"),
        ("until=5", "until"),
        ("action=token.hacked", "action"),
        ("cursor=abc", "cursor"),
        ("cursor=-1", "cursor"),
        ("cursor=99999999999999999999", "cursor"),
        ("token=a&token=b", "token"),
        ("tokens=x", "tokens"),
    ] {
        get(
            Who::Admin,
            format!("/v1/audit?{q}"),
            400,
            "invalid_field",
            Some(field),
        );
    }
    for (q, field) in [
        ("since=-1", "since"),
        ("since=abc", "since"),
        ("since=1.5", "since"),
        ("since=18446744073709551616", "since"),
        ("since=1&since=2", "since"),
        ("wait=-5", "wait"),
        ("wait=1e3", "wait"),
        ("cursor=nocolon", "cursor"),
        ("cursor=abc:tok_x", "cursor"),
    ] {
        get(
            Who::Sync,
            format!("/v1/sync?{q}"),
            400,
            "invalid_field",
            Some(field),
        );
    }
    // Path ids: any text that is no token's is a 404; one that is not UTF-8 names `id`.
    for target in [
        "/v1/tokens/tok_0000000000000000".to_string(),
        "/v1/tokens/%00".to_string(),
        "/v1/tokens/..%2Fx".to_string(),
        "/v1/tokens/%27%20OR%201=1--".to_string(),
        format!("/v1/tokens/{}", "x".repeat(10_000)),
        format!("/v1/tokens/{}", id.to_lowercase()),
        format!("/v1/tokens/{id}%20"),
    ] {
        get(Who::Admin, target, 404, "not_found", None);
    }
    get(
        Who::Admin,
        "/v1/tokens/%FF".into(),
        400,
        "invalid_field",
        Some("id"),
    );
    get(
        Who::Admin,
        "/v1/tokens/%C3%28".into(),
        400,
        "invalid_field",
        Some("id"),
    );
    get(Who::Admin, "/v1/tokens/../x".into(), 404, "no_route", None);
    get(
        Who::Admin,
        format!("/v1/tokens/{id}/../../audit/x"),
        404,
        "no_route",
        None,
    );
    get(Who::Admin, "/v1/tokens//".into(), 404, "no_route", None);
    for (method, target) in [
        ("PATCH", "/v1/tokens/%FF"),
        ("POST", "/v1/tokens/%FF/suspend"),
        ("POST", "/v1/tokens/%FF/reactivate"),
        ("POST", "/v1/tokens/%FF/rotate"),
        ("DELETE", "/v1/tokens/%FF"),
    ] {
        let body = (method == "PATCH").then_some(&br#"{"name":"y"}"#[..]);
        cases.push(case(
            method,
            target,
            Who::Admin,
            body,
            400,
            "invalid_field",
            Some("id"),
        ));
    }
    for (method, target) in [
        ("POST", "/v1/tokens/tok_0000000000000000/suspend"),
        ("POST", "/v1/tokens/tok_0000000000000000/reactivate"),
        ("DELETE", "/v1/tokens/tok_0000000000000000"),
        ("DELETE", "/v1/tokens/%00"),
    ] {
        cases.push(case(
            method,
            target,
            Who::Admin,
            None,
            404,
            "not_found",
            None,
        ));
    }
    // A method a route does not have is JSON too, with Allow.
    for (method, target) in [
        ("DELETE", "/v1/tokens".to_string()),
        ("PUT", format!("/v1/tokens/{id}")),
        ("GET", format!("/v1/tokens/{id}/suspend")),
        ("PUT", "/v1/usage".into()),
        ("POST", "/v1/sync".into()),
        ("PATCH", "/v1/audit".into()),
    ] {
        cases.push(case(
            method,
            &target,
            Who::Admin,
            None,
            405,
            "method_not_allowed",
            None,
        ));
    }
    print(&run(&app, &cases));
    let r = raw(
        &app,
        "DELETE",
        "/v1/tokens",
        &[("authorization", &format!("Bearer {ADMIN}"))],
        None,
    );
    assert!(
        r.header("allow")
            .is_some_and(|a| a.contains("POST") && a.contains("GET")),
        "{:?}",
        r.headers
    );
    // Cursors are opaque but harmless: one this server never made is an empty page.
    for q in ["cursor=zzzz", "order=newest&cursor=%27"] {
        let (s, v) = app.admin("GET", &format!("/v1/tokens?{q}"), None);
        assert_eq!(s, 200, "{q}: {v}");
    }
    // No query text holds U+0000, which PostgreSQL cannot take (it was a 500 there).
    for q in [
        "cursor=%00",
        "owner=a%00",
        "name_contains=%00",
        "token=%00",
        "actor=x%00y",
    ] {
        let path = if q.starts_with("token") || q.starts_with("actor") {
            format!("/v1/audit?{q}")
        } else {
            format!("/v1/tokens?{q}")
        };
        let (s, v) = app.admin("GET", &path, None);
        let name = q.split('=').next().unwrap();
        assert_eq!((s, v["field"].as_str()), (400, Some(name)), "{q}: {v}");
    }
    // Lossy decoding of a query that is not UTF-8 still leads to a named refusal.
    let r = raw(
        &app,
        "GET",
        "/v1/tokens?%FF=1",
        &[("authorization", &format!("Bearer {ADMIN}"))],
        None,
    );
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (400, Some("invalid_field")),
        "{}",
        r.text
    );
}

/// Every documented route, from the served OpenAPI document, with `{id}` filled in.
fn routes(app: &TestApp, id: &str) -> Vec<(String, String)> {
    let (s, doc) = app.call("GET", "/v1/openapi.json", None, None);
    assert_eq!(s, 200);
    let mut out = vec![];
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                out.push((method.to_uppercase(), path.replace("{id}", id)));
            }
        }
    }
    assert!(out.len() >= 12, "{out:?}");
    out
}

#[test]
fn the_sync_credential_changes_nothing_and_reads_no_tokens() {
    let (app, id) = fixture();
    let before = state(&app);
    let sync = format!("Bearer {SYNC}");
    let mut tried = vec![];
    let session_body = format!(r#"{{"credential":"{SYNC}"}}"#);
    for (method, path) in routes(&app, &id) {
        let may = path == "/v1/sync"
            || path == "/v1/usage"
            || path == "/v1/fleet"
            || path == "/healthz"
            || path == "/readyz"
            || path == "/metrics"
            || path == "/v1/openapi.json";
        if may {
            continue;
        }
        // A body that would be valid for the admin, so only the credential can refuse it.
        let body: Option<&[u8]> = match (method.as_str(), path.as_str()) {
            ("POST", "/v1/tokens") => Some(br#"{"name":"by-sync"}"#),
            ("PATCH", _) => Some(br#"{"name":"renamed","max_rps":null}"#),
            ("POST", p) if p.ends_with("/rotate") => Some(br#"{"grace_seconds":60}"#),
            ("POST", "/v1/session") => Some(session_body.as_bytes()),
            _ => None,
        };
        let mut headers = vec![("authorization", sync.as_str())];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        let r = raw(&app, &method, &path, &headers, body);
        assert_eq!(
            r.status, 401,
            "{method} {path} with the sync credential: {}",
            r.text
        );
        assert_eq!(r.json["error"], "unauthorized", "{method} {path}");
        assert!(r.header("set-cookie").is_none(), "{method} {path}");
        tried.push(format!("{method} {path}"));
    }
    for must in [
        "POST /v1/tokens",
        "PATCH",
        "DELETE",
        "/suspend",
        "/reactivate",
        "/rotate",
        "GET /v1/tokens",
        "GET /v1/audit",
        "POST /v1/session",
        "DELETE /v1/session",
    ] {
        assert!(
            tried.iter().any(|t| t.contains(must)),
            "{must} not tried: {tried:?}"
        );
    }
    // Spelled differently, it is still not an admin credential.
    for auth in [
        format!("bearer {SYNC}"),
        format!("Bearer  {SYNC} "),
        format!("Bearer {SYNC}x"),
    ] {
        let r = raw(
            &app,
            "DELETE",
            &format!("/v1/tokens/{id}"),
            &[("authorization", &auth)],
            None,
        );
        assert_eq!(r.status, 401, "{auth}: {}", r.text);
    }
    assert_eq!(state(&app), before);
    println!("refused to the sync credential: {}", tried.join(", "));
}

/// Names and owners are shown in the console, the CLI and the audit trail: a character that
/// shows as nothing would let `al\u{200b}ice` pass for `alice`.
#[test]
fn invisible_and_format_characters_in_names_and_owners_are_refused() {
    let app = spawn_app(100);
    let id = app.create(r#"{"name":"plain"}"#)["id"]
        .as_str()
        .unwrap()
        .to_string();
    for c in [
        "\\u061c", "\\u200b", "\\ufeff", "\\u00ad", "\\u200d", "\\u2060", "\\u3164", "\\u180e",
        "\\ue000",
    ] {
        for (method, path, body, field) in [
            (
                "POST",
                "/v1/tokens".to_string(),
                format!(r#"{{"name":"al{c}ice"}}"#),
                "name",
            ),
            (
                "POST",
                "/v1/tokens".to_string(),
                format!(r#"{{"name":"x","owner":"al{c}ice"}}"#),
                "owner",
            ),
            (
                "POST",
                "/v1/tokens".to_string(),
                format!(r#"{{"name":"x","kind":"service","owner":"{c}team"}}"#),
                "owner",
            ),
            (
                "PATCH",
                format!("/v1/tokens/{id}"),
                format!(r#"{{"name":"al{c}ice"}}"#),
                "name",
            ),
        ] {
            let (s, v) = app.admin(method, &path, Some(&body));
            assert_eq!(
                (s, v["error"].as_str(), v["field"].as_str()),
                (400, Some("invalid_field"), Some(field)),
                "{method} {body}: {v}"
            );
            let m = v["message"].as_str().unwrap();
            assert!(m.starts_with(&format!("{field} must not contain")), "{m}");
            assert!(m.contains("U+"), "{m}");
        }
    }
    let (_, list) = app.admin("GET", "/v1/tokens", None);
    assert_eq!(list["tokens"].as_array().unwrap().len(), 1, "{list}");
    let (_, t) = app.admin("GET", &format!("/v1/tokens/{id}"), None);
    assert_eq!(t["name"], "plain");
}

/// A field error's message names its field once, as the subject of a sentence.
#[test]
fn field_errors_name_their_field_once() {
    let app = spawn_app(100);
    for (body, field, message) in [
        (
            r#"{"name":"x","kind":"service"}"#,
            "owner",
            "owner is required for service tokens: name the group that owns the automation.",
        ),
        (
            r#"{"name":"x","max_rps":0}"#,
            "max_rps",
            "max_rps must be between 1 and 1000000, or null for unlimited.",
        ),
        (
            r#"{"name":"x","expires_in_seconds":60,"expires_at":"2999-01-01T00:00:00Z"}"#,
            "expires_at",
            "expires_at cannot be given with expires_in_seconds: give one or the other.",
        ),
    ] {
        let (s, v) = app.admin("POST", "/v1/tokens", Some(body));
        assert_eq!((s, v["field"].as_str()), (400, Some(field)), "{v}");
        assert_eq!(v["message"], message, "{v}");
    }
    let (s, v) = app.admin("GET", "/v1/tokens?colour=red", None);
    assert_eq!(s, 400);
    assert_eq!(
        v["message"], "colour is not a known query parameter.",
        "{v}"
    );
}
