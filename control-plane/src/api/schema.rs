//! JSON Schema for the OpenAPI document, built from the same constants, tables and patterns
//! that the validation uses, so that the document states what the server enforces. Each
//! request type writes its schema beside itself with these pieces; this module holds only
//! what several of them share.

use regex::Regex;
use serde_json::{json, Map, Value};
use std::ops::RangeInclusive;
use std::sync::{LazyLock, OnceLock};
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::Object;
use utoipa::openapi::Required;
use utoipa::openapi::{RefOr, Schema};

/// A schema written as JSON. utoipa's model has no place for the conditional keywords
/// (`if`, `then`, `not`, ...), so whatever it does not model rides along in the object's
/// extension map, which serialises flat: the document shows the JSON as written (a test
/// checks that nothing is lost).
pub fn from_json(v: Value) -> RefOr<Schema> {
    let mut object: Object = match serde_json::from_value(v.clone()) {
        Ok(o) => o,
        Err(e) => unreachable_schema(&v, &e),
    };
    let modeled = serde_json::to_value(&object).unwrap_or_default();
    let rest: Extensions = v
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| modeled.get(k.as_str()).is_none())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !rest.is_empty() {
        object.extensions = Some(rest);
    }
    RefOr::T(Schema::Object(object))
}

/// The schemas are written in this crate; one utoipa cannot read is a bug that the
/// document tests catch at once.
#[cold]
fn unreachable_schema(v: &Value, e: &serde_json::Error) -> Object {
    tracing::error!(%e, schema = %v, "a schema of the OpenAPI document does not parse");
    Object::new()
}

/// A regular expression that the document states as a `pattern` and the server checks with,
/// written in the syntax ECMA-262, Python and Rust read alike.
pub struct Pattern {
    pub source: &'static str,
    compiled: OnceLock<Option<Regex>>,
}

impl Pattern {
    pub const fn new(source: &'static str) -> Pattern {
        Pattern {
            source,
            compiled: OnceLock::new(),
        }
    }

    /// Whether `v` matches (never, should the pattern not compile: a test compiles each).
    pub fn matches(&self, v: &str) -> bool {
        self.compiled
            .get_or_init(|| Regex::new(self.source).ok())
            .as_ref()
            .is_some_and(|r| r.is_match(v))
    }

    pub fn schema(&self) -> Value {
        matching(self.source)
    }
}

/// An optional query parameter.
pub fn query(name: &str, description: &str, schema: Value) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(from_json(schema)))
        .build()
}

/// An integer within `range`.
pub fn integer<T: Into<u64> + Copy>(range: &RangeInclusive<T>) -> Value {
    json!({
        "type": "integer",
        "minimum": (*range.start()).into(),
        "maximum": (*range.end()).into(),
    })
}

/// Any unsigned 64-bit integer (what `u64` reads).
pub fn unsigned() -> Value {
    integer(&(0..=u64::MAX))
}

/// Any signed 64-bit integer (what `i64` reads).
pub fn signed() -> Value {
    json!({"type": "integer", "minimum": i64::MIN, "maximum": i64::MAX})
}

/// A string that is one of `values`.
pub fn one_of(values: &[&str]) -> Value {
    json!({"type": "string", "enum": values})
}

/// An RFC 3339 date-time (what chrono's `parse_from_rfc3339` reads).
pub fn date_time() -> Value {
    json!({"type": "string", "format": "date-time"})
}

/// A string matching `pattern`.
pub fn matching(pattern: &str) -> Value {
    json!({"type": "string", "pattern": pattern})
}

/// A name or owner: `crate::text::check`'s rule.
pub fn text() -> Value {
    static PATTERN: LazyLock<String> = LazyLock::new(crate::text::pattern);
    json!({
        "type": "string",
        "minLength": 1,
        "maxLength": crate::text::MAX_CHARS,
        "pattern": PATTERN.as_str(),
    })
}

/// `schema`, or null.
pub fn nullable(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        if let Some(t) = o.get("type").cloned() {
            o.insert("type".into(), json!([t, "null"]));
        }
        if let Some(Value::Array(values)) = o.get_mut("enum") {
            values.push(Value::Null);
        }
    }
    schema
}

/// `schema` with a description.
pub fn described(mut schema: Value, text: &str) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.insert("description".into(), text.into());
    }
    schema
}

/// A request body that takes only `properties` and requires `required` (the server refuses
/// unknown fields).
pub fn object(properties: Value, required: &[&str]) -> Map<String, Value> {
    let mut o = answer(properties, required);
    o.insert("additionalProperties".into(), false.into());
    o
}

/// An answer's object with `properties`, always holding `required`. Other properties may be
/// added in later versions.
pub fn answer(properties: Value, required: &[&str]) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("type".into(), "object".into());
    if !required.is_empty() {
        o.insert("required".into(), json!(required));
    }
    o.insert("properties".into(), properties);
    o
}

/// A value of this kind must be present and not null (for `if`/`then`/`not` conditions).
pub fn present(fields: &[(&str, &str)]) -> Value {
    let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
    let types: Map<String, Value> = fields
        .iter()
        .map(|(n, t)| (n.to_string(), json!({"type": t})))
        .collect();
    json!({"required": names, "properties": types})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_schema_survives_utoipa_whole() {
        let v = json!({
            "type": "object",
            "additionalProperties": false,
            "minProperties": 1,
            "required": ["a"],
            "properties": {
                "a": nullable(integer(&(1u32..=5))),
                "b": nullable(one_of(&["x", "y"])),
                "c": text(),
                "d": date_time(),
                "e": signed(),
                "f": unsigned(),
            },
            "allOf": [
                {"if": present(&[("a", "integer")]), "then": present(&[("c", "string")])},
                {"not": present(&[("d", "string"), ("e", "integer")])},
            ],
            "dependentRequired": {"a": ["c"]},
        });
        let back = serde_json::to_value(from_json(v.clone())).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn null_joins_types_and_enums() {
        assert_eq!(
            nullable(one_of(&["x"])),
            json!({"type": ["string", "null"], "enum": ["x", null]})
        );
    }
}
