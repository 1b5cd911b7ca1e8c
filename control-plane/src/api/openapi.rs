//! The OpenAPI document's frame: title, security schemes, the error answers that operations
//! share, and the document's own path. Paths and schemas come from the handlers'
//! annotations (see `routes` in `api/mod.rs`); request schemas are written beside the types
//! that enforce them (`api/schema.rs`).

use super::auth::COOKIE;
use super::error::ErrorBody;
use crate::policy::Policy;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Doc, RefOr};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tokengate control plane",
        description = "Access tokens for Envoy and Istio: the admin API, the web console's \
            session, and the filters' sync and usage calls.\n\n\
            Every error answer is JSON, `{\"error\": code, \"message\": sentence}` (see \
            `ErrorBody`). A 400 means the request breaks this document: the body or a query \
            parameter is not as its schema says (a time in the past, where a future one is \
            asked for, and the server's expiry policy are the only rules the schemas cannot \
            state; their descriptions do). A 409 means the request is well formed but \
            conflicts with the token's current state.",
    ),
    modifiers(&Security),
    components(schemas(ErrorBody)),
    tags(
        (name = "tokens", description = "Create and govern tokens (admin credential or console session)"),
        (name = "scopes", description = "Named sets of method and path rules that tokens may be limited to (admin credential or console session)"),
        (name = "audit", description = "The audit trail (admin credential or console session)"),
        (name = "filters", description = "Called by the Envoy filters (sync credential)"),
        (name = "console", description = "The web console's sign-in: a session cookie for an admin credential"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut Doc) {
        let components = doc.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("admin", "A named admin credential (`--admin-token`, `--admin-credentials-file`)"),
            ("sync", "The sync credential (`--sync-token`): reads /v1/sync, reports /v1/usage, nothing else"),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                COOKIE,
                "The web console's session, set by POST /v1/session; it stands for the admin \
                 credential it was signed in with",
            ))),
        );
        components.add_security_scheme(
            "csrf",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-CSRF-Token",
                "The session's `csrf_token` (from POST or GET /v1/session): a console session \
                 sends it with every change",
            ))),
        );
    }
}

fn error(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(ErrorBody::name_ref()))
            .build(),
    )
}

trait NameRef {
    fn name_ref() -> RefOr<utoipa::openapi::Schema>;
}

impl<T: ToSchema> NameRef for T {
    fn name_ref() -> RefOr<utoipa::openapi::Schema> {
        RefOr::Ref(utoipa::openapi::Ref::from_schema_name(T::name()))
    }
}

fn header(schema: Value, description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(super::schema::from_json(schema))
        .description(Some(description))
        .build()
}

/// `Retry-After` in whole seconds.
fn retry_after(description: &str) -> utoipa::openapi::header::Header {
    header(json!({"type": "integer", "minimum": 1}), description)
}

fn unauthorized(description: &str) -> Response {
    error(description)
        .header(
            "WWW-Authenticate",
            header(
                json!({"type": "string", "const": "Bearer"}),
                "Always `Bearer`",
            ),
        )
        .build()
}

fn throttled() -> Response {
    error(
        "`too_many_failures`: this address presented too many refused credentials \
         (`--auth-failure-burst`, `--auth-failure-interval`); every credential it presents is \
         refused until `Retry-After`, right or wrong",
    )
    .header(
        "Retry-After",
        retry_after("Seconds until this address may present a credential again"),
    )
    .build()
}

fn responses(list: Vec<(&str, Response)>) -> BTreeMap<String, RefOr<Response>> {
    list.into_iter()
        .map(|(status, r)| (status.to_string(), RefOr::T(r)))
        .collect()
}

/// Refusals of an admin credential (`Authorization: Bearer`) or a console session.
pub struct AdminCredential;

impl IntoResponses for AdminCredential {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![
            (
                "401",
                unauthorized(
                    "`unauthorized`: no admin credential or console session, or a wrong one",
                ),
            ),
            ("429", throttled()),
        ])
    }
}

/// Refusals of an admin credential presented to sign in to the console.
pub struct SignInCredential;

impl IntoResponses for SignInCredential {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![
            (
                "401",
                unauthorized("`unauthorized`: not an admin credential"),
            ),
            ("429", throttled()),
        ])
    }
}

/// Refusals of the sync credential.
pub struct SyncCredential;

impl IntoResponses for SyncCredential {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![
            (
                "401",
                unauthorized("`unauthorized`: no sync credential, or a wrong one"),
            ),
            ("429", throttled()),
        ])
    }
}

/// A console session's change without its CSRF token.
pub struct Csrf;

impl IntoResponses for Csrf {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![(
            "403",
            error(
                "`csrf_failed`: a console session's change without its CSRF token in \
                 X-CSRF-Token",
            )
            .build(),
        )])
    }
}

/// A request body the call cannot take.
pub struct BadBody;

