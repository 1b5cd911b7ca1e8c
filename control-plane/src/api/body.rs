//! Request bodies, queries and path ids, taken apart so that every error is JSON and names
//! the field it is about.

use super::error::ApiError;
use super::schema::Pattern;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::HeaderValue;
use serde::de::{Deserialize, DeserializeOwned, Deserializer};
use std::ops::RangeInclusive;
use std::pin::Pin;

/// Largest body the admin and session calls accept: a token body is a few hundred bytes, and
/// `POST /v1/session` reads its body before any credential is checked.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Largest `POST /v1/usage` body: a full report of `MAX_ENTRIES` entries is about 1.3 MB.
pub const USAGE_BODY_LIMIT: usize = 2 * 1024 * 1024;

/// A request body meant as JSON, at most `LIMIT` bytes. A non-blank body must come as
/// `application/json` or `application/*+json` (UTF-8), or without a Content-Type: browsers
/// always label what a cross-site form or script sends, so refusing other types keeps such
/// requests out, while curl-style clients that leave the type off still work.
pub struct JsonBody<const LIMIT: usize = BODY_LIMIT>(pub Bytes);

impl<S: Send + Sync, const LIMIT: usize> FromRequest<S> for JsonBody<LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        // Refused before reading, so a client that announces a huge body is not waited for.
        if declared.is_some_and(|n| n > LIMIT as u64) {
            return Err(too_large(LIMIT));
        }
        let json = req.headers().get(CONTENT_TYPE).map(is_json);
        let bytes = read_limited(req.into_body(), LIMIT).await?;
        if json == Some(false) && !bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::UnsupportedMediaType);
        }
        Ok(JsonBody(bytes))
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::TooLarge(format!(
        "The request body is larger than the {limit} bytes this call accepts."
    ))
}

async fn read_limited(mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut buf = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| {
            if crate::connections::is_body_timeout(&e) {
                ApiError::BodyTimeout
            } else {
                ApiError::Body(format!("The request body could not be read: {e}."))
            }
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(too_large(limit));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

/// `application/json` or `application/<anything>+json`, with no charset but UTF-8 (the only
/// one JSON allows, RFC 8259).
fn is_json(v: &HeaderValue) -> bool {
    let Ok(v) = v.to_str() else {
        return false;
    };
    let mut parts = v.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    let json = essence == "application/json"
        || essence
            .strip_prefix("application/")
            .and_then(|s| s.strip_suffix("+json"))
            .is_some_and(|s| !s.is_empty() && !s.contains('/'));
    json && parts.all(|p| match p.split_once('=') {
        Some((name, value)) if name.trim().eq_ignore_ascii_case("charset") => {
            value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        }
        _ => true,
    })
}

/// A page of a listing (`limit`): how many entries it may hold, and how many by default.
pub const LIMIT: RangeInclusive<u32> = 1..=1000;
pub const DEFAULT_LIMIT: u32 = 100;

/// Reads `limit`.
pub fn limit(v: &str) -> Result<u32, ApiError> {
    v.parse().ok().filter(|n| LIMIT.contains(n)).ok_or_else(|| {
        ApiError::field(
            "limit",
            format!("must be between {} and {}", LIMIT.start(), LIMIT.end()),
        )
    })
}

/// `limit`'s schema.
pub fn limit_schema() -> serde_json::Value {
    let mut s = super::schema::integer(&LIMIT);
    s["default"] = DEFAULT_LIMIT.into();
    s
}

/// Text the API reads from a query or a report may hold anything but U+0000, which
/// PostgreSQL can neither store nor compare (SQLite can; both backends answer alike).
pub static NO_NUL: Pattern = Pattern::new("^[^\\u0000]*$");

/// A string of `NO_NUL`, as the document states it.
pub fn text_schema() -> serde_json::Value {
    NO_NUL.schema()
}

/// A 400 naming `field` if `v` holds U+0000.
pub fn no_nul(field: &str, v: &str) -> Result<(), ApiError> {
    if NO_NUL.matches(v) {
        Ok(())
    } else {
        Err(ApiError::field(field, "must not contain U+0000"))
    }
}

/// The query's parameters in order. A parameter given twice is refused rather than one of
/// its values picked silently, and none may hold U+0000.
pub struct Params(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Query(pairs) =
            Query::<Vec<(String, String)>>::try_from_uri(&parts.uri).map_err(|e| {
                ApiError::Body(format!("The query string is invalid: {}.", e.body_text()))
            })?;
        for (i, (name, value)) in pairs.iter().enumerate() {
            if pairs[..i].iter().any(|(n, _)| n == name) {
                return Err(ApiError::field(name, "is given more than once"));
            }
            no_nul(name, value)?;
        }
        Ok(Params(pairs))
    }
}

/// The `{id}` of a `/v1/tokens/{id}` path. Any id that is no token's is a 404; only one that
/// does not decode to text is refused here (and one holding U+0000, which no id holds, is a
/// 404 without asking the store, which may not take it).
pub struct TokenId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for TokenId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::field("id", "must be percent-encoded UTF-8"))?;
        if id.contains('\0') {
            return Err(ApiError::NotFound);
        }
        Ok(TokenId(id))
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Only an object: serde would also take a struct from an array of its fields in order.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::Body(
            "The request body must be a JSON object.".into(),
        ));
    }
    match read(bytes) {
        Err(Refused::Serde(e)) if e.inner().to_string().starts_with(WHOLE_FLOAT) => {
            match whole_numbers(bytes) {
                Some(again) => read(&again).map_err(Refused::into_api),
                None => Err(refusal(e)),
            }
        }
        r => r.map_err(Refused::into_api),
    }
}

