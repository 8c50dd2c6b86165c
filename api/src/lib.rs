//! ocmesh-api: the client-facing HTTP side of a site.
//!
//! REST over axum: documents with history, sign-in, health and mesh
//! status, and a read-only management page at `/ui` (ui.html, embedded).
//! Every route but `/health`, `/ui` and `/api/v1/signin` (and the OpenIAP
//! and OpenAPI documents) needs a caller (HTTP Basic or a bearer JWT signed
//! by this site).
//!
//! Invariants: every failure is a JSON `{"error", "detail"}` with a fitting
//! status; request input never panics the server; reads run on the blocking
//! pool (redb reads are synchronous), writes go through the node's writer.

mod auth;
mod error;
pub mod openapi;
pub mod openiap;

use std::future::Future;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use ocmesh_federation::{PeerStatus, PeerTable};
use ocmesh_node::Node;
use ocmesh_node::messaging::{Broker, ExchangeKind, Message, MqError};
use ocmesh_node::query::value::kind_of;

pub use auth::{Caller, issue_token, verify_token};
pub use error::ApiError;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// What handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub node: Node,
    pub peers: Option<PeerTable>,
    pub limits: Limits,
    pub broker: Broker,
    /// The OpenIAP protocol (shared with the gRPC listener when the binary
    /// passes its own).
    pub openiap: openiap::FlowServer,
}

/// Request limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest file upload accepted.
    pub max_file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 1 << 30,
        }
    }
}

/// The REST API of a site with default limits.
pub fn router(node: Node, peers: Option<PeerTable>) -> Router {
    router_with_limits(node, peers, Limits::default())
}

/// The REST API of a site with the embedded message broker.
pub fn router_with_limits(node: Node, peers: Option<PeerTable>, limits: Limits) -> Router {
    router_with_broker(node, peers, limits, Broker::embedded())
}

/// The REST API of a site, with OpenIAP over WebSocket on its own dispatcher.
pub fn router_with_broker(node: Node, peers: Option<PeerTable>, limits: Limits, broker: Broker) -> Router {
    let openiap = openiap::FlowServer::new(node.clone(), openiap::GrpcLimits::default());
    router_with_openiap(node, peers, limits, broker, openiap)
}

/// The REST API of a site, plus OpenIAP over WebSocket (`/ws/v2`) served
/// by `openiap` (pass the gRPC listener's, so both share limits and counters).
pub fn router_with_openiap(
    node: Node,
    peers: Option<PeerTable>,
    limits: Limits,
    broker: Broker,
    openiap: openiap::FlowServer,
) -> Router {
    openiap.use_broker(broker.clone());
    let docs = "/api/v1/collections/{collection}/documents";
    Router::new()
        .route("/health", get(health))
        .route("/ui", get(ui_page))
        .route("/api/openapi.json", get(openapi_json))
        .route("/ws/v2", get(openiap::websocket))
        .route("/config", get(openiap::config))
        .route("/api/v1/signin", post(signin))
        .route(docs, post(insert_document))
        .route(
            &format!("{docs}/{{id}}"),
            get(get_document)
                .put(replace_document)
                .patch(update_document)
                .delete(delete_document),
        )
        .route(&format!("{docs}/{{id}}/recover"), post(recover_document))
        .route("/api/v1/collections/{collection}/insertmany", post(insert_many))
        .route(
            "/api/v1/collections/{collection}/insertorupdate",
            post(insert_or_update),
        )
        .route("/api/v1/collections/{collection}/updatemany", post(update_many))
        .route("/api/v1/collections/{collection}/deletemany", post(delete_many))
        .route(&format!("{docs}/{{id}}/versions"), get(list_versions))
        .route(&format!("{docs}/{{id}}/versions/{{n}}"), get(get_version))
        .route("/api/v1/collections/{collection}/query", post(query_documents))
        .route("/api/v1/collections/{collection}/count", post(count_documents))
        .route("/api/v1/collections/{collection}/distinct", post(distinct_values))
        .route(
            "/api/v1/collections/{collection}/indexes",
            get(list_indexes).post(create_index),
        )
        .route(
            "/api/v1/collections/{collection}/indexes/{field}",
            axum::routing::delete(drop_index),
        )
        .route("/api/v1/mesh/peers", get(mesh_peers))
        .route("/api/v1/conflicts", get(list_conflicts))
        .route(&format!("{docs}/{{id}}/conflicts"), get(document_conflicts))
        .route("/api/v1/metrics", get(metrics))
        .route("/api/v1/files", post(upload_file))
        .route("/api/v1/users", post(create_user))
        .route("/api/v1/mq/queues", post(mq_declare_queue))
        .route("/api/v1/mq/queues/{name}", axum::routing::delete(mq_delete_queue))
        .route("/api/v1/mq/queues/{name}/next", post(mq_next))
        .route("/api/v1/mq/exchanges", post(mq_declare_exchange))
        .route("/api/v1/mq/bindings", post(mq_bind))
        .route("/api/v1/mq/publish", post(mq_publish))
        .route("/api/v1/files/{id}", get(download_file).delete(delete_file))
        .route("/api/v1/workitemqueues", post(add_queue))
        .route(
            "/api/v1/workitemqueues/{name}",
            get(get_queue).put(update_queue).delete(delete_queue),
        )
        .route("/api/v1/workitemqueues/{name}/workitems", post(push_workitems))
        .route("/api/v1/workitemqueues/{name}/pop", post(pop_workitem))
        .route(
            "/api/v1/workitems/{id}",
            get(get_workitem).put(update_workitem).delete(delete_workitem),
        )
        .route("/api/v1/workitems/{id}/takeover", post(takeover_workitem))
        .fallback(|| async { ApiError::not_found("no such route") })
        // After every route: it only reaches the routes added before it.
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(log_request))
        .with_state(ApiState {
            node,
            peers,
            limits,
            broker,
            openiap,
        })
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status();
    let micros = started.elapsed().as_micros() as u64;
    if status.is_server_error() {
        tracing::info!(%method, %path, status = status.as_u16(), micros, "request failed");
    } else {
        tracing::debug!(%method, %path, status = status.as_u16(), micros, "request");
    }
    resp
}

