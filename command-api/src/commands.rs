//! The path every command takes once its request is valid: idempotency claim, the aggregate
//! store (load, decide, append), and the answer, remembered under the idempotency key in the
//! append's own transaction (a refusal's answer right after).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use canopy_domain::{DomainError, Feature, Session, SessionStatus};
use canopy_event_store::{Committed, ExecuteError, Fence, PgConnection};
use cqrs_es::Aggregate;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use crate::budgets::Admission;
use crate::dto::CommandAccepted;
use crate::error::ApiError;
use crate::extract::CommandContext;
use crate::idempotency::{self, Claim, CompleteOnAppend};

/// Whether a command creates something (201) or changes what exists (202).
#[derive(Debug, Clone)]
pub(crate) enum Effect {
    Creates(String),
    Changes,
}

/// What a command writes or checks in its append's transaction besides its events (a
/// [`Fence`]), and, when it refused, why: the budgets' admission of a prompt says which budget
/// is spent; a fence that only writes never refuses on its own.
pub(crate) trait Admit: Fence {
    /// Why the fence refused, when it did.
    fn refusal(&self) -> Option<ApiError> {
        None
    }
}

impl Admit for Admission<'_> {
    fn refusal(&self) -> Option<ApiError> {
        let refusal = self.refusal.lock().unwrap_or_else(|p| p.into_inner());
        refusal
            .clone()
            .map(|shortfall| ApiError::BudgetExhausted(Box::new(shortfall)))
    }
}

/// Runs `command` against aggregate `aggregate_id` of type `A`, with the limits `services`.
pub(crate) async fn run<A>(
    state: &AppState,
    ctx: CommandContext,
    aggregate_id: &str,
    command: A::Command,
    services: &A::Services,
    effect: Effect,
) -> Result<Response, ApiError>
where
    A: Aggregate<Error = DomainError> + 'static,
    A::Command: Clone,
{
    run_with::<A, NoFence>(state, ctx, aggregate_id, command, services, effect, None).await
}

/// What a command writes besides its events, in the append's transaction: a [`Fence`] of its
/// own, and the secret its answer shows once (a webhook's signing secret).
#[derive(Debug)]
pub(crate) struct Extra<'a, F> {
    pub(crate) fence: &'a F,
    pub(crate) secret: Option<String>,
}

/// No fence of the command's own.
#[derive(Debug)]
pub(crate) struct NoFence;

impl Fence for NoFence {
    async fn check(&self, _: &mut PgConnection, _: &Committed) -> Result<bool, sqlx::Error> {
        Ok(true)
    }
}

impl Admit for NoFence {}

/// Both fences, in order; the append commits only if both agree.
struct Both<'a, A, B>(&'a A, &'a B);

impl<A: Fence, B: Fence> Fence for Both<'_, A, B> {
    async fn check(
        &self,
        conn: &mut PgConnection,
        committed: &Committed,
    ) -> Result<bool, sqlx::Error> {
        Ok(self.0.check(conn, committed).await? && self.1.check(conn, committed).await?)
    }
}

