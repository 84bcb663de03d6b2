//! People's session commands.

use std::sync::Mutex;

use axum::extract::State;
use axum::response::Response;
use canopy_domain::{Actor, Session, SessionCommand};
use uuid::Uuid;

use crate::AppState;
use crate::budgets::Admission;
use crate::commands::{Effect, Extra, Ids, check_feature, run, run_with};
use crate::dto::{
    DenyToolApproval, Empty, RejectPlan, RequestCheckpoint, RequestPush, RequestRestore,
    StartSession, SubmitPrompt,
};
use crate::error::ApiError;
use crate::extract::{CommandContext, CommandHeaders, CommandRequest};
use crate::routes::{Changed, Created, PromptCreated};

/// Runs a session command built from the caller's actor.
pub(crate) async fn session(
    state: &AppState,
    ctx: CommandContext,
    session_id: Uuid,
    effect: Effect,
    command: impl FnOnce(Actor) -> SessionCommand,
) -> Result<Response, ApiError> {
    let command = command(ctx.caller.actor());
    let id = session_id.to_string();
    run::<Session>(state, ctx, &id, command, &state.session_policy, effect).await
}

/// Start a session in the caller's workspace; the caller joins it.
#[utoipa::path(post, path = "/sessions", params(CommandHeaders), tag = "sessions", request_body = StartSession,
    responses(Created), security(("bearer" = [])))]
pub(crate) async fn start_session(
    State(state): State<AppState>,
    request: CommandRequest<StartSession>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    if let Some(feature_id) = body.feature_id {
        check_feature(&state, &ctx.caller, feature_id).await?;
    }
    let session_id = Uuid::new_v4();
    let session_branch = body
        .session_branch
        .unwrap_or_else(|| format!("canopy/{}", &session_id.simple().to_string()[..8]));
    // A runner token has no workspace; the domain refuses it the command anyway.
    let workspace_id = ctx.caller.claims.workspace_id.clone().unwrap_or_default();
    let effect = Effect::Creates(session_id.to_string());
    session(&state, ctx, session_id, effect, |actor| {
        SessionCommand::StartSession {
            actor,
            session_id,
            workspace_id,
            feature_id: body.feature_id,
            title: body.title,
            repository_url: body.repository_url,
            base_branch: body.base_branch,
            session_branch,
        }
    })
    .await
}

/// Join a session as a participant (a no-op when already one).
#[utoipa::path(post, path = "/sessions/{session_id}/join", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), CommandHeaders), request_body(content = Option<Empty>),
    responses(Changed), security(("bearer" = [])))]
pub(crate) async fn join_session(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    session(&state, request.ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::JoinSession { actor }
    })
    .await
}

/// Leave a session.
#[utoipa::path(post, path = "/sessions/{session_id}/leave", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), CommandHeaders), request_body(content = Option<Empty>),
    responses(Changed), security(("bearer" = [])))]
pub(crate) async fn leave_session(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    session(&state, request.ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::LeaveSession { actor }
    })
    .await
}

/// Queue a prompt for the agent (FIFO; one runs at a time). The author joins the session.
///
/// A session holds at most `CANOPY_MAX_QUEUED_PROMPTS` queued prompts (429 `prompt_queue_full`),
/// and a prompt id is used once per session, for the session's whole life (409 `duplicate_id`).
/// A prompt is admitted only while every budget it draws on has something left after what is
/// spent and what admitted prompts reserve (402 `budget_exhausted`; `docs/budgets.md`).
#[utoipa::path(post, path = "/sessions/{session_id}/prompts", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), CommandHeaders), request_body = SubmitPrompt,
    responses(PromptCreated), security(("bearer" = [])))]
pub(crate) async fn submit_prompt(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: CommandRequest<SubmitPrompt>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    let prompt_id = Uuid::new_v4();
    let effect = Effect::Creates(prompt_id.to_string());
    let actor = ctx.caller.actor();
    // A person of another workspace is refused by the session before the fence runs.
    let workspace_id = actor.workspace_id.clone().unwrap_or_default();
    let admission = Admission {
        settings: &state.budgets,
        workspace_id: &workspace_id,
        person_id: &actor.id,
        session_id,
        prompt_id,
        refusal: Mutex::default(),
    };
    let command = SessionCommand::SubmitPrompt {
        actor: actor.clone(),
        prompt_id,
        text: body.text,
    };
    let id = session_id.to_string();
    let policy = &state.session_policy;
    let extra = Extra {
        fence: &admission,
        secret: None,
    };
    run_with::<Session, _>(&state, ctx, &id, command, policy, effect, Some(extra)).await
}

/// Cancel a queued prompt, or interrupt the running one. Members cancel their own prompts;
/// owners and admins any.
#[utoipa::path(post, path = "/sessions/{session_id}/prompts/{prompt_id}/cancel", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), ("prompt_id" = Uuid, Path, description = "The prompt's id"), CommandHeaders),
    request_body(content = Option<Empty>), responses(Changed), security(("bearer" = [])))]
