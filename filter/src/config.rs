//! Plugin configuration: parsed once by the root context, shared by every request.
//! A bad configuration names the offending field so Envoy's log says what to fix.

use serde::Deserialize;
use serde_json::error::Category;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Envoy cluster that reaches the control plane.
    pub control_plane_cluster: String,
    /// `:authority` sent on sync calls.
    pub control_plane_authority: String,
    /// Credential for `GET /v1/sync`.
    pub sync_token: String,
    pub sync_path: String,
    /// How long the control plane may hold a long-poll.
    pub sync_wait_seconds: u32,
    /// Headers that carry the raw token, checked in order, lower case.
    pub token_headers: Vec<String>,
    /// Also accept `Authorization: Bearer <token>`.
    pub bearer: bool,
    /// Prefix of the identity headers sent upstream (`<prefix>token-id`, ...).
    pub identity_header_prefix: String,
    pub tick_ms: u32,
    pub lease_ms: u32,
    pub backoff_initial_ms: u32,
    pub backoff_max_ms: u32,
    pub cas_retries: u32,
    /// Sent to the control plane as `proxy_id`; defaults to Envoy's node id.
    pub proxy_id: Option<String>,
    /// Count requests per token and report them to `usage_path`.
    pub usage_reporting: bool,
    pub usage_path: String,
    pub usage_report_ms: u32,
    /// Distinct token ids held per worker and in the leader's pending report.
    pub usage_max_tokens: u32,
    /// Responses carry the token's expiry once it is this close; 0: never.
    pub expiry_warning_seconds: u32,
    /// Where the leader reports fleet demand and fetches this proxy's shares.
    pub fleet_path: String,
    /// How often it does.
    pub fleet_report_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid tokengate configuration: {}", self.message)
        } else {
            write!(
                f,
                "invalid tokengate configuration: field `{}`: {}",
                self.field, self.message
            )
        }
    }
}

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        message: message.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    control_plane_cluster: Option<String>,
    control_plane_authority: Option<String>,
    sync_token: Option<String>,
    sync_path: Option<String>,
    sync_wait_seconds: Option<u32>,
    token_headers: Option<Vec<String>>,
    bearer: Option<bool>,
    identity_header_prefix: Option<String>,
    tick_ms: Option<u32>,
    lease_ms: Option<u32>,
    backoff_initial_ms: Option<u32>,
    backoff_max_ms: Option<u32>,
    cas_retries: Option<u32>,
    proxy_id: Option<String>,
    usage_reporting: Option<bool>,
    usage_path: Option<String>,
    usage_report_ms: Option<u32>,
    usage_max_tokens: Option<u32>,
    expiry_warning_seconds: Option<u32>,
    fleet_path: Option<String>,
    fleet_report_ms: Option<u32>,
}

fn required(field: &str, v: Option<String>) -> Result<String, ConfigError> {
    match v {
        Some(s) if !s.trim().is_empty() => Ok(s),
        Some(_) => Err(err(field, "must not be empty")),
        None => Err(err(field, "is required")),
    }
}

