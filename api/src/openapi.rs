//! The OpenAPI 3.1 document of the REST API, served at `GET /api/openapi.json`.
//!
//! Every route of `router_with_openiap` carries a `#[utoipa::path]`; the
//! two OpenIAP routes whose handlers live in `openiap/` are described by
//! stubs here. Error responses all share one schema, `ErrorBody`
//! (`{"error", "detail"}`, see `error.rs`). Invariant (tested in
//! api/tests/openapi.rs): every route the router serves is in the document,
//! and every documented path and method reaches a handler.

use std::collections::BTreeMap;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use crate::ApiError;

/// The body of every failed request.
#[derive(Debug, ToSchema)]
#[schema(example = json!({"error": "not_found", "detail": "things/0123456789abcdef01234567 does not exist"}))]
pub struct ErrorBody {
    /// A short machine-readable code: `bad_request`, `unauthorized`,
    /// `forbidden`, `not_found`, `method_not_allowed`, `conflict`,
    /// `payload_too_large`, `internal`, `unavailable`, `broker`.
    pub error: String,
    /// What went wrong, precisely.
    pub detail: String,
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

fn error_responses(list: &[(&str, &str)]) -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
    list.iter()
        .map(|(status, description)| ((*status).to_owned(), error_response(description)))
        .collect()
}

/// The failures any route that needs a caller can answer with.
#[derive(Debug)]
pub struct CallerErrors;

impl IntoResponses for CallerErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        error_responses(&[
            (
                "400",
                "bad input: a path segment, query string or body the route cannot use",
            ),
            ("401", "no caller: missing, wrong or expired credentials"),
            ("403", "the caller may read but not change this"),
            ("404", "no such thing, or the caller may not read it"),
            ("413", "request body over the limit"),
            ("500", "the node failed"),
            ("503", "the node is shutting down or its writer stopped"),
        ])
    }
}

/// The failures of a route open to anyone.
#[derive(Debug)]
pub struct PublicErrors;

impl IntoResponses for PublicErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        error_responses(&[
            ("400", "bad input"),
            ("413", "request body over the limit"),
            ("500", "the node failed"),
        ])
    }
}

/// The failures added by a message broker route.
#[derive(Debug)]
pub struct BrokerErrors;

impl IntoResponses for BrokerErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        let mut r = CallerErrors::responses();
        r.extend(error_responses(&[
            ("409", "an exchange of that name exists with another type"),
            ("502", "the external broker (RabbitMQ) failed"),
            ("503", "the queue is full"),
        ]));
        r
    }
}

/// Adds the two ways of signing a request: HTTP Basic (user name and
/// password) and a bearer JWT from `POST /api/v1/signin`.
#[derive(Debug)]
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("basic", SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)));
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// `GET /ws/v2`: OpenIAP envelopes over WebSocket (handler in `openiap::ws`).
#[utoipa::path(
    get,
    path = "/ws/v2",
    tag = "openiap",
    description = "Upgrades to a WebSocket carrying OpenIAP envelopes (JSON text frames). \
                   Sign in with the `signin` command, or set each envelope's `jwt`.",
    responses(
        (status = 101, description = "switched to the WebSocket protocol"),
        (status = 400, description = "not a WebSocket upgrade request (plain text, from axum)", content_type = "text/plain", body = String),
        (status = 426, description = "upgrade required (plain text, from axum)", content_type = "text/plain", body = String),
    )
)]
#[allow(dead_code)]
fn openiap_websocket() {}

