//! What people and the agent runner may ask of a session.
//!
//! Every command carries the [`Actor`] issuing it and any ids the resulting events need; the caller
//! generates those ids so the domain stays deterministic. Which role may send which command is
//! decided in one place, [`SessionCommand::permission`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::actor::{Actor, Permission};
use crate::session::{CheckpointTrigger, ToolPhase, ToolStatus};

/// A request to change a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SessionCommand {
    StartSession {
        actor: Actor,
        session_id: Uuid,
        workspace_id: String,
        feature_id: Option<Uuid>,
        title: String,
        repository_url: String,
        base_branch: String,
        session_branch: String,
    },
    JoinSession {
        actor: Actor,
    },
    LeaveSession {
        actor: Actor,
    },
    SubmitPrompt {
        actor: Actor,
        prompt_id: Uuid,
        text: String,
    },
    CancelPrompt {
        actor: Actor,
        prompt_id: Uuid,
    },
    StartPrompt {
        actor: Actor,
        prompt_id: Uuid,
    },
    ProposePlan {
        actor: Actor,
        plan_id: Uuid,
        prompt_id: Uuid,
        summary: String,
        steps: Vec<String>,
    },
    ApprovePlan {
        actor: Actor,
        plan_id: Uuid,
    },
    RejectPlan {
        actor: Actor,
        plan_id: Uuid,
        comment: String,
    },
    RequestToolApproval {
        actor: Actor,
        request_id: Uuid,
        prompt_id: Uuid,
        call_id: String,
        tool: String,
        input_summary: String,
    },
    GrantToolApproval {
        actor: Actor,
        request_id: Uuid,
    },
    DenyToolApproval {
        actor: Actor,
        request_id: Uuid,
        comment: Option<String>,
    },
    RecordToolExecution {
        actor: Actor,
        prompt_id: Uuid,
        call_id: String,
        tool: String,
        phase: ToolPhase,
        input_summary: String,
        output_summary: String,
        status: ToolStatus,
        duration_ms: u64,
    },
    RecordAgentMessage {
        actor: Actor,
        prompt_id: Uuid,
        message_id: String,
        text: String,
    },
    RecordUsage {
        actor: Actor,
        prompt_id: Uuid,
        tokens_in: u64,
        tokens_out: u64,
        cost_micro_usd: u64,
    },
    /// A budget the session draws on reached its warning threshold (command-api's own report,
    /// sent as the runner whose usage reached it).
    RecordBudgetThreshold {
        actor: Actor,
        threshold: crate::session::BudgetThresholdReached,
    },
    RequestCheckpoint {
        actor: Actor,
        label: Option<String>,
    },
    RecordCheckpoint {
        actor: Actor,
        checkpoint_id: Uuid,
        prompt_id: Option<Uuid>,
        label: Option<String>,
        commit_sha: String,
        files_changed: Vec<String>,
        trigger: CheckpointTrigger,
    },
    RequestRestore {
        actor: Actor,
        checkpoint_id: Uuid,
    },
    RecordRestore {
        actor: Actor,
        checkpoint_id: Uuid,
    },
    RequestPush {
        actor: Actor,
        /// Defaults to the session branch.
        branch: Option<String>,
    },
    RecordBranchPushed {
        actor: Actor,
        branch: String,
        commit_sha: String,
    },
    RecordSandboxStarted {
        actor: Actor,
        sandbox_id: String,
        opencode_session_id: String,
    },
    RecordSandboxStopped {
        actor: Actor,
        sandbox_id: String,
        reason: String,
    },
    CompletePrompt {
        actor: Actor,
        prompt_id: Uuid,
        summary: Option<String>,
    },
    FailPrompt {
        actor: Actor,
        prompt_id: Uuid,
        reason: String,
    },
    CompleteSession {
        actor: Actor,
    },
    FailSession {
        actor: Actor,
        reason: String,
    },
    ArchiveSession {
        actor: Actor,
    },
}

impl SessionCommand {
    /// Who is issuing the command.
    pub fn actor(&self) -> &Actor {
        match self {
            Self::StartSession { actor, .. }
            | Self::JoinSession { actor }
            | Self::LeaveSession { actor }
            | Self::SubmitPrompt { actor, .. }
            | Self::CancelPrompt { actor, .. }
            | Self::StartPrompt { actor, .. }
            | Self::ProposePlan { actor, .. }
            | Self::ApprovePlan { actor, .. }
            | Self::RejectPlan { actor, .. }
            | Self::RequestToolApproval { actor, .. }
            | Self::GrantToolApproval { actor, .. }
            | Self::DenyToolApproval { actor, .. }
            | Self::RecordToolExecution { actor, .. }
            | Self::RecordAgentMessage { actor, .. }
            | Self::RecordUsage { actor, .. }
            | Self::RecordBudgetThreshold { actor, .. }
            | Self::RequestCheckpoint { actor, .. }
            | Self::RecordCheckpoint { actor, .. }
            | Self::RequestRestore { actor, .. }
            | Self::RecordRestore { actor, .. }
            | Self::RequestPush { actor, .. }
            | Self::RecordBranchPushed { actor, .. }
            | Self::RecordSandboxStarted { actor, .. }
            | Self::RecordSandboxStopped { actor, .. }
            | Self::CompletePrompt { actor, .. }
            | Self::FailPrompt { actor, .. }
            | Self::CompleteSession { actor }
            | Self::FailSession { actor, .. }
            | Self::ArchiveSession { actor } => actor,
        }
    }

    /// The permission the actor's role must grant: the session half of the role table.
    ///
    /// Cancelling someone else's prompt additionally needs [`Permission::Moderate`]; that is
    /// checked once the prompt's author is known.
    pub const fn permission(&self) -> Permission {
        match self {
            Self::StartSession { .. }
            | Self::JoinSession { .. }
            | Self::SubmitPrompt { .. }
            | Self::CancelPrompt { .. }
            | Self::RequestCheckpoint { .. }
            | Self::CompleteSession { .. } => Permission::Prompt,
            Self::ApprovePlan { .. }
            | Self::RejectPlan { .. }
            | Self::GrantToolApproval { .. }
            | Self::DenyToolApproval { .. }
            | Self::RequestRestore { .. }
            | Self::RequestPush { .. }
            | Self::ArchiveSession { .. } => Permission::Moderate,
            // Leaving must stay possible for someone whose role was lowered after joining.
            Self::LeaveSession { .. } => Permission::Person,
            Self::StartPrompt { .. }
            | Self::ProposePlan { .. }
            | Self::RequestToolApproval { .. }
            | Self::RecordToolExecution { .. }
            | Self::RecordAgentMessage { .. }
            | Self::RecordUsage { .. }
            | Self::RecordBudgetThreshold { .. }
            | Self::RecordCheckpoint { .. }
            | Self::RecordRestore { .. }
            | Self::RecordBranchPushed { .. }
            | Self::RecordSandboxStarted { .. }
            | Self::RecordSandboxStopped { .. }
            | Self::CompletePrompt { .. }
            | Self::FailPrompt { .. }
            | Self::FailSession { .. } => Permission::Runner,
        }
    }

    /// Whether a completed or failed session still accepts this command: people may still leave
    /// and archive it, and the runner must be able to report its sandbox going away.
    pub const fn accepted_when_finished(&self) -> bool {
        matches!(
            self,
            Self::ArchiveSession { .. }
                | Self::LeaveSession { .. }
                | Self::RecordSandboxStopped { .. }
                | Self::RecordBudgetThreshold { .. }
        )
    }
}
