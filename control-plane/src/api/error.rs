//! API errors: `{"error": code, "message": sentence, "field"?: name}` with the right status.

use super::schema;
use crate::domain::{rfc3339, DomainError};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use utoipa::openapi::{RefOr, Schema};

/// Every `error` code an answer may carry.
pub const CODES: &[&str] = &[
    "invalid_field",
    "invalid_body",
    "unauthorized",
    "too_many_failures",
    "request_timeout",
    "csrf_failed",
    "not_found",
    "already_revoked",
    "scope_in_use",
    "no_route",
    "method_not_allowed",
    "payload_too_large",
    "unsupported_media_type",
    "conflict",
    "store_unavailable",
    "shutting_down",
    "internal",
];

/// Every error answer's body.
pub struct ErrorBody;

impl utoipa::PartialSchema for ErrorBody {
    fn schema() -> RefOr<Schema> {
        let mut o = schema::answer(
            json!({
                "error": schema::described(schema::one_of(CODES), "What went wrong, for programs."),
                "message": schema::described(json!({"type": "string"}), "What went wrong, for people: a sentence."),
                "field": schema::described(json!({"type": "string"}),
                    "The body field or query parameter at fault (`invalid_field`, and `conflict` \
                     when a field conflicts with the token's settings), or `content-type` \
                     (`unsupported_media_type`)."),
                "tokens": schema::described(schema::unsigned(),
                    "How many live tokens still name the scope (`scope_in_use`)."),
                "revoked_at": schema::described(schema::date_time(),
                    "When the token was revoked (`already_revoked`, or `not_found` for a revoked token)."),
            }),
            &["error", "message"],
        );
        o.insert("description".into(), "Every error answer's body.".into());
        schema::from_json(Value::Object(o))
    }
}

impl utoipa::ToSchema for ErrorBody {}

#[derive(Debug)]
pub enum ApiError {
    /// 400 about one field of the body or query; `message` is a phrase that follows the
    /// field's name ("must be between 1 and 1000").
    Field {
        field: String,
        message: String,
    },
    /// 400 about the body as a whole.
    Body(String),
    Unauthorized,
    /// The client's address failed too many credential checks.
    Throttled {
        retry_after_secs: u64,
    },
    /// The request body did not arrive within the body deadline.
    BodyTimeout,
    /// A console session's change without its CSRF token.
    Csrf,
    NotFound,
    /// The token was revoked (Unix seconds): a 404 that says so.
    Revoked {
        at: i64,
    },
    /// A revoke of a token that was already revoked.
    AlreadyRevoked {
        at: i64,
    },
    /// No such scope.
    NoScope,
    /// A deletion of a scope that live tokens still name.
    ScopeInUse {
        name: String,
        tokens: u64,
    },
    /// No route for the path (not the same as an unknown token).
    NoRoute,
    /// The path exists, the method does not.
    MethodNotAllowed,
    TooLarge(String),
    /// A body that is not labelled as JSON.
    UnsupportedMediaType,
    Conflict(String),
    /// 409 about one field that conflicts with the token's current settings.
    FieldConflict {
        field: String,
        message: String,
    },
    /// The database is unreachable; the client should try again shortly.
    StoreUnavailable(String),
    /// The server is stopping (a readiness probe's answer).
    ShuttingDown,
    Internal(String),
}

