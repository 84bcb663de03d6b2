//! The session's rules: how a command becomes events or a refusal.
//!
//! Checks run in a fixed order so that the answer to a command does not depend on which rule
//! happens to be written first:
//! 1. existence (`not_found`, or `session_already_started` for a second start),
//! 2. workspace: a person from another workspace gets `not_found`, never a hint that it exists,
//! 3. the role table (`forbidden`),
//! 4. the session's lifecycle (`session_archived`, `session_finished`),
//! 5. the command's own input (`invalid_command`, `duplicate_id`),
//! 6. the state of the prompt, plan, request or checkpoint it names.

use uuid::Uuid;

use crate::actor::Actor;
use crate::error::DomainError;
use crate::session::{
    AgentMessageRecorded, ApprovalStatus, BranchPushed, CheckpointRequested, CheckpointRestored,
    CheckpointTaken, ParticipantJoined, ParticipantLeft, PlanApproved, PlanProposed, PlanRejected,
    PlanStatus, PromptCancelled, PromptCompleted, PromptFailed, PromptRecord, PromptStarted,
    PromptStatus, PromptSubmitted, PushRequested, RestoreRequested, SandboxStarted, SandboxStopped,
    Session, SessionArchived, SessionCommand, SessionCompleted, SessionEvent, SessionFailed,
    SessionPolicy, SessionStarted, SessionStatus, ToolApprovalDenied, ToolApprovalGranted,
    ToolApprovalRequested, ToolExecuted, ToolPhase, UsageRecorded,
};
use crate::validate::{optional, required};

/// Tools the agent may run while planning: they look at the repository without changing it.
pub const READ_ONLY_TOOLS: [&str; 4] = ["read", "grep", "glob", "list"];

