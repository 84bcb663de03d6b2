//! Why an aggregate refused a command.
//!
//! Each refusal has a stable snake_case [`DomainError::code`] that the API maps to an HTTP status
//! and that clients may match on; the message is for people and may change. This type only ever
//! means "the domain said no": failing to load or store events is a different error, owned by the
//! event store.

use uuid::Uuid;

/// A command refused by the `Session` or `Feature` aggregate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The actor's role does not allow this command, people sent a runner command or the runner
    /// sent a people command, or a member tried to cancel someone else's prompt.
    #[error("the actor is not allowed to do this")]
    Forbidden,
    /// The aggregate has not been started or created, or it belongs to another workspace than the
    /// person acting (another workspace's aggregates must look absent, not forbidden).
    #[error("not found")]
    NotFound,
    /// `StartSession` on a session that already exists.
    #[error("the session has already been started")]
    SessionAlreadyStarted,
    /// An archived session accepts no command at all.
    #[error("the session is archived")]
    SessionArchived,
    /// A completed or failed session accepts only archiving, leaving and the sandbox stopping.
    #[error("the session has finished")]
    SessionFinished,
    /// Completing or archiving an active session while prompts are still queued or running;
    /// they must finish or be cancelled first.
    #[error("the session still has queued or running prompts")]
    PromptsOutstanding,
    /// Leaving a session the person has not joined.
    #[error("the actor is not a participant of this session")]
    NotAParticipant,
    /// The prompt id is not a prompt of this session.
    #[error("prompt {0} not found")]
    PromptNotFound(Uuid),
    /// The prompt has completed, failed or been cancelled and takes no more events.
    #[error("prompt {0} has already finished")]
    PromptFinished(Uuid),
    /// The agent reported work on, or a reviewer answered for, a prompt that is queued rather than
    /// running.
    #[error("prompt {0} is not running")]
    PromptNotRunning(Uuid),
    /// Starting a prompt that is not at the head of the FIFO queue.
    #[error("prompt {0} is not at the head of the queue")]
    PromptNotAtHead(Uuid),
    /// Starting a prompt while another (or the same) prompt is already running.
    #[error("a prompt is already running")]
    PromptAlreadyRunning,
    /// The plan id is not a plan of this session.
    #[error("plan {0} not found")]
    PlanNotFound(Uuid),
    /// Proposing a plan while the prompt's previous proposal still awaits a decision.
    #[error("a plan for prompt {0} is still awaiting a decision")]
    PlanPending(Uuid),
    /// Approving or rejecting a plan that was already approved or rejected.
    #[error("plan {0} has already been decided")]
    PlanAlreadyDecided(Uuid),
    /// A build-phase tool ran for a prompt whose latest plan is not approved.
    #[error("prompt {0} has no approved plan")]
    PlanNotApproved(Uuid),
    /// A plan-phase tool that is not read-only (read, grep, glob, list).
    #[error("tool {0} is not read-only and cannot run in the plan phase")]
    ToolNotReadOnly(String),
    /// The tool approval request id is not a request of this session.
    #[error("tool approval request {0} not found")]
    ApprovalRequestNotFound(Uuid),
    /// Granting or denying a tool approval request that was already answered.
    #[error("tool approval request {0} has already been decided")]
    ApprovalAlreadyDecided(Uuid),
    /// The checkpoint id was not taken in this session.
    #[error("checkpoint {0} not found")]
    CheckpointNotFound(Uuid),
    /// The runner reported a sandbox starting while another one is still recorded as running.
    #[error("a sandbox is already running for this session")]
    SandboxAlreadyRunning,
    /// The runner reported a sandbox stopping that is not the session's running sandbox.
    #[error("sandbox {0} is not running for this session")]
    SandboxNotFound(String),
    /// A caller-generated id (prompt, plan, tool approval request, checkpoint, learning, decision)
    /// was reused; names which one.
    #[error("{0} is already in use")]
    DuplicateId(&'static str),
    /// A required text field is empty or blank; names the field.
    #[error("invalid command: {0} must not be empty")]
    InvalidCommand(&'static str),
    /// `CreateFeature` on a feature that already exists.
    #[error("the feature has already been created")]
    FeatureAlreadyCreated,
    /// A completed feature accepts no command at all.
    #[error("the feature is completed")]
    FeatureCompleted,
    /// Attaching a session that is already attached to the feature.
    #[error("session {0} is already attached to this feature")]
    SessionAlreadyAttached(Uuid),
    /// Sharing a learning from a session that is not attached to the feature.
    #[error("session {0} is not attached to this feature")]
    SessionNotAttached(Uuid),
}

impl DomainError {
    /// Every code, in declaration order; lets the API and tests check their tables are complete.
    pub const CODES: [&'static str; 28] = [
        "forbidden",
        "not_found",
        "session_already_started",
        "session_archived",
        "session_finished",
        "prompts_outstanding",
        "not_a_participant",
        "prompt_not_found",
        "prompt_finished",
        "prompt_not_running",
        "prompt_not_at_head",
        "prompt_already_running",
        "plan_not_found",
        "plan_pending",
        "plan_already_decided",
        "plan_not_approved",
        "tool_not_read_only",
        "approval_request_not_found",
        "approval_already_decided",
        "checkpoint_not_found",
        "sandbox_already_running",
        "sandbox_not_found",
        "duplicate_id",
        "invalid_command",
        "feature_already_created",
        "feature_completed",
        "session_already_attached",
        "session_not_attached",
    ];

    /// The stable snake_case code clients may match on.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::SessionAlreadyStarted => "session_already_started",
            Self::SessionArchived => "session_archived",
            Self::SessionFinished => "session_finished",
            Self::PromptsOutstanding => "prompts_outstanding",
            Self::NotAParticipant => "not_a_participant",
            Self::PromptNotFound(_) => "prompt_not_found",
            Self::PromptFinished(_) => "prompt_finished",
            Self::PromptNotRunning(_) => "prompt_not_running",
            Self::PromptNotAtHead(_) => "prompt_not_at_head",
            Self::PromptAlreadyRunning => "prompt_already_running",
            Self::PlanNotFound(_) => "plan_not_found",
            Self::PlanPending(_) => "plan_pending",
            Self::PlanAlreadyDecided(_) => "plan_already_decided",
            Self::PlanNotApproved(_) => "plan_not_approved",
            Self::ToolNotReadOnly(_) => "tool_not_read_only",
            Self::ApprovalRequestNotFound(_) => "approval_request_not_found",
            Self::ApprovalAlreadyDecided(_) => "approval_already_decided",
            Self::CheckpointNotFound(_) => "checkpoint_not_found",
            Self::SandboxAlreadyRunning => "sandbox_already_running",
            Self::SandboxNotFound(_) => "sandbox_not_found",
            Self::DuplicateId(_) => "duplicate_id",
            Self::InvalidCommand(_) => "invalid_command",
            Self::FeatureAlreadyCreated => "feature_already_created",
            Self::FeatureCompleted => "feature_completed",
            Self::SessionAlreadyAttached(_) => "session_already_attached",
            Self::SessionNotAttached(_) => "session_not_attached",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for code in DomainError::CODES {
            assert!(seen.insert(code), "duplicate code {code}");
            assert!(
                code.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{code} is not snake_case"
            );
        }
    }

    fn one_of_each() -> Vec<DomainError> {
        let id = Uuid::nil();
        vec![
            DomainError::Forbidden,
            DomainError::NotFound,
            DomainError::SessionAlreadyStarted,
            DomainError::SessionArchived,
            DomainError::SessionFinished,
            DomainError::PromptsOutstanding,
            DomainError::NotAParticipant,
            DomainError::PromptNotFound(id),
            DomainError::PromptFinished(id),
            DomainError::PromptNotRunning(id),
            DomainError::PromptNotAtHead(id),
            DomainError::PromptAlreadyRunning,
            DomainError::PlanNotFound(id),
            DomainError::PlanPending(id),
            DomainError::PlanAlreadyDecided(id),
            DomainError::PlanNotApproved(id),
            DomainError::ToolNotReadOnly("edit".into()),
            DomainError::ApprovalRequestNotFound(id),
            DomainError::ApprovalAlreadyDecided(id),
            DomainError::CheckpointNotFound(id),
            DomainError::SandboxAlreadyRunning,
            DomainError::SandboxNotFound("sbx".into()),
            DomainError::DuplicateId("prompt_id"),
            DomainError::InvalidCommand("text"),
            DomainError::FeatureAlreadyCreated,
            DomainError::FeatureCompleted,
            DomainError::SessionAlreadyAttached(id),
            DomainError::SessionNotAttached(id),
        ]
    }

    #[test]
    fn codes_table_matches_variants() {
        let codes: Vec<_> = one_of_each().iter().map(DomainError::code).collect();
        assert_eq!(codes, DomainError::CODES);
    }

    #[test]
    fn messages_are_lowercase_without_trailing_period() {
        for error in one_of_each() {
            let message = error.to_string();
            assert!(!message.ends_with('.'), "{message}");
            assert!(!message.starts_with(char::is_uppercase), "{message}");
        }
    }
}
