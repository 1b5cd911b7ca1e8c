//! gRPC clients get gRPC answers: a real gRPC stack (a tonic client, and a tonic server
//! serving the standard `grpc.health.v1.Health` service as the upstream) through the real
//! Envoy and filter. Each refusal arrives as its documented status with the sentence as
//! its message and the JSON `error` code as `tokengate-error` metadata; an admitted call
//! reaches the upstream with the identity metadata and without the token; a client that
//! retries UNAVAILABLE does not retry a rate-limited call. Clients that are not gRPC,
//! over HTTP/2 or HTTP/1.1, get the JSON answers as before.

use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokengate_e2e::{flavored, http, unknown_token, Flavor, Options, Stack};
use tokio::runtime::Runtime;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::{HealthReporter, HealthService};
use tower::ServiceExt;

const STATE_LOAD: Duration = Duration::from_secs(40);
const PROPAGATION: Duration = Duration::from_secs(10);

/// The tests here run one at a time: the gRPC upstream binds an ephemeral port in this
/// process, which could otherwise take a port another test's stack has just picked (and
/// not yet bound) with `free_ports`.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The gRPC upstream: the health service, with an interceptor that keeps the metadata of
/// every call it receives.
struct Upstream {
    port: u16,
    seen: Arc<Mutex<Vec<MetadataMap>>>,
}

fn start_upstream(rt: &Runtime) -> Upstream {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the gRPC upstream");
    let port = listener.local_addr().expect("local addr").port();
    let health = HealthService::from_health_reporter(HealthReporter::new());
    let service = HealthServer::with_interceptor(health, move |req: Request<()>| {
        record.lock().expect("lock").push(req.metadata().clone());
        Ok(req)
    });
    rt.spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    Upstream { port, seen }
}

/// A stack whose Envoy routes to the gRPC upstream.
fn grpc_stack(rt: &Runtime, control_plane: bool, flavor: Flavor) -> (Stack, Upstream) {
    let mut stack = Stack::start_with(Options {
        control_plane,
        envoy: false,
        flavor,
    });
    let upstream = start_upstream(rt);
    stack.replace_upstream(upstream.port);
    stack.start_envoy();
    (stack, upstream)
}

async fn channel(stack: &Stack) -> Channel {
    Channel::from_shared(format!("http://{}", stack.envoy_addr()))
        .expect("an endpoint")
        .connect()
        .await
        .expect("connect to Envoy over HTTP/2")
}

/// One `Health/Check` call with `metadata`.
async fn check(ch: &Channel, metadata: &[(&'static str, String)]) -> Result<ServingStatus, Status> {
    let mut req = Request::new(HealthCheckRequest {
        service: String::new(),
    });
    for (name, value) in metadata {
        req.metadata_mut()
            .insert(*name, value.parse().expect("a metadata value"));
    }
    let answer = HealthClient::new(ch.clone()).check(req).await?;
    Ok(answer.into_inner().status())
}

/// Waits until a call with `token` is admitted (the upstream speaks only gRPC, so the
/// harness's HTTP/1.1 wait cannot tell).
fn wait_admitted(rt: &Runtime, ch: &Channel, token: &str) {
    let mut last = None;
    let admitted = tokengate_e2e::try_wait_until(STATE_LOAD, || {
        let r = rt.block_on(check(ch, &bearer(token)));
        let ok = r.is_ok();
        last = Some(r);
        ok
    });
    assert!(
        admitted.is_some(),
        "not admitted in {STATE_LOAD:?}: {last:?}"
    );
}

fn bearer(token: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {token}"))]
}

fn meta<'a>(s: &'a Status, name: &str) -> Option<&'a str> {
    s.metadata().get(name).and_then(|v| v.to_str().ok())
}

/// The refusal a client gets: code, message and `tokengate-error`, against what the HTTP
/// answer for the same case says (its `message` and `error`).
fn assert_refusal(s: &Status, code: Code, error: &str, http_answer: &Value) {
    assert_eq!(s.code(), code, "{s:?}");
    assert_eq!(meta(s, "tokengate-error"), Some(error), "{s:?}");
    assert_eq!(
        Some(s.message()),
        http_answer["message"].as_str(),
        "the message is the HTTP answer's sentence: {s:?}"
    );
    assert_eq!(http_answer["error"], error);
}

/// The JSON answer to a plain HTTP/1.1 request with `headers`, for comparison.
fn http_answer(stack: &Stack, headers: &[(&str, &str)]) -> Value {
    stack.call(headers).json()
}

/// Envoy's count of requests on its listener (streams, so every gRPC call and retry).
fn downstream_requests(stack: &Stack) -> u64 {
    stack.envoy_stat("http.ingress_http.downstream_rq_total")
}

/// A client-side gRPC retry policy, as a service config's `retryPolicy` describes one
/// (`maxAttempts`, `retryableStatusCodes`, exponential backoff); tonic has none built in.
struct RetryPolicy {
    max_attempts: u32,
    retryable: &'static [Code],
}

