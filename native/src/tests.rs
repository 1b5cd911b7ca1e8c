//! The module through its real event hooks, against the fake Envoy of `abi::fake_envoy`.

use crate::abi::fake_envoy::{allocations_during, logs, FakeFilter, Loaded};
use std::time::Instant;
use tokengate_filter::authorize::hash_hex;
use tokengate_wire::{token, Kind, Rule, SyncRecord, SyncResponse, SyncScope, SyncStatus};

const CONFIG: &str = r#"{"control_plane_cluster": "tokengate_control_plane",
    "control_plane_authority": "tokengate", "sync_token": "s3cret", "proxy_id": "proxy-7"}"#;

fn secret(c: char) -> String {
    token::compose(&c.to_string().repeat(32)).unwrap()
}

fn record(secret: &str, id: &str, max_rps: Option<u32>) -> SyncRecord {
    SyncRecord {
        hash: hash_hex(secret.as_bytes()),
        id: id.into(),
        name: format!("{id} name"),
        owner: "team-a".into(),
        kind: Kind::Service,
        status: SyncStatus::Active,
        max_rps,
        burst: max_rps.map(|_| 1),
        limit_scope: Default::default(),
        expires_at: None,
        scopes: None,
        quota: None,
        version: 1,
    }
}

/// A configuration loaded with `records` through a real poll and answer.
fn loaded(records: Vec<SyncRecord>) -> Loaded {
    loaded_with_scopes(records, None)
}

fn scope(name: &str, methods: Option<&[&str]>, path: &str) -> SyncScope {
    SyncScope {
        name: name.into(),
        rules: vec![Rule {
            methods: methods.map(|ms| ms.iter().map(|m| m.to_string()).collect()),
            path: path.into(),
        }],
        version: 1,
    }
}

fn loaded_with_scopes(records: Vec<SyncRecord>, scopes: Option<Vec<SyncScope>>) -> Loaded {
    let l = Loaded::new(CONFIG).unwrap();
    l.tick();
    let poll = l.last_callout().unwrap();
    let body = serde_json::to_vec(&SyncResponse {
        store_id: "store-1".into(),
        version: 7,
        snapshot: true,
        token_count: records.len() as u64,
        proxies: None,
        changes: records,
        next_cursor: None,
        scopes_version: scopes.as_ref().map(|_| 3),
        scopes,
    })
    .unwrap();
    l.answer(poll.id, Some("200"), &body);
    l
}

fn sent_status(f: &FakeFilter) -> Option<(u32, String)> {
    let sent = f.sent.borrow().clone()?;
    let json: serde_json::Value = serde_json::from_str(&sent.body).unwrap();
    Some((sent.status, json["error"].as_str().unwrap().to_string()))
}

#[test]
fn the_leader_polls_the_control_plane_like_the_wasm_filter() {
    let l = Loaded::new(CONFIG).unwrap();
    l.tick();
    let poll = l.last_callout().unwrap();
    assert_eq!(poll.cluster, "tokengate_control_plane");
    assert_eq!(poll.timeout_ms, 25_000);
    let header = |n: &str| {
        poll.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header(":method"), Some("GET"));
    assert_eq!(
        header(":path"),
        Some("/v1/sync?since=0&wait=20&proxy_id=proxy-7")
    );
    assert_eq!(header(":authority"), Some("tokengate"));
    assert_eq!(header("authorization"), Some("Bearer s3cret"));
    // While the poll is held, ticks send nothing more.
    l.tick();
    assert_eq!(l.envoy.callouts.borrow().len(), 1);
    // No answer at all (a reset): counted as a failure.
    l.answer(poll.id, None, b"");
    assert_eq!(l.envoy.counter("tokengate.sync.failure"), 1);
}