/// `axum::extract::Path`, rejecting with a JSON error (a segment that is
/// not UTF-8 once percent-decoded, for one).
#[derive(Debug)]
struct Path<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(ApiError::rejected(e.status(), e.body_text())),
        }
    }
}

/// `axum::extract::Query`, rejecting with a JSON error.
#[derive(Debug)]
struct Query<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(ApiError::rejected(e.status(), e.body_text())),
        }
    }
}

/// A version number in a path: decimal digits only (no sign), within `u64`.
fn version_number(n: &str) -> Result<u64, ApiError> {
    let bad = || ApiError::bad_request(format!("version {n:?} is not a non-negative integer"));
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    n.parse().map_err(|_| bad())
}

/// A request body that must be a JSON object; anything else is a 400 that
/// quotes the parser, or a 413 when over the limit.
#[derive(Debug)]
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    "payload_too_large",
                    format!("request body is over {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::rejected(status, e.body_text())
            }
        })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => Ok(JsonObject(m)),
            Ok(other) => Err(ApiError::bad_request(format!(
                "document must be a JSON object, not {}",
                kind_of(&other)
            ))),
            Err(e) => Err(ApiError::bad_request(format!("body is not valid JSON: {e}"))),
        }
    }
}

/// Runs a synchronous node read on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ocmesh_node::ReadError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::internal(format!("read task failed: {e}"))),
    }
}

/// The OpenAPI document of this API (no sign-in needed).
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "meta",
    responses((status = 200, description = "this document", body = Object))
)]
async fn openapi_json() -> Response {
    openapi::document_response()
}

/// The management page: one static HTML file with its script and styles
/// inline; it signs in through `/api/v1/signin` and reads the REST API of
/// the site that served it.
pub const UI_HTML: &str = include_str!("ui.html");

#[utoipa::path(
    get,
    path = "/ui",
    tag = "meta",
    responses((status = 200, description = "the read-only management page (HTML; it signs in itself)", body = String, content_type = "text/html"))
)]
async fn ui_page() -> Response {
    use axum::http::{HeaderValue, header};
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            // Inline script and styles only; requests go to this site alone.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
                ),
            ),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        UI_HTML,
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "meta",
    responses((status = 200, description = "the node is up: {status, site}", body = Object))
)]
async fn health(State(s): State<ApiState>) -> Json<Value> {
    Json(json!({"status": "ok", "site": s.node.site()}))
}

#[derive(Debug, Deserialize)]
struct SignIn {
    username: String,
    password: String,
}

#[utoipa::path(
    post,
    path = "/api/v1/signin",
    tag = "auth",
    request_body(content = crate::openapi::SignInBody, description = "{username, password}", example = json!({"username": "admin", "password": "secret"})),
    responses((status = 200, description = "a bearer token and the user: {jwt, user}", body = Object), (status = 401, description = "wrong user name or password", body = crate::openapi::ErrorBody), crate::openapi::PublicErrors)
)]
async fn signin(State(s): State<ApiState>, JsonObject(body): JsonObject) -> Result<Json<Value>, ApiError> {
    let SignIn { username, password } = serde_json::from_value(Value::Object(body))
        .map_err(|e| ApiError::bad_request(format!("sign-in needs {{\"username\", \"password\"}}: {e}")))?;
    let who = s.node.authenticate(&username, &password).await?;
    let jwt = issue_token(&s.node, &who, auth::TOKEN_LIFETIME_SECS)?;
    Ok(Json(
        json!({"jwt": jwt, "user": {"_id": who.id, "name": who.name, "username": username}}),
    ))
}