/// Runs `check` under `policy`; returns the last result and the attempts made.
async fn check_with_retries(
    ch: &Channel,
    metadata: &[(&'static str, String)],
    policy: &RetryPolicy,
) -> (Result<ServingStatus, Status>, u32) {
    let mut attempts = 0;
    let mut backoff = Duration::from_millis(20);
    loop {
        attempts += 1;
        let result = check(ch, metadata).await;
        match &result {
            Err(s) if policy.retryable.contains(&s.code()) && attempts < policy.max_attempts => {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            _ => return (result, attempts),
        }
    }
}

const RETRY_UNAVAILABLE: RetryPolicy = RetryPolicy {
    max_attempts: 4,
    retryable: &[Code::Unavailable],
};

flavored!(grpc_calls_are_admitted_with_identity_and_refused_with_grpc_statuses);
fn grpc_calls_are_admitted_with_identity_and_refused_with_grpc_statuses(flavor: Flavor) {
    let _serial = one_at_a_time();
    let rt = runtime();
    let (stack, upstream) = grpc_stack(&rt, true, flavor);
    let (id, good) = stack.create_token(json!({"name": "grpc-client", "owner": "grpc-team"}));
    let ch = rt.block_on(channel(&stack));
    wait_admitted(&rt, &ch, &good);

    // Admitted, in either header: the upstream sees the identity, never the token.
    for metadata in [bearer(&good), vec![("x-api-token", good.clone())]] {
        let before = upstream.seen.lock().expect("lock").len();
        let status = rt.block_on(check(&ch, &metadata));
        assert_eq!(status.ok(), Some(ServingStatus::Serving));
        let seen = upstream.seen.lock().expect("lock");
        assert_eq!(seen.len(), before + 1, "the upstream got the call once");
        let m = &seen[before];
        let get = |name: &str| m.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(get("x-tokengate-token-id"), Some(id.as_str()));
        assert_eq!(get("x-tokengate-token-name"), Some("grpc-client"));
        assert_eq!(get("x-tokengate-token-owner"), Some("grpc-team"));
        assert_eq!(get("x-tokengate-token-kind"), Some("user"));
        assert_eq!(get("authorization"), None);
        assert_eq!(get("x-api-token"), None);
        let all = format!("{:?}", m.clone().into_headers());
        assert!(
            !all.contains(&good),
            "the token reached the upstream: {all}"
        );
    }

    // No token, a malformed one, an unknown one: UNAUTHENTICATED.
    let s = rt.block_on(check(&ch, &[])).expect_err("no token");
    assert_refusal(
        &s,
        Code::Unauthenticated,
        "missing_token",
        &http_answer(&stack, &[]),
    );
    assert_eq!(meta(&s, "www-authenticate"), Some("Bearer"));
    let s = rt
        .block_on(check(&ch, &bearer("tg_garbage")))
        .expect_err("garbage");
    let invalid = http_answer(&stack, &[("X-API-Token", "tg_garbage")]);
    assert_refusal(&s, Code::Unauthenticated, "invalid_token", &invalid);
    let s = rt
        .block_on(check(&ch, &bearer(&unknown_token())))
        .expect_err("unknown");
    assert_refusal(&s, Code::Unauthenticated, "invalid_token", &invalid);

    // Expired: UNAUTHENTICATED.
    let (_, short) = stack.create_token(json!({"name": "grpc-short", "expires_in_seconds": 1}));
    // Unknown (also a 401) until it is synced, expired a second later.
    tokengate_e2e::wait_until(STATE_LOAD, "the token refused as expired", || {
        stack.call_with_token(&short).error_code().as_deref() == Some("token_expired")
    });
    let s = rt
        .block_on(check(&ch, &bearer(&short)))
        .expect_err("expired");
    let expired = http_answer(&stack, &[("X-API-Token", &short)]);
    assert_refusal(&s, Code::Unauthenticated, "token_expired", &expired);

    // Suspended: PERMISSION_DENIED.
    let (paused, paused_secret) = stack.create_token(json!({"name": "grpc-paused"}));
    wait_admitted(&rt, &ch, &paused_secret);
    stack.token_action(&paused, "suspend");
    stack.wait_for_status(&paused_secret, 403, PROPAGATION);
    let s = rt
        .block_on(check(&ch, &bearer(&paused_secret)))
        .expect_err("suspended");
    let suspended = http_answer(&stack, &[("X-API-Token", &paused_secret)]);
    assert_refusal(&s, Code::PermissionDenied, "token_suspended", &suspended);

    // Over maxRPS: RESOURCE_EXHAUSTED with Retry-After, and a client whose retry policy
    // covers UNAVAILABLE makes one attempt only. One call a second is allowed, so the calls
    // go until one is refused; every call is counted by Envoy as it arrives.
    let (_, limited) = stack.create_token(json!({"name": "grpc-limited", "max_rps": 1}));
    wait_admitted(&rt, &ch, &limited);
    let mut refused = None;
    for _ in 0..200 {
        let before = downstream_requests(&stack);
        let (result, attempts) = rt.block_on(check_with_retries(
            &ch,
            &bearer(&limited),
            &RETRY_UNAVAILABLE,
        ));
        match result {
            Ok(status) => assert_eq!(status, ServingStatus::Serving),
            Err(s) => {
                refused = Some((s, attempts, downstream_requests(&stack) - before));
                break;
            }
        }
    }
    let (s, attempts, requests) = refused.expect("a refusal within 200 calls at 1 request/s");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(meta(&s, "tokengate-error"), Some("rate_limited"));
    let retry_after: u64 = meta(&s, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retry-after: {s:?}"));
    assert!(retry_after >= 1, "{s:?}");
    assert!(meta(&s, "ratelimit-policy").is_some(), "{s:?}");
    assert!(s.message().starts_with("Too many requests"), "{s:?}");
    assert_eq!(attempts, 1, "the client retried a rate-limited call");
    assert_eq!(requests, 1, "Envoy saw {requests} requests for one call");
}

flavored!(grpc_calls_before_the_token_state_loads_are_unavailable_and_retried);
fn grpc_calls_before_the_token_state_loads_are_unavailable_and_retried(flavor: Flavor) {
    let _serial = one_at_a_time();
    // No control plane: the filter has no token state, so it cannot judge any token.
    let rt = runtime();
    let (stack, upstream) = grpc_stack(&rt, false, flavor);
    let ch = rt.block_on(channel(&stack));
    let token = unknown_token();
    let s = rt
        .block_on(check(&ch, &bearer(&token)))
        .expect_err("no state");
    let http_503 = stack.call(&[("X-API-Token", &token)]);
    assert_eq!(http_503.status, 503);
    assert_refusal(
        &s,
        Code::Unavailable,
        "token_state_unavailable",
        &http_503.json(),
    );
    assert_eq!(meta(&s, "retry-after"), Some("1"));

    // UNAVAILABLE is what the retry policy is for: the client tries every attempt it has.
    let before = downstream_requests(&stack);
    let (result, attempts) =
        rt.block_on(check_with_retries(&ch, &bearer(&token), &RETRY_UNAVAILABLE));
    assert_eq!(result.map_err(|s| s.code()), Err(Code::Unavailable));
    assert_eq!(attempts, RETRY_UNAVAILABLE.max_attempts);
    assert_eq!(
        downstream_requests(&stack) - before,
        u64::from(RETRY_UNAVAILABLE.max_attempts)
    );
    assert!(
        upstream.seen.lock().expect("lock").is_empty(),
        "a call reached the upstream"
    );
}

/// One request over HTTP/2 through Envoy, as a client that is not gRPC sends it.
async fn h2_request(
    ch: &Channel,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let mut req = tonic::codegen::http::Request::builder()
        .method("GET")
        .uri(format!("http://tokengate{path}"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req
        .body(tonic::body::Body::empty())
        .expect("an HTTP/2 request");
    let response = ch.clone().oneshot(req).await.expect("an HTTP/2 answer");
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

flavored!(clients_that_are_not_grpc_get_the_json_answers_over_http2_and_http1);
fn clients_that_are_not_grpc_get_the_json_answers_over_http2_and_http1(flavor: Flavor) {
    let _serial = one_at_a_time();
    let rt = runtime();
    // The shipped configuration with the demo upstream, which speaks HTTP/2 as well.
    let stack = Stack::start_flavor(flavor);
    let (id, good) = stack.create_token(json!({"name": "h2-client"}));
    stack.wait_for_status(&good, 200, STATE_LOAD);
    let ch = rt.block_on(channel(&stack));
    for content_type in [
        None,
        Some("application/json"),
        Some("application/grpc-web+proto"),
    ] {
        let mut headers = vec![];
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        // HTTP/2, refused: the JSON answer, no gRPC status.
        let (status, h, body) = rt.block_on(h2_request(&ch, "/hello", &headers));
        assert_eq!(status, 401, "{content_type:?}: {body}");
        assert!(
            !h.iter().any(|(n, _)| n == "grpc-status"),
            "{content_type:?}: {h:?}"
        );
        let json: Value = serde_json::from_str(&body).expect("a JSON body");
        assert_eq!(json["error"], "missing_token");
        // HTTP/1.1, refused: the same.
        let r = http(stack.envoy_addr(), "GET", "/hello", &headers, None).expect("HTTP/1.1");
        assert_eq!(
            (r.status, r.error_code().as_deref()),
            (401, Some("missing_token"))
        );
        assert_eq!(r.header("grpc-status"), None);
        // HTTP/2, admitted: the demo upstream answers over HTTP/2 with the identity.
        headers.push(("x-api-token", &good));
        let (status, _, body) = rt.block_on(h2_request(&ch, "/hello", &headers));
        assert_eq!(status, 200, "{content_type:?}: {body}");
        let json: Value = serde_json::from_str(&body).expect("the demo upstream's echo");
        assert_eq!(json["identity"]["token_id"], id.as_str());
        assert!(!body.contains(&good));
    }
}