fn in_range(
    field: &str,
    v: Option<u32>,
    default: u32,
    lo: u32,
    hi: u32,
) -> Result<u32, ConfigError> {
    let v = v.unwrap_or(default);
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(err(
            field,
            format!("must be between {lo} and {hi}, got {v}"),
        ))
    }
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let raw: Raw = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let field = e.path().to_string();
            // A syntax error, or a top level that is not an object (serde would read an array
            // by position), belongs to no field: naming `?` or `[0]` would mislead.
            let no_field = field == "."
                || field.starts_with('[')
                || matches!(e.inner().classify(), Category::Syntax | Category::Eof);
            err(if no_field { "" } else { &field }, e.inner().to_string())
        })?;

        let token_headers = raw
            .token_headers
            .unwrap_or_else(|| vec!["x-api-token".to_string()]);
        for (i, h) in token_headers.iter().enumerate() {
            if !is_header_name(h) {
                return Err(err(
                    &format!("token_headers[{i}]"),
                    format!("`{h}` is not a lower-case header name"),
                ));
            }
        }
        let bearer = raw.bearer.unwrap_or(true);
        if token_headers.is_empty() && !bearer {
            return Err(err(
                "token_headers",
                "is empty and `bearer` is false: no way to send a token",
            ));
        }
        let identity_header_prefix = raw
            .identity_header_prefix
            .unwrap_or_else(|| "x-tokengate-".to_string());
        if !is_header_name(&identity_header_prefix) {
            return Err(err(
                "identity_header_prefix",
                "must be a lower-case header name prefix",
            ));
        }
        let sync_path = raw.sync_path.unwrap_or_else(|| "/v1/sync".to_string());
        if !sync_path.starts_with('/') {
            return Err(err("sync_path", "must start with `/`"));
        }
        let usage_path = raw.usage_path.unwrap_or_else(|| "/v1/usage".to_string());
        if !usage_path.starts_with('/') {
            return Err(err("usage_path", "must start with `/`"));
        }
        let fleet_path = raw.fleet_path.unwrap_or_else(|| "/v1/fleet".to_string());
        if !fleet_path.starts_with('/') {
            return Err(err("fleet_path", "must start with `/`"));
        }
        let max_entries = u32::try_from(tokengate_wire::usage::MAX_ENTRIES).unwrap_or(u32::MAX);
        let tick_ms = in_range("tick_ms", raw.tick_ms, 200, 10, 60_000)?;
        let lease_ms = in_range("lease_ms", raw.lease_ms, 2_000, 100, 600_000)?;
        if lease_ms < tick_ms.saturating_mul(3) {
            return Err(err(
                "lease_ms",
                "must be at least three times `tick_ms` so the leader renews it in time",
            ));
        }
        let backoff_initial_ms = in_range(
            "backoff_initial_ms",
            raw.backoff_initial_ms,
            250,
            1,
            600_000,
        )?;
        let backoff_max_ms = in_range("backoff_max_ms", raw.backoff_max_ms, 10_000, 1, 3_600_000)?;
        if backoff_max_ms < backoff_initial_ms {
            return Err(err(
                "backoff_max_ms",
                "must not be less than `backoff_initial_ms`",
            ));
        }
        Ok(Config {
            control_plane_cluster: required("control_plane_cluster", raw.control_plane_cluster)?,
            control_plane_authority: raw
                .control_plane_authority
                .unwrap_or_else(|| "tokengate-control-plane".to_string()),
            sync_token: required("sync_token", raw.sync_token)?,
            sync_path,
            sync_wait_seconds: in_range("sync_wait_seconds", raw.sync_wait_seconds, 20, 1, 300)?,
            token_headers,
            bearer,
            identity_header_prefix,
            tick_ms,
            lease_ms,
            backoff_initial_ms,
            backoff_max_ms,
            cas_retries: in_range("cas_retries", raw.cas_retries, 16, 1, 1_000)?,
            proxy_id: match raw.proxy_id.filter(|p| !p.is_empty()) {
                Some(p) if p.len() > tokengate_wire::fleet::MAX_PROXY_ID => {
                    return Err(err(
                        "proxy_id",
                        format!(
                            "must be at most {} bytes long",
                            tokengate_wire::fleet::MAX_PROXY_ID
                        ),
                    ))
                }
                Some(p) if p.chars().any(char::is_control) => {
                    return Err(err("proxy_id", "must not contain control characters"))
                }
                p => p,
            },
            usage_reporting: raw.usage_reporting.unwrap_or(true),
            usage_path,
            usage_report_ms: in_range("usage_report_ms", raw.usage_report_ms, 5_000, 100, 600_000)?,
            usage_max_tokens: in_range(
                "usage_max_tokens",
                raw.usage_max_tokens,
                10_000,
                1,
                max_entries,
            )?,
            expiry_warning_seconds: in_range(
                "expiry_warning_seconds",
                raw.expiry_warning_seconds,
                604_800,
                0,
                31_536_000,
            )?,
            fleet_path,
            fleet_report_ms: in_range(
                "fleet_report_ms",
                raw.fleet_report_ms,
                1_000,
                tokengate_wire::fleet::MIN_INTERVAL_MS,
                tokengate_wire::fleet::MAX_INTERVAL_MS,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"{"control_plane_cluster":"cp","sync_token":"s3cret"}"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MIN.as_bytes()).unwrap();
        assert_eq!(c.token_headers, vec!["x-api-token"]);
        assert!(c.bearer);
        assert_eq!(c.identity_header_prefix, "x-tokengate-");
        assert_eq!(c.sync_path, "/v1/sync");
        assert_eq!(c.sync_wait_seconds, 20);
        assert_eq!((c.tick_ms, c.lease_ms), (200, 2_000));
        assert_eq!((c.backoff_initial_ms, c.backoff_max_ms), (250, 10_000));
        assert_eq!(c.cas_retries, 16);
        assert_eq!(c.control_plane_authority, "tokengate-control-plane");
        assert_eq!(c.proxy_id, None);
        assert!(c.usage_reporting);
        assert_eq!(c.usage_path, "/v1/usage");
        assert_eq!((c.usage_report_ms, c.usage_max_tokens), (5_000, 10_000));
        assert_eq!(c.expiry_warning_seconds, 604_800);
        assert_eq!(
            (c.fleet_path.as_str(), c.fleet_report_ms),
            ("/v1/fleet", 1_000)
        );
    }

    #[test]
    fn fleet_fields_are_checked_and_named() {
        let long = format!(r#""proxy_id":"{}""#, "p".repeat(129));
        for (extra, field) in [
            (long.as_str(), "proxy_id"),
            (r#""proxy_id":"envoy\n1""#, "proxy_id"),
            (r#""proxy_id":"envoy\u0000""#, "proxy_id"),
            (r#""fleet_report_ms":0"#, "fleet_report_ms"),
            (r#""fleet_report_ms":99"#, "fleet_report_ms"),
            (r#""fleet_report_ms":60001"#, "fleet_report_ms"),
            (r#""fleet_report_ms":"1s""#, "fleet_report_ms"),
            (r#""fleet_path":"v1/fleet""#, "fleet_path"),
        ] {
            let json = format!(
                r#"{{"control_plane_cluster":"cp","sync_token":"s","{}}}"#,
                &extra[1..]
            );
            let e = Config::parse(json.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{extra}: {e}");
        }
        let c = Config::parse(
            br#"{"control_plane_cluster":"cp","sync_token":"s","fleet_report_ms":250}"#,
        )
        .unwrap();
        assert_eq!(c.fleet_report_ms, 250);
    }

    #[test]
    fn usage_and_expiry_fields_are_checked() {
        let with = |extra: &str| {
            field_of(&format!(
                r#"{{"control_plane_cluster":"cp","sync_token":"x",{extra}}}"#
            ))
        };
        assert_eq!(with(r#""usage_path":"v1/usage""#), "usage_path");
        assert_eq!(with(r#""usage_report_ms":10"#), "usage_report_ms");
        assert_eq!(with(r#""usage_max_tokens":0"#), "usage_max_tokens");
        assert_eq!(with(r#""usage_max_tokens":10001"#), "usage_max_tokens");
        assert_eq!(with(r#""usage_reporting":"yes""#), "usage_reporting");
        assert_eq!(
            with(r#""expiry_warning_seconds":-1"#),
            "expiry_warning_seconds"
        );
        let c = Config::parse(
            br#"{"control_plane_cluster":"cp","sync_token":"x","expiry_warning_seconds":0,"usage_reporting":false}"#,
        )
        .unwrap();
        assert_eq!((c.expiry_warning_seconds, c.usage_reporting), (0, false));
    }

    fn field_of(json: &str) -> String {
        Config::parse(json.as_bytes()).unwrap_err().field
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of(r#"{"sync_token":"x"}"#), "control_plane_cluster");
        assert_eq!(field_of(r#"{"control_plane_cluster":"cp"}"#), "sync_token");
        assert_eq!(
            field_of(r#"{"control_plane_cluster":"cp","sync_token":" "}"#),
            "sync_token"
        );
        assert_eq!(
            field_of(r#"{"control_plane_cluster":"cp","sync_token":"x","sync_wait_seconds":"10"}"#),
            "sync_wait_seconds"
        );
        assert_eq!(
            field_of(r#"{"control_plane_cluster":"cp","sync_token":"x","sync_wait_seconds":0}"#),
            "sync_wait_seconds"
        );
        assert_eq!(
            field_of(
                r#"{"control_plane_cluster":"cp","sync_token":"x","token_headers":["ok","Bad Header"]}"#
            ),
            "token_headers[1]"
        );
        assert_eq!(
            field_of(
                r#"{"control_plane_cluster":"cp","sync_token":"x","tick_ms":1000,"lease_ms":1000}"#
            ),
            "lease_ms"
        );
        assert_eq!(
            field_of(
                r#"{"control_plane_cluster":"cp","sync_token":"x","token_headers":[],"bearer":false}"#
            ),
            "token_headers"
        );
        assert_eq!(
            field_of(
                r#"{"control_plane_cluster":"cp","sync_token":"x","backoff_initial_ms":500,"backoff_max_ms":100}"#
            ),
            "backoff_max_ms"
        );
        assert_eq!(
            field_of(r#"{"control_plane_cluster":"cp","sync_token":"x","sync_path":"v1"}"#),
            "sync_path"
        );
    }

    #[test]
    fn unknown_fields_and_bad_json_are_refused() {
        let e = Config::parse(br#"{"control_plane_cluster":"cp","sync_token":"x","max_rps":3}"#)
            .unwrap_err();
        assert!(e.message.contains("max_rps"), "{e}");
        let e = Config::parse(b"{not json").unwrap_err();
        assert!(e.to_string().starts_with("invalid tokengate configuration"));
        assert!(Config::parse(b"").is_err());
    }

    #[test]
    fn syntax_errors_and_arrays_name_no_field() {
        // Found by the property tests: these named the fields `?` and `[0]`.
        assert_eq!(field_of(r#"{"control_plane_cluster":"cp" "#), "");
        assert_eq!(field_of(r#"{"control_plane_cluster":"cp",}"#), "");
        assert_eq!(field_of("[false]"), "");
        assert_eq!(field_of(r#"{"token_headers":[1]}"#), "token_headers[0]");
        assert_eq!(field_of(r#"{"tick_ms":"x"}"#), "tick_ms");
    }

    #[test]
    fn bounds_between_fields_admit_their_equal() {
        let c = Config::parse(
            br#"{"control_plane_cluster":"cp","sync_token":"x","tick_ms":100,"lease_ms":300,
                "backoff_initial_ms":400,"backoff_max_ms":400}"#,
        )
        .unwrap();
        assert_eq!((c.tick_ms, c.lease_ms), (100, 300));
        assert_eq!((c.backoff_initial_ms, c.backoff_max_ms), (400, 400));
        assert_eq!(
            field_of(
                r#"{"control_plane_cluster":"cp","sync_token":"x","tick_ms":100,"lease_ms":299}"#
            ),
            "lease_ms"
        );
        assert_eq!(
            field_of(
                r#"{"control_plane_cluster":"cp","sync_token":"x","backoff_initial_ms":400,"backoff_max_ms":399}"#
            ),
            "backoff_max_ms"
        );
    }

    #[test]
    fn a_configured_proxy_id_is_kept_and_an_empty_one_is_none() {
        let with = |id: &str| {
            Config::parse(
                format!(r#"{{"control_plane_cluster":"cp","sync_token":"x","proxy_id":"{id}"}}"#)
                    .as_bytes(),
            )
            .unwrap()
            .proxy_id
        };
        assert_eq!(with("node-7"), Some("node-7".to_string()));
        assert_eq!(with(""), None, "empty: Envoy's node id");
    }

    #[test]
    fn display_names_the_field() {
        let e = Config::parse(br#"{"sync_token":"x"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid tokengate configuration: field `control_plane_cluster`: is required"
        );
    }
}
