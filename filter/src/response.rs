//! What a refused client sees: DESIGN.md's table, as status, headers and a JSON body.
//! Bodies are fixed text: nothing from the request (least of all the token) is echoed.

use crate::authorize::Denial;

pub struct Refusal {
    pub status: u32,
    pub code: &'static str,
    /// The human sentence of the body (also a gRPC refusal's `grpc-message`).
    pub message: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

const INVALID_CHALLENGE: &str = r#"Bearer error="invalid_token""#;

/// RFC 6750's challenge for a request outside the token's scopes. `needed`: the known scopes
/// that would cover the request, space-separated (scope names never hold `"` or `\`); left
/// out when none would.
pub fn insufficient_scope_challenge(needed: Option<&str>) -> String {
    match needed {
        Some(n) if !n.is_empty() => format!(r#"Bearer error="insufficient_scope", scope="{n}""#),
        _ => r#"Bearer error="insufficient_scope""#.to_string(),
    }
}

fn body(code: &str, message: &str) -> String {
    format!(r#"{{"error":"{code}","message":"{message}"}}"#)
}

pub fn refusal(d: Denial) -> Refusal {
    let (status, code, message, mut headers): (u32, &'static str, &'static str, Vec<(&'static str, String)>) =
        match d {
            Denial::MissingToken => (
                401,
                "missing_token",
                "An access token is required: send it in the X-API-Token header or as Authorization: Bearer.",
                vec![("www-authenticate", "Bearer".to_string())],
            ),
            Denial::InvalidToken => (
                401,
                "invalid_token",
                "The access token is malformed, unknown or revoked.",
                vec![("www-authenticate", INVALID_CHALLENGE.to_string())],
            ),
            Denial::TokenExpired => (
                401,
                "token_expired",
                "The access token has expired.",
                vec![("www-authenticate", INVALID_CHALLENGE.to_string())],
            ),
            Denial::TokenSuspended => (403, "token_suspended", "The access token is suspended.", vec![]),
            Denial::InsufficientScope => (
                403,
                "insufficient_scope",
                "The access token's scopes do not cover this method and path.",
                vec![("www-authenticate", insufficient_scope_challenge(None))],
            ),
            Denial::RateLimited { retry_after_secs, max_rps, .. } => (
                429,
                "rate_limited",
                "Too many requests for this access token; retry after the time in Retry-After.",
                vec![
                    ("retry-after", retry_after_secs.to_string()),
                    ("ratelimit-policy", format!(r#""tokengate";q={max_rps};w=1"#)),
                    ("ratelimit", format!(r#""tokengate";r=0;t={retry_after_secs}"#)),
                ],
            ),
            Denial::QuotaExceeded { retry_after_secs, limit, window_secs } => (
                429,
                "quota_exceeded",
                "The access token's quota for this period is used up; retry after the time in Retry-After.",
                vec![
                    ("retry-after", retry_after_secs.to_string()),
                    ("ratelimit-policy", format!(r#""quota";q={limit};w={window_secs}"#)),
                ],
            ),
            Denial::StateUnavailable => (
                503,
                "token_state_unavailable",
                "Token state is not loaded yet; retry shortly.",
                vec![("retry-after", "1".to_string())],
            ),
        };
    headers.push(("content-type", "application/json".to_string()));
    Refusal {
        status,
        code,
        message,
        headers,
        body: body(code, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(r: &'a Refusal, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn table_rows() {
        let cases = [
            (Denial::MissingToken, 401, "missing_token", Some("Bearer")),
            (
                Denial::InvalidToken,
                401,
                "invalid_token",
                Some(INVALID_CHALLENGE),
            ),
            (
                Denial::TokenExpired,
                401,
                "token_expired",
                Some(INVALID_CHALLENGE),
            ),
            (Denial::TokenSuspended, 403, "token_suspended", None),
            (
                Denial::InsufficientScope,
                403,
                "insufficient_scope",
                Some(r#"Bearer error="insufficient_scope""#),
            ),
            (
                Denial::StateUnavailable,
                503,
                "token_state_unavailable",
                None,
            ),
        ];
        for (d, status, code, challenge) in cases {
            let r = refusal(d);
            assert_eq!((r.status, r.code), (status, code));
            assert_eq!(header(&r, "www-authenticate"), challenge, "{code}");
            let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(json["error"], code);
            assert!(json["message"].as_str().unwrap().len() > 10);
            assert_eq!(header(&r, "content-type"), Some("application/json"));
        }
        assert_eq!(
            header(&refusal(Denial::StateUnavailable), "retry-after"),
            Some("1")
        );
    }

    #[test]
    fn rate_limited_carries_retry_after_and_ratelimit_headers() {
        let r = refusal(Denial::RateLimited {
            retry_after_secs: 3,
            max_rps: 10,
            burst: 20,
        });
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "retry-after"), Some("3"));
        assert_eq!(
            header(&r, "ratelimit-policy"),
            Some(r#""tokengate";q=10;w=1"#)
        );
        assert_eq!(header(&r, "ratelimit"), Some(r#""tokengate";r=0;t=3"#));
    }

    #[test]
    fn quota_exceeded_carries_retry_after_and_the_quota_policy() {
        let r = refusal(Denial::QuotaExceeded {
            retry_after_secs: 1_800,
            limit: 1_000,
            window_secs: 3_600,
        });
        assert_eq!((r.status, r.code), (429, "quota_exceeded"));
        assert_eq!(header(&r, "retry-after"), Some("1800"));
        assert_eq!(
            header(&r, "ratelimit-policy"),
            Some(r#""quota";q=1000;w=3600"#)
        );
        assert_eq!(header(&r, "ratelimit"), None);
        let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(json["error"], "quota_exceeded");
    }

    #[test]
    fn the_scope_challenge_names_the_scopes_that_would_do() {
        assert_eq!(
            insufficient_scope_challenge(Some("orders:read admin")),
            r#"Bearer error="insufficient_scope", scope="orders:read admin""#
        );
        assert_eq!(
            insufficient_scope_challenge(Some("")),
            r#"Bearer error="insufficient_scope""#
        );
    }
}
