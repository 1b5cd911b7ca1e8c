//! JSON bodies and queries parsed so that every error names the field it is about.

use super::error::ApiError;
use serde::de::{Deserialize, DeserializeOwned, Deserializer};

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::Body(
            "The request body must be a JSON object.".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::Body(format!("The request body is not valid JSON: {inner}."))
        } else if path == "." {
            // Unknown fields are reported at the top level; serde names them in the message.
            match unknown_field(&inner.to_string()) {
                Some(field) => ApiError::field(&field, "is not a known field"),
                None => ApiError::Body(format!("Invalid request body: {inner}.")),
            }
        } else {
            ApiError::field(&path, strip_position(&inner.to_string()))
        }
    })
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
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
    }

    #[test]
    fn null_and_absent_differ() {
        assert_eq!(parse_json::<B>(b"{}").unwrap().m, None);
        assert_eq!(parse_json::<B>(br#"{"m":null}"#).unwrap().m, Some(None));
        assert_eq!(parse_json::<B>(br#"{"m":3}"#).unwrap().m, Some(Some(3)));
    }
}
