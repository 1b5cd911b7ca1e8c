//! Plugin configuration: any bytes are either a config or an error that names a real field.

use crate::config::{Config, ConfigError};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// The fields of the configuration (`config::Raw`).
const FIELDS: [&str; 19] = [
    "control_plane_cluster",
    "control_plane_authority",
    "sync_token",
    "sync_path",
    "sync_wait_seconds",
    "token_headers",
    "bearer",
    "identity_header_prefix",
    "tick_ms",
    "lease_ms",
    "backoff_initial_ms",
    "backoff_max_ms",
    "cas_retries",
    "proxy_id",
    "usage_reporting",
    "usage_path",
    "usage_report_ms",
    "usage_max_tokens",
    "expiry_warning_seconds",
];

/// Every field set to a valid value.
fn base() -> Value {
    json!({
        "control_plane_cluster": "cp",
        "control_plane_authority": "tokengate-control-plane",
        "sync_token": "s3cret",
        "sync_path": "/v1/sync",
        "sync_wait_seconds": 20,
        "token_headers": ["x-api-token", "x-token"],
        "bearer": true,
        "identity_header_prefix": "x-tokengate-",
        "tick_ms": 200,
        "lease_ms": 2000,
        "backoff_initial_ms": 250,
        "backoff_max_ms": 10000,
        "cas_retries": 16,
        "proxy_id": "node-1",
        "usage_reporting": true,
        "usage_path": "/v1/usage",
        "usage_report_ms": 5000,
        "usage_max_tokens": 10000,
        "expiry_warning_seconds": 604800,
    })
}

/// The field an error's path points into: `token_headers[2]` is `token_headers`.
fn root(field: &str) -> &str {
    field.split(['[', '.']).next().unwrap_or(field)
}

/// An error names a field of the configuration, or none (a syntax error, a top level that
/// is not an object), or, for a field the configuration does not have, that one.
fn names_a_field_or_none(e: &ConfigError) -> bool {
    e.field.is_empty()
        || FIELDS.contains(&root(&e.field))
        || e.message
            .starts_with(&format!("unknown field `{}`", e.field))
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12..1e12f64).prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        "[a-z_-]{1,12}".prop_map(Value::from),
        "/[ -~]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Values the field cannot take: the wrong JSON type, or outside its range.
fn wrong_value(field: &'static str) -> BoxedStrategy<Value> {
    let not_a_string = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(json!([])),
        Just(json!({})),
    ];
    let not_a_number = prop_oneof![
        "\\PC{0,8}".prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(json!([1])),
        Just(json!({})),
        (0.1..1e6f64).prop_map(|f| Value::from(f.floor() + 0.5)),
        (i64::MIN..0).prop_map(Value::from),
        (1u64 << 32..=u64::MAX).prop_map(Value::from),
    ];
    let range = |lo: u64, hi: u64| {
        let below = if lo > 0 {
            (0..lo).boxed()
        } else {
            Just(hi + 1).boxed()
        };
        prop_oneof![
            not_a_number.clone().boxed(),
            below.prop_map(Value::from),
            (hi + 1..=u64::from(u32::MAX)).prop_map(Value::from)
        ]
        .boxed()
    };
    match field {
        "control_plane_cluster" | "sync_token" => prop_oneof![
            not_a_string,
            Just(Value::Null),
            "[ \t]{0,3}".prop_map(Value::from)
        ]
        .boxed(),
        "control_plane_authority" | "proxy_id" => not_a_string.boxed(),
        "sync_path" | "usage_path" => prop_oneof![
            not_a_string,
            "[^/]\\PC{0,8}".prop_map(Value::from),
            Just(Value::from("")),
        ]
        .boxed(),
        "identity_header_prefix" => prop_oneof![
            not_a_string,
            Just(Value::from("")),
            "[a-z-]{0,4}[A-Z :/][a-z-]{0,4}".prop_map(Value::from),
        ]
        .boxed(),
        "token_headers" => prop_oneof![
            not_a_string
                .clone()
                .prop_filter("arrays are its type", |v| !v.is_array()),
            prop::collection::vec(not_a_string, 1..3).prop_map(Value::from),
            "[a-z-]{0,4}[A-Z :/][a-z-]{0,4}".prop_map(|h| json!(["x-api-token", h])),
            Just(json!([""])),
        ]
        .boxed(),
        "bearer" | "usage_reporting" => prop_oneof![
            "\\PC{0,8}".prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            Just(json!([])),
        ]
        .boxed(),
        "sync_wait_seconds" => range(1, 300),
        "tick_ms" => range(10, 60_000),
        "lease_ms" => range(100, 600_000),
        "backoff_initial_ms" => range(1, 600_000),
        "backoff_max_ms" => range(1, 3_600_000),
        "cas_retries" => range(1, 1_000),
        "usage_report_ms" => range(100, 600_000),
        "usage_max_tokens" => range(1, tokengate_wire::usage::MAX_ENTRIES as u64),
        "expiry_warning_seconds" => range(0, 31_536_000),
        _ => unreachable!("{field}"),
    }
}

proptest! {
    #[test]
    fn any_bytes_parse_or_name_a_real_field(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..128),
            any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ]
    ) {
        if let Err(e) = Config::parse(&bytes) {
            prop_assert!(names_a_field_or_none(&e), "{}", e);
            prop_assert!(!e.message.is_empty());
        }
    }

    /// Objects made of real and unknown fields holding anything: a config that loads keeps its
    /// invariants; an error names a field of the object or none.
    #[test]
    fn any_object_loads_sanely_or_names_a_field(
        fields in prop::collection::btree_map(
            prop_oneof![4 => prop::sample::select(&FIELDS[..]).prop_map(str::to_string), 1 => "[a-z_]{1,12}"],
            any_json(),
            0..8,
        ),
        keep_base in any::<bool>(),
    ) {
        let mut obj = if keep_base { base().as_object().unwrap().clone() } else { Map::new() };
        obj.extend(fields.clone());
        let bytes = serde_json::to_vec(&Value::Object(obj.clone())).unwrap();
        match Config::parse(&bytes) {
            Ok(c) => {
                prop_assert!(obj.keys().all(|k| FIELDS.contains(&k.as_str())));
                prop_assert!(!c.control_plane_cluster.trim().is_empty());
                prop_assert!(!c.sync_token.trim().is_empty());
                prop_assert!(c.sync_path.starts_with('/') && c.usage_path.starts_with('/'));
                prop_assert!(c.lease_ms >= 3 * c.tick_ms);
                prop_assert!(c.backoff_max_ms >= c.backoff_initial_ms);
                prop_assert!(c.bearer || !c.token_headers.is_empty());
                prop_assert!((1..=1_000).contains(&c.cas_retries));
                prop_assert!((1..=300).contains(&c.sync_wait_seconds));
            }
            Err(e) => {
                let named = root(&e.field);
                prop_assert!(names_a_field_or_none(&e), "{}", e);
                if !e.field.is_empty() && !matches!(named, "control_plane_cluster" | "sync_token") {
                    prop_assert!(obj.contains_key(named), "{} names a field that is not there", e);
                }
            }
        }
    }

    #[test]
    fn one_bad_field_is_the_one_named(
        (field, value) in prop::sample::select(&FIELDS[..]).prop_flat_map(|f| (Just(f), wrong_value(f)))
    ) {
        let mut config = base();
        config[field] = value.clone();
        let e = Config::parse(&serde_json::to_vec(&config).unwrap()).unwrap_err();
        prop_assert_eq!(root(&e.field), field, "{} for {}", e, value);
    }
}