/// [`run`] with what the command writes besides its events ([`Extra`]).
pub(crate) async fn run_with<A, F>(
    state: &AppState,
    ctx: CommandContext,
    aggregate_id: &str,
    command: A::Command,
    services: &A::Services,
    effect: Effect,
    extra: Option<Extra<'_, F>>,
) -> Result<Response, ApiError>
where
    A: Aggregate<Error = DomainError> + 'static,
    A::Command: Clone,
    F: Admit,
{
    let secret = extra.as_ref().and_then(|extra| extra.secret.clone());
    let (status, created_id) = match &effect {
        Effect::Creates(id) => (StatusCode::CREATED, Some(id.as_str())),
        Effect::Changes => (StatusCode::ACCEPTED, None),
    };
    let answer = |committed: &Committed| CommandAccepted {
        aggregate_type: A::TYPE.to_owned(),
        aggregate_id: committed.aggregate_id.clone(),
        version: committed.version,
        event_ids: committed.events.iter().map(|e| e.event_id).collect(),
        id: created_id.map(str::to_owned),
        secret: secret.clone(),
    };
    let claimed = match &ctx.idempotency_key {
        None => None,
        Some(key) => {
            let claim = idempotency::claim(
                &state.pool,
                &ctx.caller.scope(),
                key,
                &ctx.fingerprint,
                state.idempotency_lease,
                state.idempotency_ttl,
            )
            .await?;
            match claim {
                Claim::Proceed(claimed) => Some(claimed),
                Claim::Replay { status, body } => return Ok(replay(status, &body)),
            }
        }
    };

    let store = &state.store;
    let result = match (&claimed, &extra) {
        // the key's answer commits with the events, or neither does
        (Some(claimed), extra) => {
            let fence = CompleteOnAppend {
                claimed,
                status: status.as_u16(),
                answer: &answer,
            };
            match extra {
                Some(extra) => {
                    store
                        .execute_fenced::<A, _>(
                            aggregate_id,
                            command,
                            services,
                            &ctx.metadata,
                            ctx.if_match,
                            &Both(extra.fence, &fence),
                        )
                        .await
                }
                None => {
                    store
                        .execute_fenced::<A, _>(
                            aggregate_id,
                            command,
                            services,
                            &ctx.metadata,
                            ctx.if_match,
                            &fence,
                        )
                        .await
                }
            }
        }
        (None, Some(extra)) => {
            store
                .execute_fenced::<A, _>(
                    aggregate_id,
                    command,
                    services,
                    &ctx.metadata,
                    ctx.if_match,
                    extra.fence,
                )
                .await
        }
        (None, None) => {
            store
                .execute::<A>(aggregate_id, command, services, &ctx.metadata, ctx.if_match)
                .await
        }
    };
    let outcome = match result {
        Ok(committed) => Ok(answer(&committed)),
        Err(ExecuteError::Domain(error)) => Err(ApiError::Domain(error)),
        Err(ExecuteError::VersionMismatch { expected, actual }) => {
            Err(ApiError::VersionMismatch { expected, actual })
        }
        Err(ExecuteError::Conflict { retry_after }) => {
            Err(ApiError::ConcurrencyConflict { retry_after })
        }
        Err(ExecuteError::Fenced) if refused(&extra).is_some() => {
            Err(refused(&extra).expect("checked just above"))
        }
        Err(ExecuteError::Fenced) => {
            // A later request with the same key took it over (our lease ran out) and answers
            // for it; our append rolled back. Answer like a duplicate of that request.
            metrics::counter!("canopy_idempotency_takeovers_fenced_total").increment(1);
            let Some(claimed) = &claimed else {
                return Err(ApiError::internal(anyhow::anyhow!(
                    "fenced without a fence"
                )));
            };
            let (status, body) =
                idempotency::after_takeover(&state.pool, claimed, &ctx.fingerprint).await?;
            return Ok(replay(status, &body));
        }
        Err(ExecuteError::Duplicate { index }) => match duplicate_field(&index) {
            Some(field) => Err(ApiError::Domain(DomainError::DuplicateId(field))),
            None => Err(ApiError::internal(anyhow::anyhow!(
                "an append broke the unique index {index}"
            ))),
        },
        Err(ExecuteError::Store(error)) => Err(ApiError::internal(error)),
    };
    metrics::counter!(
        "canopy_commands_total",
        "aggregate" => A::TYPE,
        "outcome" => match &outcome { Ok(_) => "accepted", Err(e) => e.code() },
    )
    .increment(1);

    let Some(claimed) = &claimed else {
        return outcome.map(|body| accepted(status, &body));
    };
    match outcome {
        // already completed in the append's transaction
        Ok(body) => Ok(accepted(status, &body)),
        Err(error) if error.is_transient() => {
            // a no-op when the append did commit (the key is completed then)
            idempotency::release(&state.pool, claimed).await;
            Err(error)
        }
        Err(error) => {
            // A refusal is an answer too: the same request gets it again.
            let problem = serde_json::to_value(error.problem()).map_err(ApiError::internal)?;
            idempotency::complete(&state.pool, claimed, error.status().as_u16(), &problem).await?;
            Err(error)
        }
    }
}

/// Why the command's own fence refused, when it did.
fn refused<F: Admit>(extra: &Option<Extra<'_, F>>) -> Option<ApiError> {
    extra.as_ref().and_then(|extra| extra.fence.refusal())
}

/// The id field an `events_<field>_once` unique index keeps unique within a session (see
/// `migrations/20261130003000_event_ids_once.sql`): the aggregate forgets finished prompts, the
/// index does not.
fn duplicate_field(index: &str) -> Option<&'static str> {
    match index {
        "events_prompt_id_once" => Some("prompt_id"),
        "events_plan_id_once" => Some("plan_id"),
        "events_request_id_once" => Some("request_id"),
        "events_checkpoint_id_once" => Some("checkpoint_id"),
        _ => None,
    }
}

/// A remembered answer, marked as a replay (problem+json when it is a refusal).
fn replay(status: u16, body: &serde_json::Value) -> Response {
    metrics::counter!("canopy_idempotent_replays_total").increment(1);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut response = (status, axum::Json(body)).into_response();
    if body.get("code").is_some() && status.is_client_error() {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
    }
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

fn accepted(status: StatusCode, body: &CommandAccepted) -> Response {
    (status, axum::Json(body)).into_response()
}

/// Path parameters, each a UUID, parsed after the caller is authenticated (so a bad token is
/// 401 before a bad path is 422). A malformed id is 422 naming the parameter; a well-formed one
/// that names nothing of the caller's is 404 later.
#[derive(Debug)]
pub(crate) struct Ids<T>(pub(crate) T);

impl<T> FromRequestParts<AppState> for Ids<T>
where
    T: canopy_http::params::FromIds + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        use canopy_http::params::PathError;
        Caller::from_request_parts(parts, state).await?;
        match canopy_http::params::path_ids(parts).await {
            Ok(ids) => Ok(Self(ids)),
            Err(PathError::Invalid(errors)) => Err(ApiError::Validation(errors)),
            Err(PathError::Mismatch(error)) => Err(ApiError::internal(anyhow::anyhow!(error))),
        }
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