#[test]
fn requests_are_judged_and_rewritten_as_the_design_says() {
    let (a, b) = (secret('a'), secret('b'));
    let l = loaded(vec![
        record(&a, "tok_a", None),
        record(&b, "tok_b", Some(1)),
    ]);
    assert_eq!(l.envoy.gauge("tokengate.state_version"), 7);
    assert_eq!(l.envoy.gauge("tokengate.tokens"), 2);
    assert_eq!(l.envoy.counter("tokengate.sync.success"), 1);
    // The next poll went at once, from the loaded version.
    assert!(l.last_callout().unwrap().headers.contains(&(
        ":path".into(),
        "/v1/sync?since=7&store_id=store-1&wait=20&proxy_id=proxy-7".into()
    )));

    let f = FakeFilter::with(&[
        ("x-api-token", &a),
        ("x-tokengate-token-id", "tok_SPOOF"),
        ("x-tokengate-token-owner", "root"),
        ("x_tokengate_token_name", "spoofed"),
        ("X-Tokengate-Token_Kind", "spoofed"),
        ("x-tokengate-token-expires", "spoofed"),
        ("x_api_token", &a),
        ("authorization", "Basic dXNlcg=="),
        ("x-other", "kept"),
    ]);
    assert_eq!(l.stream(&f), 0, "continue");
    assert!(f.sent.borrow().is_none());
    let names: Vec<String> = f
        .request
        .borrow()
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "x-other",
            "x-tokengate-token-id",
            "x-tokengate-token-name",
            "x-tokengate-token-owner",
            "x-tokengate-token-kind"
        ],
        "no credential and no spoofed tokengate header in any spelling goes upstream"
    );
    assert_eq!(f.request_header("x-api-token"), Vec::<String>::new());
    assert_eq!(f.request_header("x-tokengate-token-id"), ["tok_a"]);
    assert_eq!(f.request_header("x-tokengate-token-name"), ["tok_a name"]);
    assert_eq!(f.request_header("x-tokengate-token-owner"), ["team-a"]);
    assert_eq!(f.request_header("x-tokengate-token-kind"), ["service"]);

    let bearer = format!("Bearer {a}");
    let f = FakeFilter::with(&[("authorization", &bearer)]);
    assert_eq!(l.stream(&f), 0);
    assert!(f.request_header("authorization").is_empty());

    let f = FakeFilter::with(&[]);
    assert_eq!(l.stream(&f), 1, "stop");
    assert_eq!(sent_status(&f), Some((401, "missing_token".into())));
    let sent = f.sent.borrow().clone().unwrap();
    assert!(sent
        .headers
        .contains(&("www-authenticate".into(), "Bearer".into())));
    assert_eq!(sent.details, "missing_token");

    // The same token header twice: no copy passes for the credential.
    let f = FakeFilter::with(&[("x-api-token", &a), ("x-api-token", &a)]);
    assert_eq!(l.stream(&f), 1);
    assert_eq!(sent_status(&f), Some((401, "invalid_token".into())));

    // One request per second, burst 1: the first passes, then 429 with Retry-After.
    let start = Instant::now();
    let mut admitted = 0u64;
    let refused = loop {
        let f = FakeFilter::with(&[("x-api-token", &b)]);
        if l.stream(&f) == 0 {
            admitted += 1;
            continue;
        }
        break f;
    };
    assert!(
        admitted >= 1 && admitted <= 2 + start.elapsed().as_secs(),
        "{admitted}"
    );
    assert_eq!(sent_status(&refused), Some((429, "rate_limited".into())));
    let sent = refused.sent.borrow().clone().unwrap();
    assert!(sent.headers.contains(&("retry-after".into(), "1".into())));
    assert!(sent
        .headers
        .contains(&("ratelimit-policy".into(), "\"tokengate\";q=1;w=1".into())));

    // The workers' counts reach Envoy's counters on the next tick.
    l.tick();
    assert_eq!(l.envoy.counter("tokengate.allowed"), 2 + admitted);
    assert_eq!(l.envoy.counter("tokengate.denied.missing_token"), 1);
    assert_eq!(l.envoy.counter("tokengate.denied.invalid_token"), 1);
    assert_eq!(l.envoy.counter("tokengate.denied.rate_limited"), 1);
    assert_eq!(l.envoy.counter("tokengate.panics"), 0);
}