impl Session {
    /// Decides what `command` does to this session under `policy`: the events to record, in
    /// order, or why it is refused. Pure and deterministic; the `Aggregate::handle` impl only
    /// writes the result.
    pub fn decide(
        &self,
        command: SessionCommand,
        policy: &SessionPolicy,
    ) -> Result<Vec<SessionEvent>, DomainError> {
        self.admit(&command)?;
        match command {
            SessionCommand::StartSession {
                actor,
                session_id,
                workspace_id,
                feature_id,
                title,
                repository_url,
                base_branch,
                session_branch,
            } => {
                required("title", &title)?;
                required("repository_url", &repository_url)?;
                required("base_branch", &base_branch)?;
                required("session_branch", &session_branch)?;
                Ok(vec![
                    SessionStarted {
                        session_id,
                        workspace_id,
                        feature_id,
                        title,
                        repository_url,
                        base_branch,
                        session_branch,
                        started_by: actor.id.clone(),
                    }
                    .into(),
                    joined(&actor),
                ])
            }
            SessionCommand::JoinSession { actor } => {
                // Joining twice is a no-op rather than an error: clients re-join on reconnect and
                // should not have to know whether they already had.
                Ok(self.join_if_needed(&actor).into_iter().collect())
            }
            SessionCommand::LeaveSession { actor } => {
                if self.participant(&actor.id).is_none() {
                    return Err(DomainError::NotAParticipant);
                }
                Ok(vec![ParticipantLeft { user_id: actor.id }.into()])
            }
            SessionCommand::SubmitPrompt {
                actor,
                prompt_id,
                text,
            } => {
                required("text", &text)?;
                if self.prompts.contains_key(&prompt_id) {
                    return Err(DomainError::DuplicateId("prompt_id"));
                }
                if self.queue.len() >= policy.max_queued_prompts {
                    return Err(DomainError::PromptQueueFull(policy.max_queued_prompts));
                }
                let mut events: Vec<SessionEvent> =
                    self.join_if_needed(&actor).into_iter().collect();
                events.push(
                    PromptSubmitted {
                        prompt_id,
                        author_email: actor.email.clone(),
                        author_id: actor.id,
                        author_name: actor.name,
                        text,
                    }
                    .into(),
                );
                Ok(events)
            }
            SessionCommand::CancelPrompt { actor, prompt_id } => {
                let prompt = self.known_prompt(prompt_id)?;
                if prompt.author_id != actor.id && !actor.role.can_moderate() {
                    return Err(DomainError::Forbidden);
                }
                if prompt.status.is_finished() {
                    return Err(DomainError::PromptFinished(prompt_id));
                }
                Ok(vec![
                    PromptCancelled {
                        prompt_id,
                        cancelled_by: actor.id,
                        was_running: prompt.status == PromptStatus::Running,
                    }
                    .into(),
                ])
            }
            SessionCommand::StartPrompt { prompt_id, .. } => {
                let prompt = self.known_prompt(prompt_id)?;
                if prompt.status.is_finished() {
                    return Err(DomainError::PromptFinished(prompt_id));
                }
                if self.running.is_some() {
                    return Err(DomainError::PromptAlreadyRunning);
                }
                if self.queue.first() != Some(&prompt_id) {
                    return Err(DomainError::PromptNotAtHead(prompt_id));
                }
                Ok(vec![PromptStarted { prompt_id }.into()])
            }
            SessionCommand::ProposePlan {
                plan_id,
                prompt_id,
                summary,
                steps,
                ..
            } => {
                required("summary", &summary)?;
                if self.plans.contains_key(&plan_id) {
                    return Err(DomainError::DuplicateId("plan_id"));
                }
                let prompt = self.running_prompt_record(prompt_id)?;
                if self.latest_plan_status(prompt) == Some(PlanStatus::Pending) {
                    return Err(DomainError::PlanPending(prompt_id));
                }
                Ok(vec![
                    PlanProposed {
                        plan_id,
                        prompt_id,
                        summary,
                        steps,
                    }
                    .into(),
                ])
            }
            SessionCommand::ApprovePlan { actor, plan_id } => {
                let prompt_id = self.pending_plan(plan_id)?;
                Ok(vec![
                    PlanApproved {
                        plan_id,
                        prompt_id,
                        reviewer_id: actor.id,
                        reviewer_name: actor.name,
                    }
                    .into(),
                ])
            }
            SessionCommand::RejectPlan {
                actor,
                plan_id,
                comment,
            } => {
                required("comment", &comment)?;
                let prompt_id = self.pending_plan(plan_id)?;
                Ok(vec![
                    PlanRejected {
                        plan_id,
                        prompt_id,
                        reviewer_id: actor.id,
                        reviewer_name: actor.name,
                        comment,
                    }
                    .into(),
                ])
            }
            SessionCommand::RequestToolApproval {
                request_id,
                prompt_id,
                call_id,
                tool,
                input_summary,
                ..
            } => {
                required("call_id", &call_id)?;
                required("tool", &tool)?;
                if self.tool_approvals.contains_key(&request_id) {
                    return Err(DomainError::DuplicateId("request_id"));
                }
                self.running_prompt_record(prompt_id)?;
                Ok(vec![
                    ToolApprovalRequested {
                        request_id,
                        prompt_id,
                        call_id,
                        tool,
                        input_summary,
                    }
                    .into(),
                ])
            }
            SessionCommand::GrantToolApproval { actor, request_id } => {
                let prompt_id = self.open_request(request_id)?;
                Ok(vec![
                    ToolApprovalGranted {
                        request_id,
                        prompt_id,
                        reviewer_id: actor.id,
                        reviewer_name: actor.name,
                    }
                    .into(),
                ])
            }
            SessionCommand::DenyToolApproval {
                actor,
                request_id,
                comment,
            } => {
                optional("comment", comment.as_deref())?;
                let prompt_id = self.open_request(request_id)?;
                Ok(vec![
                    ToolApprovalDenied {
                        request_id,
                        prompt_id,
                        reviewer_id: actor.id,
                        reviewer_name: actor.name,
                        comment,
                    }
                    .into(),
                ])
            }
            SessionCommand::RecordToolExecution {
                prompt_id,
                call_id,
                tool,
                phase,
                input_summary,
                output_summary,
                status,
                duration_ms,
                ..
            } => {
                required("call_id", &call_id)?;
                required("tool", &tool)?;
                let prompt = self.running_prompt_record(prompt_id)?;
                match phase {
                    ToolPhase::Plan if !READ_ONLY_TOOLS.contains(&tool.as_str()) => {
                        return Err(DomainError::ToolNotReadOnly(tool));
                    }
                    ToolPhase::Build
                        if self.latest_plan_status(prompt) != Some(PlanStatus::Approved) =>
                    {
                        return Err(DomainError::PlanNotApproved(prompt_id));
                    }
                    ToolPhase::Plan | ToolPhase::Build => {}
                }
                Ok(vec![
                    ToolExecuted {
                        prompt_id,
                        call_id,
                        tool,
                        phase,
                        input_summary,
                        output_summary,
                        status,
                        duration_ms,
                    }
                    .into(),
                ])
            }
            SessionCommand::RecordAgentMessage {
                prompt_id,
                message_id,
                text,
                ..
            } => {
                required("message_id", &message_id)?;
                required("text", &text)?;
                self.running_prompt_record(prompt_id)?;
                Ok(vec![
                    AgentMessageRecorded {
                        prompt_id,
                        message_id,
                        text,
                    }
                    .into(),
                ])
            }
            SessionCommand::RecordUsage {
                prompt_id,
                tokens_in,
                tokens_out,
                cost_micro_usd,
                ..
            } => {
                self.running_prompt_record(prompt_id)?;
                Ok(vec![
                    UsageRecorded {
                        prompt_id,
                        input_tokens: tokens_in,
                        output_tokens: tokens_out,
                        cost_micro_usd,
                    }
                    .into(),
                ])
            }
            SessionCommand::RecordBudgetThreshold { threshold, .. } => {
                if threshold.workspace_id != self.workspace_id {
                    return Err(DomainError::NotFound);
                }
                Ok(vec![threshold.into()])
            }
            SessionCommand::RequestCheckpoint { actor, label } => {
                optional("label", label.as_deref())?;
                Ok(vec![
                    CheckpointRequested {
                        requested_by: actor.id,
                        label,
                    }
                    .into(),
                ])
            }
            SessionCommand::RecordCheckpoint {
                checkpoint_id,
                prompt_id,
                label,
                commit_sha,
                files_changed,
                trigger,
                ..
            } => {
                required("commit_sha", &commit_sha)?;
                optional("label", label.as_deref())?;
                if self.checkpoints.contains(&checkpoint_id) {
                    return Err(DomainError::DuplicateId("checkpoint_id"));
                }
                // Any prompt of the session will do, finished or not: automatic checkpoints are
                // taken right after the prompt they capture has completed.
                if let Some(prompt_id) = prompt_id {
                    self.known_prompt(prompt_id)?;
                }
                Ok(vec![
                    CheckpointTaken {
                        checkpoint_id,
                        prompt_id,
                        label,
                        commit_sha,
                        files_changed,
                        trigger,
                    }
                    .into(),
                ])
            }
            SessionCommand::RequestRestore {
                actor,
                checkpoint_id,
            } => {
                self.known_checkpoint(checkpoint_id)?;
                Ok(vec![
                    RestoreRequested {
                        checkpoint_id,
                        requested_by: actor.id,
                    }
                    .into(),
                ])
            }
            SessionCommand::RecordRestore { checkpoint_id, .. } => {
                self.known_checkpoint(checkpoint_id)?;
                Ok(vec![CheckpointRestored { checkpoint_id }.into()])
            }
            SessionCommand::RequestPush { actor, branch } => {
                optional("branch", branch.as_deref())?;
                Ok(vec![
                    PushRequested {
                        requested_by: actor.id,
                        branch: branch.unwrap_or_else(|| self.session_branch.clone()),
                    }
                    .into(),
                ])
            }
            SessionCommand::RecordBranchPushed {
                branch, commit_sha, ..
            } => {
                required("branch", &branch)?;
                required("commit_sha", &commit_sha)?;
                Ok(vec![BranchPushed { branch, commit_sha }.into()])
            }
            SessionCommand::RecordSandboxStarted {
                sandbox_id,
                opencode_session_id,
                ..
            } => {
                required("sandbox_id", &sandbox_id)?;
                required("opencode_session_id", &opencode_session_id)?;
                if self.sandbox_id.is_some() {
                    return Err(DomainError::SandboxAlreadyRunning);
                }
                Ok(vec![
                    SandboxStarted {
                        sandbox_id,
                        opencode_session_id,
                    }
                    .into(),
                ])
            }
            SessionCommand::RecordSandboxStopped {
                sandbox_id, reason, ..
            } => {
                required("reason", &reason)?;
                if self.sandbox_id.as_deref() != Some(sandbox_id.as_str()) {
                    return Err(DomainError::SandboxNotFound(sandbox_id));
                }
                Ok(vec![SandboxStopped { sandbox_id, reason }.into()])
            }
            SessionCommand::CompletePrompt {
                prompt_id, summary, ..
            } => {
                optional("summary", summary.as_deref())?;
                self.running_prompt_record(prompt_id)?;
                Ok(vec![PromptCompleted { prompt_id, summary }.into()])
            }
            SessionCommand::FailPrompt {
                prompt_id, reason, ..
            } => {
                required("reason", &reason)?;
                self.running_prompt_record(prompt_id)?;
                Ok(vec![PromptFailed { prompt_id, reason }.into()])
            }
            SessionCommand::CompleteSession { actor } => {
                // Refused rather than cancelling for the caller: a member completing the session
                // must not be able to cancel other people's prompts by the back door.
                if self.has_outstanding_prompts() {
                    return Err(DomainError::PromptsOutstanding);
                }
                Ok(vec![
                    SessionCompleted {
                        completed_by: actor.id,
                    }
                    .into(),
                ])
            }
            SessionCommand::FailSession { reason, .. } => {
                required("reason", &reason)?;
                // The runner reports a failure that already happened, so it cannot be refused for
                // outstanding prompts; instead each one is closed explicitly so no read model is
                // left with a prompt queued or running forever.
                let mut events: Vec<SessionEvent> = self
                    .running
                    .iter()
                    .chain(&self.queue)
                    .map(|&prompt_id| {
                        PromptFailed {
                            prompt_id,
                            reason: reason.clone(),
                        }
                        .into()
                    })
                    .collect();
                events.push(SessionFailed { reason }.into());
                Ok(events)
            }
            SessionCommand::ArchiveSession { actor } => {
                if self.has_outstanding_prompts() {
                    return Err(DomainError::PromptsOutstanding);
                }
                Ok(vec![
                    SessionArchived {
                        archived_by: actor.id,
                    }
                    .into(),
                ])
            }
        }
    }

