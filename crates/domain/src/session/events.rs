//! The facts a session records, one versioned payload struct per event type.
//!
//! These structs are the stored wire format: renaming a field or changing its meaning needs a new
//! version and an upcaster, while adding an optional field does not. Unknown fields are accepted
//! on purpose, so an older reader can still load events written by a newer one.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::actor::Role;
use crate::budget::BudgetKind;
use crate::event::domain_events;
use crate::session::Session;

domain_events! {
    /// Everything that can happen to a session. Externally tagged: `{"PromptSubmitted": {..}}`.
    pub enum SessionEvent for <Session as cqrs_es::Aggregate>::TYPE => {
        SessionStarted => "1",
        ParticipantJoined => "1",
        ParticipantLeft => "1",
        PromptSubmitted => "1",
        PromptStarted => "1",
        PromptCompleted => "1",
        PromptFailed => "1",
        PromptCancelled => "1",
        PlanProposed => "1",
        PlanApproved => "1",
        PlanRejected => "1",
        ToolApprovalRequested => "1",
        ToolApprovalGranted => "1",
        ToolApprovalDenied => "1",
        ToolExecuted => "1",
        AgentMessageRecorded => "1",
        UsageRecorded => "2",
        CheckpointRequested => "1",
        CheckpointTaken => "1",
        RestoreRequested => "1",
        CheckpointRestored => "1",
        PushRequested => "1",
        BranchPushed => "1",
        SandboxStarted => "1",
        SandboxStopped => "1",
        SessionCompleted => "1",
        SessionFailed => "1",
        SessionArchived => "1",
        BudgetThresholdReached => "1",
    }
}

/// The agent phase a tool ran in: planning (read-only tools only) or building (after approval).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolPhase {
    Plan,
    Build,
}

/// How a tool call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolStatus {
    Completed,
    Failed,
    /// Refused, by a reviewer or by policy, and not run.
    Denied,
}

/// Why a checkpoint was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointTrigger {
    /// Taken by the runner on its own, e.g. after a prompt finished.
    Auto,
    /// Taken because a person asked for it.
    Manual,
}

/// A session was started on a repository; the starter joins right after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionStarted {
    pub session_id: Uuid,
    pub workspace_id: String,
    /// The feature this session works towards, if any.
    pub feature_id: Option<Uuid>,
    pub title: String,
    pub repository_url: String,
    /// The branch the session starts from.
    pub base_branch: String,
    /// The branch the session's work is committed to.
    pub session_branch: String,
    /// User id of the person who started it.
    pub started_by: String,
}

/// A person joined the session, explicitly or by prompting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ParticipantJoined {
    pub user_id: String,
    pub name: String,
    /// The person's workspace role when they joined.
    pub role: Role,
}

/// A person left the session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ParticipantLeft {
    pub user_id: String,
}

/// A prompt joined the back of the session's FIFO queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PromptSubmitted {
    pub prompt_id: Uuid,
    pub author_id: String,
    pub author_name: String,
    /// The author's email from their token, when it had one (commits made for the prompt are
    /// authored with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author_email: Option<String>,
    pub text: String,
}

/// The runner took the prompt at the head of the queue and the agent began working on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PromptStarted {
    pub prompt_id: Uuid,
}

/// The agent finished the running prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PromptCompleted {
    pub prompt_id: Uuid,
    pub summary: Option<String>,
}

/// The prompt could not be completed; also recorded for every outstanding prompt when the
/// session fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PromptFailed {
    pub prompt_id: Uuid,
    pub reason: String,
}

/// A queued prompt was withdrawn, or a running one interrupted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PromptCancelled {
    pub prompt_id: Uuid,
    /// User id of the person who cancelled it.
    pub cancelled_by: String,
    /// True when the agent was interrupted mid-work, false when the prompt was still queued.
    pub was_running: bool,
}

/// The agent proposed a plan for the running prompt; building waits for its approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanProposed {
    pub plan_id: Uuid,
    pub prompt_id: Uuid,
    pub summary: String,
    pub steps: Vec<String>,
}

/// A reviewer approved a pending plan; the agent may now build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanApproved {
    pub plan_id: Uuid,
    pub prompt_id: Uuid,
    pub reviewer_id: String,
    pub reviewer_name: String,
}

/// A reviewer rejected a pending plan; the agent may propose another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanRejected {
    pub plan_id: Uuid,
    pub prompt_id: Uuid,
    pub reviewer_id: String,
    pub reviewer_name: String,
    /// What the reviewer wants changed, fed back to the agent.
    pub comment: String,
}

