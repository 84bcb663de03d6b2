//! The runner's reports of what the agent and its sandbox did (service role only; an
//! `Idempotency-Key` is required on every one, so a retried report is never recorded twice).

use axum::extract::State;
use axum::response::Response;
use canopy_domain::SessionCommand;
use uuid::Uuid;

use crate::AppState;
use crate::budgets;
use crate::commands::{Effect, Ids};
use crate::dto::{
    AgentMessage, BranchPushed, CheckpointRestored, CheckpointTaken, CompletePrompt, Empty,
    Failure, ProposePlan, RequestToolApproval, SandboxStarted, SandboxStopped, ToolExecuted, Usage,
};
use crate::error::ApiError;
use crate::extract::{CommandRequest, RunnerHeaders, RunnerRequest};
use crate::routes::sessions::session;
use crate::routes::{Changed, Created};

/// The runner started the prompt at the head of the queue.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/prompts/{prompt_id}/start", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), ("prompt_id" = Uuid, Path, description = "The prompt's id"), RunnerHeaders),
    request_body(content = Option<Empty>), responses(Changed), security(("bearer" = [])))]
pub(crate) async fn prompt_started(
    State(state): State<AppState>,
    Ids((session_id, prompt_id)): Ids<(Uuid, Uuid)>,
    request: RunnerRequest<Empty>,
) -> Result<Response, ApiError> {
    session(&state, request.ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::StartPrompt { actor, prompt_id }
    })
    .await
}

/// The running prompt finished.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/prompts/{prompt_id}/complete", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), ("prompt_id" = Uuid, Path, description = "The prompt's id"), RunnerHeaders),
    request_body(content = Option<CompletePrompt>), responses(Changed), security(("bearer" = [])))]
pub(crate) async fn prompt_completed(
    State(state): State<AppState>,
    Ids((session_id, prompt_id)): Ids<(Uuid, Uuid)>,
    request: RunnerRequest<CompletePrompt>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::CompletePrompt {
            actor,
            prompt_id,
            summary: body.summary,
        }
    })
    .await
}

/// The running prompt failed.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/prompts/{prompt_id}/fail", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), ("prompt_id" = Uuid, Path, description = "The prompt's id"), RunnerHeaders),
    request_body = Failure, responses(Changed), security(("bearer" = [])))]
pub(crate) async fn prompt_failed(
    State(state): State<AppState>,
    Ids((session_id, prompt_id)): Ids<(Uuid, Uuid)>,
    request: RunnerRequest<Failure>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::FailPrompt {
            actor,
            prompt_id,
            reason: body.reason,
        }
    })
    .await
}

/// The agent proposed a plan for the running prompt.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/plans", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), RunnerHeaders),
    request_body = ProposePlan, responses(Created), security(("bearer" = [])))]
pub(crate) async fn plan_proposed(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: RunnerRequest<ProposePlan>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    let plan_id = body.plan_id.unwrap_or_else(Uuid::new_v4);
    let effect = Effect::Creates(plan_id.to_string());
    session(&state, ctx, session_id, effect, |actor| {
        SessionCommand::ProposePlan {
            actor,
            plan_id,
            prompt_id: body.prompt_id,
            summary: body.summary,
            steps: body.steps,
        }
    })
    .await
}

/// The agent asked permission for a tool call.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/tool-approvals", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), RunnerHeaders),
    request_body = RequestToolApproval, responses(Created), security(("bearer" = [])))]
pub(crate) async fn tool_approval_requested(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: RunnerRequest<RequestToolApproval>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    let request_id = body.request_id.unwrap_or_else(Uuid::new_v4);
    let effect = Effect::Creates(request_id.to_string());
    session(&state, ctx, session_id, effect, |actor| {
        SessionCommand::RequestToolApproval {
            actor,
            request_id,
            prompt_id: body.prompt_id,
            call_id: body.call_id,
            tool: body.tool,
            input_summary: body.input_summary,
        }
    })
    .await
}

/// The agent ran a tool.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/tool-executions", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), RunnerHeaders),
    request_body = ToolExecuted, responses(Changed), security(("bearer" = [])))]
pub(crate) async fn tool_executed(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: RunnerRequest<ToolExecuted>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::RecordToolExecution {
            actor,
            prompt_id: body.prompt_id,
            call_id: body.call_id,
            tool: body.tool,
            phase: body.phase.into(),
            input_summary: body.input_summary,
            output_summary: body.output_summary,
            status: body.status.into(),
            duration_ms: body.duration_ms,
        }
    })
    .await
}

