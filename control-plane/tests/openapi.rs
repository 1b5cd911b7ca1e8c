//! The OpenAPI document against the server that serves it: every constraint the document
//! states on a request (bounds, lengths, patterns, enums, formats, null, required fields,
//! unknown fields) is tried at its edges, and the server must accept what the document
//! allows and refuse, with a 400 naming the field, what it forbids. Every operation is then
//! called with each credential, and only the ones its `security` lists may pass. A
//! constraint that changes on one side only fails here.

mod common;

use common::*;
use regex::Regex;
use serde_json::{json, Value};

/// The document's own definition of `pointer` (a `$ref` followed).
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("{r} is not in the document")),
        None => schema,
    }
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn types(schema: &Value) -> Vec<&str> {
    match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    }
}

/// Values that `schema` admits (`true`) or refuses (`false`), at its edges. A query holds
/// text only, so there neither `1` and `"1"` nor `1` and `1.0` differ.
fn probes(schema: &Value, in_query: bool) -> Vec<(Value, bool)> {
    let mut out = vec![];
    let t = types(schema);
    out.push((Value::Null, t.contains(&"null")));
    if let Some(values) = schema["enum"].as_array() {
        out.extend(values.iter().map(|v| (v.clone(), true)));
        out.push((json!("not-one-of-them"), false));
        return out;
    }
    if t.contains(&"integer") {
        let min = schema["minimum"]
            .as_i64()
            .map(i128::from)
            .or(schema["minimum"].as_u64().map(i128::from));
        let max = schema["maximum"]
            .as_i64()
            .map(i128::from)
            .or(schema["maximum"].as_u64().map(i128::from));
        let (min, max) = (
            min.expect("an integer has a minimum"),
            max.expect("and a maximum"),
        );
        let number = |n: i128| -> Value { serde_json::from_str(&n.to_string()).unwrap() };
        out.extend([
            (number(min), true),
            (number(max), true),
            (number(min - 1), false),
            (number(max + 1), false),
        ]);
        if !in_query {
            out.push((json!("1"), false));
            // A whole number written with a fraction is the same integer (JSON Schema's
            // reading).
            if min.abs() < 1 << 53 {
                out.push((json!(min as f64), true));
            }
            out.push((json!(min as f64 + 0.5), false));
        }
    }
    if t.contains(&"string") {
        if !in_query {
            out.push((json!(1), false));
        }
        if schema["format"] == "date-time" {
            out.extend([
                (json!("2099-01-31T12:00:00Z"), true),
                (json!("2099-01-31T12:00:00.5+02:00"), true),
                (json!("2099-01-31"), false),
                (json!("tomorrow"), false),
            ]);
        }
        let pattern = schema["pattern"].as_str().map(|p| Regex::new(p).unwrap());
        let (min, max) = (
            schema["minLength"].as_u64().unwrap_or(0) as usize,
            schema["maxLength"].as_u64().map(|n| n as usize),
        );
        let fits = |s: &str| {
            let n = s.chars().count();
            n >= min && max.is_none_or(|m| n <= m) && pattern.as_ref().is_none_or(|p| p.is_match(s))
        };
        let mut texts: Vec<String> = SAMPLES.iter().map(|s| s.to_string()).collect();
        // Every character the samples hold, alone and at either end and inside.
        for c in SAMPLES
            .iter()
            .flat_map(|s| s.chars())
            .chain(EDGE_CHARS.iter().copied())
        {
            texts.extend([
                c.to_string(),
                format!("{c}ab"),
                format!("ab{c}"),
                format!("a{c}b"),
            ]);
        }
        for n in [
            min.max(1) - 1,
            min.max(1),
            max.unwrap_or(300),
            max.unwrap_or(300) + 1,
        ] {
            texts.extend(["a".repeat(n), "é".repeat(n), "7".repeat(n)]);
        }
        if schema["format"] != "date-time" {
            out.extend(texts.iter().map(|s| (json!(s), fits(s))));
        }
    }
    out
}