enum Refused {
    Serde(serde_path_to_error::Error<serde_json::Error>),
    Api(ApiError),
}

impl Refused {
    fn into_api(self) -> ApiError {
        match self {
            Refused::Serde(e) => refusal(e),
            Refused::Api(e) => e,
        }
    }
}

fn read<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Refused> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(Refused::Serde)?;
    de.end().map_err(|e| {
        Refused::Api(ApiError::Body(format!(
            "The request body is not valid JSON: {e}: nothing may follow the object."
        )))
    })?;
    Ok(value)
}

/// How serde refuses a number with a fraction or an exponent where it reads an integer.
const WHOLE_FLOAT: &str = "invalid type: floating point";

/// `bytes` with every number that is written with a fraction or an exponent but is whole
/// (`5.0`, `7e0`) written as the integer it equals, or `None` if there is none: JSON Schema,
/// which the OpenAPI document speaks, counts them as integers. Strings are copied as they
/// are; anything that is not JSON stays as it was, for the parser to refuse.
fn whole_numbers(bytes: &[u8]) -> Option<Vec<u8>> {
    // Within ±2^53 a float spells its integer exactly.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    let mut out = Vec::with_capacity(bytes.len());
    let mut changed = false;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        if bytes[i] == b'"' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(bytes.len());
            out.extend_from_slice(&bytes[start..i]);
        } else if bytes[i] == b'-' || bytes[i].is_ascii_digit() {
            while i < bytes.len()
                && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
            {
                i += 1;
            }
            let token = &bytes[start..i];
            let whole = std::str::from_utf8(token)
                .ok()
                .filter(|t| t.contains(['.', 'e', 'E']))
                .and_then(|t| t.parse::<f64>().ok())
                .filter(|f| f.fract() == 0.0 && f.abs() <= EXACT);
            match whole {
                Some(f) => {
                    out.extend_from_slice((f as i64).to_string().as_bytes());
                    changed = true;
                }
                None => out.extend_from_slice(token),
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    changed.then_some(out)
}

/// A body serde refused, as a 400 that names the field where it can.
fn refusal(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    // A syntax error while reading a key leaves an unknown segment: no field to blame.
    let in_field = path != "."
        && !e
            .path()
            .iter()
            .any(|s| matches!(s, serde_path_to_error::Segment::Unknown));
    let inner = e.into_inner();
    let message = strip_position(&inner.to_string());
    if in_field {
        // Inside a field's value, even a syntax error (a broken string, a number out of
        // range) is that field's.
        if inner.is_syntax() || inner.is_eof() {
            ApiError::field(&path, format!("is not valid JSON: {message}"))
        } else if let Some(field) = quoted(&message, "missing field `") {
            // Within a nested object (a scope's rule): name the field it lacks.
            ApiError::field(&format!("{path}.{field}"), "is required")
        } else {
            ApiError::field(&path, message)
        }
    } else if inner.is_syntax() || inner.is_eof() {
        ApiError::Body(format!("The request body is not valid JSON: {inner}."))
    } else if let Some(field) = quoted(&message, "unknown field `") {
        ApiError::field(&field, "is not a known field")
    } else if let Some(field) = quoted(&message, "duplicate field `") {
        ApiError::field(&field, "is given more than once")
    } else if let Some(field) = quoted(&message, "missing field `") {
        ApiError::field(&field, "is required")
    } else {
        ApiError::Body(format!("Invalid request body: {message}."))
    }
}

fn quoted(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?;
    Some(rest[..rest.find('`')?].to_string())
}

fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
pub fn nullable<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct B {
        n: Option<u32>,
        #[serde(default, deserialize_with = "nullable")]
        m: Option<Option<u32>>,
    }

    fn field(json: &str) -> String {
        match parse_json::<B>(json.as_bytes()).unwrap_err() {
            ApiError::Field { field, .. } => field,
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn errors_name_fields() {
        assert_eq!(field(r#"{"n":"x"}"#), "n");
        assert_eq!(field(r#"{"n":-1}"#), "n");
        assert_eq!(field(r#"{"zzz":1}"#), "zzz");
        assert!(matches!(parse_json::<B>(b"{"), Err(ApiError::Body(_))));
        assert!(matches!(parse_json::<B>(b""), Err(ApiError::Body(_))));
        assert_eq!(field(r#"{"n":1,"n":2}"#), "n");
        assert_eq!(field(r#"{"n":1e400}"#), "n");
        assert_eq!(field(r#"{"n":4294967296}"#), "n");
    }

    #[test]
    fn a_whole_float_is_an_integer() {
        let b: B = parse_json(br#"{"n": 5.0, "m": 7e0}"#).unwrap();
        assert_eq!((b.n, b.m), (Some(5), Some(Some(7))));
        assert_eq!(field(r#"{"n": 5.5}"#), "n");
        assert_eq!(field(r#"{"n": -1.0}"#), "n");
        assert_eq!(field(r#"{"n": 4294967296.0}"#), "n");
        // Nothing else is read differently: strings, duplicates, what follows the object.
        assert_eq!(field(r#"{"n": 5.0, "n": 6}"#), "n");
        assert_eq!(field(r#"{"n": 5.0, "zzz": "1.0"}"#), "zzz");
        assert!(matches!(
            parse_json::<B>(br#"{"n": 5.0} x"#),
            Err(ApiError::Body(_))
        ));
        assert_eq!(
            whole_numbers(br#"{"a": "2.0 \" 3.0", "b": [1.0, -2e1, 0.5, 1e400]}"#).unwrap(),
            br#"{"a": "2.0 \" 3.0", "b": [1, -20, 0.5, 1e400]}"#
        );
    }

    #[test]
    fn only_one_object_is_a_body() {
        for body in [
            &b"[1, null]"[..],
            b"\"n\"",
            b"null",
            b"{\"n\":1} {}",
            b"{\"n\":1} x",
        ] {
            let e = parse_json::<B>(body).unwrap_err();
            assert!(matches!(e, ApiError::Body(_)), "{body:?}: {e:?}");
        }
        assert_eq!(parse_json::<B>(b" {\"n\":1}\n").unwrap().n, Some(1));
    }

    #[test]
    fn json_media_types() {
        let yes = [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=\"UTF-8\"",
            "application/merge-patch+json",
        ];
        let no = [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/json; charset=iso-8859-1",
            "application/+json",
            "text/json",
            "",
        ];
        for t in yes {
            assert!(is_json(&HeaderValue::from_static(t)), "{t}");
        }
        for t in no {
            assert!(!is_json(&HeaderValue::from_static(t)), "{t}");
        }
    }

    #[test]
    fn null_and_absent_differ() {
        assert_eq!(parse_json::<B>(b"{}").unwrap().m, None);
        assert_eq!(parse_json::<B>(br#"{"m":null}"#).unwrap().m, Some(None));
        assert_eq!(parse_json::<B>(br#"{"m":3}"#).unwrap().m, Some(Some(3)));
    }
}