#[test]
fn grpc_clients_get_a_trailers_only_grpc_answer() {
    let a = secret('a');
    let mut slow = record(&a, "tok_a", None);
    slow.max_rps = Some(1);
    slow.burst = Some(1);
    let l = loaded(vec![slow]);
    let grpc = |extra: &[(&str, &str)]| {
        let mut h = vec![("content-type", "application/grpc")];
        h.extend_from_slice(extra);
        FakeFilter::with(&h)
    };

    let f = grpc(&[]);
    assert_eq!(l.stream(&f), 1, "stop");
    let sent = f.sent.borrow().clone().unwrap();
    // Not Envoy's local reply: that would choose the grpc-status itself.
    assert!(!sent.local_reply);
    assert_eq!((sent.status, sent.body.as_str()), (200, ""));
    assert_eq!(sent.details, "end_stream=true");
    let has = |n: &str, v: &str| sent.headers.contains(&(n.into(), v.into()));
    assert!(
        has("content-type", "application/grpc"),
        "{:?}",
        sent.headers
    );
    assert!(has("grpc-status", "16"), "{:?}", sent.headers);
    assert!(
        has("tokengate-error", "missing_token"),
        "{:?}",
        sent.headers
    );
    assert!(has("www-authenticate", "Bearer"), "{:?}", sent.headers);
    assert!(
        sent.headers
            .iter()
            .any(|(n, v)| n == "grpc-message" && v.starts_with("An access token is required")),
        "{:?}",
        sent.headers
    );
    assert_eq!(
        sent.headers
            .iter()
            .filter(|(n, _)| n == "content-type")
            .count(),
        1,
        "the JSON refusal's content-type stays out"
    );

    // Rate limited: RESOURCE_EXHAUSTED, which gRPC clients do not retry on their own.
    let refused = loop {
        let f = grpc(&[("x-api-token", &a)]);
        if l.stream(&f) == 1 {
            break f;
        }
    };
    let sent = refused.sent.borrow().clone().unwrap();
    assert!(sent.headers.contains(&("grpc-status".into(), "8".into())));
    assert!(sent.headers.contains(&("retry-after".into(), "1".into())));

    // gRPC-Web is answered as HTTP.
    let f = FakeFilter::with(&[("content-type", "application/grpc-web")]);
    assert_eq!(l.stream(&f), 1);
    assert_eq!(sent_status(&f), Some((401, "missing_token".into())));
    assert!(f.sent.borrow().as_ref().unwrap().local_reply);
}

#[test]
fn an_expiry_inside_the_warning_window_is_announced() {
    let (a, b) = (secret('a'), secret('b'));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut soon = record(&a, "tok_a", None);
    soon.expires_at = Some(now + 3_600);
    let mut later = record(&b, "tok_b", None);
    later.expires_at = Some(now + 30 * 86_400);
    let l = loaded(vec![soon, later]);
    let f = FakeFilter::with(&[("x-api-token", &a)]);
    assert_eq!(l.stream(&f), 0);
    let announced = f.response_header("x-tokengate-token-expires").unwrap();
    assert_eq!(announced.len(), "2026-12-01T08:00:00Z".len());
    assert!(announced.ends_with('Z'), "{announced}");
    let f = FakeFilter::with(&[("x-api-token", &b)]);
    assert_eq!(l.stream(&f), 0);
    assert_eq!(f.response_header("x-tokengate-token-expires"), None);
}

#[test]
fn before_the_first_snapshot_every_request_is_refused_with_503() {
    let l = Loaded::new(CONFIG).unwrap();
    let f = FakeFilter::with(&[("x-api-token", &secret('a'))]);
    assert_eq!(l.stream(&f), 1);
    assert_eq!(
        sent_status(&f),
        Some((503, "token_state_unavailable".into()))
    );
}

#[test]
fn usage_is_gathered_from_the_workers_and_reported_by_the_leader() {
    let a = secret('a');
    let l = loaded(vec![record(&a, "tok_a", None)]);
    for worker in [0, 1, 1] {
        let mut f = FakeFilter::with(&[("x-api-token", &a)]);
        f.worker = worker;
        assert_eq!(l.stream(&f), 0);
    }
    l.tick();
    let report = l
        .envoy
        .callouts
        .borrow()
        .iter()
        .find(|c| c.headers.contains(&(":method".into(), "POST".into())))
        .cloned()
        .unwrap();
    assert!(report
        .headers
        .contains(&(":path".into(), "/v1/usage".into())));
    let body: serde_json::Value = serde_json::from_slice(&report.body).unwrap();
    assert_eq!(body["proxy_id"], "proxy-7");
    assert_eq!(body["entries"][0]["id"], "tok_a");
    assert_eq!(body["entries"][0]["allowed"], 3);
    l.answer(report.id, Some("204"), b"");
    assert_eq!(l.envoy.counter("tokengate.usage.reports"), 1);
}