/// The agent said something.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/messages", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), RunnerHeaders),
    request_body = AgentMessage, responses(Changed), security(("bearer" = [])))]
pub(crate) async fn agent_message(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: RunnerRequest<AgentMessage>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::RecordAgentMessage {
            actor,
            prompt_id: body.prompt_id,
            message_id: body.message_id,
            text: body.text,
        }
    })
    .await
}

/// Tokens and cost the running prompt used. The budget ledger counts them in the same
/// transaction; a budget this reaches 80% of is then recorded as `BudgetThresholdReached`.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/usage", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), RunnerHeaders),
    request_body = Usage, responses(Changed), security(("bearer" = [])))]
pub(crate) async fn usage(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: RunnerRequest<Usage>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    let actor = ctx.caller.actor();
    let mut metadata = ctx.metadata.clone();
    metadata.idempotency_key = None;
    let prompt_id = body.prompt_id;
    let answer = session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::RecordUsage {
            actor,
            prompt_id,
            tokens_in: body.tokens_in,
            tokens_out: body.tokens_out,
            cost_micro_usd: body.cost_micro_usd,
        }
    })
    .await?;
    // a replayed answer recorded nothing new, so nothing new can have crossed a threshold
    if answer.status().is_success() && !answer.headers().contains_key("idempotent-replayed") {
        budgets::warn_after_usage(&state, actor, &metadata, session_id, prompt_id).await;
    }
    Ok(answer)
}

/// A checkpoint of the workspace was taken.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/checkpoints", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), RunnerHeaders),
    request_body = CheckpointTaken, responses(Created), security(("bearer" = [])))]
pub(crate) async fn checkpoint_taken(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: RunnerRequest<CheckpointTaken>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    let checkpoint_id = body.checkpoint_id.unwrap_or_else(Uuid::new_v4);
    let effect = Effect::Creates(checkpoint_id.to_string());
    session(&state, ctx, session_id, effect, |actor| {
        SessionCommand::RecordCheckpoint {
            actor,
            checkpoint_id,
            prompt_id: body.prompt_id,
            label: body.label,
            commit_sha: body.commit_sha,
            files_changed: body.files_changed,
            trigger: body.trigger.into(),
        }
    })
    .await
}

/// A checkpoint was restored into the workspace.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/restores", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), RunnerHeaders),
    request_body = CheckpointRestored, responses(Changed), security(("bearer" = [])))]
pub(crate) async fn checkpoint_restored(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: RunnerRequest<CheckpointRestored>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::RecordRestore {
            actor,
            checkpoint_id: body.checkpoint_id,
        }
    })
    .await
}

/// The session branch was pushed.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/pushes", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), RunnerHeaders),
    request_body = BranchPushed, responses(Changed), security(("bearer" = [])))]
pub(crate) async fn branch_pushed(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: RunnerRequest<BranchPushed>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::RecordBranchPushed {
            actor,
            branch: body.branch,
            commit_sha: body.commit_sha,
        }
    })
    .await
}

/// The session's sandbox started, with OpenCode inside it.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/sandbox/started", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), RunnerHeaders),
    request_body = SandboxStarted, responses(Changed), security(("bearer" = [])))]
pub(crate) async fn sandbox_started(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: RunnerRequest<SandboxStarted>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::RecordSandboxStarted {
            actor,
            sandbox_id: body.sandbox_id,
            opencode_session_id: body.opencode_session_id,
        }
    })
    .await
}

/// The session's sandbox stopped.
#[utoipa::path(post, path = "/runner/sessions/{session_id}/sandbox/stopped", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), RunnerHeaders),
    request_body = SandboxStopped, responses(Changed), security(("bearer" = [])))]
pub(crate) async fn sandbox_stopped(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: RunnerRequest<SandboxStopped>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::RecordSandboxStopped {
            actor,
            sandbox_id: body.sandbox_id,
            reason: body.reason,
        }
    })
    .await
}

/// The session failed (its running and queued prompts fail with it).
#[utoipa::path(post, path = "/runner/sessions/{session_id}/fail", tag = "runner",
    params(("session_id" = Uuid, Path, description = "The session's id"), RunnerHeaders),
    request_body = Failure, responses(Changed), security(("bearer" = [])))]
pub(crate) async fn session_failed(
    State(state): State<AppState>,
    Ids(session_id): Ids<Uuid>,
    request: RunnerRequest<Failure>,
) -> Result<Response, ApiError> {
    let CommandRequest { ctx, body } = request;
    session(&state, ctx, session_id, Effect::Changes, |actor| {
        SessionCommand::FailSession {
            actor,
            reason: body.reason,
        }
    })
    .await
}