impl IntoResponses for BadBody {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![
            (
                "400",
                error(
                    "`invalid_field` (naming the field in `field`) or `invalid_body`: the body \
                     is not one JSON object as its schema says",
                )
                .build(),
            ),
            (
                "408",
                error(
                    "`request_timeout`: the body did not arrive within `--body-read-timeout`; \
                     the connection is closed",
                )
                .build(),
            ),
            (
                "413",
                error(
                    "`payload_too_large`: the body is over 64 kB (2 MB for /v1/usage and /v1/fleet, which \
                     also refuse more entries than one report may carry)",
                )
                .build(),
            ),
            (
                "415",
                error(
                    "`unsupported_media_type`: the body is labelled as something other than \
                     JSON (`field`: `content-type`)",
                )
                .build(),
            ),
        ])
    }
}

/// A query the call cannot take.
pub struct BadQuery;

impl IntoResponses for BadQuery {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![(
            "400",
            error(
                "`invalid_field`: a query parameter is not as its schema says, unknown, or \
                 given twice (named in `field`)",
            )
            .build(),
        )])
    }
}

/// `/v1/tokens/{id}` names no live token.
pub struct TokenNotFound;

impl IntoResponses for TokenNotFound {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![(
            "404",
            error(
                "`not_found`: no such token, or it was purged, or revoked (then `revoked_at` \
                 says when)",
            )
            .build(),
        )])
    }
}

/// `/v1/scopes/{name}` names no scope.
pub struct ScopeNotFound;

impl IntoResponses for ScopeNotFound {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![("404", error("`not_found`: no such scope").build())])
    }
}

/// What any call that reads or writes the database may answer.
pub struct Store;

impl IntoResponses for Store {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses(vec![
            (
                "500",
                error("`internal`: the database failed in an unexpected way; see the log").build(),
            ),
            (
                "503",
                error(
                    "`store_unavailable`: the database does not answer (within \
                     `--db-timeout`); try again after `Retry-After`",
                )
                .header(
                    "Retry-After",
                    retry_after("Seconds to wait before trying again"),
                )
                .build(),
            ),
        ])
    }
}

/// Response headers that are sent with every answer of their status where they are
/// documented (utoipa's header model has no `required`).
const ALWAYS_SENT: &[(&str, &str)] = &[
    ("401", "WWW-Authenticate"),
    ("429", "Retry-After"),
    ("201", "Set-Cookie"),
    ("204", "Set-Cookie"),
];

/// `/v1/openapi.json` is served by the router directly; it documents itself here.
pub fn add_self(doc: &mut Doc) {
    let op = OperationBuilder::new()
        .tag("operations")
        .operation_id(Some("openapi"))
        .summary(Some("This document"))
        .response(
            "200",
            ResponseBuilder::new()
                .description("The OpenAPI 3.1 description of this API")
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(super::schema::from_json(json!({"type": "object"}))))
                        .build(),
                ),
        )
        .build();
    doc.paths.paths.insert(
        "/v1/openapi.json".into(),
        PathItem::new(HttpMethod::Get, op),
    );
}

/// utoipa 5 writes a Link's fields in snake_case; OpenAPI spells them in camelCase.
fn camel_case_links(response: &mut Value) {
    let Some(links) = response.get_mut("links").and_then(Value::as_object_mut) else {
        return;
    };
    for link in links.values_mut().filter_map(Value::as_object_mut) {
        for (from, to) in [
            ("operation_id", "operationId"),
            ("operation_ref", "operationRef"),
            ("request_body", "requestBody"),
        ] {
            if let Some(v) = link.remove(from) {
                link.insert(to.into(), v);
            }
        }
    }
}

/// utoipa writes an optional request body (`Option<T>`) as one that may be JSON `null`; an
/// optional body is one that may be left out, and `null` is not an object.
fn optional_body(op: &mut Value) {
    let Some(body) = op.get_mut("requestBody") else {
        return;
    };
    if body.get("required") == Some(&Value::Bool(true)) {
        return;
    }
    let Some(content) = body.get_mut("content").and_then(Value::as_object_mut) else {
        return;
    };
    for media in content.values_mut() {
        let Some(schema) = media.get_mut("schema") else {
            continue;
        };
        let not_null: Vec<Value> = schema
            .get("oneOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|s| s.get("type") != Some(&json!("null")))
            .cloned()
            .collect();
        if let [only] = not_null.as_slice() {
            *schema = only.clone();
        }
    }
}

/// The last touches, on the document as JSON: the headers that are always sent, links as
/// OpenAPI spells them, optional bodies, and the operator's expiry policy in the creation
/// body's schema.
pub fn finish(doc: &mut Value, policy: &Policy) {
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for op in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in op.values_mut() {
                optional_body(op);
                let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                    continue;
                };
                responses.values_mut().for_each(camel_case_links);
                for (status, name) in ALWAYS_SENT {
                    if let Some(h) = responses
                        .get_mut(*status)
                        .and_then(|r| r.get_mut("headers"))
                        .and_then(|h| h.get_mut(*name))
                    {
                        h["required"] = true.into();
                    }
                }
            }
        }
    }
    if let Some(rules) = super::tokens::policy_rules(policy) {
        if let Some(all) = doc
            .pointer_mut("/components/schemas/CreateBody/allOf")
            .and_then(Value::as_array_mut)
        {
            all.push(rules);
        }
    }
}
