//! `/v1/scopes`: create, list, get, update, delete. What a scope's rules say is
//! `tokengate_wire::scope`'s; a rule's path grammar is stated here as a pattern built from
//! the same characters, and checked by the same code (`check_rule`).

use super::auth::Actor;
use super::body::{nullable, parse_json, JsonBody, Params};
use super::error::ErrorBody;
use super::openapi::{AdminCredential, BadBody, BadQuery, Csrf, ScopeNotFound, Store};
use super::schema::{self, described};
use super::{ApiError, AppState};
use crate::domain::rfc3339;
use crate::domain::scopes::{NewScope, ScopePatch};
use crate::store::ScopeRow;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::LazyLock;
use tokengate_wire::scope::{
    Rule, MAX_DESCRIPTION, MAX_METHOD, MAX_METHODS, MAX_NAME, MAX_PATH, MAX_RULES, MAX_TOKEN_SCOPES,
};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

/// A scope name, as `tokengate_wire::scope::check_name` takes it.
pub fn name_schema() -> Value {
    static PATTERN: LazyLock<String> =
        LazyLock::new(|| format!("^[a-z0-9][a-z0-9:._-]{{0,{}}}$", MAX_NAME - 1));
    json!({"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": PATTERN.as_str()})
}

/// A token's `scopes`: null (unrestricted) or scope names.
pub fn token_scopes_schema() -> Value {
    json!({
        "type": ["array", "null"],
        "items": name_schema(),
        "maxItems": MAX_TOKEN_SCOPES,
    })
}

/// A rule's path as `check_rule` takes it: `/`, or segments that are `*`, a literal of
/// RFC 3986 `pchar` without `%` and `;` (not `.` or `..`), and a last one that may be `**`.
fn path_schema() -> Value {
    static PATTERN: LazyLock<String> = LazyLock::new(|| {
        let any = r"[A-Za-z0-9\-._~!$&'()+,=:@]";
        let no_dot = r"[A-Za-z0-9\-_~!$&'()+,=:@]";
        let literal = format!(r"(?:{no_dot}{any}*|\.{no_dot}{any}*|\.\.{any}+)");
        let segment = format!(r"(?:\*|{literal})");
        format!(r"^/(?:(?:{segment}/)*(?:{segment}|\*\*))?$")
    });
    described(
        json!({"type": "string", "maxLength": MAX_PATH, "pattern": PATTERN.as_str()}),
        "`/` and `/`-separated segments: a literal (letters, digits and -._~!$&'()+,=:@; not \
         `.` or `..`), `*` for exactly one segment, and as the last one `**` for any rest \
         (none included: `/orders/**` covers `/orders` too). Matched against the path Envoy \
         routes on, without its query; case matters.",
    )
}

fn rule_schema() -> Value {
    let methods = described(
        json!({
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_METHODS,
            "items": {"type": "string", "pattern": format!("^[A-Z]{{1,{MAX_METHOD}}}$")},
        }),
        "Upper-case method names; left out: any method.",
    );
    let mut o = schema::object(
        json!({"methods": methods, "path": path_schema()}),
        &["path"],
    );
    o.insert(
        "examples".into(),
        json!([{"methods": ["GET"], "path": "/orders/**"}]),
    );
    Value::Object(o)
}

fn rules_schema() -> Value {
    json!({"type": "array", "minItems": 1, "maxItems": MAX_RULES, "items": rule_schema()})
}

fn description_schema() -> Value {
    static PATTERN: LazyLock<String> = LazyLock::new(crate::text::optional_pattern);
    json!({"type": "string", "maxLength": MAX_DESCRIPTION, "pattern": PATTERN.as_str()})
}

// For `#[schema(schema_with = ...)]`, which takes a function without arguments.
fn name_field() -> RefOr<Schema> {
    schema::from_json(name_schema())
}

fn rules_field() -> RefOr<Schema> {
    schema::from_json(rules_schema())
}

fn time_field() -> RefOr<Schema> {
    schema::from_json(schema::date_time())
}

