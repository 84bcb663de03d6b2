//! The path every command takes once its request is valid: idempotency claim, the aggregate
//! store (load, decide, append), and the answer, remembered under the idempotency key.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use canopy_domain::{DomainError, Feature, Session, SessionStatus};
use canopy_event_store::ExecuteError;
use cqrs_es::Aggregate;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use crate::dto::CommandAccepted;
use crate::error::ApiError;
use crate::extract::CommandContext;
use crate::idempotency::{self, Claim, Plan};

/// Whether a command creates something (201) or changes what exists (202).
#[derive(Debug, Clone)]
pub(crate) enum Effect {
    Creates(String),
    Changes,
}

/// Runs `command` against aggregate `aggregate_id` of type `A`.
pub(crate) async fn run<A>(
    state: &AppState,
    ctx: CommandContext,
    aggregate_id: &str,
    command: A::Command,
    effect: Effect,
) -> Result<Response, ApiError>
where
    A: Aggregate<Error = DomainError, Services = ()>,
    A::Command: Clone,
{
    let (status, created_id) = match &effect {
        Effect::Creates(id) => (StatusCode::CREATED, Some(id.as_str())),
        Effect::Changes => (StatusCode::ACCEPTED, None),
    };
    let scope = ctx.caller.scope();
    if let Some(key) = &ctx.idempotency_key {
        let plan = Plan {
            status: status.as_u16(),
            aggregate_type: A::TYPE,
            aggregate_id,
            created_id,
        };
        let claim = idempotency::claim(
            &state.pool,
            &scope,
            &ctx.caller.claims.sub,
            key,
            &ctx.fingerprint,
            &plan,
            state.idempotency_ttl,
        )
        .await?;
        if let Claim::Replay { status, body } = claim {
            metrics::counter!("canopy_idempotent_replays_total").increment(1);
            return Ok(json_response(
                StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
                &body,
                true,
            ));
        }
    }

    let result = state
        .store
        .execute::<A>(aggregate_id, command, &(), &ctx.metadata, ctx.if_match)
        .await;
    let outcome = match result {
        Ok(committed) => Ok(CommandAccepted {
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: committed.aggregate_id,
            version: committed.version,
            event_ids: committed.events.iter().map(|e| e.event_id).collect(),
            id: created_id.map(str::to_owned),
        }),
        Err(ExecuteError::Domain(error)) => Err(ApiError::Domain(error)),
        Err(ExecuteError::VersionMismatch { expected, actual }) => {
            Err(ApiError::VersionMismatch { expected, actual })
        }
        Err(ExecuteError::Conflict { retry_after }) => {
            Err(ApiError::ConcurrencyConflict { retry_after })
        }
        Err(ExecuteError::Store(error)) => Err(ApiError::internal(error)),
    };
    metrics::counter!(
        "canopy_commands_total",
        "aggregate" => A::TYPE,
        "outcome" => match &outcome { Ok(_) => "accepted", Err(e) => e.code() },
    )
    .increment(1);

    let Some(key) = &ctx.idempotency_key else {
        return outcome.map(|body| accepted(status, &body));
    };
    match outcome {
        Ok(body) => {
            let body = serde_json::to_value(&body).map_err(ApiError::internal)?;
            idempotency::complete(&state.pool, &scope, key, status.as_u16(), &body).await?;
            Ok(json_response(status, &body, false))
        }
        Err(error) if error.is_transient() => {
            idempotency::release(&state.pool, &scope, key).await;
            Err(error)
        }
        Err(error) => {
            // A refusal is an answer too: the same request gets it again.
            let problem = serde_json::to_value(error.problem()).map_err(ApiError::internal)?;
            idempotency::complete(&state.pool, &scope, key, error.status().as_u16(), &problem)
                .await?;
            Err(error)
        }
    }
}

fn accepted(status: StatusCode, body: &CommandAccepted) -> Response {
    (status, axum::Json(body)).into_response()
}

fn json_response(status: StatusCode, body: &serde_json::Value, replayed: bool) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    if body.get("code").is_some() && status.is_client_error() {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// Path parameters, parsed after the caller is authenticated (so a bad token is 401 before a
/// bad path is 404). A malformed id names nothing: 404.
#[derive(Debug)]
pub(crate) struct Ids<T>(pub(crate) T);

impl<T> FromRequestParts<AppState> for Ids<T>
where
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Caller::from_request_parts(parts, state).await?;
        let axum::extract::Path(ids) = axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::Domain(DomainError::NotFound))?;
        Ok(Self(ids))
    }
}

/// The feature a new session is grouped under must exist in the caller's workspace.
pub(crate) async fn check_feature(
    state: &AppState,
    caller: &Caller,
    feature_id: Uuid,
) -> Result<(), ApiError> {
    let loaded = state
        .store
        .load::<Feature>(&feature_id.to_string())
        .await
        .map_err(ApiError::internal)?;
    let exists = loaded.version > 0
        && caller.claims.workspace_id.as_deref() == Some(loaded.aggregate.workspace_id());
    if exists {
        Ok(())
    } else {
        Err(ApiError::Reference {
            code: "feature_not_found",
            what: format!("feature {feature_id}"),
        })
    }
}

/// A session attached to a feature must exist in the caller's workspace.
pub(crate) async fn check_session(
    state: &AppState,
    caller: &Caller,
    session_id: Uuid,
) -> Result<(), ApiError> {
    let loaded = state
        .store
        .load::<Session>(&session_id.to_string())
        .await
        .map_err(ApiError::internal)?;
    let exists = loaded.aggregate.status() != SessionStatus::NotStarted
        && caller.claims.workspace_id.as_deref() == Some(loaded.aggregate.workspace_id());
    if exists {
        Ok(())
    } else {
        Err(ApiError::Reference {
            code: "session_not_found",
            what: format!("session {session_id}"),
        })
    }
}
