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

    /// An extractor's rejection (bad path segment, query string, body):
    /// the caller's fault unless axum says otherwise.
    pub(crate) fn rejected(status: StatusCode, detail: impl Into<String>) -> Self {
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => Self::new(status, "payload_too_large", detail),
            s if s.is_client_error() => Self::new(s, "bad_request", detail),
            _ => Self::internal(detail),
        }
    }

    pub(crate) fn internal(detail: impl Into<String>) -> Self {
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
                WorkItemError::QueueExists(_)
                | WorkItemError::NotOwner { .. }
                | WorkItemError::AlreadyOwner { .. }
                | WorkItemError::Finished { .. }
                | WorkItemError::AlreadyDone { .. }
                | WorkItemError::NotProcessing { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
                _ => ApiError::bad_request(e.to_string()),
            },
            WriteError::AlreadyExists { .. }
            | WriteError::NotUnique { .. }
            | WriteError::NotDeleted { .. }
            | WriteError::ClockBehind { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            WriteError::File(f) => match f {
                FileError::TooLarge { .. } => {
                    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", e.to_string())
                }
                FileError::InUse(..) => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
                FileError::NotFound(_) => ApiError::not_found(e.to_string()),
                FileError::BadName | FileError::ChunkMismatch(_) => ApiError::bad_request(e.to_string()),
                FileError::MissingChunk { .. } => ApiError::internal(e.to_string()),
            },
            WriteError::Forbidden { .. } => ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
            WriteError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", e.to_string())
            }
            WriteError::Filter(_)
            | WriteError::TooDeep { .. }
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
            AuthError::TooManyAttempts { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", e.to_string())
            }
            AuthError::Storage(_) => ApiError::internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ocmesh_node::StorageError;
    use ocmesh_node::ids::NameError;

    fn status_and_code(e: impl Into<ApiError>) -> (StatusCode, &'static str) {
        let e = e.into();
        (e.status, e.code)
    }

    #[test]
    fn write_errors_map_to_statuses() {
        let (c, id) = (String::from("c"), String::from("0123456789abcdef01234567"));
        let cases = [
            (
                WriteError::Name(NameError::EmptyCollection),
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                WriteError::IdNotString("5".into()),
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                WriteError::IdMismatch {
                    path: id.clone(),
                    body: "\"x\"".into(),
                },
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                WriteError::NotFound {
                    collection: c.clone(),
                    id: id.clone(),
                },
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                WriteError::AlreadyExists { collection: c, id },
                StatusCode::CONFLICT,
                "conflict",
            ),
            (
                WriteError::Storage(StorageError("disk on fire".into())),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
            (WriteError::Closed, StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        ];
        for (e, status, code) in cases {
            let detail = e.to_string();
            let api = ApiError::from(e);
            assert_eq!((api.status, api.code), (status, code), "{detail}");
            assert_eq!(api.detail, detail, "the detail is the node's own message");
        }
    }

    #[test]
    fn read_and_auth_errors_map_to_statuses() {
        let (c, id) = (String::from("c"), String::from("0123456789abcdef01234567"));
        assert_eq!(
            status_and_code(ReadError::Name(NameError::BadId("x".into()))),
            (StatusCode::BAD_REQUEST, "bad_request")
        );
        assert_eq!(
            status_and_code(ReadError::NotFound {
                collection: c.clone(),
                id: id.clone(),
            }),
            (StatusCode::NOT_FOUND, "not_found")
        );
        assert_eq!(
            status_and_code(ReadError::NoSuchVersion {
                collection: c,
                id,
                version: 7,
            }),
            (StatusCode::NOT_FOUND, "not_found")
        );
        assert_eq!(
            status_and_code(ReadError::Storage(StorageError("gone".into()))),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
        assert_eq!(
            status_and_code(AuthError::BadCredentials),
            (StatusCode::UNAUTHORIZED, "unauthorized")
        );
        assert_eq!(
            status_and_code(AuthError::TooManyAttempts { retry_after_secs: 2 }),
            (StatusCode::TOO_MANY_REQUESTS, "too_many_requests")
        );
        assert_eq!(
            status_and_code(AuthError::Storage(StorageError("gone".into()))),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
    }

    #[test]
    fn rejections_keep_their_status() {
        let e = ApiError::rejected(StatusCode::PAYLOAD_TOO_LARGE, "big");
        assert_eq!((e.status, e.code), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
        let e = ApiError::rejected(StatusCode::UNSUPPORTED_MEDIA_TYPE, "type");
        assert_eq!((e.status, e.code), (StatusCode::UNSUPPORTED_MEDIA_TYPE, "bad_request"));
        let e = ApiError::rejected(StatusCode::INTERNAL_SERVER_ERROR, "route has no such parameter");
        assert_eq!((e.status, e.code), (StatusCode::INTERNAL_SERVER_ERROR, "internal"));
    }

    #[test]
    fn only_unauthorized_asks_for_credentials() {
        let resp = ApiError::unauthorized("who are you").into_response();
        assert_eq!(
            resp.headers().get(header::WWW_AUTHENTICATE),
            Some(&HeaderValue::from_static("Basic realm=\"ocmesh\""))
        );
        let resp = ApiError::not_found("no").into_response();
        assert!(resp.headers().get(header::WWW_AUTHENTICATE).is_none());
    }
}