/// Strings that the document's patterns should tell apart.
const SAMPLES: &[&str] = &[
    "alice",
    "nightly export",
    "données",
    "東京",
    "a\u{301}",
    "7d",
    "12h",
    "90m",
    "3600s",
    "0d",
    "07d",
    "+7d",
    "7D",
    "7",
    "d",
    "999999999999d",
    "9999999999999d",
    "1:tok_a",
    "123:",
    ":1",
    "1",
    "1234567890123456789",
    "12345678901234567890",
    "-1",
    "1.5",
];

/// Characters at the edges of what names, owners and credentials may hold.
const EDGE_CHARS: &[char] = &[
    ' ',
    '\t',
    '\n',
    '\u{0}',
    '\u{1f}',
    '\u{7f}',
    '\u{85}',
    '\u{a0}',
    '\u{ad}',
    '\u{34f}',
    '\u{1680}',
    '\u{200a}',
    '\u{200b}',
    '\u{200d}',
    '\u{2028}',
    '\u{202e}',
    '\u{3000}',
    '\u{3164}',
    '\u{e000}',
    '\u{f8ff}',
    '\u{fdd0}',
    '\u{feff}',
    '\u{fffd}',
    '\u{fffe}',
    '\u{1f600}',
    '\u{1fffe}',
    '\u{e0001}',
    '\u{e0041}',
    '\u{f0000}',
    '\u{10ffff}',
];

/// How the server answered a probe: refused for this field (400 naming it), or not.
fn refused(status: u16, v: &Value, field: &str) -> bool {
    status == 400 && (v["field"] == field || v["error"] == "invalid_body")
}

/// A body operation and what to send it to.
struct BodyCall {
    method: &'static str,
    path: String,
    schema: &'static str,
    cred: Option<&'static str>,
}

/// The application on a fresh database of the shared throwaway PostgreSQL cluster.
fn on_postgres() -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 100, tokengate::policy::Policy::default());
    config.database =
        tokengate::app::Database::Postgres(tokengate_pgtest::shared().fresh_database());
    spawn(config, dir)
}

/// Every property of every request body, at its edges.
#[test]
fn request_bodies_are_refused_exactly_where_the_document_says() {
    bodies_agree(&spawn_app(100));
}

/// The same on PostgreSQL, which takes less than SQLite (no U+0000 in text, say): what the
/// document allows must not be a 500 there either.
#[test]
fn request_bodies_are_refused_exactly_where_the_document_says_on_postgres() {
    bodies_agree(&on_postgres());
}

