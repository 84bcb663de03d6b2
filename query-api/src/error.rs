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

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Validation(_) => "validation_failed",
            Self::NotYetConsistent { .. } => "not_yet_consistent",
            Self::RouteNotFound => "route_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unavailable => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound(_) | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotYetConsistent { .. } => StatusCode::CONFLICT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::NotYetConsistent { .. } => Some(Duration::from_secs(1)),
            Self::Unavailable => Some(Duration::from_secs(5)),
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
        Problem::new(self.status(), self.code(), self.to_string(), errors)
            .into_response_with(self.retry_after())
    }
}
