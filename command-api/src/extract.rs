//! [`CommandRequest`]: everything a command endpoint needs from its request, checked in a fixed
//! order so that bad input is refused before anything is written: the caller (401), the rate
//! limit (429), the headers (400), the body's size (413), media type (415), JSON syntax (400),
//! shape (422 naming the field) and values (422 listing every invalid field, 413 for prompt text).
//!
//! The headers it reads are documented on every command by [`CommandHeaders`] (people's routes)
//! and [`RunnerHeaders`] (the runner's, where `Idempotency-Key` is required of every caller).

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use canopy_event_store::EventMetadata;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use utoipa::IntoParams;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, FieldError};
use crate::validate::{Checks, Validate};

/// The most an Idempotency-Key, correlation or causation id may hold.
const MAX_KEY_LEN: usize = 255;

/// A validated command request: its context and its body. `KEYED`: the route requires an
/// `Idempotency-Key` of every caller (the runner's routes; a runner caller must send one
/// anywhere).
#[derive(Debug)]
pub(crate) struct CommandRequest<T, const KEYED: bool = false> {
    pub ctx: CommandContext,
    pub body: T,
}

/// A request to one of the runner's routes.
pub(crate) type RunnerRequest<T> = CommandRequest<T, true>;

/// The headers a person's command reads (documentation; [`CommandRequest`] reads them).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code, reason = "documents the headers CommandRequest reads")]
pub(crate) struct CommandHeaders {
    /// Makes a retry of this request safe: the same key and request get the first answer (kept
    /// 24 h per caller); the same key with another request is 422 `idempotency_key_reused`.
    #[param(
        rename = "Idempotency-Key",
        nullable = false,
        pattern = "^[!-~]{1,255}$"
    )]
    idempotency_key: Option<String>,
    /// Apply only at this aggregate version (`7` or `"7"`); else 409 `version_mismatch`.
    #[param(
        rename = "If-Match",
        nullable = false,
        pattern = "^(W/)?(\"[0-9]{1,18}\"|[0-9]{1,18})$",
        example = "\"7\""
    )]
    if_match: Option<String>,
    /// Recorded as the events' request id (generated when absent).
    #[param(rename = "X-Request-Id", nullable = false, pattern = "^[!-~]{1,255}$")]
    request_id: Option<String>,
    /// Recorded as the events' correlation id (the request id when absent).
    #[param(
        rename = "X-Correlation-Id",
        nullable = false,
        pattern = "^[!-~]{1,255}$"
    )]
    correlation_id: Option<String>,
    /// Recorded as the events' causation id.
    #[param(
        rename = "X-Causation-Id",
        nullable = false,
        pattern = "^[!-~]{1,255}$"
    )]
    causation_id: Option<String>,
}

/// The headers a runner's report reads (documentation; [`RunnerRequest`] reads them).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code, reason = "documents the headers RunnerRequest reads")]
pub(crate) struct RunnerHeaders {
    /// Required: a retried report is recorded once (400 `idempotency_key_required` without it;
    /// the same key with another report is 422 `idempotency_key_reused`).
    #[param(
        rename = "Idempotency-Key",
        nullable = false,
        pattern = "^[!-~]{1,255}$"
    )]
    idempotency_key: String,
    /// Apply only at this aggregate version (`7` or `"7"`); else 409 `version_mismatch`.
    #[param(
        rename = "If-Match",
        nullable = false,
        pattern = "^(W/)?(\"[0-9]{1,18}\"|[0-9]{1,18})$",
        example = "\"7\""
    )]
    if_match: Option<String>,
    /// Recorded as the events' request id (generated when absent).
    #[param(rename = "X-Request-Id", nullable = false, pattern = "^[!-~]{1,255}$")]
    request_id: Option<String>,
    /// Recorded as the events' correlation id (the request id when absent).
    #[param(
        rename = "X-Correlation-Id",
        nullable = false,
        pattern = "^[!-~]{1,255}$"
    )]
    correlation_id: Option<String>,
    /// Recorded as the events' causation id.
    #[param(
        rename = "X-Causation-Id",
        nullable = false,
        pattern = "^[!-~]{1,255}$"
    )]
    causation_id: Option<String>,
}

