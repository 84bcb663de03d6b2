//! The API's one error type: every failure a client can see, with a stable `code`, rendered as
//! RFC 9457 problem+json. The status of each code is decided in one table, [`ApiError::status`].
//! 5xx bodies carry only the request id; the details go to the log.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use canopy_domain::DomainError;

pub use canopy_http::{FieldError, Problem};

/// Every error the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("the body must be application/json")]
    UnsupportedMediaType,
    #[error("the request has invalid fields")]
    Validation(Vec<FieldError>),
    #[error("the body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the prompt text is larger than {limit} bytes")]
    PromptTooLarge { limit: usize },
    #[error("invalid {header} header: {reason}")]
    InvalidHeader {
        header: &'static str,
        reason: &'static str,
    },
    #[error("the runner must send an Idempotency-Key header")]
    IdempotencyKeyRequired,
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being processed")]
    IdempotencyInFlight,
    #[error("the aggregate is at version {actual}, not {expected}")]
    VersionMismatch { expected: usize, actual: usize },
    #[error("the aggregate was changed concurrently; retry")]
    ConcurrencyConflict { retry_after: Duration },
    #[error("too many requests")]
    RateLimited { retry_after: Duration },
    #[error("{what} does not exist in this workspace")]
    Reference { code: &'static str, what: String },
    #[error("{0}")]
    Domain(DomainError),
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
    /// Wraps any failure we did not expect; its details reach only the log.
    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::Internal(error.into())
    }

    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::MalformedJson(_) => "malformed_json",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Validation(_) => "validation_failed",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::PromptTooLarge { .. } => "prompt_too_large",
            Self::InvalidHeader { .. } => "invalid_header",
            Self::IdempotencyKeyRequired => "idempotency_key_required",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyInFlight => "idempotency_key_in_flight",
            Self::VersionMismatch { .. } => "version_mismatch",
            Self::ConcurrencyConflict { .. } => "concurrency_conflict",
            Self::RateLimited { .. } => "rate_limited",
            Self::Reference { code, .. } => code,
            Self::Domain(error) => error.code(),
            Self::RouteNotFound => "route_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unavailable => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// The one table from error to HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::MalformedJson(_) | Self::InvalidHeader { .. } | Self::IdempotencyKeyRequired => {
                StatusCode::BAD_REQUEST
            }
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Validation(_) | Self::IdempotencyKeyReused | Self::Reference { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::PayloadTooLarge { .. } | Self::PromptTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::IdempotencyInFlight
            | Self::VersionMismatch { .. }
            | Self::ConcurrencyConflict { .. } => StatusCode::CONFLICT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Domain(error) => domain_status(error),
            Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds a client should wait before retrying, when retrying can help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::ConcurrencyConflict { retry_after } | Self::RateLimited { retry_after } => {
                Some(*retry_after)
            }
            Self::IdempotencyInFlight => Some(Duration::from_secs(1)),
            Self::Unavailable => Some(Duration::from_secs(5)),
            _ => None,
        }
    }

    /// Whether a repeat of the same request could get another answer: such answers are not
    /// remembered under an idempotency key.
    pub fn is_transient(&self) -> bool {
        self.retry_after().is_some() || self.status().is_server_error()
    }

    /// The problem+json body of this error for the request being answered.
    pub fn problem(&self) -> Problem {
        let errors = match self {
            Self::Validation(errors) => Some(errors.clone()),
            _ => None,
        };
        Problem::new(self.status(), self.code(), self.to_string(), errors)
    }
}

/// Domain refusals: who may not (403), what is not there (404), what the request itself gets
/// wrong whatever the state (422), and what the current state does not allow (409).
fn domain_status(error: &DomainError) -> StatusCode {
    match error {
        DomainError::Forbidden => StatusCode::FORBIDDEN,
        DomainError::NotFound => StatusCode::NOT_FOUND,
        DomainError::InvalidCommand(_) | DomainError::ToolNotReadOnly(_) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        DomainError::PromptNotFound(_)
        | DomainError::PlanNotFound(_)
        | DomainError::ApprovalRequestNotFound(_)
        | DomainError::CheckpointNotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::CONFLICT,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(error) = &self {
            let request_id = canopy_http::current_request_id();
            tracing::error!(request_id = request_id.as_deref(), error = ?error, "internal error");
        }
        self.problem().into_response_with(self.retry_after())
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> Self {
        Self::Domain(error)
    }
}
