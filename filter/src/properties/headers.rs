//! Where the credential comes from: `Authorization: Bearer` parsing and header precedence.

use super::cfg;
use crate::authorize::{bearer_token, extract};
use crate::config::Config;
use proptest::prelude::*;
use std::collections::HashMap;

/// "bearer" with each letter's case chosen by `mask`.
fn scheme(mask: u8) -> String {
    "bearer"
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if mask & (1 << i) != 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

fn is_subslice(inner: &[u8], outer: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    i >= o && i + inner.len() <= o + outer.len()
}

fn whitespace() -> impl Strategy<Value = String> {
    "[ \t\r\n]{0,3}"
}

/// Header names the test config may list, plus ones it never does.
const NAMES: [&str; 5] = [
    "x-api-token",
    "x-token",
    "api-key",
    "authorization",
    "cookie",
];

fn config_with(headers: &[&str], bearer: bool) -> Config {
    let json = serde_json::json!({
        "control_plane_cluster": "cp",
        "sync_token": "x",
        "token_headers": headers,
        "bearer": bearer,
    });
    Config::parse(json.to_string().as_bytes()).unwrap()
}

proptest! {
    #[test]
    fn bearer_parsing_never_panics_and_only_answers_for_the_bearer_scheme(
        value in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..48),
            (whitespace(), any::<u8>(), "[ \t]{0,2}", prop::collection::vec(any::<u8>(), 0..24))
                .prop_map(|(ws, mask, sep, rest)| {
                    let mut v = format!("{ws}{}{sep}", scheme(mask)).into_bytes();
                    v.extend(rest);
                    v
                }),
        ]
    ) {
        let trimmed = value.trim_ascii();
        let is_bearer = trimmed.len() >= 6
            && trimmed[..6].eq_ignore_ascii_case(b"bearer")
            && trimmed.get(6).is_none_or(|b| *b == b' ');
        match bearer_token(&value) {
            Some(t) => {
                prop_assert!(is_bearer);
                prop_assert!(t.is_empty() || is_subslice(t, &value));
                prop_assert_eq!(t, trimmed.get(7..).unwrap_or_default().trim_ascii());
            }
            None => prop_assert!(!is_bearer),
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive(
        mask in any::<u8>(),
        before in whitespace(),
        gap in " {1,3}",
        credential in "[!-~]{1,48}",
        after in whitespace(),
    ) {
        let value = format!("{before}{}{gap}{credential}{after}", scheme(mask));
        prop_assert_eq!(bearer_token(value.as_bytes()), Some(credential.as_bytes()));
        // Any other scheme of the same length is not Bearer.
        let mut other = value.clone().into_bytes();
        let i = before.len() + usize::from(mask % 6);
        other[i] = if other[i].eq_ignore_ascii_case(&b'x') { b'y' } else { b'x' };
        prop_assert_eq!(bearer_token(&other), None);
    }

    /// The first configured token header that is present wins; Bearer only when none is.
    #[test]
    fn extraction_follows_the_configured_order(
        listed in prop::sample::subsequence(&NAMES[..3], 0..=3).prop_shuffle(),
        bearer in any::<bool>(),
        present in prop::collection::hash_map(
            prop::sample::select(&NAMES[..]),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..48),
                "[bB][eE][aA][rR][eE][rR] [ -~]{0,40}".prop_map(String::into_bytes),
            ],
            0..=5,
        ),
    ) {
        // A config with no way to send a token is refused at load; not this property's subject.
        let bearer = bearer || listed.is_empty();
        let cfg = config_with(&listed, bearer);
        let present: HashMap<&str, Vec<u8>> = present.into_iter().collect();
        let mut asked = Vec::new();
        let got = extract(&cfg, |name| {
            asked.push(name.to_string());
            present.get(name).cloned()
        })
        .map(|c| c.bytes().to_vec());
        let expected = match listed.iter().find_map(|h| present.get(h)) {
            Some(v) => Some(v.trim_ascii().to_vec()),
            None if bearer => present
                .get("authorization")
                .and_then(|v| bearer_token(v).map(<[u8]>::to_vec)),
            None => None,
        };
        prop_assert_eq!(got, expected);
        prop_assert!(asked.iter().all(|n| listed.contains(&n.as_str()) || n == "authorization"));
    }

    #[test]
    fn extraction_never_panics_on_arbitrary_header_bytes(
        token_header in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        authorization in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
    ) {
        let c = cfg();
        let got = extract(&c, |name| match name {
            "x-api-token" => token_header.clone(),
            "authorization" => authorization.clone(),
            _ => None,
        })
        .map(|c| c.bytes().to_vec());
        if let Some(t) = &token_header {
            prop_assert_eq!(got, Some(t.trim_ascii().to_vec()));
        } else if got.is_some() {
            prop_assert!(authorization.is_some());
        }
    }
}