#[test]
fn a_bad_configuration_is_refused_naming_the_field() {
    assert!(Loaded::new(
        r#"{"control_plane_cluster": "cp", "sync_token": "x", "tick_ms": "fast"}"#
    )
    .is_none());
    assert!(
        logs()
            .iter()
            .any(|(_, line)| line.contains("field `tick_ms`")),
        "{:?}",
        logs()
    );
}

#[test]
fn the_allowed_path_allocates_nothing() {
    let (a, c) = (secret('a'), secret('c'));
    let l = loaded_with_scopes(
        vec![
            record(&a, "tok_a", None),
            // Limited, far above what this test asks: every request writes the rate state.
            record(&c, "tok_c", Some(1_000_000)),
            scoped(&secret('s'), "tok_s", &["orders:read", "orders:write"]),
        ],
        Some(orders_scopes()),
    );
    let bearer = format!("Bearer {c}");
    let s = secret('s');
    let requests = |n: usize| -> Vec<FakeFilter> {
        (0..n)
            .flat_map(|_| {
                [
                    FakeFilter::with(&[("x-api-token", &a), ("x-tokengate-token-id", "spoof")]),
                    FakeFilter::with(&[
                        ("authorization", &bearer),
                        ("x_tokengate_token_owner", "spoof"),
                    ]),
                    // Scoped: matched against the compiled set, its scopes sent upstream.
                    FakeFilter::with(&[
                        ("x-api-token", &s),
                        (":method", "GET"),
                        (":path", "/orders/42?page=2"),
                        ("x-tokengate-scopes", "spoof"),
                    ]),
                ]
            })
            .collect()
    };
    // Warm up: the first streams make the pooled stream objects and the usage entries. Then
    // a tick: the leader drains the usage (the entries stay, zeroed) and flushes the counts,
    // so the measured requests are a worker's steady state between two ticks.
    for f in requests(8) {
        assert_eq!(l.stream(&f), 0);
    }
    let batch = requests(1_000);
    l.tick();
    let allocations = allocations_during(|| {
        for f in &batch {
            l.stream(f);
        }
    });
    assert!(
        batch.iter().all(|f| f.sent.borrow().is_none()),
        "all were allowed"
    );
    assert!(batch.iter().all(|f| {
        f.request_header("x-tokengate-token-id") != ["spoof"]
            && f.request_header("x_tokengate_token_owner").is_empty()
            && f.request_header("x-tokengate-scopes") != ["spoof"]
    }));
    assert_eq!(allocations, 0, "heap allocations on the allowed path");
    // Whereas a refusal builds its answer.
    let refused = FakeFilter::with(&[]);
    assert!(
        allocations_during(|| {
            l.stream(&refused);
        }) > 0
    );
}

