//! The wire format of command-api: request bodies and the response every accepted command gets.
//! Separate from the domain's types on purpose; only this module knows the JSON shape. Every
//! body refuses unknown fields. Each text field's schema is the [`Rule`](crate::validate::Rule)
//! its `Validate` impl checks it by ([`fields`]), so the document states exactly what the
//! server accepts.

use canopy_domain::session::{CheckpointTrigger, ToolPhase, ToolStatus};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validate::{
    BRANCH, COMMENT, COMMIT_SHA, Checks, EVENT_TYPE, EVENT_TYPES, ID, LONG_TEXT, NOTE, PATH,
    REPOSITORY_URL, SUMMARY, TITLE, TOOL, Validate, WEBHOOK_URL,
};

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
    /// A webhook's new signing secret (`whsec_…`), in the answer that creates the subscription
    /// or rotates its secret and nowhere else: keep it, it is not shown again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
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
    /// A feature of the caller's workspace to group the session under.
    pub feature_id: Option<Uuid>,
    #[schema(schema_with = fields::title)]
    pub title: String,
    #[schema(schema_with = fields::repository_url)]
    pub repository_url: String,
    #[schema(schema_with = fields::branch)]
    pub base_branch: String,
    #[schema(schema_with = fields::session_branch)]
    pub session_branch: Option<String>,
}

