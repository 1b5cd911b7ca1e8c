//! Expiry-warning webhooks: the event payload, its HMAC signature, and delivery with retries.
//! Events wait in the store's outbox, so a restart neither loses nor repeats a warning, and
//! each is leased to one replica at a time. A replica that dies between sending and
//! recording the result leaves the event to be sent again when its lease ends, so delivery
//! is at least once, and receivers de-duplicate on the event id.

use crate::domain::rfc3339;
use crate::store::{Delivery, DeliveryOutcome, TokenRow};
use hmac::{Hmac, Mac};
use rand::distributions::{Alphanumeric, DistString};
use sha2::Sha256;
use std::time::Duration;

pub const EVENT_EXPIRING: &str = "token.expiring";
pub const EVENT_QUOTA_EXHAUSTED: &str = "token.quota_exhausted";
pub const SIGNATURE_HEADER: &str = "x-tokengate-signature";
pub const EVENT_HEADER: &str = "x-tokengate-event";
pub const DELIVERY_HEADER: &str = "x-tokengate-delivery";
/// Longest wait between two attempts.
const MAX_BACKOFF_SECS: i64 = 600;

#[derive(Clone)]
pub struct Webhook {
    pub url: String,
    pub secret: String,
    pub max_attempts: u32,
    pub timeout: Duration,
}

/// The event for a warning at `lead` seconds before expiry: (event id, type, JSON payload).
pub fn expiring_event(t: &TokenRow, lead: i64, now: i64) -> (String, String, String) {
    let id = format!(
        "evt_{}",
        Alphanumeric.sample_string(&mut rand::rngs::OsRng, 20)
    );
    let expires_at = t.expires_at.unwrap_or(now);
    let payload = serde_json::json!({
        "id": id,
        "type": EVENT_EXPIRING,
        "created_at": rfc3339(now),
        "data": {
            "token": {
                "id": t.id,
                "name": t.name,
                "kind": t.kind.as_str(),
                "owner": t.owner,
                "status": t.status.as_str(),
                "expires_at": rfc3339(expires_at),
            },
            "expires_in_seconds": (expires_at - now).max(0),
            "warning_lead_seconds": lead,
        }
    });
    (id, EVENT_EXPIRING.to_string(), payload.to_string())
}

/// The event for a quota used up in the period `[start, end)`: (event id, type, JSON
/// payload). No secret and no hash.
pub fn quota_exhausted_event(
    t: &TokenRow,
    quota: tokengate_wire::quota::Quota,
    (start, end): (i64, i64),
    used: u64,
    now: i64,
) -> (String, String, String) {
    let id = format!(
        "evt_{}",
        Alphanumeric.sample_string(&mut rand::rngs::OsRng, 20)
    );
    let payload = serde_json::json!({
        "id": id,
        "type": EVENT_QUOTA_EXHAUSTED,
        "created_at": rfc3339(now),
        "data": {
            "token": {
                "id": t.id,
                "name": t.name,
                "kind": t.kind.as_str(),
                "owner": t.owner,
                "status": t.status.as_str(),
            },
            "quota": quota,
            "period_start": rfc3339(start),
            "resets_at": rfc3339(end),
            "used": used,
        }
    });
    (id, EVENT_QUOTA_EXHAUSTED.to_string(), payload.to_string())
}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

