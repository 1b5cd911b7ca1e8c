//! Flags and background jobs as the real binary runs them: expiry warnings delivered as
//! webhooks signed as documented (checked with an HMAC written here, not the crate's), old
//! tokens purged after `--retention` at `--purge-interval` (or never), the expiry policy per
//! kind, and `--console false`. Every expectation comes from the server's own answers
//! (audit times, records) rather than from how fast the test ran.

mod common;

use common::process::{free_port, serve_with, Server};
use common::SYNC;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a background job may take to show its effect: several rounds of a 1 s loop on
/// a busy machine.
const JOBS: Duration = Duration::from_secs(60);

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn unix(v: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap_or_else(|e| panic!("{v}: {e}"))
        .timestamp()
}

fn wait_for<T>(what: &str, timeout: Duration, mut found: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = found() {
            return t;
        }
        assert!(start.elapsed() < timeout, "waited {timeout:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn create(s: &Server, body: &str) -> Value {
    let (status, v) = s.call("POST", "/v1/tokens", Some(body));
    assert_eq!(status, 201, "{body}: {v}");
    v
}

/// The token's audit entries with `action`, oldest first.
fn audit(s: &Server, id: &str, action: &str) -> Vec<Value> {
    let (status, v) = s.call(
        "GET",
        &format!("/v1/audit?token={id}&action={action}"),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let mut entries = v["entries"].as_array().unwrap().clone();
    entries.reverse();
    entries
}

/// The ids in a full sync snapshot (one page is plenty here).
fn snapshot_ids(s: &Server) -> Vec<String> {
    let v: Value = ureq::get(&format!("{}/v1/sync?since=0", s.url))
        .set("authorization", &format!("Bearer {SYNC}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert!(v["next_cursor"].is_null(), "{v}");
    v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

// ---- an HMAC-SHA256 of our own, and a webhook receiver --------------------------------

/// HMAC-SHA256 (RFC 2104) from SHA-256 alone, so that the signature check below does not
/// share code with the control plane's `hmac` crate.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_hmac_used_to_check_signatures_meets_rfc_4231() {
    // Test cases 2 and 6 of RFC 4231: a short key, and a key longer than a block.
    assert_eq!(
        hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    assert_eq!(
        hex(&hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First"
        )),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
}

struct Received {
    request_line: String,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Accepts webhook POSTs on a free port, answers 204 and keeps them.
fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut raw = Vec::new();
            let mut buf = [0u8; 8192];
            let head_end = loop {
                if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                }
            };
            let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
            let mut lines = head.split("\r\n");
            let request_line = lines.next().unwrap_or_default().to_string();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut body = raw[head_end..].to_vec();
            while body.len() < length {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&buf[..n]),
                }
            }
            let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            sink.lock().unwrap().push(Received {
                request_line,
                headers,
                body,
            });
        }
    });
    (url, got)
}