impl ApiError {
    pub fn field(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::Field {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> ApiError {
        match e {
            DomainError::NotFound => ApiError::NotFound,
            DomainError::Revoked { at } => ApiError::Revoked { at },
            DomainError::Conflict(m) => ApiError::Conflict(m),
            DomainError::Invalid { field, message } => ApiError::field(field, message),
            DomainError::InvalidAt { field, message } => ApiError::Field { field, message },
            DomainError::NoScope => ApiError::NoScope,
            DomainError::ScopeInUse { name, tokens } => ApiError::ScopeInUse { name, tokens },
            DomainError::StateConflict { field, message } => ApiError::FieldConflict {
                field: field.to_string(),
                message,
            },
            DomainError::Unavailable(m) => ApiError::StoreUnavailable(m),
            DomainError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        DomainError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::Field { field, message } => (
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_field", "message": format!("{field} {message}."), "field": field}),
            ),
            ApiError::Body(message) => (
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_body", "message": message}),
            ),
            ApiError::Unauthorized => {
                let body = json!({"error": "unauthorized", "message": "A valid credential is required in Authorization: Bearer."});
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    Json(body),
                )
                    .into_response();
            }
            ApiError::Throttled { retry_after_secs } => {
                let body = json!({"error": "too_many_failures", "message": format!("Too many refused credentials from this address; try again in {retry_after_secs} s.")});
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, retry_after_secs.to_string())],
                    Json(body),
                )
                    .into_response();
            }
            ApiError::BodyTimeout => {
                let body = json!({"error": "request_timeout", "message": "The request body did not arrive in time."});
                return (
                    StatusCode::REQUEST_TIMEOUT,
                    [(header::CONNECTION, "close")],
                    Json(body),
                )
                    .into_response();
            }
            ApiError::Csrf => (
                StatusCode::FORBIDDEN,
                json!({"error": "csrf_failed", "message": "A console session's changes need its CSRF token in X-CSRF-Token."}),
            ),
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "message": "No such token."}),
            ),
            ApiError::NoScope => (
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "message": "No such scope."}),
            ),
            ApiError::ScopeInUse { name, tokens } => (
                StatusCode::CONFLICT,
                json!({"error": "scope_in_use", "message": format!(
                    "The scope {name} is still named by {tokens} token{}; take it off them first \
                     (GET /v1/tokens shows each token's scopes).",
                    if tokens == 1 { "" } else { "s" }
                ), "tokens": tokens}),
            ),
            ApiError::Revoked { at } => (
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "message": format!("The token was revoked at {}; a revoked token cannot be shown or changed.", rfc3339(at)), "revoked_at": rfc3339(at)}),
            ),
            ApiError::AlreadyRevoked { at } => (
                StatusCode::CONFLICT,
                json!({"error": "already_revoked", "message": format!("The token was already revoked at {}.", rfc3339(at)), "revoked_at": rfc3339(at)}),
            ),
            ApiError::NoRoute => (
                StatusCode::NOT_FOUND,
                json!({"error": "no_route", "message": "No such endpoint; see /v1/openapi.json."}),
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method_not_allowed", "message": "This endpoint does not take that method; see the Allow header and /v1/openapi.json."}),
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"error": "unsupported_media_type", "message": "content-type: request bodies must be JSON, sent as application/json.", "field": "content-type"}),
            ),
            ApiError::TooLarge(message) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "payload_too_large", "message": message}),
            ),
            ApiError::Conflict(message) => (
                StatusCode::CONFLICT,
                json!({"error": "conflict", "message": message}),
            ),
            ApiError::FieldConflict { field, message } => (
                StatusCode::CONFLICT,
                json!({"error": "conflict", "message": format!("{field} {message}."), "field": field}),
            ),
            ApiError::StoreUnavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                let body = json!({"error": "store_unavailable", "message": "The database is unavailable; try again shortly."});
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "1")],
                    Json(body),
                )
                    .into_response();
            }
            ApiError::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "shutting_down", "message": "This replica is shutting down."}),
            ),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "internal", "message": "Internal error; see the control plane's log."}),
                )
            }
        };
        (status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_answer_carries_a_listed_code() {
        let all = [
            ApiError::field("f", "is bad"),
            ApiError::Body("bad".into()),
            ApiError::Unauthorized,
            ApiError::Throttled {
                retry_after_secs: 1,
            },
            ApiError::BodyTimeout,
            ApiError::Csrf,
            ApiError::NotFound,
            ApiError::NoScope,
            ApiError::ScopeInUse {
                name: "s".into(),
                tokens: 2,
            },
            ApiError::Revoked { at: 0 },
            ApiError::AlreadyRevoked { at: 0 },
            ApiError::NoRoute,
            ApiError::MethodNotAllowed,
            ApiError::TooLarge("big".into()),
            ApiError::UnsupportedMediaType,
            ApiError::Conflict("c".into()),
            ApiError::FieldConflict {
                field: "f".into(),
                message: "clashes".into(),
            },
            ApiError::StoreUnavailable("down".into()),
            ApiError::ShuttingDown,
            ApiError::Internal("bug".into()),
        ];
        let mut seen = vec![];
        for e in all {
            let body = axum::body::to_bytes(e.into_response().into_body(), 4096)
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&body).unwrap();
            let code = v["error"].as_str().unwrap().to_string();
            assert!(CODES.contains(&code.as_str()), "{code} is not in CODES");
            seen.push(code);
        }
        for code in CODES {
            assert!(seen.iter().any(|c| c == code), "{code} is never answered");
        }
    }
}