/// `GET /config`: what OpenIAP clients read before connecting (handler in
/// `openiap::config`).
#[utoipa::path(
    get,
    path = "/config",
    tag = "openiap",
    description = "OpenCore's client configuration: WebSocket host, version, optional features.",
    responses((status = 200, description = "the configuration", body = Object))
)]
#[allow(dead_code)]
fn openiap_config() {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ocmesh REST API",
        description = "An OpenCore-compatible automation node: documents with full history, \
                       queries, work-item queues, files, messaging, users, mesh status. Every failure \
                       is a JSON `{error, detail}` (schema `ErrorBody`)."
    ),
    paths(
        crate::health,
        crate::ui_page,
        openiap_websocket,
        openiap_config,
        crate::openapi_json,
        crate::signin,
        crate::insert_document,
        crate::get_document,
        crate::replace_document,
        crate::update_document,
        crate::delete_document,
        crate::recover_document,
        crate::insert_many,
        crate::insert_or_update,
        crate::update_many,
        crate::delete_many,
        crate::list_versions,
        crate::get_version,
        crate::list_conflicts,
        crate::document_conflicts,
        crate::query_documents,
        crate::count_documents,
        crate::distinct_values,
        crate::list_indexes,
        crate::create_index,
        crate::drop_index,
        crate::mesh_peers,
        crate::metrics,
        crate::upload_file,
        crate::download_file,
        crate::delete_file,
        crate::create_user,
        crate::mq_declare_queue,
        crate::mq_delete_queue,
        crate::mq_next,
        crate::mq_declare_exchange,
        crate::mq_bind,
        crate::mq_publish,
        crate::add_queue,
        crate::get_queue,
        crate::update_queue,
        crate::delete_queue,
        crate::push_workitems,
        crate::pop_workitem,
        crate::get_workitem,
        crate::update_workitem,
        crate::delete_workitem,
        crate::takeover_workitem,
    ),
    components(schemas(ErrorBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "meta", description = "health, this document, metrics, mesh status"),
        (name = "auth", description = "sign-in and users"),
        (name = "documents", description = "documents, their history, bulk writes"),
        (name = "queries", description = "query, count, distinct, indexes"),
        (name = "workitems", description = "work-item queues and items"),
        (name = "files", description = "file upload, download, delete"),
        (name = "mq", description = "message queues, exchanges, bindings"),
        (name = "openiap", description = "the OpenIAP client protocol's HTTP side"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

/// The document as JSON text.
pub fn document_json() -> Result<String, ApiError> {
    ApiDoc::openapi()
        .to_pretty_json()
        .map_err(|e| ApiError::internal(format!("OpenAPI document does not serialize: {e}")))
}

/// The `GET /api/openapi.json` response.
pub(crate) fn document_response() -> Response {
    match document_json() {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            text,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

// Request bodies, for the document only: the handlers read a `JsonObject`
// and check its fields themselves (with the same rules).

/// `POST /api/v1/signin`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct SignInBody {
    #[schema(min_length = 1)]
    pub username: String,
    pub password: String,
}

/// `POST /api/v1/users` (admins only).
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct NewUserBody {
    #[schema(min_length = 1)]
    pub username: String,
    #[schema(min_length = 1)]
    pub password: String,
    pub name: Option<String>,
}

/// The state a work item is completed with.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum WorkItemState {
    Successful,
    Failed,
    Retry,
}

/// `PUT /api/v1/workitems/{id}`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct WorkItemUpdateBody {
    pub state: WorkItemState,
    /// `application` (retried up to the queue's maxretries) or `business` (never retried).
    pub errortype: Option<String>,
    pub errormessage: Option<String>,
    /// Replaces the item's payload when given.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

/// `POST .../insertmany`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct InsertManyBody {
    #[schema(value_type = Vec<Object>)]
    pub documents: Vec<serde_json::Value>,
}

/// `POST .../insertorupdate`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct InsertOrUpdateBody {
    #[schema(value_type = Object)]
    pub document: serde_json::Value,
    /// Field names that identify the document: a comma-separated string
    /// or an array of strings (default `_id`).
    #[schema(value_type = Option<Value>)]
    pub uniqueness: Option<serde_json::Value>,
}

/// `POST .../updatemany`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct UpdateManyBody {
    /// A query filter (`$eq $ne $gt ... $and $or`); default `{}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub filter: serde_json::Value,
    /// Update operators (`$set $unset $inc $push $pull`).
    #[schema(value_type = Object)]
    pub update: serde_json::Value,
}

/// `POST .../deletemany` and `POST .../count`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct FilterBody {
    /// A query filter; default `{}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub filter: serde_json::Value,
}

/// `POST .../distinct`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct DistinctBody {
    #[schema(min_length = 1)]
    pub field: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub filter: serde_json::Value,
}

/// `POST .../indexes`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct IndexBody {
    /// A field path, dotted through nested objects.
    #[schema(min_length = 1)]
    pub field: String,
}

/// `POST /api/v1/workitemqueues`: the queue document; other fields are kept.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct QueueBody {
    #[schema(min_length = 1)]
    pub name: String,
    pub maxretries: Option<i64>,
    /// Seconds before a retried item is due again.
    pub retrydelay: Option<f64>,
    /// Seconds a popped item stays leased (default 300).
    pub leasetime: Option<f64>,
    pub success_wiq: Option<String>,
    pub failed_wiq: Option<String>,
}

/// `POST /api/v1/mq/queues`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct MqQueueBody {
    /// Without a name, a temporary queue with a generated one.
    pub name: Option<String>,
}

/// An exchange's routing.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum ExchangeType {
    Direct,
    Fanout,
    Topic,
}

/// `POST /api/v1/mq/exchanges`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct MqExchangeBody {
    #[schema(min_length = 1)]
    pub name: String,
    /// Default `fanout`.
    #[serde(rename = "type")]
    pub kind: Option<ExchangeType>,
}

/// `POST /api/v1/mq/bindings`.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct MqBindBody {
    pub queue: String,
    pub exchange: String,
    pub routingkey: Option<String>,
}
