//! The API's one error type: every failure a client can see, with a stable `code`, rendered as
//! RFC 9457 problem+json. The status of each code is decided in one table, [`ApiError::status`].
//! 5xx bodies carry only the request id; the details go to the log.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use canopy_domain::{DomainError, Refusal};

pub use canopy_http::{BudgetShortfall, FieldError, Problem};

/// How long a client should wait before submitting to a full prompt queue again: about as long
/// as a short prompt runs.
const PROMPT_QUEUE_RETRY_AFTER: Duration = Duration::from_secs(10);

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
    #[error("the {} budget is spent ({} of {} {} used or reserved)", .0.budget, .0.spent + .0.reserved, .0.limit, .0.unit)]
    BudgetExhausted(Box<BudgetShortfall>),
    #[error("{what} does not exist in this workspace")]
    Reference { code: &'static str, what: String },
    #[error("{0}")]
    Domain(DomainError),
    #[error("{0}")]
    Target(canopy_webhook::TargetError),
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

    /// The one table from error to its stable code and HTTP status. No arm is a catch-all: a
    /// new error (or a new kind of domain refusal) does not compile until it is given both.
    pub fn describe(&self) -> (&'static str, StatusCode) {
        match self {
            Self::Unauthorized => ("unauthorized", StatusCode::UNAUTHORIZED),
            Self::MalformedJson(_) => ("malformed_json", StatusCode::BAD_REQUEST),
            Self::UnsupportedMediaType => {
                ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            Self::Validation(_) => ("validation_failed", StatusCode::UNPROCESSABLE_ENTITY),
            Self::PayloadTooLarge { .. } => ("payload_too_large", StatusCode::PAYLOAD_TOO_LARGE),
            Self::PromptTooLarge { .. } => ("prompt_too_large", StatusCode::PAYLOAD_TOO_LARGE),
            Self::InvalidHeader { .. } => ("invalid_header", StatusCode::BAD_REQUEST),
            Self::IdempotencyKeyRequired => ("idempotency_key_required", StatusCode::BAD_REQUEST),
            Self::IdempotencyKeyReused => {
                ("idempotency_key_reused", StatusCode::UNPROCESSABLE_ENTITY)
            }
            Self::IdempotencyInFlight => ("idempotency_key_in_flight", StatusCode::CONFLICT),
            Self::VersionMismatch { .. } => ("version_mismatch", StatusCode::CONFLICT),
            Self::ConcurrencyConflict { .. } => ("concurrency_conflict", StatusCode::CONFLICT),
            Self::RateLimited { .. } => ("rate_limited", StatusCode::TOO_MANY_REQUESTS),
            // not a rate (429) nor a conflict with the aggregate (409): the workspace's own
            // spending limit, which only more budget or time (a new period, prompts finishing)
            // lifts; clients tell it apart by status alone
            Self::BudgetExhausted(_) => ("budget_exhausted", StatusCode::PAYMENT_REQUIRED),
            Self::Reference { code, .. } => (code, StatusCode::UNPROCESSABLE_ENTITY),
            Self::Domain(error) => (error.code(), refusal_status(error.refusal())),
            Self::Target(error) => (error.code(), StatusCode::UNPROCESSABLE_ENTITY),
            Self::RouteNotFound => ("route_not_found", StatusCode::NOT_FOUND),
            Self::MethodNotAllowed => ("method_not_allowed", StatusCode::METHOD_NOT_ALLOWED),
            Self::Unavailable => ("unavailable", StatusCode::SERVICE_UNAVAILABLE),
            Self::Internal(_) => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        self.describe().0
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.describe().1
    }

    /// Seconds a client should wait before retrying, when retrying can help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::ConcurrencyConflict { retry_after } | Self::RateLimited { retry_after } => {
                Some(*retry_after)
            }
            Self::IdempotencyInFlight => Some(Duration::from_secs(1)),
            Self::Domain(DomainError::PromptQueueFull(_)) => Some(PROMPT_QUEUE_RETRY_AFTER),
            Self::Unavailable => Some(Duration::from_secs(5)),
            _ => None,
        }
    }

    /// Whether a repeat of the same request could get another answer: such answers are not
    /// remembered under an idempotency key.
    pub fn is_transient(&self) -> bool {
        // a budget refusal may pass once reservations of running prompts are released
        matches!(self, Self::BudgetExhausted(_))
            || self.retry_after().is_some()
            || self.status().is_server_error()
    }

    /// The problem+json body of this error for the request being answered.
    pub fn problem(&self) -> Problem {
        let errors = match self {
            Self::Validation(errors) => Some(errors.clone()),
            _ => None,
        };
        let problem = Problem::new(self.status(), self.code(), self.to_string(), errors);
        match self {
            Self::BudgetExhausted(shortfall) => problem.with_budget((**shortfall).clone()),
            _ => problem,
        }
    }
}

/// Domain refusals by kind: who may not (403), what is not there (404), what the request itself
/// gets wrong whatever the state (422), what the current state does not allow (409), and a
/// condition of the moment like a full prompt queue (429: the same request may pass later, and it
/// is not remembered under an idempotency key).
fn refusal_status(refusal: Refusal) -> StatusCode {
    match refusal {
        Refusal::Forbidden => StatusCode::FORBIDDEN,
        Refusal::NotFound => StatusCode::NOT_FOUND,
        Refusal::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        Refusal::Conflict => StatusCode::CONFLICT,
        Refusal::Busy => StatusCode::TOO_MANY_REQUESTS,
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