/// A scope as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct ScopeView {
    #[schema(schema_with = name_field)]
    name: String,
    /// Empty when none was given.
    description: String,
    #[schema(schema_with = rules_field)]
    rules: Vec<Rule>,
    #[schema(schema_with = time_field)]
    created_at: String,
    #[schema(schema_with = time_field)]
    updated_at: String,
    /// The version of the scope's last change (as `/v1/sync` hands it out).
    version: u64,
}

impl From<ScopeRow> for ScopeView {
    fn from(s: ScopeRow) -> ScopeView {
        ScopeView {
            name: s.name,
            description: s.description,
            rules: s.rules,
            created_at: rfc3339(s.created_at),
            updated_at: rfc3339(s.updated_at),
            version: s.version,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ScopeListing {
    /// Every scope, by name.
    scopes: Vec<ScopeView>,
}

/// `POST /v1/scopes`. `description` may also be null, which means the same as absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateScopeBody {
    name: Option<String>,
    description: Option<String>,
    rules: Option<Vec<Rule>>,
}

impl PartialSchema for CreateScopeBody {
    fn schema() -> RefOr<Schema> {
        let mut o = schema::object(
            json!({
                "name": described(name_schema(),
                    "Unique; 1 to 64 characters of a-z, 0-9, ':', '.', '_' and '-', starting \
                     with a letter or digit."),
                "description": described(schema::nullable(description_schema()),
                    "What the scope is for; null or absent: none."),
                "rules": described(rules_schema(),
                    "A request is in the scope when any rule covers its method and path."),
            }),
            &["name", "rules"],
        );
        o.insert(
            "examples".into(),
            json!([{"name": "orders:read", "description": "Read orders",
                    "rules": [{"methods": ["GET", "HEAD"], "path": "/orders/**"},
                              {"path": "/health"}]}]),
        );
        schema::from_json(Value::Object(o))
    }
}

impl ToSchema for CreateScopeBody {}

/// `PATCH /v1/scopes/{name}`: the fields to change, at least one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchScopeBody {
    #[serde(default, deserialize_with = "nullable")]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    rules: Option<Option<Vec<Rule>>>,
}

impl PartialSchema for PatchScopeBody {
    fn schema() -> RefOr<Schema> {
        let mut o = schema::object(
            json!({
                "description": described(schema::nullable(description_schema()),
                    "null or empty: none."),
                "rules": described(rules_schema(),
                    "Replaces every rule; cannot be null."),
            }),
            &[],
        );
        o.insert("minProperties".into(), 1.into());
        o.insert(
            "examples".into(),
            json!([{"description": "Read orders and their lines",
                    "rules": [{"methods": ["GET"], "path": "/orders/**"}]}]),
        );
        schema::from_json(Value::Object(o))
    }
}

impl ToSchema for PatchScopeBody {}

/// The `{name}` of a `/v1/scopes/{name}` path: any text (one that is no scope's is a 404).
pub struct ScopeName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ScopeName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::field("name", "must be percent-encoded UTF-8"))?;
        Ok(ScopeName(name))
    }
}

/// A created scope's name, for the links to the calls that take it.
const BY_NAME: &str = "$response.body#/name";

#[utoipa::path(post, path = "/v1/scopes", tag = "scopes", operation_id = "create_scope",
    summary = "Create a scope",
    security(("admin" = []), ("session" = [], "csrf" = [])),
    request_body = CreateScopeBody,
    responses((status = 201, description = "Created", body = ScopeView,
            links(
                ("get" = (operation_id = "get_scope", parameters(("name" = BY_NAME)))),
                ("update" = (operation_id = "update_scope", parameters(("name" = BY_NAME)))),
                ("delete" = (operation_id = "delete_scope", parameters(("name" = BY_NAME)))),
            )),
        (status = 409, description = "`conflict`: a scope of that name exists", body = ErrorBody),
        BadBody, AdminCredential, Csrf, Store))]
