//! gRPC clients get gRPC answers: which requests are gRPC, which status each refusal maps
//! to, and the `grpc-message` and metadata that carry the rest. Plain Rust with no host
//! types, so that every data-plane flavor answers the same.
//!
//! A gRPC client reads `grpc-status` and `grpc-message`, not the HTTP status or a JSON body.
//! Envoy maps an HTTP 429 or 503 to UNAVAILABLE, which gRPC clients retry on their own, so
//! a rate-limited client would hammer harder; refusals are therefore mapped here, the way
//! Envoy's own rate-limit filters answer gRPC (RESOURCE_EXHAUSTED).

use crate::authorize::Denial;
use crate::response;

/// The gRPC status codes tokengate answers with (the numbers are gRPC's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// The metadata entry that carries the JSON body's `error` code.
pub const ERROR_METADATA: &str = "tokengate-error";

const GRPC: &[u8] = b"application/grpc";

/// Whether a request with this `content-type` is gRPC: `application/grpc`, alone or with a
/// `+codec` suffix (`application/grpc+proto`), as Envoy decides for its own local replies.
/// gRPC-Web (`application/grpc-web...`) is not: its clients read HTTP answers unless
/// Envoy's grpc_web filter, placed before tokengate, has turned the request into gRPC.
pub fn is_grpc(content_type: Option<&[u8]>) -> bool {
    content_type
        .is_some_and(|ct| ct.starts_with(GRPC) && matches!(ct.get(GRPC.len()), None | Some(b'+')))
}

/// The gRPC status for a refusal.
pub fn code(d: Denial) -> Code {
    match d {
        Denial::MissingToken | Denial::InvalidToken | Denial::TokenExpired => Code::Unauthenticated,
        Denial::TokenSuspended | Denial::InsufficientScope => Code::PermissionDenied,
        // Not UNAVAILABLE: clients retry that by themselves.
        Denial::RateLimited { .. } | Denial::QuotaExceeded { .. } => Code::ResourceExhausted,
        Denial::StateUnavailable => Code::Unavailable,
    }
}

/// `grpc-message` encoding: every byte outside printable ASCII, and `%` itself, as `%XX`
/// (gRPC's HTTP/2 protocol: the value is percent-encoded UTF-8).
pub fn percent_encode(message: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
    }
    out
}

/// A refusal as a gRPC client sees it: a trailers-only answer (HTTP 200, `content-type:
/// application/grpc`, no body) whose status is `code`, with `metadata` beside it.
#[derive(Debug)]
pub struct GrpcRefusal {
    pub code: Code,
    /// The HTTP refusal's status, for hosts that log or map it.
    pub http_status: u32,
    /// `grpc-message` (the sentence, percent-encoded), `tokengate-error` (the JSON body's
    /// `error`) and the HTTP refusal's headers other than its `content-type`:
    /// `retry-after` and the rate-limit headers, `www-authenticate`.
    pub metadata: Vec<(&'static str, String)>,
}

pub fn refusal(d: Denial) -> GrpcRefusal {
    let r = response::refusal(d);
    let mut metadata = vec![
        ("grpc-message", percent_encode(r.message)),
        (ERROR_METADATA, r.code.to_string()),
    ];
    metadata.extend(r.headers.into_iter().filter(|(n, _)| *n != "content-type"));
    GrpcRefusal {
        code: code(d),
        http_status: r.status,
        metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_is_application_grpc_with_or_without_a_codec() {
        for ct in [
            &b"application/grpc"[..],
            b"application/grpc+proto",
            b"application/grpc+json",
        ] {
            assert!(is_grpc(Some(ct)), "{}", String::from_utf8_lossy(ct));
        }
        for ct in [
            &b"application/grpc-web"[..],
            b"application/grpc-web+proto",
            b"application/grpc-web-text",
            b"application/grpcx",
            b"application/json",
            b"application/grp",
            b"text/plain; application/grpc",
            b"",
            b"\xff\xfe",
        ] {
            assert!(!is_grpc(Some(ct)), "{}", String::from_utf8_lossy(ct));
        }
        assert!(!is_grpc(None));
    }

    #[test]
    fn each_refusal_maps_to_its_status() {
        let limited = Denial::RateLimited {
            retry_after_secs: 2,
            max_rps: 5,
            burst: 5,
        };
        let cases = [
            (Denial::MissingToken, Code::Unauthenticated, 16),
            (Denial::InvalidToken, Code::Unauthenticated, 16),
            (Denial::TokenExpired, Code::Unauthenticated, 16),
            (Denial::TokenSuspended, Code::PermissionDenied, 7),
            (Denial::InsufficientScope, Code::PermissionDenied, 7),
            (limited, Code::ResourceExhausted, 8),
            (Denial::StateUnavailable, Code::Unavailable, 14),
        ];
        for (d, c, n) in cases {
            assert_eq!(code(d), c, "{d:?}");
            assert_eq!(c as u32, n);
        }
    }

    #[test]
    fn percent_encoding_leaves_printable_ascii_but_percent() {
        assert_eq!(percent_encode("plain text; ok!"), "plain text; ok!");
        assert_eq!(percent_encode("100%"), "100%25");
        assert_eq!(percent_encode("a\nb\tc"), "a%0Ab%09c");
        assert_eq!(percent_encode("café ☕"), "caf%C3%A9 %E2%98%95");
        assert_eq!(percent_encode("\u{7f}~ "), "%7F~ ");
        assert_eq!(percent_encode(""), "");
    }

    fn meta<'a>(g: &'a GrpcRefusal, name: &str) -> Option<&'a str> {
        g.metadata
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_refusal_carries_the_sentence_the_code_and_the_http_headers() {
        for d in [
            Denial::MissingToken,
            Denial::InvalidToken,
            Denial::TokenExpired,
            Denial::TokenSuspended,
            Denial::StateUnavailable,
        ] {
            let g = refusal(d);
            let r = response::refusal(d);
            assert_eq!(meta(&g, "grpc-message"), Some(r.message), "{d:?}");
            assert_eq!(meta(&g, ERROR_METADATA), Some(r.code));
            assert_eq!(meta(&g, "content-type"), None);
            assert_eq!(g.http_status, r.status);
            assert_eq!(
                meta(&g, "www-authenticate"),
                r.headers
                    .iter()
                    .find(|(n, _)| *n == "www-authenticate")
                    .map(|(_, v)| v.as_str())
            );
        }
        let g = refusal(Denial::RateLimited {
            retry_after_secs: 3,
            max_rps: 10,
            burst: 10,
        });
        assert_eq!(g.code, Code::ResourceExhausted);
        assert_eq!(meta(&g, "retry-after"), Some("3"));
        assert_eq!(meta(&g, ERROR_METADATA), Some("rate_limited"));
        assert!(meta(&g, "ratelimit-policy").is_some());
        assert_eq!(
            meta(&refusal(Denial::StateUnavailable), "retry-after"),
            Some("1")
        );
    }
}