#[utoipa::path(
    post,
    path = "/api/v1/collections/{collection}/documents",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$")),
    request_body(content = Object, description = "the document; _id is generated when absent", example = json!({"name": "x", "_type": "thing"})),
    responses((status = 201, description = "the stored document with _id, _version and stamps", body = Object), (status = 409, description = "a document with this _id exists", body = crate::openapi::ErrorBody), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn insert_document(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(collection): Path<String>,
    JsonObject(doc): JsonObject,
) -> Result<Response, ApiError> {
    let stored = s.node.insert(&collection, doc, &who).await?;
    Ok((StatusCode::CREATED, Json(stored)).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/collections/{collection}/documents/{id}",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$"), ("id" = String, Path, description = "document id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    responses((status = 200, description = "the current document", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn get_document(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path((collection, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let node = s.node.clone();
    Ok(Json(blocking(move || node.get_as(&collection, &id, &who)).await?))
}

#[utoipa::path(
    put,
    path = "/api/v1/collections/{collection}/documents/{id}",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$"), ("id" = String, Path, description = "document id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    request_body(content = Object, description = "the whole new document (its _id, when given, must match the path)"),
    responses((status = 200, description = "the new current document", body = Object), (status = 409, description = "conflict", body = crate::openapi::ErrorBody), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn replace_document(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path((collection, id)): Path<(String, String)>,
    JsonObject(doc): JsonObject,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.node.replace(&collection, &id, doc, &who).await?))
}

#[utoipa::path(
    delete,
    path = "/api/v1/collections/{collection}/documents/{id}",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$"), ("id" = String, Path, description = "document id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    responses((status = 200, description = "the deleted version (history is kept)", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn delete_document(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path((collection, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.node.delete(&collection, &id, &who).await?))
}

/// `PATCH` with update operators (`$set $unset $inc $push $pull`).
#[utoipa::path(
    patch,
    path = "/api/v1/collections/{collection}/documents/{id}",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$"), ("id" = String, Path, description = "document id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    request_body(content = Object, description = "update operators: $set $unset $inc $push $pull", example = json!({"$set": {"name": "y"}})),
    responses((status = 200, description = "the updated document", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn update_document(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path((collection, id)): Path<(String, String)>,
    JsonObject(update): JsonObject,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        s.node.update(&collection, &id, Value::Object(update), &who).await?,
    ))
}

#[utoipa::path(
    post,
    path = "/api/v1/collections/{collection}/documents/{id}/recover",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$"), ("id" = String, Path, description = "document id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    responses((status = 201, description = "the document restored from its last version before the delete", body = Object), (status = 409, description = "the document is not deleted", body = crate::openapi::ErrorBody), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn recover_document(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path((collection, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let doc = s.node.recover(&collection, &id, &who).await?;
    Ok((StatusCode::CREATED, Json(doc)).into_response())
}

fn take_objects(body: &mut Map<String, Value>, key: &str) -> Result<Vec<Map<String, Value>>, ApiError> {
    match body.remove(key) {
        Some(Value::Array(list)) => list
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Object(m) => Ok(m),
                other => Err(ApiError::bad_request(format!(
                    "{key}[{i}] must be a JSON object, not {other}"
                ))),
            })
            .collect(),
        _ => Err(ApiError::bad_request(format!("{key} must be an array of JSON objects"))),
    }
}

fn no_more_fields(body: &Map<String, Value>, allowed: &str) -> Result<(), ApiError> {
    match body.keys().next() {
        Some(k) => Err(ApiError::bad_request(format!("unknown field {k:?}; use {allowed}"))),
        None => Ok(()),
    }
}

/// `{documents: [...]}`: all inserted, or none.
#[utoipa::path(
    post,
    path = "/api/v1/collections/{collection}/insertmany",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$")),
    request_body(content = crate::openapi::InsertManyBody, description = "{documents: [...]}", example = json!({"documents": [{"name": "a"}, {"name": "b"}]})),
    responses((status = 201, description = "the stored documents (all or none)", body = Vec<Object>), (status = 409, description = "an _id exists", body = crate::openapi::ErrorBody), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn insert_many(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(collection): Path<String>,
    JsonObject(mut body): JsonObject,
) -> Result<Response, ApiError> {
    let docs = take_objects(&mut body, "documents")?;
    no_more_fields(&body, "documents")?;
    let stored = s.node.insert_many(&collection, docs, &who).await?;
    Ok((StatusCode::CREATED, Json(Value::Array(stored))).into_response())
}

/// `{document, uniqueness}` (OpenCore also spells it `uniqeness`): a
/// comma-separated string or an array of field names; default `_id`.
#[utoipa::path(
    post,
    path = "/api/v1/collections/{collection}/insertorupdate",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$")),
    request_body(content = crate::openapi::InsertOrUpdateBody, description = "{document, uniqueness?}: uniqueness is a comma-separated string or an array of field names, default _id", example = json!({"document": {"name": "a"}, "uniqueness": "name"})),
    responses((status = 200, description = "the stored document", body = Object), (status = 409, description = "more than one document matches the uniqueness fields", body = crate::openapi::ErrorBody), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn insert_or_update(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(collection): Path<String>,
    JsonObject(mut body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let doc = match body.remove("document") {
        Some(Value::Object(m)) => m,
        _ => return Err(ApiError::bad_request("document must be a JSON object")),
    };
    let uniqueness = match body.remove("uniqueness").or_else(|| body.remove("uniqeness")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s
            .split(',')
            .map(|f| f.trim().to_owned())
            .filter(|f| !f.is_empty())
            .collect(),
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(ApiError::bad_request(format!(
                    "uniqueness field names must be strings, not {other}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "uniqueness must be a string or an array, not {other}"
            )));
        }
    };
    no_more_fields(&body, "document and uniqueness")?;
    Ok(Json(s.node.insert_or_update(&collection, doc, uniqueness, &who).await?))
}

/// `{filter, update}`.
#[utoipa::path(
    post,
    path = "/api/v1/collections/{collection}/updatemany",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$")),
    request_body(content = crate::openapi::UpdateManyBody, description = "{filter, update}", example = json!({"filter": {"name": "a"}, "update": {"$set": {"done": true}}})),
    responses((status = 200, description = "{modified: N}", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn update_many(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(collection): Path<String>,
    JsonObject(mut body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let filter = parse_filter(&mut body)?;
    let update = body
        .remove("update")
        .ok_or_else(|| ApiError::bad_request("update is required"))?;
    no_more_fields(&body, "filter and update")?;
    let changed = s.node.update_many(&collection, filter, update, &who).await?;
    Ok(Json(json!({"modified": changed.len()})))
}

/// `{filter}`.
#[utoipa::path(
    post,
    path = "/api/v1/collections/{collection}/deletemany",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$")),
    request_body(content = crate::openapi::FilterBody, description = "{filter}", example = json!({"filter": {"done": true}})),
    responses((status = 200, description = "{deleted: N}", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn delete_many(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(collection): Path<String>,
    JsonObject(mut body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let filter = parse_filter(&mut body)?;
    no_more_fields(&body, "filter")?;
    let deleted = s.node.delete_many(&collection, filter, &who).await?;
    Ok(Json(json!({"deleted": deleted.len()})))
}

#[utoipa::path(
    get,
    path = "/api/v1/collections/{collection}/documents/{id}/versions",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$"), ("id" = String, Path, description = "document id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    responses((status = 200, description = "every version, oldest first", body = Vec<Object>), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn list_versions(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path((collection, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let node = s.node.clone();
    Ok(Json(Value::Array(
        blocking(move || node.versions_as(&collection, &id, &who)).await?,
    )))
}

/// Which conflicts to list.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
struct ConflictFilter {
    /// Only this collection's documents.
    collection: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/conflicts",
    tag = "documents",
    params(ConflictFilter),
    responses((status = 200, description = "same-field conflicts in the histories the caller may read: [{collection, _id, field, kept, lost}], kept and lost being version numbers", body = Vec<Object>), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn list_conflicts(
    State(s): State<ApiState>,
    Caller(who): Caller,
    axum::extract::Query(filter): axum::extract::Query<ConflictFilter>,
) -> Result<Json<Value>, ApiError> {
    let node = s.node.clone();
    Ok(Json(Value::Array(
        blocking(move || node.conflicts(filter.collection.as_deref(), None, &who)).await?,
    )))
}

#[utoipa::path(
    get,
    path = "/api/v1/collections/{collection}/documents/{id}/conflicts",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$"), ("id" = String, Path, description = "document id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    responses((status = 200, description = "the document's same-field conflicts: [{collection, _id, field, kept, lost}]", body = Vec<Object>), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn document_conflicts(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path((collection, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let node = s.node.clone();
    Ok(Json(Value::Array(
        blocking(move || {
            // A document the caller cannot read looks missing, conflicts or not.
            node.versions_as(&collection, &id, &who)?;
            node.conflicts(Some(&collection), Some(&id), &who)
        })
        .await?,
    )))
}

#[utoipa::path(
    get,
    path = "/api/v1/collections/{collection}/documents/{id}/versions/{n}",
    tag = "documents",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$"), ("id" = String, Path, description = "document id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$"), ("n" = u64, Path, description = "version number, counted from 0")),
    responses((status = 200, description = "that version of the document", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn get_version(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path((collection, id, n)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let n = version_number(&n)?;
    let node = s.node.clone();
    Ok(Json(
        blocking(move || node.version_as(&collection, &id, n, &who)).await?,
    ))
}

fn parse_query(body: Map<String, Value>) -> Result<ocmesh_node::query::Query, ApiError> {
    ocmesh_node::query::Query::from_json(&Value::Object(body)).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn parse_filter(body: &mut Map<String, Value>) -> Result<ocmesh_node::query::Filter, ApiError> {
    let filter = body
        .remove("filter")
        .or_else(|| body.remove("query"))
        .unwrap_or_else(|| json!({}));
    ocmesh_node::query::Filter::parse(&filter).map_err(|e| ApiError::bad_request(format!("invalid filter: {e}")))
}

/// `POST .../query` with `{filter, projection, sort, skip, top}`.
#[utoipa::path(
    post,
    path = "/api/v1/collections/{collection}/query",
    tag = "queries",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$")),
    request_body(content = Object, description = "{filter?, projection?, sort?, skip?, top? (default 100)}", example = json!({"filter": {"_type": "thing"}, "sort": {"name": 1}, "top": 10})),
    responses((status = 200, description = "the matching documents the caller may read", body = Vec<Object>), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn query_documents(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(collection): Path<String>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let q = parse_query(body)?;
    let node = s.node.clone();
    Ok(Json(Value::Array(
        blocking(move || node.query_as(&collection, &q, &who)).await?,
    )))
}

/// `POST .../count` with `{filter}`.
#[utoipa::path(
    post,
    path = "/api/v1/collections/{collection}/count",
    tag = "queries",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$")),
    request_body(content = crate::openapi::FilterBody, description = "{filter?}", example = json!({"filter": {"_type": "thing"}})),
    responses((status = 200, description = "{count: N}", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn count_documents(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(collection): Path<String>,
    JsonObject(mut body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let filter = parse_filter(&mut body)?;
    if let Some(k) = body.keys().next() {
        return Err(ApiError::bad_request(format!("unknown count field {k:?}; use filter")));
    }
    let node = s.node.clone();
    let n = blocking(move || node.count_as(&collection, &filter, &who)).await?;
    Ok(Json(json!({"count": n})))
}

/// `POST .../distinct` with `{field, filter}`.
#[utoipa::path(
    post,
    path = "/api/v1/collections/{collection}/distinct",
    tag = "queries",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$")),
    request_body(content = crate::openapi::DistinctBody, description = "{field, filter?}", example = json!({"field": "name"})),
    responses((status = 200, description = "the distinct values of the field", body = Vec<Value>), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn distinct_values(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(collection): Path<String>,
    JsonObject(mut body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let field = match body.remove("field") {
        Some(Value::String(f)) if !f.is_empty() => f,
        _ => return Err(ApiError::bad_request("distinct needs \"field\": a non-empty string")),
    };
    let filter = parse_filter(&mut body)?;
    if let Some(k) = body.keys().next() {
        return Err(ApiError::bad_request(format!(
            "unknown distinct field {k:?}; use field and filter"
        )));
    }
    let node = s.node.clone();
    Ok(Json(Value::Array(
        blocking(move || node.distinct_as(&collection, &field, &filter, &who)).await?,
    )))
}

#[utoipa::path(
    get,
    path = "/api/v1/collections/{collection}/indexes",
    tag = "queries",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$")),
    responses((status = 200, description = "[{field}] for every index of the collection", body = Vec<Object>), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn list_indexes(
    State(s): State<ApiState>,
    Caller(_): Caller,
    Path(collection): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let node = s.node.clone();
    let fields = blocking(move || node.indexes(&collection)).await?;
    Ok(Json(Value::Array(
        fields.into_iter().map(|f| json!({"field": f})).collect(),
    )))
}

/// `POST .../indexes` with `{field}`.
#[utoipa::path(
    post,
    path = "/api/v1/collections/{collection}/indexes",
    tag = "queries",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$")),
    request_body(content = crate::openapi::IndexBody, description = "{field}: a field path", example = json!({"field": "name"})),
    responses((status = 201, description = "{field}", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn create_index(
    State(s): State<ApiState>,
    Caller(_): Caller,
    Path(collection): Path<String>,
    JsonObject(mut body): JsonObject,
) -> Result<Response, ApiError> {
    let field = match body.remove("field") {
        Some(Value::String(f)) => f,
        _ => return Err(ApiError::bad_request("an index needs \"field\": a field path string")),
    };
    s.node.create_index(&collection, &field).await?;
    Ok((StatusCode::CREATED, Json(json!({"field": field}))).into_response())
}

#[utoipa::path(
    delete,
    path = "/api/v1/collections/{collection}/indexes/{field}",
    tag = "queries",
    params(("collection" = String, Path, description = "collection name: letters, digits, _ - .; 1 to 120 long; not starting with . or system.", pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,119}$"), ("field" = String, Path, description = "indexed field path")),
    responses((status = 200, description = "{dropped: field}", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn drop_index(
    State(s): State<ApiState>,
    Caller(_): Caller,
    Path((collection, field)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    s.node.drop_index(&collection, &field).await?;
    Ok(Json(json!({"dropped": field})))
}

#[utoipa::path(
    post,
    path = "/api/v1/workitemqueues",
    tag = "workitems",
    request_body(content = crate::openapi::QueueBody, description = "the queue: {name, maxretries?, retrydelay?, leasetime?, success_wiq?, failed_wiq?, _acl?}", example = json!({"name": "jobs", "maxretries": 3})),
    responses((status = 201, description = "the queue document", body = Object), (status = 409, description = "a queue of that name exists", body = crate::openapi::ErrorBody), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn add_queue(
    State(s): State<ApiState>,
    Caller(who): Caller,
    JsonObject(doc): JsonObject,
) -> Result<Response, ApiError> {
    let q = s.node.add_queue(doc, &who).await?;
    Ok((StatusCode::CREATED, Json(q)).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/workitemqueues/{name}",
    tag = "workitems",
    params(("name" = String, Path, description = "queue name")),
    responses((status = 200, description = "the queue document", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn get_queue(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let node = s.node.clone();
    Ok(Json(blocking(move || node.queue_as(&name, &who)).await?))
}

#[utoipa::path(
    put,
    path = "/api/v1/workitemqueues/{name}",
    tag = "workitems",
    params(("name" = String, Path, description = "queue name")),
    request_body(content = Object, description = "queue fields to change"),
    responses((status = 200, description = "the updated queue document", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn update_queue(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(name): Path<String>,
    JsonObject(doc): JsonObject,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.node.update_queue(&name, doc, &who).await?))
}

#[utoipa::path(
    delete,
    path = "/api/v1/workitemqueues/{name}",
    tag = "workitems",
    params(("name" = String, Path, description = "queue name"), ("purge" = Option<bool>, Query, description = "also delete every item of the queue, in the same write (needs the delete right on each)")),
    responses((status = 200, description = "the deleted queue document; with purge, {\"purged\": [the deleted items]}", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn delete_queue(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(name): Path<String>,
    Query(params): Query<PurgeParams>,
) -> Result<Json<Value>, ApiError> {
    if params.purge.unwrap_or(false) {
        let purged = s.node.purge_queue(&name, true, &who).await?;
        return Ok(Json(json!({ "purged": purged })));
    }
    Ok(Json(s.node.delete_queue(&name, &who).await?))
}

#[derive(Debug, Deserialize)]
struct PurgeParams {
    purge: Option<bool>,
}

/// One item as the body, or `{"items": [...]}` for many.
#[utoipa::path(
    post,
    path = "/api/v1/workitemqueues/{name}/workitems",
    tag = "workitems",
    params(("name" = String, Path, description = "queue name")),
    request_body(content = Object, description = "one item ({name?, payload?, priority?, nextrun?, files?, ...}), or {items: [...]} for many", example = json!({"name": "job 1", "payload": {"x": 1}})),
    responses((status = 201, description = "the pushed items", body = Vec<Object>), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn push_workitems(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(name): Path<String>,
    JsonObject(mut body): JsonObject,
) -> Result<Response, ApiError> {
    let items = match body.remove("items") {
        Some(Value::Array(list)) => list
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Object(m) => Ok(m),
                other => Err(ApiError::bad_request(format!(
                    "items[{i}] must be a JSON object, not {other}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(ApiError::bad_request(format!("items must be an array, not {other}"))),
        None => vec![body],
    };
    let pushed = s.node.push_workitems(&name, items, &who).await?;
    Ok((StatusCode::CREATED, Json(Value::Array(pushed))).into_response())
}

#[derive(Debug, Deserialize)]
struct PopParams {
    /// Seconds to wait for an item.
    wait: Option<f64>,
}

/// Pops an item: 200 with it, or 204 when none is due (after `?wait=` seconds).
#[utoipa::path(
    post,
    path = "/api/v1/workitemqueues/{name}/pop",
    tag = "workitems",
    params(("name" = String, Path, description = "queue name"), ("wait" = Option<f64>, Query, description = "seconds to wait for an item, 0 to 300", minimum = 0, maximum = 300)),
    responses((status = 200, description = "the popped item, now processing under a lease", body = Object), (status = 204, description = "no item came due within wait"), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn pop_workitem(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(name): Path<String>,
    Query(params): Query<PopParams>,
) -> Result<Response, ApiError> {
    let wait = match params.wait {
        None => None,
        Some(w) if (0.0..=300.0).contains(&w) => Some(std::time::Duration::from_secs_f64(w)),
        Some(w) => return Err(ApiError::bad_request(format!("wait={w}: give 0 to 300 seconds"))),
    };
    match s.node.pop_workitem(&name, &who, wait).await? {
        Some(item) => Ok(Json(item).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/workitems/{id}",
    tag = "workitems",
    params(("id" = String, Path, description = "work item id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    responses((status = 200, description = "the work item", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn get_workitem(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let node = s.node.clone();
    Ok(Json(
        blocking(move || node.get_as(ocmesh_node::workitems::ITEMS, &id, &who)).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkItemUpdate {
    state: String,
    errortype: Option<String>,
    errormessage: Option<String>,
    payload: Option<Map<String, Value>>,
}

/// `{state: successful|failed|retry, errortype?, errormessage?, payload?}`.
#[utoipa::path(
    put,
    path = "/api/v1/workitems/{id}",
    tag = "workitems",
    params(("id" = String, Path, description = "work item id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    request_body(content = crate::openapi::WorkItemUpdateBody, description = "{state: successful|failed|retry, errortype?: application|business, errormessage?, payload?}", example = json!({"state": "successful"})),
    responses((status = 200, description = "the work item in its new state", body = Object), (status = 409, description = "another site owns the item", body = crate::openapi::ErrorBody), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn update_workitem(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let u: WorkItemUpdate = serde_json::from_value(Value::Object(body))
        .map_err(|e| ApiError::bad_request(format!("work item update: {e}")))?;
    Ok(Json(
        s.node
            .update_workitem(&id, &u.state, u.errortype.as_deref(), u.errormessage, u.payload, &who)
            .await?,
    ))
}

#[utoipa::path(
    delete,
    path = "/api/v1/workitems/{id}",
    tag = "workitems",
    params(("id" = String, Path, description = "work item id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    responses((status = 200, description = "the deleted work item", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn delete_workitem(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.node.delete_workitem(&id, &who).await?))
}

/// An operator's forced move of a work item to this site when its owner
/// site is out of reach: the ownership epoch goes up, a processing item
/// goes back to new, and a result the old owner reports later is kept in
/// history as a conflict but never counts.
#[utoipa::path(
    post,
    path = "/api/v1/workitems/{id}/takeover",
    tag = "workitems",
    params(("id" = String, Path, description = "work item id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    responses(
        (status = 200, description = "the work item, now owned by this site under a new epoch", body = Object),
        (status = 409, description = "the item is already owned here, or is no longer new or processing", body = crate::openapi::ErrorBody),
        crate::openapi::CallerErrors
    ),
    security(("basic" = []), ("bearer" = []))
)]
async fn takeover_workitem(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.node.takeover_workitem(&id, &who).await?))
}

#[derive(Debug, Deserialize)]
struct UploadParams {
    filename: String,
    #[serde(rename = "contentType")]
    content_type: Option<String>,
}

/// `POST /api/v1/files?filename=NAME[&contentType=TYPE]` with the raw
/// content as the body, streamed to the store a chunk at a time.
#[utoipa::path(
    post,
    path = "/api/v1/files",
    tag = "files",
    params(("filename" = String, Query, description = "file name", min_length = 1), ("contentType" = Option<String>, Query, description = "MIME type, default application/octet-stream")),
    request_body(content = String, content_type = "application/octet-stream", description = "the raw file content"),
    responses((status = 201, description = "the fs.files metadata document", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn upload_file(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Query(params): Query<UploadParams>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use http_body_util::BodyExt;
    let mut upload = s.node.upload(s.limits.max_file_bytes);
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("upload body broke off: {e}")))?;
        if let Some(data) = frame.data_ref() {
            upload.write(data).await?;
        }
    }
    let content_type = params.content_type.unwrap_or_else(|| "application/octet-stream".into());
    let doc = upload.finish(&params.filename, &content_type, Map::new(), &who).await?;
    Ok((StatusCode::CREATED, Json(doc)).into_response())
}

/// Streams a file's content, one chunk read at a time.
#[utoipa::path(
    get,
    path = "/api/v1/files/{id}",
    tag = "files",
    params(("id" = String, Path, description = "file id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    responses((status = 200, description = "the file content, with its content type", content_type = "application/octet-stream", body = String), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn download_file(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let node = s.node.clone();
    let doc = blocking(move || node.get_as(ocmesh_node::files::FILES, &id, &who)).await?;
    let hashes =
        ocmesh_node::files::chunk_hashes(&doc).ok_or_else(|| ApiError::internal("file lists malformed chunks"))?;
    // A file replicated from a peer may be here before all its content.
    let (node, listed) = (s.node.clone(), hashes.clone());
    let missing = blocking(move || node.missing_chunks(&listed)).await?;
    if let Some(first) = missing.first() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "{} of this file's {} chunks (first {}) have not reached this site yet; try again shortly",
                missing.len(),
                hashes.len(),
                hex_of(first)
            ),
        ));
    }
    let node = s.node.clone();
    let stream = futures_util::stream::unfold((node, hashes.into_iter()), |(node, mut rest)| async move {
        let hash = rest.next()?;
        let reader = node.clone();
        let chunk = match tokio::task::spawn_blocking(move || reader.read_chunk(&hash)).await {
            Ok(Ok(Some(c))) => Ok(Bytes::from(c)),
            Ok(Ok(None)) => Err(std::io::Error::other(format!("chunk {} is missing", hex_of(&hash)))),
            Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        Some((chunk, (node, rest)))
    });
    let mut resp = axum::body::Body::from_stream(stream).into_response();
    let headers = resp.headers_mut();
    if let Some(ct) = doc["contentType"]
        .as_str()
        .and_then(|c| axum::http::HeaderValue::from_str(c).ok())
    {
        headers.insert(axum::http::header::CONTENT_TYPE, ct);
    }
    if let Some(len) = doc["length"].as_u64() {
        headers.insert(axum::http::header::CONTENT_LENGTH, axum::http::HeaderValue::from(len));
    }
    Ok(resp)
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[utoipa::path(
    delete,
    path = "/api/v1/files/{id}",
    tag = "files",
    params(("id" = String, Path, description = "file id: an ObjectId, 24 hexadecimal digits", pattern = "^[0-9a-fA-F]{24}$")),
    responses((status = 200, description = "the deleted metadata document", body = Object), (status = 409, description = "a work item lists this file", body = crate::openapi::ErrorBody), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn delete_file(
    State(s): State<ApiState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.node.delete_file(&id, &who).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    username: String,
    password: String,
    #[serde(default)]
    name: String,
}

/// `{username, password, name?}`: admins only.
#[utoipa::path(
    post,
    path = "/api/v1/users",
    tag = "auth",
    request_body(content = crate::openapi::NewUserBody, description = "{username, password, name?} (admins only)", example = json!({"username": "robot", "password": "secret", "name": "Robot"})),
    responses((status = 201, description = "the new user document", body = Object), (status = 409, description = "the user name is taken", body = crate::openapi::ErrorBody), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn create_user(
    State(s): State<ApiState>,
    Caller(who): Caller,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let u: NewUser =
        serde_json::from_value(Value::Object(body)).map_err(|e| ApiError::bad_request(format!("new user: {e}")))?;
    let doc = s.node.create_user(&u.username, &u.password, &u.name, &who).await?;
    Ok((StatusCode::CREATED, Json(doc)).into_response())
}

impl From<MqError> for ApiError {
    fn from(e: MqError) -> Self {
        match &e {
            MqError::NoQueue(_) | MqError::NoExchange(_) => ApiError::not_found(e.to_string()),
            MqError::ExchangeKindMismatch { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            MqError::BadKind(_) | MqError::BadName(_) => ApiError::bad_request(e.to_string()),
            MqError::Full(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
            MqError::Broker(_) => ApiError::new(StatusCode::BAD_GATEWAY, "broker", e.to_string()),
        }
    }
}

fn opt_str(body: &mut Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match body.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::bad_request(format!("{key} must be a string, not {other}"))),
    }
}

/// `{name?}`: without a name, a temporary queue with a generated name.
#[utoipa::path(
    post,
    path = "/api/v1/mq/queues",
    tag = "mq",
    request_body(content = crate::openapi::MqQueueBody, description = "{name?}: without a name, a temporary queue with a generated one", example = json!({"name": "jobs"})),
    responses((status = 201, description = "{name}", body = Object), crate::openapi::BrokerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn mq_declare_queue(
    State(s): State<ApiState>,
    Caller(_): Caller,
    JsonObject(mut body): JsonObject,
) -> Result<Response, ApiError> {
    let name = opt_str(&mut body, "name")?;
    no_more_fields(&body, "name")?;
    let name = s.broker.declare_queue(name.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(json!({"name": name}))).into_response())
}

#[utoipa::path(
    delete,
    path = "/api/v1/mq/queues/{name}",
    tag = "mq",
    params(("name" = String, Path, description = "queue name")),
    responses((status = 200, description = "{deleted: name}", body = Object), crate::openapi::BrokerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn mq_delete_queue(
    State(s): State<ApiState>,
    Caller(_): Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.broker.delete_queue(&name).await?;
    Ok(Json(json!({"deleted": name})))
}

/// `{name, type: direct|fanout|topic}`.
#[utoipa::path(
    post,
    path = "/api/v1/mq/exchanges",
    tag = "mq",
    request_body(content = crate::openapi::MqExchangeBody, description = "{name, type?: direct|fanout|topic (default fanout)}", example = json!({"name": "events", "type": "topic"})),
    responses((status = 201, description = "{name, type}", body = Object), crate::openapi::BrokerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn mq_declare_exchange(
    State(s): State<ApiState>,
    Caller(_): Caller,
    JsonObject(mut body): JsonObject,
) -> Result<Response, ApiError> {
    let name = opt_str(&mut body, "name")?.ok_or_else(|| ApiError::bad_request("an exchange needs a name"))?;
    let kind = ExchangeKind::parse(&opt_str(&mut body, "type")?.unwrap_or_else(|| "fanout".into()))?;
    no_more_fields(&body, "name and type")?;
    s.broker.declare_exchange(&name, kind).await?;
    Ok((StatusCode::CREATED, Json(json!({"name": name, "type": kind.name()}))).into_response())
}

/// `{queue, exchange, routingkey?}`.
#[utoipa::path(
    post,
    path = "/api/v1/mq/bindings",
    tag = "mq",
    request_body(content = crate::openapi::MqBindBody, description = "{queue, exchange, routingkey?}", example = json!({"queue": "jobs", "exchange": "events", "routingkey": "a.*"})),
    responses((status = 200, description = "{queue, exchange, routingkey}", body = Object), crate::openapi::BrokerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn mq_bind(
    State(s): State<ApiState>,
    Caller(_): Caller,
    JsonObject(mut body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let queue = opt_str(&mut body, "queue")?.ok_or_else(|| ApiError::bad_request("queue is required"))?;
    let exchange = opt_str(&mut body, "exchange")?.ok_or_else(|| ApiError::bad_request("exchange is required"))?;
    let key = opt_str(&mut body, "routingkey")?.unwrap_or_default();
    no_more_fields(&body, "queue, exchange and routingkey")?;
    s.broker.bind(&queue, &exchange, &key).await?;
    Ok(Json(json!({"queue": queue, "exchange": exchange, "routingkey": key})))
}

/// `{queue | exchange + routingkey, data, replyto?, correlationId?, expiration? (ms)}`.
#[utoipa::path(
    post,
    path = "/api/v1/mq/publish",
    tag = "mq",
    request_body(content = Object, description = "{queue | exchange + routingkey, data, replyto?, correlationId?, expiration? (ms)}", example = json!({"queue": "jobs", "data": {"x": 1}})),
    responses((status = 200, description = "{published: true}", body = Object), crate::openapi::BrokerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn mq_publish(
    State(s): State<ApiState>,
    Caller(_): Caller,
    JsonObject(mut body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let queue = opt_str(&mut body, "queue")?;
    let exchange = opt_str(&mut body, "exchange")?.unwrap_or_default();
    let key = match (queue, exchange.is_empty()) {
        (Some(q), true) => q,
        (None, false) => opt_str(&mut body, "routingkey")?.unwrap_or_default(),
        _ => {
            return Err(ApiError::bad_request(
                "give either queue, or exchange (with routingkey)",
            ));
        }
    };
    let data = body.remove("data").unwrap_or(Value::Null);
    let reply_to = opt_str(&mut body, "replyto")?;
    let correlation_id = opt_str(&mut body, "correlationId")?;
    let expiration = match body.remove("expiration") {
        None | Some(Value::Null) => None,
        Some(v) => Some(std::time::Duration::from_millis(v.as_u64().ok_or_else(|| {
            ApiError::bad_request(format!("expiration must be milliseconds, not {v}"))
        })?)),
    };
    no_more_fields(
        &body,
        "queue, exchange, routingkey, data, replyto, correlationId, expiration",
    )?;
    let body = serde_json::to_vec(&data).map_err(|e| ApiError::bad_request(e.to_string()))?;
    s.broker
        .publish(
            &exchange,
            &key,
            Message {
                body,
                reply_to,
                correlation_id,
                expiration,
            },
        )
        .await?;
    Ok(Json(json!({"published": true})))
}

/// Takes the next message of a queue: 200 `{data, replyto, correlationId}`,
/// or 204 when none arrives within `?wait=` seconds.
#[utoipa::path(
    post,
    path = "/api/v1/mq/queues/{name}/next",
    tag = "mq",
    params(("name" = String, Path, description = "queue name"), ("wait" = Option<f64>, Query, description = "seconds to wait for a message, 0 to 300 (default 0)", minimum = 0, maximum = 300)),
    responses((status = 200, description = "{data, replyto, correlationId}", body = Object), (status = 204, description = "no message arrived within wait"), crate::openapi::BrokerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn mq_next(
    State(s): State<ApiState>,
    Caller(_): Caller,
    Path(name): Path<String>,
    Query(params): Query<PopParams>,
) -> Result<Response, ApiError> {
    let wait = match params.wait {
        None => std::time::Duration::ZERO,
        Some(w) if (0.0..=300.0).contains(&w) => std::time::Duration::from_secs_f64(w),
        Some(w) => return Err(ApiError::bad_request(format!("wait={w}: give 0 to 300 seconds"))),
    };
    match s.broker.get_wait(&name, wait).await? {
        Some(m) => {
            let data: Value = serde_json::from_slice(&m.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&m.body).into_owned()));
            Ok(Json(json!({"data": data, "replyto": m.reply_to, "correlationId": m.correlation_id})).into_response())
        }
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// Node counters and queue depths, and each peer's status.
#[utoipa::path(
    get,
    path = "/api/v1/metrics",
    tag = "meta",
    responses((status = 200, description = "node counters, queue depths, peers, OpenIAP counters", body = Object), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn metrics(State(s): State<ApiState>, Caller(_): Caller) -> Json<Value> {
    let mut m = s.node.metrics();
    let peers = s.peers.as_ref().map(|p| p.snapshot()).unwrap_or_default();
    if let Value::Object(obj) = &mut m {
        obj.insert("peers".into(), serde_json::to_value(peers).unwrap_or(Value::Null));
        obj.insert("openiap".into(), s.openiap.stats().snapshot());
    }
    Json(m)
}

/// Each peer's status as the mesh reports it; empty without a mesh.
#[utoipa::path(
    get,
    path = "/api/v1/mesh/peers",
    tag = "meta",
    responses((status = 200, description = "each peer's status; empty without a mesh", body = Vec<Object>), crate::openapi::CallerErrors),
    security(("basic" = []), ("bearer" = []))
)]
async fn mesh_peers(State(s): State<ApiState>, Caller(_): Caller) -> Json<Vec<PeerStatus>> {
    Json(s.peers.as_ref().map(|p| p.snapshot()).unwrap_or_default())
}