fn bodies_agree(app: &TestApp) {
    let (_, doc) = app.call("GET", "/v1/openapi.json", None, None);
    let limited = app.create(r#"{"name":"limited","max_rps":5}"#)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = app.call(
        "POST",
        "/v1/scopes",
        Some(ADMIN),
        Some(r#"{"name":"probed","rules":[{"path":"/"}]}"#),
    );
    assert_eq!(s, 201, "{v}");
    let calls = [
        BodyCall {
            method: "POST",
            path: "/v1/tokens".into(),
            schema: "CreateBody",
            cred: Some(ADMIN),
        },
        BodyCall {
            method: "PATCH",
            path: format!("/v1/tokens/{limited}"),
            schema: "PatchBody",
            cred: Some(ADMIN),
        },
        BodyCall {
            method: "POST",
            path: format!("/v1/tokens/{limited}/rotate"),
            schema: "RotateBody",
            cred: Some(ADMIN),
        },
        BodyCall {
            method: "POST",
            path: "/v1/scopes".into(),
            schema: "CreateScopeBody",
            cred: Some(ADMIN),
        },
        BodyCall {
            method: "PATCH",
            path: "/v1/scopes/probed".into(),
            schema: "PatchScopeBody",
            cred: Some(ADMIN),
        },
        BodyCall {
            method: "POST",
            path: "/v1/session".into(),
            schema: "SignIn",
            cred: None,
        },
        BodyCall {
            method: "POST",
            path: "/v1/usage".into(),
            schema: "UsageReport",
            cred: Some(SYNC),
        },
        BodyCall {
            method: "POST",
            path: "/v1/fleet".into(),
            schema: "FleetReport",
            cred: Some(SYNC),
        },
    ];
    let (mut tried, mut checked_rules) = (0, 0);
    for call in &calls {
        let schema = &doc["components"]["schemas"][call.schema];
        let example = schema["examples"][0].clone();
        assert!(example.is_object(), "{}: no example", call.schema);
        let send =
            |body: &Value| app.call(call.method, &call.path, call.cred, Some(&body.to_string()));
        let (s, v) = send(&example);
        assert!(
            s < 300 || s == 401,
            "{}: its example is refused: {s} {v}",
            call.schema
        );
        // Fields that exclude each other (`not` with two required fields): a probe of one
        // leaves the other out.
        let exclusive: Vec<Vec<String>> = schema["allOf"]
            .as_array()
            .into_iter()
            .flatten()
            .chain([schema])
            .filter_map(|s| s["not"]["required"].as_array())
            .map(|r| r.iter().map(|f| f.as_str().unwrap().to_string()).collect())
            .collect();
        let mut fields = vec![];
        walk(&doc, schema, "", &mut fields);
        for (path, field_schema) in fields {
            let field = path.rsplit('/').next().unwrap().to_string();
            for (value, admitted) in probes(&field_schema, false) {
                let mut body = example.clone();
                for pair in &exclusive {
                    if pair.contains(&field) {
                        for other in pair.iter().filter(|o| **o != field) {
                            body.as_object_mut().unwrap().remove(other);
                        }
                    }
                }
                let (parent, _) = path.rsplit_once('/').unwrap();
                body.pointer_mut(parent)
                    .and_then(Value::as_object_mut)
                    .unwrap()
                    .insert(field.clone(), value.clone());
                let (s, v) = send(&body);
                let named = v["field"].as_str().unwrap_or_default();
                let refused_here =
                    s == 400 && (named.ends_with(&field) || v["error"] == "invalid_body");
                assert_eq!(
                    !refused_here,
                    admitted,
                    "{} {}: {field} = {value}: the document {} it, the server answered {s} {v}",
                    call.method,
                    call.schema,
                    if admitted { "allows" } else { "forbids" },
                );
                assert_ne!(s, 500, "{body}: {v}");
                tried += 1;
            }
        }
        // Rules across fields: `not` (these together are refused) and `if`/`then` (with
        // these, those are required); each is broken from the example, and refused.
        let admitted_value = |field: &str, kind: &Value| -> Value {
            if kind == "null" {
                return Value::Null;
            }
            let own = resolve(&doc, &schema["properties"][field]);
            probes(own, false)
                .into_iter()
                .find(|(v, ok)| {
                    *ok && !v.is_null()
                        && types(&json!({"type": kind}))
                            .iter()
                            .any(|t| type_of(v) == *t)
                })
                .map(|(v, _)| v)
                .unwrap_or_else(|| panic!("{field}: no {kind} value admitted"))
        };
        for rule in schema["allOf"]
            .as_array()
            .into_iter()
            .flatten()
            .chain([schema])
        {
            if let Some(not) = rule["not"].as_object() {
                let mut body = example.clone();
                for (f, s) in not["properties"].as_object().unwrap() {
                    body[f] = admitted_value(f, &s["type"]);
                }
                let (s, v) = send(&body);
                assert!(s == 400, "{}: {body} breaks `not`: {s} {v}", call.schema);
                checked_rules += 1;
            }
            if let (Some(cond), Some(then)) = (rule["if"].as_object(), rule["then"].as_object()) {
                let mut body = example.clone();
                for (f, s) in cond["properties"].as_object().unwrap() {
                    body[f] = s
                        .get("const")
                        .cloned()
                        .unwrap_or_else(|| admitted_value(f, &s["type"]));
                }
                for f in then["required"].as_array().unwrap() {
                    body.as_object_mut().unwrap().remove(f.as_str().unwrap());
                }
                let (s, v) = send(&body);
                assert!(
                    s == 400,
                    "{}: {body} breaks `if`/`then`: {s} {v}",
                    call.schema
                );
                checked_rules += 1;
            }
        }
        // Whole-body rules: required fields, unknown fields, at least one field.
        let required: Vec<&str> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for r in &required {
            let mut body = example.clone();
            body.as_object_mut().unwrap().remove(*r);
            let (s, v) = send(&body);
            assert!(refused(s, &v, r), "{}: without {r}: {s} {v}", call.schema);
        }
        if schema["additionalProperties"] == false {
            let mut body = example.clone();
            body["colour"] = json!("red");
            let (s, v) = send(&body);
            assert!(
                refused(s, &v, "colour"),
                "{}: an unknown field: {s} {v}",
                call.schema
            );
        }
        if schema["minProperties"] == 1 {
            let (s, v) = send(&json!({}));
            assert!(refused(s, &v, ""), "{}: no field: {s} {v}", call.schema);
        }
    }
    assert_eq!(checked_rules, 4, "the rules across fields");
    println!(
        "{tried} body probes and {checked_rules} rules across fields agreed with the document"
    );
}

/// The properties under `schema` (objects, and the first item of arrays), as JSON pointers
/// into a body shaped like the example.
fn walk(doc: &Value, schema: &Value, at: &str, out: &mut Vec<(String, Value)>) {
    let schema = resolve(doc, schema);
    if let Some(props) = schema["properties"].as_object() {
        for (name, s) in props {
            let s = resolve(doc, s);
            let path = format!("{at}/{name}");
            if s["type"] == "array" {
                walk(doc, &s["items"], &format!("{path}/0"), out);
            } else {
                out.push((path, s.clone()));
            }
        }
    }
}

/// Every query parameter of every operation that has any, at its edges.
#[test]
fn query_parameters_are_refused_exactly_where_the_document_says() {
    queries_agree(&spawn_app(100));
}

#[test]
fn query_parameters_are_refused_exactly_where_the_document_says_on_postgres() {
    queries_agree(&on_postgres());
}

fn queries_agree(app: &TestApp) {
    let (_, doc) = app.call("GET", "/v1/openapi.json", None, None);
    let mut tried = 0;
    for (path, cred) in [
        ("/v1/tokens", ADMIN),
        ("/v1/audit", ADMIN),
        ("/v1/sync", SYNC),
    ] {
        let params = doc["paths"][path]["get"]["parameters"].as_array().unwrap();
        for p in params.iter().filter(|p| p["in"] == "query") {
            let name = p["name"].as_str().unwrap();
            for (value, admitted) in probes(&p["schema"], true) {
                let text = match &value {
                    // A query has no null: an absent parameter is what null would mean.
                    Value::Null => continue,
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                let q = format!("{name}={}", encode(&text));
                // A sync poll is answered at once: without a store id it is a snapshot.
                let (s, v) = app.call("GET", &format!("{path}?{q}"), Some(cred), None);
                assert_eq!(
                    s == 200,
                    admitted,
                    "GET {path}?{q}: the document {} it, the server answered {s} {v}",
                    if admitted { "allows" } else { "forbids" },
                );
                if !admitted {
                    assert_eq!(v["field"], name, "{q}: {v}");
                }
                tried += 1;
            }
        }
    }
    // A path id is any text: one no token has (U+0000 included, which PostgreSQL cannot
    // take) is a 404.
    for (method, path) in [
        ("GET", "/v1/tokens/%00"),
        ("POST", "/v1/tokens/tok_a%00b/suspend"),
        ("DELETE", "/v1/tokens/%00%00"),
    ] {
        let (s, v) = app.call(method, path, Some(ADMIN), None);
        assert_eq!(
            (s, v["error"].as_str()),
            (404, Some("not_found")),
            "{method} {path}: {v}"
        );
    }
    println!("{tried} query probes agreed with the document");
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Security schemes, and the headers that present them.
type Presented<'a> = (&'a [&'a str], Vec<(&'a str, &'a str)>);

/// Each credential on each operation: a credential passes exactly where the operation's
/// `security` lists it (the admin bearer, the sync bearer, the console session with its
/// CSRF token); with none, every secured operation is a 401.
#[test]
fn each_operation_takes_exactly_the_credentials_it_documents() {
    let app = spawn_app(100);
    let (_, doc) = app.call("GET", "/v1/openapi.json", None, None);
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert_eq!(
        schemes.keys().map(String::as_str).collect::<Vec<_>>(),
        ["admin", "csrf", "session", "sync"]
    );
    let id = app.create(r#"{"name":"probe","max_rps":5}"#)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let admin = format!("Bearer {ADMIN}");
    let sync = format!("Bearer {SYNC}");
    let mut checked = vec![];
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let method = method.to_uppercase();
            let url = path.replace("{id}", &id);
            let requirements: Vec<Vec<&str>> = op["security"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| r.as_object().unwrap().keys().map(String::as_str).collect())
                .collect();
            let body = if method == "POST" && path == "/v1/session" {
                // The credential travels in the body here; only the right one signs in.
                Some(json!({ "credential": ADMIN }).to_string())
            } else {
                op["requestBody"]["content"]["application/json"]["schema"]
                    .get("$ref")
                    .map(|s| resolve(&doc, s)["examples"][0].to_string())
            };
            // A fresh session each time: a sign-out ends the one it is given.
            let session = app.sign_in(ADMIN);
            let credentials: [Presented; 5] = [
                (&[], vec![]),
                (&["admin"], vec![("authorization", admin.as_str())]),
                (&["sync"], vec![("authorization", sync.as_str())]),
                (&["session"], vec![("cookie", session.cookie.as_str())]),
                (
                    &["session", "csrf"],
                    vec![
                        ("cookie", session.cookie.as_str()),
                        ("x-csrf-token", session.csrf.as_str()),
                    ],
                ),
            ];
            for (schemes, headers) in credentials {
                let documented = requirements.is_empty()
                    || requirements
                        .iter()
                        .any(|r| r.iter().all(|s| schemes.contains(s)));
                // A session's change without its CSRF token is a 403: refused too.
                let r = app.request(&method, &url, &headers, body.as_deref());
                let passed = !matches!(r.status, 401 | 403);
                assert_eq!(
                    passed, documented,
                    "{method} {path} with {schemes:?}: documented {requirements:?}, answered {} {}",
                    r.status, r.text
                );
                checked.push(format!("{method} {path} {schemes:?}"));
            }
        }
    }
    assert!(checked.len() >= 5 * 17, "{}", checked.len());
}

/// The operator's expiry policy is part of the creation body's schema, read from the
/// configuration: what it says there (a kind that must expire, a longest lifetime) is what
/// the server holds to, and with no policy there is no such rule.
#[test]
fn the_expiry_policy_is_in_the_document_as_configured() {
    let (_, plain) = spawn_app(100).call("GET", "/v1/openapi.json", None, None);
    let rules = plain["components"]["schemas"]["CreateBody"]["allOf"]
        .as_array()
        .unwrap()
        .len();
    let policy = tokengate::policy::Policy {
        user: tokengate::policy::KindPolicy {
            max_lifetime: Some(90 * 86_400),
            require_expiry: false,
        },
        service: tokengate::policy::KindPolicy {
            max_lifetime: None,
            require_expiry: true,
        },
    };
    let app = spawn_app_with(100, policy);
    let (_, doc) = app.call("GET", "/v1/openapi.json", None, None);
    let all = doc["components"]["schemas"]["CreateBody"]["allOf"]
        .as_array()
        .unwrap();
    assert_eq!(all.len(), rules + 1, "one rule more than without a policy");
    let rule = all.last().unwrap();
    assert_eq!(rule["if"]["properties"]["kind"]["const"], "service");
    let max = rule["else"]["properties"]["expires_in_seconds"]["maximum"]
        .as_u64()
        .expect("the user kind's longest lifetime");
    assert_eq!(max, 90 * 86_400);
    let must_expire = |kind: &str| !rule[kind]["anyOf"].is_null();
    assert!(must_expire("else") && must_expire("then"));
    let create = |body: Value| app.admin("POST", "/v1/tokens", Some(&body.to_string()));
    let (s, v) = create(json!({"name": "u", "expires_in_seconds": max}));
    assert_eq!(s, 201, "{v}");
    for body in [
        json!({"name": "u", "expires_in_seconds": max + 1}),
        json!({"name": "u"}),
        json!({"name": "s", "kind": "service", "owner": "ops"}),
        json!({"name": "s", "kind": "service", "owner": "ops", "expires_in_seconds": null}),
    ] {
        let (s, v) = create(body.clone());
        assert_eq!(
            (s, v["field"].as_str()),
            (400, Some("expires_in_seconds")),
            "{body}: {v}"
        );
    }
    let (s, v) = create(json!({"name": "s", "kind": "service", "owner": "ops",
        "expires_at": "2099-01-31T12:00:00Z"}));
    assert_eq!(s, 201, "{v}");
}
