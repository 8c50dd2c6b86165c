//! The JSON error body every failing request gets: `{"error", "detail"}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use ocmesh_node::files::FileError;
use ocmesh_node::{AuthError, ReadError, WorkItemError, WriteError};

/// A failed request: status, short code, precise message.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    fn internal(detail: impl Into<String>) -> Self {
        let detail = detail.into();
        tracing::error!(%detail, "request failed inside the node");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(json!({"error": self.code, "detail": self.detail}))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"ocmesh\""),
            );
        }
        resp
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match &e {
            WriteError::Name(_)
            | WriteError::IdNotString(_)
            | WriteError::IdMismatch { .. }
            | WriteError::BadIndex(_) => ApiError::bad_request(e.to_string()),
            WriteError::NotFound { .. } => ApiError::not_found(e.to_string()),
            WriteError::WorkItem(w) => match w {
                WorkItemError::NoQueue(_) | WorkItemError::NoItem(_) => ApiError::not_found(e.to_string()),
                WorkItemError::QueueExists(_) => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
                _ => ApiError::bad_request(e.to_string()),
            },
            WriteError::AlreadyExists { .. } | WriteError::NotUnique { .. } | WriteError::NotDeleted { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            WriteError::File(f) => match f {
                FileError::TooLarge { .. } => {
                    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", e.to_string())
                }
                FileError::InUse(..) => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
                FileError::NotFound(_) => ApiError::not_found(e.to_string()),
                FileError::BadName => ApiError::bad_request(e.to_string()),
                FileError::MissingChunk { .. } => ApiError::internal(e.to_string()),
            },
            WriteError::Forbidden { .. } => ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
            WriteError::Filter(_)
            | WriteError::Update(_)
            | WriteError::MissingUniqueField(_)
            | WriteError::Acl(_)
            | WriteError::BadUser(_) => ApiError::bad_request(e.to_string()),
            WriteError::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
            WriteError::Apply(_) | WriteError::Storage(_) => ApiError::internal(e.to_string()),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match &e {
            ReadError::Name(_) => ApiError::bad_request(e.to_string()),
            ReadError::NotFound { .. } | ReadError::NoSuchVersion { .. } => ApiError::not_found(e.to_string()),
            ReadError::Storage(_) => ApiError::internal(e.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match &e {
            AuthError::BadCredentials => ApiError::unauthorized(e.to_string()),
            AuthError::Storage(_) => ApiError::internal(e.to_string()),
        }
    }
}