    /// Steps 1 to 4 of the check order: existence, workspace, role and lifecycle.
    fn admit(&self, command: &SessionCommand) -> Result<(), DomainError> {
        let actor = command.actor();
        if let SessionCommand::StartSession { workspace_id, .. } = command {
            // Nothing exists yet to hide, so a person starting a session elsewhere than in their
            // own workspace is simply not allowed.
            if !actor.role.allows(command.permission()) || !actor.belongs_to(workspace_id) {
                return Err(DomainError::Forbidden);
            }
            if self.status != SessionStatus::NotStarted {
                return Err(DomainError::SessionAlreadyStarted);
            }
            return Ok(());
        }
        if self.status == SessionStatus::NotStarted {
            return Err(DomainError::NotFound);
        }
        if !actor.is_runner() && !actor.belongs_to(&self.workspace_id) {
            return Err(DomainError::NotFound);
        }
        if !actor.role.allows(command.permission()) {
            return Err(DomainError::Forbidden);
        }
        match self.status {
            SessionStatus::Archived => Err(DomainError::SessionArchived),
            SessionStatus::Completed | SessionStatus::Failed
                if !command.accepted_when_finished() =>
            {
                Err(DomainError::SessionFinished)
            }
            _ => Ok(()),
        }
    }

    fn join_if_needed(&self, actor: &Actor) -> Option<SessionEvent> {
        self.participant(&actor.id).is_none().then(|| joined(actor))
    }

