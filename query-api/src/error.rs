//! query-api's one error type: stable codes, one status table, RFC 9457 problem+json; 5xx bodies
//! carry only the request id.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

pub use canopy_http::{FieldError, Problem};

/// Every error query-api answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("this role may not read")]
    Forbidden,
    #[error("no such {0} in this workspace")]
    NotFound(&'static str),
    #[error("invalid query parameters")]
    Validation(Vec<FieldError>),
    #[error("version {version} of {aggregate_id} is not projected yet")]
    NotYetConsistent { aggregate_id: String, version: i64 },
    #[error("no such route")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the service is not ready")]
    Unavailable,
    #[error("this endpoint speaks WebSocket only: send a WebSocket handshake")]
    UpgradeRequired,
    #[error("this person already has {limit} live streams open here: close one first")]
    TooManyStreams { limit: usize },
    #[error("this server has as many live streams open as it takes: try again later")]
    StreamsAtCapacity,
    #[error(
        "this person already has {limit} reads waiting for consistent_with here: wait for one first"
    )]
    TooManyWaits { limit: usize },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::Internal(error.into())
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError {
            field: field.to_owned(),
            message: message.into(),
        }])
    }

    /// The one table from error to its stable code and HTTP status (no catch-all: a new error
    /// does not compile until it is given both).
    pub fn describe(&self) -> (&'static str, StatusCode) {
        match self {
            Self::Unauthorized => ("unauthorized", StatusCode::UNAUTHORIZED),
            Self::Forbidden => ("forbidden", StatusCode::FORBIDDEN),
            Self::NotFound(_) => ("not_found", StatusCode::NOT_FOUND),
            Self::Validation(_) => ("validation_failed", StatusCode::UNPROCESSABLE_ENTITY),
            Self::NotYetConsistent { .. } => ("not_yet_consistent", StatusCode::CONFLICT),
            Self::RouteNotFound => ("route_not_found", StatusCode::NOT_FOUND),
            Self::MethodNotAllowed => ("method_not_allowed", StatusCode::METHOD_NOT_ALLOWED),
            Self::Unavailable => ("unavailable", StatusCode::SERVICE_UNAVAILABLE),
            Self::UpgradeRequired => ("upgrade_required", StatusCode::UPGRADE_REQUIRED),
            Self::TooManyStreams { .. } => ("too_many_streams", StatusCode::TOO_MANY_REQUESTS),
            Self::TooManyWaits { .. } => ("too_many_waits", StatusCode::TOO_MANY_REQUESTS),
            Self::StreamsAtCapacity => ("streams_at_capacity", StatusCode::SERVICE_UNAVAILABLE),
            Self::Internal(_) => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    pub fn code(&self) -> &'static str {
        self.describe().0
    }

    pub fn status(&self) -> StatusCode {
        self.describe().1
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::NotYetConsistent { .. } => Some(Duration::from_secs(1)),
            Self::Unavailable | Self::StreamsAtCapacity => Some(Duration::from_secs(5)),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(error) = &self {
            let request_id = canopy_http::current_request_id();
            tracing::error!(request_id = request_id.as_deref(), error = ?error, "internal error");
        }
        let errors = match &self {
            Self::Validation(errors) => Some(errors.clone()),
            _ => None,
        };
        let mut response = Problem::new(self.status(), self.code(), self.to_string(), errors)
            .into_response_with(self.retry_after());
        if let Self::UpgradeRequired = self {
            // RFC 9110: a 426 names the protocol to switch to
            response.headers_mut().insert(
                axum::http::header::UPGRADE,
                axum::http::HeaderValue::from_static("websocket"),
            );
        }
        response
    }
}