#[test]
fn expiry_warnings_reach_the_webhook_signed_as_documented() {
    let (url, got) = receiver();
    let secret = "webhook-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let s = serve_with(
        dir.path().join("t.db"),
        free_port(),
        &[
            "--webhook-url",
            &url,
            "--webhook-secret",
            secret,
            "--jobs-interval",
            "1s",
        ],
    );
    let before = unix_now();
    let token = create(
        &s,
        r#"{"name":"nightly-export","kind":"service","owner":"data-eng","expires_in_seconds":3600}"#,
    );
    let n = wait_for("a webhook delivery", JOBS, || {
        let n = got.lock().unwrap().len();
        (n > 0).then_some(n)
    });
    let after = unix_now();
    assert_eq!(n, 1, "one warning, one delivery");
    let got = got.lock().unwrap();
    let hook = &got[0];

    assert_eq!(hook.request_line, "POST /hook HTTP/1.1");
    assert_eq!(hook.header("content-type"), Some("application/json"));
    assert_eq!(hook.header("x-tokengate-event"), Some("token.expiring"));
    let body: Value = serde_json::from_slice(&hook.body).expect("a JSON body");
    assert_eq!(
        hook.header("x-tokengate-delivery"),
        body["id"].as_str(),
        "{body}"
    );
    assert!(body["id"].as_str().unwrap().starts_with("evt_"), "{body}");
    assert_eq!(body["type"], "token.expiring");
    let t = &body["data"]["token"];
    for field in ["id", "name", "kind", "owner", "status", "expires_at"] {
        assert_eq!(t[field], token[field], "data.token.{field}: {body}");
    }
    // The tightest of the default lead times (7d, 1d) that the token is inside.
    assert_eq!(body["data"]["warning_lead_seconds"], 86_400, "{body}");
    assert_eq!(
        body["data"]["expires_in_seconds"].as_i64(),
        Some(unix(&token["expires_at"]) - unix(&body["created_at"])),
        "{body}"
    );

    // `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, keyed with the secret.
    let signature = hook.header("x-tokengate-signature").expect("a signature");
    let (t, v1) = signature
        .split_once(',')
        .and_then(|(t, v1)| Some((t.strip_prefix("t=")?, v1.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("signature header {signature:?}"));
    let t: i64 = t.parse().expect("t is unix seconds");
    assert!(
        (before..=after).contains(&t),
        "signed at {t}, outside the test's {before}..={after}"
    );
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&hook.body);
    assert_eq!(v1, hex(&hmac_sha256(secret.as_bytes(), &signed)));

    // Issued by the control plane itself, in the audit trail.
    let warnings = audit(&s, token["id"].as_str().unwrap(), "token.expiry_warning");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["actor"], "system");
}

/// Revokes a new token; its id and the time of its revocation.
fn revoke_new(s: &Server, name: &str) -> (String, i64) {
    let id = create(s, &format!(r#"{{"name":"{name}"}}"#))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = s.call("DELETE", &format!("/v1/tokens/{id}"), None);
    assert_eq!(status, 204);
    let at = unix(&audit(s, &id, "token.revoked")[0]["at"]);
    (id, at)
}

/// Waits for the token's purge; its time.
fn purged(s: &Server, id: &str) -> i64 {
    let entry = wait_for("a purge", JOBS, || audit(s, id, "token.purged").pop());
    assert_eq!(entry["actor"], "system");
    unix(&entry["at"])
}

#[test]
fn revoked_tokens_are_purged_once_older_than_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve_with(
        dir.path().join("t.db"),
        free_port(),
        &[
            "--jobs-interval",
            "1s",
            "--retention",
            "3s",
            "--purge-interval",
            "1s",
        ],
    );
    let (a, revoked) = revoke_new(&s, "a");
    // A tombstone until then (unless the test was too slow to look in time).
    assert!(
        snapshot_ids(&s).contains(&a) || unix_now() >= revoked + 3,
        "purged before its retention"
    );
    let purged_at = purged(&s, &a);
    assert!(
        purged_at - revoked >= 3,
        "purged {} s after its revocation, under the 3 s retention",
        purged_at - revoked
    );
    assert!(
        !snapshot_ids(&s).contains(&a),
        "a purged token is still synced"
    );
    let (status, _) = s.call("GET", &format!("/v1/tokens/{a}"), None);
    assert_eq!(status, 404);
}

#[test]
fn purges_run_at_the_purge_interval() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve_with(
        dir.path().join("t.db"),
        free_port(),
        &[
            "--jobs-interval",
            "1s",
            "--retention",
            "1s",
            "--purge-interval",
            "5s",
        ],
    );
    let (a, _) = revoke_new(&s, "a");
    let purged_a = purged(&s, &a);
    // Revoked right after that purge and old enough a second later, but purged only at
    // the next round, 5 s after the last.
    let (b, revoked_b) = revoke_new(&s, "b");
    let purged_b = purged(&s, &b);
    assert!(purged_b - revoked_b >= 1, "{purged_b} - {revoked_b}");
    assert!(
        purged_b - purged_a >= 5,
        "two purges {} s apart, under the 5 s purge interval",
        purged_b - purged_a
    );
}