pub(crate) async fn cancel_prompt(
    State(state): State<AppState>,
    Ids((session_id, prompt_id)): Ids<(Uuid, Uuid)>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    session(&state, request.ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::CancelPrompt { actor, prompt_id }
    })
    .await
}

/// Approve the agent's plan (owners and admins).
#[utoipa::path(post, path = "/sessions/{session_id}/plans/{plan_id}/approve", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), ("plan_id" = Uuid, Path, description = "The plan's id"), CommandHeaders),
    request_body(content = Option<Empty>), responses(Changed), security(("bearer" = [])))]
pub(crate) async fn approve_plan(
    State(state): State<AppState>,
    Ids((session_id, plan_id)): Ids<(Uuid, Uuid)>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    session(&state, request.ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::ApprovePlan { actor, plan_id }
    })
    .await
}

/// Reject the agent's plan with a comment (owners and admins).
#[utoipa::path(post, path = "/sessions/{session_id}/plans/{plan_id}/reject", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), ("plan_id" = Uuid, Path, description = "The plan's id"), CommandHeaders),
    request_body = RejectPlan, responses(Changed), security(("bearer" = [])))]
pub(crate) async fn reject_plan(
    State(state): State<AppState>,
    Ids((session_id, plan_id)): Ids<(Uuid, Uuid)>,
    request: CommandRequest<RejectPlan>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::RejectPlan {
            actor,
            plan_id,
            comment: body.comment,
        }
    })
    .await
}

/// Let the agent run a tool call it asked about (owners and admins).
#[utoipa::path(post, path = "/sessions/{session_id}/tool-approvals/{request_id}/grant",
    tag = "sessions", params(("session_id" = Uuid, Path, description = "The session's id"), ("request_id" = Uuid, Path, description = "The tool approval request's id"), CommandHeaders),
    request_body(content = Option<Empty>), responses(Changed), security(("bearer" = [])))]
pub(crate) async fn grant_tool_approval(
    State(state): State<AppState>,
    Ids((session_id, request_id)): Ids<(Uuid, Uuid)>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    session(&state, request.ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::GrantToolApproval { actor, request_id }
    })
    .await
}

/// Refuse a tool call the agent asked about (owners and admins).
#[utoipa::path(post, path = "/sessions/{session_id}/tool-approvals/{request_id}/deny",
    tag = "sessions", params(("session_id" = Uuid, Path, description = "The session's id"), ("request_id" = Uuid, Path, description = "The tool approval request's id"), CommandHeaders),
    request_body(content = Option<DenyToolApproval>), responses(Changed), security(("bearer" = [])))]
pub(crate) async fn deny_tool_approval(
    State(state): State<AppState>,
    Ids((session_id, request_id)): Ids<(Uuid, Uuid)>,
    request: CommandRequest<DenyToolApproval>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::DenyToolApproval {
            actor,
            request_id,
            comment: body.comment,
        }
    })
    .await
}

/// Ask the runner for a checkpoint of the workspace.
#[utoipa::path(post, path = "/sessions/{session_id}/checkpoints", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), CommandHeaders), request_body(content = Option<RequestCheckpoint>),
    responses(Changed), security(("bearer" = [])))]
pub(crate) async fn request_checkpoint(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: CommandRequest<RequestCheckpoint>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::RequestCheckpoint {
            actor,
            label: body.label,
        }
    })
    .await
}

/// Ask the runner to restore a checkpoint of this session (owners and admins).
#[utoipa::path(post, path = "/sessions/{session_id}/restores", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), CommandHeaders), request_body = RequestRestore,
    responses(Changed), security(("bearer" = [])))]
pub(crate) async fn request_restore(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: CommandRequest<RequestRestore>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::RequestRestore {
            actor,
            checkpoint_id: body.checkpoint_id,
        }
    })
    .await
}

/// Ask the runner to push the session branch (owners and admins).
#[utoipa::path(post, path = "/sessions/{session_id}/pushes", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), CommandHeaders), request_body(content = Option<RequestPush>),
    responses(Changed), security(("bearer" = [])))]
pub(crate) async fn request_push(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: CommandRequest<RequestPush>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::RequestPush {
            actor,
            branch: body.branch,
        }
    })
    .await
}

/// Mark the session completed (no prompt may be queued or running).
#[utoipa::path(post, path = "/sessions/{session_id}/complete", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), CommandHeaders), request_body(content = Option<Empty>),
    responses(Changed), security(("bearer" = [])))]
pub(crate) async fn complete_session(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    session(&state, request.ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::CompleteSession { actor }
    })
    .await
}

/// Archive the session: it accepts nothing afterwards (owners and admins).
#[utoipa::path(post, path = "/sessions/{session_id}/archive", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), CommandHeaders), request_body(content = Option<Empty>),
    responses(Changed), security(("bearer" = [])))]
pub(crate) async fn archive_session(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: CommandRequest<Empty>,
) -> Result<Response, ApiError> {
    session(&state, request.ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::ArchiveSession { actor }
    })
    .await
}