/// What a receiver does: recompute, compare in constant time, refuse stale timestamps.
pub fn verify(secret: &str, header: &str, body: &[u8], now: i64, tolerance_secs: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    if now.abs_diff(t) > tolerance_secs.unsigned_abs() || v1.len() != 64 {
        return false;
    }
    let Some(tag) = (0..32)
        .map(|i| u8::from_str_radix(v1.get(2 * i..2 * i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    mac(secret, t, body).verify_slice(&tag).is_ok()
}

/// Seconds before attempt `attempts + 1`: 1, 2, 4 ... capped.
pub fn backoff(attempts: u32) -> i64 {
    1i64.checked_shl(attempts.min(30))
        .unwrap_or(MAX_BACKOFF_SECS)
        .min(MAX_BACKOFF_SECS)
}

impl Webhook {
    /// One attempt (blocking). Any 2xx is delivered. Redirects are not followed: a
    /// receiver must not be able to bounce signed events to another address, so a 3xx is a
    /// failed attempt like any other answer that is not a 2xx.
    pub fn send(&self, d: &Delivery, now: i64) -> Result<(), String> {
        let agent = ureq::AgentBuilder::new()
            .timeout(self.timeout)
            .redirects(0)
            .build();
        let result = agent
            .post(&self.url)
            .set("content-type", "application/json")
            .set(
                "user-agent",
                concat!("tokengate/", env!("CARGO_PKG_VERSION")),
            )
            .set(EVENT_HEADER, &d.event_type)
            .set(DELIVERY_HEADER, &d.event_id)
            .set(
                SIGNATURE_HEADER,
                &sign(&self.secret, now, d.payload.as_bytes()),
            )
            .send_string(&d.payload);
        match result {
            Ok(r) if (200..300).contains(&r.status()) => Ok(()),
            Ok(r) if (300..400).contains(&r.status()) => {
                Err(format!("HTTP {} (redirects are not followed)", r.status()))
            }
            Ok(r) => Err(format!("HTTP {}", r.status())),
            Err(ureq::Error::Status(code, _)) => Err(format!("HTTP {code}")),
            Err(e) => Err(e.kind().to_string()),
        }
    }

    /// What becomes of a delivery after an attempt at `now`.
    pub fn outcome(&self, d: &Delivery, result: Result<(), String>, now: i64) -> DeliveryOutcome {
        match result {
            Ok(()) => DeliveryOutcome::Delivered { at: now },
            Err(error) if d.attempts + 1 >= self.max_attempts => DeliveryOutcome::GaveUp { error },
            Err(error) => DeliveryOutcome::Retry {
                next_attempt_at: now + backoff(d.attempts),
                error,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let h = sign("s3cret", 1_000, b"{\"a\":1}");
        assert!(h.starts_with("t=1000,v1="));
        assert!(verify("s3cret", &h, b"{\"a\":1}", 1_010, 300));
        assert!(!verify("s3cret", &h, b"{\"a\":2}", 1_010, 300));
        assert!(!verify("other", &h, b"{\"a\":1}", 1_010, 300));
        assert!(!verify("s3cret", &h, b"{\"a\":1}", 2_000, 300));
        assert!(!verify("s3cret", "t=1000,v1=zz", b"{}", 1_000, 300));
        assert!(!verify("s3cret", "", b"{}", 1_000, 300));
    }

    #[test]
    fn signatures_match_a_known_answer() {
        // Computed apart from this crate: Python's hmac.new(secret, b"1700000000." + body,
        // hashlib.sha256).hexdigest().
        let body = br#"{"id":"evt_x","type":"token.expiring"}"#;
        assert_eq!(
            sign("webhook-secret-0123456789", 1_700_000_000, body),
            "t=1700000000,v1=27016120c7172814a8b491a726ffab18fb9845a4cba77bb4aa7fd2f2974fd35b"
        );
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!((0..4).map(backoff).collect::<Vec<_>>(), [1, 2, 4, 8]);
        assert_eq!(backoff(40), MAX_BACKOFF_SECS);
    }

    #[test]
    fn attempts_run_out() {
        let w = Webhook {
            url: String::new(),
            secret: String::new(),
            max_attempts: 2,
            timeout: Duration::from_secs(1),
        };
        let mut d = Delivery {
            id: 1,
            event_id: "e".into(),
            event_type: EVENT_EXPIRING.into(),
            payload: "{}".into(),
            attempts: 0,
        };
        assert!(matches!(
            w.outcome(&d, Err("x".into()), 10),
            DeliveryOutcome::Retry {
                next_attempt_at: 11,
                ..
            }
        ));
        d.attempts = 1;
        assert!(matches!(
            w.outcome(&d, Err("x".into()), 10),
            DeliveryOutcome::GaveUp { .. }
        ));
        assert_eq!(
            w.outcome(&d, Ok(()), 10),
            DeliveryOutcome::Delivered { at: 10 }
        );
    }
}
