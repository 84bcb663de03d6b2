//! Why an aggregate refused a command.
//!
//! Each refusal has a stable snake_case [`DomainError::code`] that the API maps to an HTTP status
//! and that clients may match on; the message is for people and may change. This type only ever
//! means "the domain said no": failing to load or store events is a different error, owned by the
//! event store.

use uuid::Uuid;

/// What kind of refusal a [`DomainError`] is. The API chooses a status once per kind, so a new
/// refusal gets a status by the kind its declaration names, never by a catch-all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The actor may not do this.
    Forbidden,
    /// What the command names does not exist (or is another workspace's).
    NotFound,
    /// The command itself is wrong, whatever the state.
    Invalid,
    /// The current state does not allow it.
    Conflict,
    /// A condition of the moment: the same command may pass later.
    Busy,
}

/// Declares [`DomainError`] with each variant's stable code and [`Refusal`] kind next to it,
/// once: `code`, `refusal` and `CODES` are generated from that one list.
macro_rules! refusals {
    ($(
        $(#[$attr:meta])*
        $variant:ident $(($($field:ty),+))? => $code:literal, $kind:ident;
    )+) => {
        /// A command refused by an aggregate.
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        pub enum DomainError {
            $($(#[$attr])* $variant $(($($field),+))?,)+
        }

        impl DomainError {
            /// Every code, in declaration order.
            pub const CODES: &'static [&'static str] = &[$($code),+];

            /// The stable snake_case code clients may match on.
            pub const fn code(&self) -> &'static str {
                match self {
                    $(Self::$variant { .. } => $code,)+
                }
            }

            /// What kind of refusal this is (the API's status follows from it).
            pub const fn refusal(&self) -> Refusal {
                match self {
                    $(Self::$variant { .. } => Refusal::$kind,)+
                }
            }
        }
    };
}

refusals! {
    /// The actor's role does not allow this command, people sent a runner command or the runner
    /// sent a people command, or a member tried to cancel someone else's prompt.
    #[error("the actor is not allowed to do this")]
    Forbidden => "forbidden", Forbidden;
    /// The aggregate has not been started or created, or it belongs to another workspace than the
    /// person acting (another workspace's aggregates must look absent, not forbidden).
    #[error("not found")]
    NotFound => "not_found", NotFound;
    /// `StartSession` on a session that already exists.
    #[error("the session has already been started")]
    SessionAlreadyStarted => "session_already_started", Conflict;
    /// An archived session accepts no command at all.
    #[error("the session is archived")]
    SessionArchived => "session_archived", Conflict;
    /// A completed or failed session accepts only archiving, leaving and the sandbox stopping.
    #[error("the session has finished")]
    SessionFinished => "session_finished", Conflict;
    /// Completing or archiving an active session while prompts are still queued or running;
    /// they must finish or be cancelled first.
    #[error("the session still has queued or running prompts")]
    PromptsOutstanding => "prompts_outstanding", Conflict;
    /// Leaving a session the person has not joined.
    #[error("the actor is not a participant of this session")]
    NotAParticipant => "not_a_participant", Conflict;
    /// The prompt id is not a prompt of this session.
    #[error("prompt {0} not found")]
    PromptNotFound(Uuid) => "prompt_not_found", NotFound;
    /// The prompt has completed, failed or been cancelled and takes no more events.
    #[error("prompt {0} has already finished")]
    PromptFinished(Uuid) => "prompt_finished", Conflict;
    /// The agent reported work on, or a reviewer answered for, a prompt that is queued rather than
    /// running.
    #[error("prompt {0} is not running")]
    PromptNotRunning(Uuid) => "prompt_not_running", Conflict;
    /// Starting a prompt that is not at the head of the FIFO queue.
    #[error("prompt {0} is not at the head of the queue")]
    PromptNotAtHead(Uuid) => "prompt_not_at_head", Conflict;
    /// Starting a prompt while another (or the same) prompt is already running.
    #[error("a prompt is already running")]
    PromptAlreadyRunning => "prompt_already_running", Conflict;
    /// Submitting a prompt to a session whose queue already holds as many prompts as allowed;
    /// names the limit. Space frees up as queued prompts start or are cancelled.
    #[error("the session's prompt queue is full ({0} prompts)")]
    PromptQueueFull(usize) => "prompt_queue_full", Busy;
    /// The plan id is not a plan of this session.
    #[error("plan {0} not found")]
    PlanNotFound(Uuid) => "plan_not_found", NotFound;
    /// Proposing a plan while the prompt's previous proposal still awaits a decision.
    #[error("a plan for prompt {0} is still awaiting a decision")]
    PlanPending(Uuid) => "plan_pending", Conflict;
    /// Approving or rejecting a plan that was already approved or rejected.
    #[error("plan {0} has already been decided")]
    PlanAlreadyDecided(Uuid) => "plan_already_decided", Conflict;
    /// A build-phase tool ran for a prompt whose latest plan is not approved.
    #[error("prompt {0} has no approved plan")]
    PlanNotApproved(Uuid) => "plan_not_approved", Conflict;
    /// A plan-phase tool that is not read-only (read, grep, glob, list).
    #[error("tool {0} is not read-only and cannot run in the plan phase")]
    ToolNotReadOnly(String) => "tool_not_read_only", Invalid;
    /// The tool approval request id is not a request of this session.
    #[error("tool approval request {0} not found")]
    ApprovalRequestNotFound(Uuid) => "approval_request_not_found", NotFound;
    /// Granting or denying a tool approval request that was already answered.
    #[error("tool approval request {0} has already been decided")]
    ApprovalAlreadyDecided(Uuid) => "approval_already_decided", Conflict;
    /// The checkpoint id was not taken in this session.
    #[error("checkpoint {0} not found")]
    CheckpointNotFound(Uuid) => "checkpoint_not_found", NotFound;
    /// The runner reported a sandbox starting while another one is still recorded as running.
    #[error("a sandbox is already running for this session")]
    SandboxAlreadyRunning => "sandbox_already_running", Conflict;
    /// The runner reported a sandbox stopping that is not the session's running sandbox.
    #[error("sandbox {0} is not running for this session")]
    SandboxNotFound(String) => "sandbox_not_found", Conflict;
    /// A caller-generated id (prompt, plan, tool approval request, checkpoint, learning, decision)
    /// was reused; names which one.
    #[error("{0} is already in use")]
    DuplicateId(&'static str) => "duplicate_id", Conflict;
    /// A required text field is empty or blank; names the field.
    #[error("invalid command: {0} must not be empty")]
    InvalidCommand(&'static str) => "invalid_command", Invalid;
    /// `CreateFeature` on a feature that already exists.
    #[error("the feature has already been created")]
    FeatureAlreadyCreated => "feature_already_created", Conflict;
    /// A completed feature accepts no command at all.
    #[error("the feature is completed")]
    FeatureCompleted => "feature_completed", Conflict;
    /// Attaching a session that is already attached to the feature.
    #[error("session {0} is already attached to this feature")]
    SessionAlreadyAttached(Uuid) => "session_already_attached", Conflict;
    /// Sharing a learning from a session that is not attached to the feature.
    #[error("session {0} is not attached to this feature")]
    SessionNotAttached(Uuid) => "session_not_attached", Conflict;
    /// Subscribing a webhook that already exists.
    #[error("the webhook subscription has already been created")]
    WebhookAlreadyCreated => "webhook_already_created", Conflict;
    /// A webhook subscription names an event type no aggregate records.
    #[error("unknown event type {0}")]
    UnknownEventType(String) => "unknown_event_type", Invalid;
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
            DomainError::PromptQueueFull(100),
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
            DomainError::WebhookAlreadyCreated,
            DomainError::UnknownEventType("X".into()),
        ]
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