/// Everything about a command request but its body.
#[derive(Debug)]
pub(crate) struct CommandContext {
    pub caller: Caller,
    pub idempotency_key: Option<String>,
    /// `If-Match: <version>`: the command applies only at this aggregate version.
    pub if_match: Option<usize>,
    pub metadata: EventMetadata,
    /// SHA-256 over the method, path and canonical JSON body: what "the same request" means for
    /// an idempotency key.
    pub fingerprint: Vec<u8>,
}

impl<T, const KEYED: bool> FromRequest<AppState> for CommandRequest<T, KEYED>
where
    T: DeserializeOwned + Validate + Send,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let (mut parts, body) = request.into_parts();
        let caller = crate::auth::verify(&state.verifier, &parts)?;
        parts.extensions.insert(caller.clone());
        if !caller.is_runner() {
            state.rate_limiter.check(&caller.scope())?;
        }

        let headers = &parts.headers;
        let idempotency_key = token_header(headers, "idempotency-key")?;
        if (KEYED || caller.is_runner()) && idempotency_key.is_none() {
            return Err(ApiError::IdempotencyKeyRequired);
        }
        let if_match = if_match(headers)?;
        let mut metadata = caller.metadata();
        if let Some(request_id) = token_header(headers, "x-request-id")? {
            metadata.request_id = request_id;
        }
        metadata.correlation_id = token_header(headers, "x-correlation-id")?
            .unwrap_or_else(|| metadata.request_id.clone());
        metadata.causation_id = token_header(headers, "x-causation-id")?;
        metadata.idempotency_key.clone_from(&idempotency_key);

        let bytes = read_body(body, state.limits.max_body_bytes).await?;
        let value = parse_json(headers, &bytes)?;
        let mut hasher = Sha256::new();
        hasher.update(parts.method.as_str());
        hasher.update([0]);
        hasher.update(parts.uri.path());
        hasher.update([0]);
        // serde_json's map is ordered by key: equal JSON hashes equal whatever its whitespace or
        // key order on the wire
        hasher.update(value.to_string());
        let fingerprint = hasher.finalize().to_vec();

        let body: T = serde_path_to_error::deserialize(value).map_err(|error| {
            let path = error.path().to_string();
            let message = error.into_inner().to_string();
            ApiError::Validation(vec![FieldError {
                field: canopy_http::params::field_of(&path, &message),
                message,
            }])
        })?;
        let mut checks = Checks::new(&state.limits);
        body.validate(&mut checks);
        checks.finish()?;

        Ok(Self {
            ctx: CommandContext {
                caller,
                idempotency_key,
                if_match,
                metadata,
                fingerprint,
            },
            body,
        })
    }
}

async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit })
}

/// An empty body means `{}`, so commands without fields need no body at all; so does `null`
/// (what the documents allow where a body is optional). A body of required fields still
/// misses them: 422 naming each.
fn parse_json(headers: &HeaderMap, bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    let empty = || serde_json::Value::Object(serde_json::Map::new());
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(empty());
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        })
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    if value.is_null() {
        return Ok(empty());
    }
    if !value.is_object() {
        return Err(ApiError::Validation(vec![FieldError {
            field: ".".to_owned(),
            message: "the body must be a JSON object".to_owned(),
        }]));
    }
    Ok(value)
}

/// A header holding an opaque token: visible ASCII, 1 to 255 characters.
fn token_header(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let invalid = |reason| ApiError::InvalidHeader {
        header: name,
        reason,
    };
    let value = value
        .to_str()
        .map_err(|_| invalid("must be visible ASCII"))?;
    if value.is_empty() || value.len() > MAX_KEY_LEN {
        return Err(invalid("must hold 1 to 255 characters"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid("must be visible ASCII without spaces"));
    }
    Ok(Some(value.to_owned()))
}

/// `If-Match: 7` or `If-Match: "7"` (an entity tag holding the version).
fn if_match(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let invalid = || ApiError::InvalidHeader {
        header: "if-match",
        reason: "must be an aggregate version, e.g. \"7\"",
    };
    let text = value.to_str().map_err(|_| invalid())?.trim();
    let text = text.strip_prefix("W/").unwrap_or(text);
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    // digits only (what the documented pattern says; `parse` would take a sign)
    if !(1..=18).contains(&text.len()) || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    text.parse::<usize>().map(Some).map_err(|_| invalid())
}