#[test]
fn purge_interval_never_keeps_revoked_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve_with(
        dir.path().join("t.db"),
        free_port(),
        &[
            "--jobs-interval",
            "1s",
            "--retention",
            "1s",
            "--purge-interval",
            "never",
        ],
    );
    let (a, revoked) = revoke_new(&s, "a");
    // Once the token is past its retention, a round of the jobs loop (it issues a warning
    // for a token created then) would have purged it, were purging on.
    wait_for("the retention to pass", JOBS, || {
        (unix_now() >= revoked + 2).then_some(())
    });
    let w = create(&s, r#"{"name":"w","expires_in_seconds":3600}"#)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let warned = wait_for("an expiry warning", JOBS, || {
        audit(&s, &w, "token.expiry_warning")
            .first()
            .map(|e| unix(&e["at"]))
    });
    assert!(warned > revoked, "warned at {warned}, revoked at {revoked}");
    assert!(audit(&s, &a, "token.purged").is_empty());
    assert!(snapshot_ids(&s).contains(&a), "the tombstone is gone");
}

#[test]
fn maximum_lifetimes_apply_per_kind() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve_with(
        dir.path().join("t.db"),
        free_port(),
        &["--user-max-lifetime", "1d", "--service-max-lifetime", "7d"],
    );
    let refused = |body: &str, field: &str, says: &str| {
        let (status, v) = s.call("POST", "/v1/tokens", Some(body));
        assert_eq!(
            (status, v["field"].as_str()),
            (400, Some(field)),
            "{body}: {v}"
        );
        assert!(v["message"].as_str().unwrap().contains(says), "{body}: {v}");
    };
    let day = 86_400;
    refused(
        &format!(r#"{{"name":"u","expires_in_seconds":{}}}"#, 2 * day),
        "expires_in_seconds",
        "at most 1d",
    );
    refused(
        r#"{"name":"u"}"#,
        "expires_in_seconds",
        "`never` is not allowed",
    );
    refused(
        &format!(
            r#"{{"name":"s","kind":"service","owner":"ops","expires_in_seconds":{}}}"#,
            8 * day
        ),
        "expires_in_seconds",
        "at most 7d",
    );
    refused(
        r#"{"name":"s","kind":"service","owner":"ops"}"#,
        "expires_in_seconds",
        "`never` is not allowed",
    );
    let user = create(&s, &format!(r#"{{"name":"u","expires_in_seconds":{day}}}"#));
    create(
        &s,
        &format!(
            r#"{{"name":"s","kind":"service","owner":"ops","expires_in_seconds":{}}}"#,
            7 * day
        ),
    );
    // An update is held to the same limit, counted from when it is made.
    let too_late = chrono::DateTime::from_timestamp(unix_now() + 2 * day, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (status, v) = s.call(
        "PATCH",
        &format!("/v1/tokens/{}", user["id"].as_str().unwrap()),
        Some(&format!(r#"{{"expires_at":"{too_late}"}}"#)),
    );
    assert_eq!(
        (status, v["field"].as_str()),
        (400, Some("expires_at")),
        "{v}"
    );
}

#[test]
fn console_false_serves_the_api_only() {
    let dir = tempfile::tempdir().unwrap();
    let on = serve_with(dir.path().join("on.db"), free_port(), &[]);
    let off = serve_with(
        dir.path().join("off.db"),
        free_port(),
        &["--console", "false"],
    );
    for path in [
        "/",
        "/console/app.js",
        "/console/app.css",
        "/console/icon.svg",
    ] {
        let (status, _) = on.call("GET", path, None);
        assert_eq!(status, 200, "console on: {path}");
        let (status, v) = off.call("GET", path, None);
        assert_eq!(
            (status, v["error"].as_str()),
            (404, Some("no_route")),
            "{path}"
        );
    }
    let (status, _) = off.call("GET", "/healthz", None);
    assert_eq!(status, 200);
    create(&off, r#"{"name":"api-only"}"#);
}