impl Validate for StartSession {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("title", &self.title, &TITLE);
        c.text("repository_url", &self.repository_url, &REPOSITORY_URL);
        c.text("base_branch", &self.base_branch, &BRANCH);
        c.optional("session_branch", self.session_branch.as_deref(), &BRANCH);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitPrompt {
    #[schema(schema_with = fields::prompt)]
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
    #[schema(schema_with = fields::comment)]
    pub comment: String,
}

impl Validate for RejectPlan {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("comment", &self.comment, &COMMENT);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DenyToolApproval {
    #[schema(schema_with = fields::optional_comment)]
    pub comment: Option<String>,
}

impl Validate for DenyToolApproval {
    fn validate(&self, c: &mut Checks<'_>) {
        c.optional("comment", self.comment.as_deref(), &COMMENT);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestCheckpoint {
    #[schema(schema_with = fields::optional_label)]
    pub label: Option<String>,
}

impl Validate for RequestCheckpoint {
    fn validate(&self, c: &mut Checks<'_>) {
        c.optional("label", self.label.as_deref(), &TITLE);
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
    #[schema(schema_with = fields::push_branch)]
    pub branch: Option<String>,
}

impl Validate for RequestPush {
    fn validate(&self, c: &mut Checks<'_>) {
        c.optional("branch", self.branch.as_deref(), &BRANCH);
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
    #[schema(schema_with = fields::optional_summary)]
    pub summary: Option<String>,
}

impl Validate for CompletePrompt {
    fn validate(&self, c: &mut Checks<'_>) {
        c.optional("summary", self.summary.as_deref(), &SUMMARY);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    #[schema(schema_with = fields::comment)]
    pub reason: String,
}

impl Validate for Failure {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("reason", &self.reason, &COMMENT);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProposePlan {
    pub plan_id: Option<Uuid>,
    pub prompt_id: Uuid,
    #[schema(schema_with = fields::summary)]
    pub summary: String,
    #[schema(schema_with = fields::steps)]
    pub steps: Vec<String>,
}

impl Validate for ProposePlan {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("summary", &self.summary, &SUMMARY);
        c.list("steps", &self.steps, &COMMENT);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestToolApproval {
    /// Client-chosen id (e.g. derived from OpenCode's permission id); generated when absent.
    pub request_id: Option<Uuid>,
    pub prompt_id: Uuid,
    #[schema(schema_with = fields::id)]
    pub call_id: String,
    #[schema(schema_with = fields::tool)]
    pub tool: String,
    #[schema(schema_with = fields::note)]
    pub input_summary: String,
}

impl Validate for RequestToolApproval {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("call_id", &self.call_id, &ID);
        c.text("tool", &self.tool, &TOOL);
        c.text("input_summary", &self.input_summary, &NOTE);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolExecuted {
    pub prompt_id: Uuid,
    #[schema(schema_with = fields::id)]
    pub call_id: String,
    #[schema(schema_with = fields::tool)]
    pub tool: String,
    pub phase: Phase,
    #[schema(schema_with = fields::note)]
    pub input_summary: String,
    #[schema(schema_with = fields::note)]
    pub output_summary: String,
    pub status: Outcome,
    #[serde(deserialize_with = "whole_number")]
    pub duration_ms: u64,
}

impl Validate for ToolExecuted {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("call_id", &self.call_id, &ID);
        c.text("tool", &self.tool, &TOOL);
        c.text("input_summary", &self.input_summary, &NOTE);
        c.text("output_summary", &self.output_summary, &NOTE);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentMessage {
    pub prompt_id: Uuid,
    #[schema(schema_with = fields::id)]
    pub message_id: String,
    #[schema(schema_with = fields::long_text)]
    pub text: String,
}

impl Validate for AgentMessage {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("message_id", &self.message_id, &ID);
        c.text("text", &self.text, &LONG_TEXT);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub prompt_id: Uuid,
    #[serde(deserialize_with = "whole_number")]
    #[schema(maximum = 1_000_000_000_000_u64)]
    pub tokens_in: u64,
    #[serde(deserialize_with = "whole_number")]
    #[schema(maximum = 1_000_000_000_000_u64)]
    pub tokens_out: u64,
    /// Cost in millionths of a US dollar.
    #[serde(deserialize_with = "whole_number")]
    #[schema(maximum = 1_000_000_000_000_u64)]
    pub cost_micro_usd: u64,
}

/// The most one usage report may carry of each count: far beyond any model call, and small
/// enough that the budget ledger's sums never overflow.
pub const MAX_USAGE: u64 = 1_000_000_000_000;

impl Validate for Usage {
    fn validate(&self, c: &mut Checks<'_>) {
        c.at_most("tokens_in", self.tokens_in, MAX_USAGE);
        c.at_most("tokens_out", self.tokens_out, MAX_USAGE);
        c.at_most("cost_micro_usd", self.cost_micro_usd, MAX_USAGE);
    }
}

/// What a budget limits (see `docs/budgets.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    /// The workspace's cost per UTC calendar month, in micro-USD.
    WorkspaceMonthlyCost,
    /// The workspace's tokens (input plus output) per UTC calendar month.
    WorkspaceMonthlyTokens,
    /// One session's cost over its life, in micro-USD.
    SessionCost,
    /// One session's tokens over its life.
    SessionTokens,
    /// The time one session's prompts ran, in seconds.
    SessionAgentSeconds,
    /// What one person's prompts cost per UTC day, in micro-USD.
    PersonDailyCost,
    /// Sessions of the workspace running an agent at once.
    ConcurrentSessions,
}

impl From<BudgetKind> for canopy_domain::BudgetKind {
    fn from(kind: BudgetKind) -> Self {
        match kind {
            BudgetKind::WorkspaceMonthlyCost => Self::WorkspaceMonthlyCost,
            BudgetKind::WorkspaceMonthlyTokens => Self::WorkspaceMonthlyTokens,
            BudgetKind::SessionCost => Self::SessionCost,
            BudgetKind::SessionTokens => Self::SessionTokens,
            BudgetKind::SessionAgentSeconds => Self::SessionAgentSeconds,
            BudgetKind::PersonDailyCost => Self::PersonDailyCost,
            BudgetKind::ConcurrentSessions => Self::ConcurrentSessions,
        }
    }
}

/// Set (or replace) the limit of one budget of the caller's workspace.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetBudget {
    pub kind: BudgetKind,
    /// In the kind's unit: micro-USD, tokens, seconds or sessions.
    #[serde(deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 9_223_372_036_854_775_807_u64)]
    pub limit: u64,
}

impl Validate for SetBudget {
    fn validate(&self, c: &mut Checks<'_>) {
        c.at_least("limit", self.limit, 1);
        c.at_most("limit", self.limit, canopy_domain::budget::MAX_LIMIT);
    }
}

/// Remove the limit of one budget of the caller's workspace.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClearBudget {
    pub kind: BudgetKind,
}

impl Validate for ClearBudget {
    fn validate(&self, _: &mut Checks<'_>) {}
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointTaken {
    pub checkpoint_id: Option<Uuid>,
    pub prompt_id: Option<Uuid>,
    #[schema(schema_with = fields::optional_label)]
    pub label: Option<String>,
    #[schema(schema_with = fields::commit_sha)]
    pub commit_sha: String,
    #[schema(schema_with = fields::files)]
    pub files_changed: Vec<String>,
    pub trigger: Trigger,
}

impl Validate for CheckpointTaken {
    fn validate(&self, c: &mut Checks<'_>) {
        c.optional("label", self.label.as_deref(), &TITLE);
        c.text("commit_sha", &self.commit_sha, &COMMIT_SHA);
        c.list("files_changed", &self.files_changed, &PATH);
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
    #[schema(schema_with = fields::branch)]
    pub branch: String,
    #[schema(schema_with = fields::commit_sha)]
    pub commit_sha: String,
}

impl Validate for BranchPushed {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("branch", &self.branch, &BRANCH);
        c.text("commit_sha", &self.commit_sha, &COMMIT_SHA);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxStarted {
    #[schema(schema_with = fields::id)]
    pub sandbox_id: String,
    #[schema(schema_with = fields::id)]
    pub opencode_session_id: String,
}

impl Validate for SandboxStarted {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("sandbox_id", &self.sandbox_id, &ID);
        c.text("opencode_session_id", &self.opencode_session_id, &ID);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxStopped {
    #[schema(schema_with = fields::id)]
    pub sandbox_id: String,
    #[schema(schema_with = fields::comment)]
    pub reason: String,
}

impl Validate for SandboxStopped {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("sandbox_id", &self.sandbox_id, &ID);
        c.text("reason", &self.reason, &COMMENT);
    }
}

// ---- features ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFeature {
    #[schema(schema_with = fields::title)]
    pub title: String,
    #[serde(default)]
    #[schema(schema_with = fields::note)]
    pub description: String,
}

impl Validate for CreateFeature {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("title", &self.title, &TITLE);
        c.text("description", &self.description, &NOTE);
    }
}

// ---- webhooks ----

/// A webhook subscription: where to POST and which event types.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// The target. https only (unless the deployment allows loopback http for development);
    /// its host must resolve to public addresses only, now and at every delivery.
    #[schema(schema_with = fields::webhook_url)]
    pub url: String,
    /// The event types to deliver, e.g. `PlanProposed`, `ToolApprovalRequested`,
    /// `PromptCompleted`, `PromptFailed`, `SessionCompleted`, `BranchPushed` (any session or
    /// feature event type; another name is 422 `unknown_event_type`).
    #[schema(schema_with = fields::event_types)]
    pub event_types: Vec<String>,
    #[serde(default)]
    #[schema(schema_with = fields::note)]
    pub description: String,
}

impl Validate for CreateWebhook {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("url", &self.url, &WEBHOOK_URL);
        c.short_list("event_types", &self.event_types, &EVENT_TYPE, EVENT_TYPES);
        c.text("description", &self.description, &NOTE);
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
    /// An attached session the learning came from.
    pub session_id: Option<Uuid>,
    #[schema(schema_with = fields::summary)]
    pub text: String,
}

impl Validate for ShareLearning {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("text", &self.text, &SUMMARY);
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordDecision {
    #[schema(schema_with = fields::title)]
    pub title: String,
    #[schema(schema_with = fields::summary)]
    pub rationale: String,
}

impl Validate for RecordDecision {
    fn validate(&self, c: &mut Checks<'_>) {
        c.text("title", &self.title, &TITLE);
        c.text("rationale", &self.rationale, &SUMMARY);
    }
}

/// The schemas of the text fields: each from the rule the field is checked by.
mod fields {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder};

    use crate::validate::{
        BRANCH, COMMENT, COMMIT_SHA, EVENT_TYPE, EVENT_TYPES, ID, LONG_TEXT, NOTE, PATH, PROMPT,
        REPOSITORY_URL, SUMMARY, TITLE, TOOL, WEBHOOK_URL,
    };

    pub(super) fn title() -> ObjectBuilder {
        TITLE.schema()
    }

    pub(super) fn optional_label() -> ObjectBuilder {
        TITLE.nullable()
    }

    pub(super) fn repository_url() -> ObjectBuilder {
        REPOSITORY_URL.schema()
    }

    pub(super) fn branch() -> ObjectBuilder {
        BRANCH.schema()
    }

    pub(super) fn session_branch() -> ObjectBuilder {
        BRANCH.nullable().description(Some(
            "Defaults to `canopy/<first 8 hex digits of the session id>`.",
        ))
    }

    pub(super) fn push_branch() -> ObjectBuilder {
        BRANCH
            .nullable()
            .description(Some("Defaults to the session branch."))
    }

    pub(super) fn prompt() -> ObjectBuilder {
        PROMPT.schema().description(Some(
            "The prompt. At most 64 KiB of UTF-8 by default (configurable: past the server's \
             limit, 413 `prompt_too_large`).",
        ))
    }

    pub(super) fn comment() -> ObjectBuilder {
        COMMENT.schema()
    }

    pub(super) fn optional_comment() -> ObjectBuilder {
        COMMENT.nullable()
    }

    pub(super) fn summary() -> ObjectBuilder {
        SUMMARY.schema()
    }

    pub(super) fn optional_summary() -> ObjectBuilder {
        SUMMARY.nullable()
    }

    pub(super) fn long_text() -> ObjectBuilder {
        LONG_TEXT.schema()
    }

    pub(super) fn note() -> ObjectBuilder {
        NOTE.schema()
    }

    pub(super) fn id() -> ObjectBuilder {
        ID.schema()
    }

    pub(super) fn tool() -> ObjectBuilder {
        TOOL.schema()
    }

    pub(super) fn commit_sha() -> ObjectBuilder {
        COMMIT_SHA.schema()
    }

    pub(super) fn steps() -> ArrayBuilder {
        COMMENT.list()
    }

    pub(super) fn files() -> ArrayBuilder {
        PATH.list()
    }

    pub(super) fn webhook_url() -> ObjectBuilder {
        WEBHOOK_URL
            .schema()
            .examples(["https://203.0.113.10/hooks/canopy"])
    }

    pub(super) fn event_types() -> ArrayBuilder {
        ArrayBuilder::new()
            .items(EVENT_TYPE.schema().examples(["PlanProposed"]))
            .min_items(Some(1))
            .max_items(Some(EVENT_TYPES))
    }
}

/// A JSON Schema `integer` is any number without a fractional part, `3.0` as much as `3` (the
/// documents say `integer`, and a client's JSON encoder may write either); serde's `u64` alone
/// refuses `3.0`. A fraction, a negative number or one past `u64::MAX` is still refused.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct Whole;
    impl serde::de::Visitor<'_> for Whole {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a whole number from 0 to 18446744073709551615")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "checked: whole, not negative and below 2^64"
        )]
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u64, E> {
            // 2^64 is exactly representable; u64::MAX is not (it rounds up to 2^64).
            if v.is_finite() && v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v)
            {
                Ok(v as u64)
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    deserializer.deserialize_any(Whole)
}
