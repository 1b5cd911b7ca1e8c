//! What an admitted request takes upstream: which client-sent headers are removed before
//! the identity headers are set. No host types here; the request flow asks each flavor's
//! header map to remove what [`to_remove`] picks.

use crate::config::Config;

/// The prefix of every header tokengate itself sets (identity, expiry), whatever
/// `identity_header_prefix` says: a client must never be able to send one.
pub const TOKENGATE_PREFIX: &str = "x-tokengate-";

/// A header name as CGI-style upstreams (WSGI, Rack, PHP) read it: `X-Foo_Bar` and
/// `x-foo-bar` both become `HTTP_X_FOO_BAR`, so they are one name to them.
fn normalized(name: &[u8]) -> impl Iterator<Item = u8> + '_ {
    name.iter().map(|b| match b {
        b'_' => b'-',
        b => b.to_ascii_lowercase(),
    })
}

fn same_name(name: &[u8], wanted: &str) -> bool {
    name.len() == wanted.len() && normalized(name).eq(normalized(wanted.as_bytes()))
}

fn has_prefix(name: &[u8], prefix: &str) -> bool {
    name.len() >= prefix.len()
        && normalized(&name[..prefix.len()]).eq(normalized(prefix.as_bytes()))
}

/// Whether an admitted request's header `name` must not reach the upstream:
/// - a credential header, in any spelling: every configured token header and, while
///   `bearer` is on, `authorization` whatever its scheme or shape (the filter read the
///   credential; what else rides in it is not the upstream's to see);
/// - any header whose name, read as CGI-style upstreams read it, starts with
///   `x-tokengate-` or the configured identity prefix (spoofed identity or expiry).
///
/// The identity headers the filter sets are among them; setting them afterwards replaces
/// whatever copies a client sent.
pub fn must_remove(cfg: &Config, name: &[u8]) -> bool {
    cfg.token_headers.iter().any(|h| same_name(name, h))
        || (cfg.bearer && same_name(name, "authorization"))
        || has_prefix(name, TOKENGATE_PREFIX)
        || has_prefix(name, &cfg.identity_header_prefix)
}

/// Whether an admitted request's header `name` is removed before the identity headers are
/// set: it [`must_remove`], and it is not one of the `identity_headers` the filter is about
/// to set (setting a header replaces every copy of it anyway, which saves a call).
pub fn to_remove(cfg: &Config, name: &[u8], identity_headers: &[String]) -> bool {
    must_remove(cfg, name) && !identity_headers.iter().any(|h| h.as_bytes() == name)
}

/// The names among `names` (a request's header names, repeats allowed) that `doomed` picks,
/// each once: removing a name removes every copy of it.
pub fn names_to_remove<'a>(
    names: impl IntoIterator<Item = &'a [u8]>,
    doomed: impl Fn(&[u8]) -> bool,
) -> Vec<&'a [u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for name in names {
        if doomed(name) && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// The names among `names` to remove before the identity headers are set, each once.
pub fn headers_to_remove<'a>(
    cfg: &Config,
    names: impl IntoIterator<Item = &'a [u8]>,
    identity_headers: &[String],
) -> Vec<&'a [u8]> {
    names_to_remove(names, |name| to_remove(cfg, name, identity_headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let json = format!(r#"{{"control_plane_cluster":"cp","sync_token":"s"{extra}}}"#);
        Config::parse(json.as_bytes()).unwrap()
    }

    const IDENTITY: [&str; 4] = [
        "x-tokengate-token-id",
        "x-tokengate-token-name",
        "x-tokengate-token-owner",
        "x-tokengate-token-kind",
    ];

    fn identity() -> Vec<String> {
        IDENTITY.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn spoofed_identity_in_any_spelling_is_removed() {
        let c = cfg("");
        for name in [
            "x_tokengate_token_id",
            "X-Tokengate-Token_Owner",
            "x-tokengate_token-name",
            "X_TOKENGATE_TOKEN_KIND",
            "x-tokengate-token-expires",
            "x_tokengate_token_expires",
            "x-tokengate-anything",
            "x-tokengate-",
        ] {
            assert!(must_remove(&c, name.as_bytes()), "{name}");
        }
        for name in [
            "x-tokengate",
            "x-tokengatex-token-id",
            "xx-tokengate-token-id",
            "x-token",
            "content-type",
            ":authority",
            "",
        ] {
            assert!(!must_remove(&c, name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn credential_headers_in_any_spelling_are_removed() {
        let c = cfg("");
        for name in ["x-api-token", "X_API_TOKEN", "x-api_token", "authorization"] {
            assert!(must_remove(&c, name.as_bytes()), "{name}");
        }
        // Without `bearer`, Authorization is not tokengate's and is left to the upstream.
        let c = cfg(r#","bearer":false"#);
        assert!(!must_remove(&c, b"authorization"));
        assert!(must_remove(&c, b"x-api-token"));
        let c = cfg(r#","token_headers":["api-key","x-token"]"#);
        for name in ["api-key", "API_KEY", "x_token", "authorization"] {
            assert!(must_remove(&c, name.as_bytes()), "{name}");
        }
        assert!(!must_remove(&c, b"x-api-token"));
        let c = cfg(r#","token_headers":["x_key"]"#);
        assert!(must_remove(&c, b"x-key"));
    }

    #[test]
    fn a_custom_identity_prefix_is_protected_as_well_as_tokengates_own() {
        let c = cfg(r#","identity_header_prefix":"x-auth-""#);
        for name in [
            "x-auth-token-id",
            "x_auth_token_owner",
            "x-tokengate-token-id",
        ] {
            assert!(must_remove(&c, name.as_bytes()), "{name}");
        }
        assert!(!must_remove(&c, b"x-authx"));
    }

    #[test]
    fn each_name_once_and_the_ones_about_to_be_set_left_to_the_replace() {
        let c = cfg("");
        let names: Vec<&[u8]> = vec![
            b":path",
            b"x-api-token",
            b"x_tokengate_token_id",
            b"x-tokengate-token-id",
            b"x_tokengate_token_id",
            b"accept",
            b"x-tokengate-token-expires",
            b"authorization",
        ];
        let removed = headers_to_remove(&c, names, &identity());
        let removed: Vec<&str> = removed
            .iter()
            .map(|n| std::str::from_utf8(n).unwrap())
            .collect();
        assert_eq!(
            removed,
            [
                "x-api-token",
                "x_tokengate_token_id",
                "x-tokengate-token-expires",
                "authorization"
            ]
        );
    }

    #[test]
    fn odd_bytes_in_names_never_panic() {
        let c = cfg("");
        for name in [
            &b"\xff\xfe"[..],
            b"x-tokengate\xc3",
            b"\x00",
            b"x-tokengate-\x00",
        ] {
            let _ = must_remove(&c, name);
        }
        assert!(must_remove(&c, b"x-tokengate-\xff"));
    }
}
