//! The wire format of command-api: request bodies and the response every accepted command gets.
//! Separate from the domain's types on purpose; only this module knows the JSON shape. Every
//! body refuses unknown fields.

use canopy_domain::session::{CheckpointTrigger, ToolPhase, ToolStatus};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validate::{self as limits, Checks, Validate};

/// What an accepted command appended. `(aggregate_id, version)` is the read-your-writes token the
/// query side accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CommandAccepted {
    /// `session` or `feature`.
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The aggregate's version after the command (its last event's sequence).
    pub version: usize,
    /// Ids of the appended events, in order (empty when the command changed nothing).
    pub event_ids: Vec<Uuid>,
    /// The id of what the command created (session, feature, prompt, plan, request,
    /// checkpoint, learning or decision), when it created something.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A body with no fields (the command says it all).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

impl Validate for Empty {
    fn validate(&self, _: &mut Checks<'_>) {}
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartSession {
    /// Client-chosen id; generated when absent.
    pub session_id: Option<Uuid>,
    /// A feature of the caller's workspace to group the session under.
    pub feature_id: Option<Uuid>,
    pub title: String,
    pub repository_url: String,
    pub base_branch: String,
    /// Defaults to `canopy/<first 8 hex digits of the session id>`.
    pub session_branch: Option<String>,
}

impl Validate for StartSession {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("title", &self.title, limits::TITLE);
        c.repository_url("repository_url", &self.repository_url);
        c.branch("base_branch", &self.base_branch);
        if let Some(branch) = &self.session_branch {
            c.branch("session_branch", branch);
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitPrompt {
    /// Client-chosen id; generated when absent.
    pub prompt_id: Option<Uuid>,
    /// The prompt (at most 64 KiB unless configured otherwise).
    pub text: String,
}

impl Validate for SubmitPrompt {
    fn validate(&self, c: &mut Checks<'_>) {
        c.prompt("text", &self.text);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectPlan {
    pub comment: String,
}

impl Validate for RejectPlan {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("comment", &self.comment, limits::COMMENT);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DenyToolApproval {
    pub comment: Option<String>,
}

impl Validate for DenyToolApproval {
    fn validate(&self, c: &mut Checks<'_>) {
        c.optional_text("comment", self.comment.as_deref(), limits::COMMENT);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestCheckpoint {
    pub label: Option<String>,
}

impl Validate for RequestCheckpoint {
    fn validate(&self, c: &mut Checks<'_>) {
        c.optional_text("label", self.label.as_deref(), limits::TITLE);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestRestore {
    pub checkpoint_id: Uuid,
}

impl Validate for RequestRestore {
    fn validate(&self, _: &mut Checks<'_>) {}
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestPush {
    /// Defaults to the session branch.
    pub branch: Option<String>,
}

impl Validate for RequestPush {
    fn validate(&self, c: &mut Checks<'_>) {
        if let Some(branch) = &self.branch {
            c.branch("branch", branch);
        }
    }
}

// ---- runner ----

/// The agent phase a tool ran in.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Plan,
    Build,
}

impl From<Phase> for ToolPhase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Plan => Self::Plan,
            Phase::Build => Self::Build,
        }
    }
}

/// How a tool call ended.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Failed,
    Denied,
}

impl From<Outcome> for ToolStatus {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Completed => Self::Completed,
            Outcome::Failed => Self::Failed,
            Outcome::Denied => Self::Denied,
        }
    }
}

/// Why a checkpoint was taken.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Auto,
    Manual,
}

impl From<Trigger> for CheckpointTrigger {
    fn from(trigger: Trigger) -> Self {
        match trigger {
            Trigger::Auto => Self::Auto,
            Trigger::Manual => Self::Manual,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletePrompt {
    pub summary: Option<String>,
}

impl Validate for CompletePrompt {
    fn validate(&self, c: &mut Checks<'_>) {
        c.optional_text("summary", self.summary.as_deref(), limits::SUMMARY);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    pub reason: String,
}

impl Validate for Failure {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("reason", &self.reason, limits::COMMENT);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProposePlan {
    pub plan_id: Option<Uuid>,
    pub prompt_id: Uuid,
    pub summary: String,
    pub steps: Vec<String>,
}

impl Validate for ProposePlan {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("summary", &self.summary, limits::SUMMARY);
        c.list("steps", &self.steps, |c, field, step| {
            c.text(field, step, limits::COMMENT);
        });
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestToolApproval {
    /// Client-chosen id (e.g. derived from OpenCode's permission id); generated when absent.
    pub request_id: Option<Uuid>,
    pub prompt_id: Uuid,
    pub call_id: String,
    pub tool: String,
    pub input_summary: String,
}

impl Validate for RequestToolApproval {
    fn validate(&self, c: &mut Checks<'_>) {
        c.id("call_id", &self.call_id);
        c.text("tool", &self.tool, limits::ID);
        c.bounded("input_summary", &self.input_summary, limits::SUMMARY);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolExecuted {
    pub prompt_id: Uuid,
    pub call_id: String,
    pub tool: String,
    pub phase: Phase,
    pub input_summary: String,
    pub output_summary: String,
    pub status: Outcome,
    pub duration_ms: u64,
}

impl Validate for ToolExecuted {
    fn validate(&self, c: &mut Checks<'_>) {
        c.id("call_id", &self.call_id);
        c.text("tool", &self.tool, limits::ID);
        c.bounded("input_summary", &self.input_summary, limits::SUMMARY);
        c.bounded("output_summary", &self.output_summary, limits::SUMMARY);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentMessage {
    pub prompt_id: Uuid,
    pub message_id: String,
    pub text: String,
}

impl Validate for AgentMessage {
    fn validate(&self, c: &mut Checks<'_>) {
        c.id("message_id", &self.message_id);
        c.text("text", &self.text, limits::LONG_TEXT);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub prompt_id: Uuid,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Cost in millionths of a US dollar.
    pub cost_micro_usd: u64,
}

impl Validate for Usage {
    fn validate(&self, _: &mut Checks<'_>) {}
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointTaken {
    pub checkpoint_id: Option<Uuid>,
    pub prompt_id: Option<Uuid>,
    pub label: Option<String>,
    pub commit_sha: String,
    pub files_changed: Vec<String>,
    pub trigger: Trigger,
}

impl Validate for CheckpointTaken {
    fn validate(&self, c: &mut Checks<'_>) {
        c.optional_text("label", self.label.as_deref(), limits::TITLE);
        c.commit_sha("commit_sha", &self.commit_sha);
        c.list("files_changed", &self.files_changed, |c, field, path| {
            c.text(field, path, limits::PATH);
        });
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRestored {
    pub checkpoint_id: Uuid,
}

impl Validate for CheckpointRestored {
    fn validate(&self, _: &mut Checks<'_>) {}
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BranchPushed {
    pub branch: String,
    pub commit_sha: String,
}

impl Validate for BranchPushed {
    fn validate(&self, c: &mut Checks<'_>) {
        c.branch("branch", &self.branch);
        c.commit_sha("commit_sha", &self.commit_sha);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxStarted {
    pub sandbox_id: String,
    pub opencode_session_id: String,
}

impl Validate for SandboxStarted {
    fn validate(&self, c: &mut Checks<'_>) {
        c.id("sandbox_id", &self.sandbox_id);
        c.id("opencode_session_id", &self.opencode_session_id);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxStopped {
    pub sandbox_id: String,
    pub reason: String,
}

impl Validate for SandboxStopped {
    fn validate(&self, c: &mut Checks<'_>) {
        c.id("sandbox_id", &self.sandbox_id);
        c.text("reason", &self.reason, limits::COMMENT);
    }
}

// ---- features ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFeature {
    pub feature_id: Option<Uuid>,
    pub title: String,
    #[serde(default)]
    pub description: String,
}

impl Validate for CreateFeature {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("title", &self.title, limits::TITLE);
        c.bounded("description", &self.description, limits::SUMMARY);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachSession {
    pub session_id: Uuid,
}

impl Validate for AttachSession {
    fn validate(&self, _: &mut Checks<'_>) {}
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareLearning {
    pub learning_id: Option<Uuid>,
    /// An attached session the learning came from.
    pub session_id: Option<Uuid>,
    pub text: String,
}

impl Validate for ShareLearning {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("text", &self.text, limits::SUMMARY);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordDecision {
    pub decision_id: Option<Uuid>,
    pub title: String,
    pub rationale: String,
}

impl Validate for RecordDecision {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("title", &self.title, limits::TITLE);
        c.text("rationale", &self.rationale, limits::SUMMARY);
    }
}