#[test]
fn a_quota_is_enforced_and_its_state_reported_by_the_leader() {
    let q = secret('q');
    let mut rec = record(&q, "tok_q", None);
    rec.quota = Some(tokengate_wire::Quota {
        limit: 3,
        period: tokengate_wire::Period::Month,
    });
    // No proxy count heard: this proxy alone holds the whole quota.
    let l = loaded(vec![rec]);
    let mut admitted = 0;
    let refused = loop {
        let mut f = FakeFilter::with(&[("x-api-token", &q)]);
        f.worker = admitted % 2;
        if l.stream(&f) == 0 {
            admitted += 1;
            assert!(admitted <= 3, "the quota is 3");
            continue;
        }
        break f;
    };
    assert_eq!(admitted, 3);
    assert_eq!(sent_status(&refused), Some((429, "quota_exceeded".into())));
    let sent = refused.sent.borrow().clone().unwrap();
    let header = |name: &str| {
        sent.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    // The whole quota is spent here: come back when the month ends.
    let retry: u64 = header("retry-after").unwrap().parse().unwrap();
    assert!((1..=31 * 86_400).contains(&retry), "{retry}");
    let policy = header("ratelimit-policy").unwrap();
    assert!(
        policy.starts_with("\"quota\";q=3;w=") && policy.len() > "\"quota\";q=3;w=".len(),
        "{policy}"
    );
    l.tick();
    assert_eq!(l.envoy.counter("tokengate.denied.quota_exceeded"), 1);
    let report = l
        .envoy
        .callouts
        .borrow()
        .iter()
        .find(|c| c.headers.contains(&(":path".into(), "/v1/fleet".into())))
        .cloned()
        .unwrap();
    let body: tokengate_wire::FleetReport = serde_json::from_slice(&report.body).unwrap();
    assert!(body.tokens.is_empty(), "no rate limit: no fleet demand");
    assert_eq!(body.quotas.len(), 1);
    let held = &body.quotas[0];
    assert_eq!(held.hash, hash_hex(q.as_bytes()));
    assert_eq!((held.spent, held.allowed), (3, 3));
}

fn scoped(secret: &str, id: &str, scopes: &[&str]) -> SyncRecord {
    let mut r = record(secret, id, None);
    r.scopes = Some(scopes.iter().map(|s| s.to_string()).collect());
    r
}

fn orders_scopes() -> Vec<SyncScope> {
    vec![
        scope("orders:read", Some(&["GET"]), "/orders/**"),
        scope("orders:write", Some(&["POST"]), "/orders"),
        scope("admin", None, "/admin/**"),
    ]
}

#[test]
fn a_scoped_token_goes_only_where_its_scopes_allow() {
    let (s, u) = (secret('s'), secret('u'));
    let l = loaded_with_scopes(
        vec![
            scoped(&s, "tok_s", &["orders:read"]),
            record(&u, "tok_u", None),
        ],
        Some(orders_scopes()),
    );
    let req = |t: &str, method: &str, path: &str| {
        FakeFilter::with(&[
            ("x-api-token", t),
            (":method", method),
            (":path", path),
            ("x-tokengate-scopes", "admin"),
        ])
    };
    let f = req(&s, "GET", "/orders/7");
    assert_eq!(l.stream(&f), 0);
    assert_eq!(f.request_header("x-tokengate-scopes"), ["orders:read"]);
    assert_eq!(f.request_header("x-tokengate-token-id"), ["tok_s"]);

    let f = req(&s, "POST", "/orders");
    assert_eq!(l.stream(&f), 1);
    assert_eq!(sent_status(&f), Some((403, "insufficient_scope".into())));
    let sent = f.sent.borrow().clone().unwrap();
    assert!(sent.headers.contains(&(
        "www-authenticate".into(),
        r#"Bearer error="insufficient_scope", scope="orders:write""#.into()
    )));
    assert_eq!(sent.details, "insufficient_scope");
    assert_eq!(f.request_header("x-api-token"), [s.as_str()], "untouched");

    for path in [
        "/orders/../admin/x",
        "//orders",
        "/ORDERS",
        "/orders/%2e%2e/admin",
        "/orders%2Fsecret",
        "/orders;x=1",
        "/orders#frag",
    ] {
        let f = req(&s, "GET", path);
        assert_eq!(l.stream(&f), 1, "{path}");
        assert_eq!(sent_status(&f), Some((403, "insufficient_scope".into())));
    }
    let f = req(&s, "GET", "/admin/x");
    assert_eq!(l.stream(&f), 1);
    let sent = f.sent.borrow().clone().unwrap();
    assert!(sent.headers.contains(&(
        "www-authenticate".into(),
        r#"Bearer error="insufficient_scope", scope="admin""#.into()
    )));
    let f = req(&s, "GET", "/elsewhere");
    assert_eq!(l.stream(&f), 1);
    let sent = f.sent.borrow().clone().unwrap();
    assert!(sent.headers.contains(&(
        "www-authenticate".into(),
        r#"Bearer error="insufficient_scope""#.into()
    )));

    // Unrestricted: anywhere, and no scopes header (the client's copy removed).
    let f = req(&u, "DELETE", "/admin/x");
    assert_eq!(l.stream(&f), 0);
    assert!(f.request_header("x-tokengate-scopes").is_empty());

    // A scope edited: the next answer carries the whole set.
    let poll = l.last_callout().unwrap();
    let body = serde_json::to_vec(&SyncResponse {
        store_id: "store-1".into(),
        version: 8,
        snapshot: false,
        token_count: 2,
        proxies: None,
        changes: vec![],
        next_cursor: None,
        scopes_version: Some(8),
        scopes: Some(vec![scope("orders:read", Some(&["GET"]), "/v2/orders/**")]),
    })
    .unwrap();
    l.answer(poll.id, Some("200"), &body);
    let f = req(&s, "GET", "/orders/7");
    assert_eq!(l.stream(&f), 1);
    let f = req(&s, "GET", "/v2/orders/7");
    assert_eq!(l.stream(&f), 0);

    l.tick();
    assert_eq!(l.envoy.counter("tokengate.denied.insufficient_scope"), 11);
}