/// The agent asked permission to run a tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolApprovalRequested {
    pub request_id: Uuid,
    pub prompt_id: Uuid,
    /// The agent's own id for the tool call.
    pub call_id: String,
    pub tool: String,
    pub input_summary: String,
}

/// A reviewer allowed a requested tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolApprovalGranted {
    pub request_id: Uuid,
    pub prompt_id: Uuid,
    pub reviewer_id: String,
    pub reviewer_name: String,
}

/// A reviewer refused a requested tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolApprovalDenied {
    pub request_id: Uuid,
    pub prompt_id: Uuid,
    pub reviewer_id: String,
    pub reviewer_name: String,
    pub comment: Option<String>,
}

/// The agent ran (or was refused) a tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolExecuted {
    pub prompt_id: Uuid,
    /// The agent's own id for the tool call.
    pub call_id: String,
    pub tool: String,
    pub phase: ToolPhase,
    pub input_summary: String,
    pub output_summary: String,
    pub status: ToolStatus,
    pub duration_ms: u64,
}

/// The agent said something to the people in the session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentMessageRecorded {
    pub prompt_id: Uuid,
    /// The agent's own id for the message.
    pub message_id: String,
    pub text: String,
}

/// Model usage the running prompt consumed since the last report.
///
/// Version 2 names the token counts as model providers report them (`input_tokens`,
/// `output_tokens`; version 1 stored `tokens_in`, `tokens_out`). Stored version 1 events are
/// upcast by [`crate::upcast::UPCASTERS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UsageRecorded {
    pub prompt_id: Uuid,
    /// Tokens the model read (prompt and context).
    pub input_tokens: u64,
    /// Tokens the model wrote.
    pub output_tokens: u64,
    /// Cost in millionths of a US dollar, kept integral so sums are exact.
    pub cost_micro_usd: u64,
}

/// A person asked the runner to take a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CheckpointRequested {
    pub requested_by: String,
    pub label: Option<String>,
}

/// The runner committed the working tree as a checkpoint that can be restored later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CheckpointTaken {
    pub checkpoint_id: Uuid,
    /// The prompt whose work the checkpoint captures, if any.
    pub prompt_id: Option<Uuid>,
    pub label: Option<String>,
    pub commit_sha: String,
    pub files_changed: Vec<String>,
    pub trigger: CheckpointTrigger,
}

/// A reviewer asked the runner to restore the working tree to a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RestoreRequested {
    pub checkpoint_id: Uuid,
    pub requested_by: String,
}

/// The runner restored the working tree to a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CheckpointRestored {
    pub checkpoint_id: Uuid,
}

/// A reviewer asked the runner to push the session's work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PushRequested {
    pub requested_by: String,
    /// The branch to push to; the session branch unless the reviewer named another.
    pub branch: String,
}

/// The runner pushed a commit to a branch of the remote repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BranchPushed {
    pub branch: String,
    pub commit_sha: String,
}

/// The runner started a sandbox with an agent (OpenCode) session inside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SandboxStarted {
    pub sandbox_id: String,
    pub opencode_session_id: String,
}

/// The session's sandbox stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SandboxStopped {
    pub sandbox_id: String,
    pub reason: String,
}

/// A person declared the session's work done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionCompleted {
    pub completed_by: String,
}

/// The runner gave up on the session (e.g. its sandbox cannot be recovered).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionFailed {
    pub reason: String,
}

/// A reviewer archived the session; it accepts nothing more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionArchived {
    pub archived_by: String,
}

/// A budget this session draws on reached a share of its limit (80%): a warning before the wall.
/// Appended by command-api after the usage that reached it, at most once per budget, scope and
/// period (the unique index `events_budget_threshold_once` decides, across sessions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BudgetThresholdReached {
    pub workspace_id: String,
    pub budget: BudgetKind,
    /// Whose spending: `workspace`, `session:<session id>` or `person:<user id>`.
    pub scope: String,
    /// The period: `YYYY-MM` (UTC) for monthly budgets, `YYYY-MM-DD` (UTC) for daily ones, empty
    /// for a session's whole life.
    pub period: String,
    /// The share of the limit reached, in percent.
    pub percent: u8,
    /// The limit, in the budget's unit.
    pub limit: u64,
    /// What was spent when it was noticed, in the budget's unit.
    pub spent: u64,
}