pub async fn create(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    JsonBody(body): JsonBody,
) -> Result<impl IntoResponse, ApiError> {
    let b: CreateScopeBody = parse_json(&body)?;
    let name = b
        .name
        .ok_or_else(|| ApiError::field("name", "is required"))?;
    let rules = b
        .rules
        .ok_or_else(|| ApiError::field("rules", "is required"))?;
    let now = Utc::now().timestamp();
    let created = state
        .scopes
        .create(
            &actor.0,
            NewScope {
                name,
                description: b.description,
                rules,
            },
            now,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(ScopeView::from(created))))
}

#[utoipa::path(get, path = "/v1/scopes", tag = "scopes", operation_id = "list_scopes",
    summary = "List scopes",
    security(("admin" = []), ("session" = [])),
    responses((status = 200, description = "Every scope, by name", body = ScopeListing),
        BadQuery, AdminCredential, Store))]
pub async fn list(
    State(state): State<AppState>,
    Params(params): Params,
) -> Result<Json<ScopeListing>, ApiError> {
    if let Some((k, _)) = params.first() {
        return Err(ApiError::field(k, "is not a known query parameter"));
    }
    let scopes = state.scopes.list().await?;
    Ok(Json(ScopeListing {
        scopes: scopes.into_iter().map(ScopeView::from).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/scopes/{name}", tag = "scopes", operation_id = "get_scope",
    summary = "Show a scope",
    security(("admin" = []), ("session" = [])),
    params(("name" = String, Path, description = "Scope name")),
    responses((status = 200, description = "The scope", body = ScopeView),
        AdminCredential, ScopeNotFound, Store))]
pub async fn get(
    State(state): State<AppState>,
    ScopeName(name): ScopeName,
) -> Result<Json<ScopeView>, ApiError> {
    Ok(Json(state.scopes.get(&name).await?.into()))
}

#[utoipa::path(patch, path = "/v1/scopes/{name}", tag = "scopes", operation_id = "update_scope",
    summary = "Change a scope's description or rules",
    security(("admin" = []), ("session" = [], "csrf" = [])),
    params(("name" = String, Path, description = "Scope name")),
    request_body = PatchScopeBody,
    responses((status = 200, description = "The updated scope; the filters apply it within moments", body = ScopeView),
        (status = 409, description = "`conflict`: the scope kept changing concurrently", body = ErrorBody),
        BadBody, AdminCredential, Csrf, ScopeNotFound, Store))]
pub async fn update(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ScopeName(name): ScopeName,
    JsonBody(body): JsonBody,
) -> Result<Json<ScopeView>, ApiError> {
    let p: PatchScopeBody = parse_json(&body)?;
    if p.description.is_none() && p.rules.is_none() {
        return Err(ApiError::Body(
            "Give at least one of description, rules.".into(),
        ));
    }
    let rules = match p.rules {
        Some(Some(r)) => Some(r),
        Some(None) => return Err(ApiError::field("rules", "cannot be null")),
        None => None,
    };
    let patch = ScopePatch {
        description: p.description.map(Option::unwrap_or_default),
        rules,
    };
    let now = Utc::now().timestamp();
    Ok(Json(
        state
            .scopes
            .update(&actor.0, &name, patch, now)
            .await?
            .into(),
    ))
}

#[utoipa::path(delete, path = "/v1/scopes/{name}", tag = "scopes", operation_id = "delete_scope",
    summary = "Delete a scope",
    security(("admin" = []), ("session" = [], "csrf" = [])),
    params(("name" = String, Path, description = "Scope name")),
    responses((status = 204, description = "Deleted"),
        (status = 409, description = "`scope_in_use`: live tokens still name the scope (`tokens` \
            says how many; take it off them first), or `conflict`: the scope kept changing \
            concurrently", body = ErrorBody),
        AdminCredential, Csrf, ScopeNotFound, Store))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ScopeName(name): ScopeName,
) -> Result<StatusCode, ApiError> {
    let now = Utc::now().timestamp();
    state.scopes.delete(&actor.0, &name, now).await?;
    Ok(StatusCode::NO_CONTENT)
}