    fn known_prompt(&self, prompt_id: Uuid) -> Result<&PromptRecord, DomainError> {
        self.prompts
            .get(&prompt_id)
            .ok_or(DomainError::PromptNotFound(prompt_id))
    }

    /// The prompt, if it is the one the agent is working on: agent reports and reviews are only
    /// meaningful for work in progress.
    fn running_prompt_record(&self, prompt_id: Uuid) -> Result<&PromptRecord, DomainError> {
        let prompt = self.known_prompt(prompt_id)?;
        match prompt.status {
            PromptStatus::Running => Ok(prompt),
            PromptStatus::Queued => Err(DomainError::PromptNotRunning(prompt_id)),
            PromptStatus::Completed | PromptStatus::Failed | PromptStatus::Cancelled => {
                Err(DomainError::PromptFinished(prompt_id))
            }
        }
    }

    fn latest_plan_status(&self, prompt: &PromptRecord) -> Option<PlanStatus> {
        prompt
            .plan_id
            .and_then(|plan_id| self.plans.get(&plan_id))
            .map(|plan| plan.status)
    }

    /// The prompt of a plan that awaits a decision while its prompt still runs.
    fn pending_plan(&self, plan_id: Uuid) -> Result<Uuid, DomainError> {
        let plan = self
            .plans
            .get(&plan_id)
            .ok_or(DomainError::PlanNotFound(plan_id))?;
        if plan.status != PlanStatus::Pending {
            return Err(DomainError::PlanAlreadyDecided(plan_id));
        }
        self.running_prompt_record(plan.prompt_id)?;
        Ok(plan.prompt_id)
    }

    /// The prompt of a tool approval request that awaits an answer while its prompt still runs.
    fn open_request(&self, request_id: Uuid) -> Result<Uuid, DomainError> {
        let request = self
            .tool_approvals
            .get(&request_id)
            .ok_or(DomainError::ApprovalRequestNotFound(request_id))?;
        if request.status != ApprovalStatus::Open {
            return Err(DomainError::ApprovalAlreadyDecided(request_id));
        }
        self.running_prompt_record(request.prompt_id)?;
        Ok(request.prompt_id)
    }

    fn known_checkpoint(&self, checkpoint_id: Uuid) -> Result<(), DomainError> {
        if self.checkpoints.contains(&checkpoint_id) {
            Ok(())
        } else {
            Err(DomainError::CheckpointNotFound(checkpoint_id))
        }
    }

    fn has_outstanding_prompts(&self) -> bool {
        self.running.is_some() || !self.queue.is_empty()
    }
}

fn joined(actor: &Actor) -> SessionEvent {
    ParticipantJoined {
        user_id: actor.id.clone(),
        name: actor.name.clone(),
        role: actor.role,
    }
    .into()
}
