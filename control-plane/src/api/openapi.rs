//! The OpenAPI document's frame: title, security schemes, and the document's own path.
//! Paths and schemas come from the handlers' annotations (see `routes` in `api/mod.rs`).

use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as Doc;
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tokengate control plane",
        description = "Access tokens for Envoy and Istio: the admin API, the filters' sync and usage calls.",
    ),
    modifiers(&Security),
    tags(
        (name = "tokens", description = "Create and govern tokens (admin credential)"),
        (name = "audit", description = "The audit trail (admin credential)"),
        (name = "filters", description = "Called by the Envoy filters (sync credential)"),
        (name = "console", description = "The web console's sign-in: a session cookie for an admin credential"),
        (name = "operations", description = "Health and this document"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut Doc) {
        let components = doc.components.get_or_insert_with(Default::default);
        for (name, what) in [
            (
                "admin",
                "A named admin credential; or the console's session cookie, with the \
                 session's CSRF token in X-CSRF-Token on every change",
            ),
            (
                "sync",
                "The sync credential: reads /v1/sync, reports /v1/usage",
            ),
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
                super::auth::COOKIE,
                "Set by POST /v1/session; sign-out also needs X-CSRF-Token",
            ))),
        );
    }
}

/// `/v1/openapi.json` is served by the router directly; it documents itself here.
pub fn add_self(doc: &mut Doc) {
    let op = OperationBuilder::new()
        .tag("operations")
        .summary(Some("This document"))
        .response(
            "200",
            ResponseBuilder::new().description("The OpenAPI 3.1 description of this API"),
        )
        .build();
    doc.paths.paths.insert(
        "/v1/openapi.json".into(),
        PathItem::new(HttpMethod::Get, op),
    );
}
