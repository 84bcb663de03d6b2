//! The session aggregate's state: what the rules need to remember, folded from its events.
//!
//! It is snapshotted and loaded for every command, so it holds what the rules decide on and not
//! the session's history: participants, the open prompts (queued, bounded by
//! [`SessionPolicy::max_queued_prompts`], and the running one) with their plans and tool approval
//! requests, and a short window of recently finished prompts and recent checkpoints. Its size
//! does not grow with the number of prompts a session has seen (no prompt texts or tool output
//! either: the read models keep those). It uses only ordered collections, so the same events
//! always serialize to the same bytes. `apply` only records facts; every decision lives in the
//! rules module.
//!
//! A prompt that leaves the finished window is forgotten: a command naming it is refused as
//! `prompt_not_found` instead of `prompt_finished`, so "a finished prompt takes no more events"
//! holds for every prompt, remembered or not. Reusing a forgotten prompt, plan, request or
//! checkpoint id is refused by the event store's unique indexes on those ids (see
//! `migrations/20261130003000_event_ids_once.sql`), which command-api answers as `duplicate_id`.

use std::collections::{BTreeMap, VecDeque};

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::actor::Role;
use crate::error::DomainError;
use crate::session::{SessionCommand, SessionEvent};

/// How many finished prompts the state remembers (with their plans and tool approval requests),
/// so late reports and answers about them are told `prompt_finished` precisely.
pub const RECENT_FINISHED_PROMPTS: usize = 32;

/// How many of the latest checkpoints a restore can go back to.
pub const RECENT_CHECKPOINTS: usize = 256;

/// The settings the session's rules take from the service that runs them (cqrs-es `Services`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// Prompts a session may hold queued (not counting the running one); one more is refused
    /// with `prompt_queue_full`.
    pub max_queued_prompts: usize,
}

impl SessionPolicy {
    /// The default of `CANOPY_MAX_QUEUED_PROMPTS`.
    pub const DEFAULT_MAX_QUEUED_PROMPTS: usize = 100;
}

impl Default for SessionPolicy {
    fn default() -> Self {
        Self {
            max_queued_prompts: Self::DEFAULT_MAX_QUEUED_PROMPTS,
        }
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// No `SessionStarted` yet: the session does not exist.
    #[default]
    NotStarted,
    Active,
    Completed,
    Failed,
    Archived,
}

/// Where a prompt is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl PromptStatus {
    /// Completed, failed or cancelled: the prompt takes no more events.
    pub const fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// A reviewer's verdict on a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    Pending,
    Approved,
    Rejected,
}

/// A reviewer's answer to a tool approval request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Open,
    Granted,
    Denied,
}

/// A person who joined the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    pub user_id: String,
    pub name: String,
    pub role: Role,
}

/// What the rules remember about one open or recently finished prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub author_id: String,
    pub status: PromptStatus,
    /// The prompt's latest plan proposal; earlier ones were rejected.
    pub plan_id: Option<Uuid>,
}

/// What the rules remember about one plan of an open or recently finished prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    pub prompt_id: Uuid,
    pub status: PlanStatus,
}

/// What the rules remember about one tool approval request of an open or recently finished
/// prompt. Answered requests are kept with their prompt so a second answer is told "already
/// decided".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub prompt_id: Uuid,
    pub status: ApprovalStatus,
}

/// The layout of the serialized state. A snapshot written with another layout (the first one
/// kept every prompt, plan and approval the session ever saw) fails to decode, and the event
/// store then ignores it and folds the session from its events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotShape;

impl SnapshotShape {
    pub const CURRENT: u32 = 2;
}

impl Serialize for SnapshotShape {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(Self::CURRENT)
    }
}

impl<'de> Deserialize<'de> for SnapshotShape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let shape = u32::deserialize(deserializer)?;
        if shape == Self::CURRENT {
            Ok(Self)
        } else {
            Err(serde::de::Error::custom(format_args!(
                "session snapshot of shape {shape}, expected {}",
                Self::CURRENT
            )))
        }
    }
}

/// The session aggregate: one multiplayer coding session on one repository branch.
// Every field but `shape` defaults when missing, so that snapshots of the current shape taken
// before a field was added still load; a snapshot without `shape` is of the first layout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub(crate) shape: SnapshotShape,
    #[serde(default)]
    pub(crate) status: SessionStatus,
    #[serde(default)]
    pub(crate) session_id: Option<Uuid>,
    #[serde(default)]
    pub(crate) workspace_id: String,
    #[serde(default)]
    pub(crate) feature_id: Option<Uuid>,
    #[serde(default)]
    pub(crate) title: String,
    #[serde(default)]
    pub(crate) repository_url: String,
    #[serde(default)]
    pub(crate) base_branch: String,
    #[serde(default)]
    pub(crate) session_branch: String,
    #[serde(default)]
    pub(crate) started_by: String,
    #[serde(default)]
    pub(crate) participants: Vec<Participant>,
    /// Queued prompt ids, oldest first.
    #[serde(default)]
    pub(crate) queue: Vec<Uuid>,
    #[serde(default)]
    pub(crate) running: Option<Uuid>,
    /// The queued and running prompts, and the recently finished ones of `finished`.
    #[serde(default)]
    pub(crate) prompts: BTreeMap<Uuid, PromptRecord>,
    /// The plans of the prompts in `prompts`.
    #[serde(default)]
    pub(crate) plans: BTreeMap<Uuid, PlanRecord>,
    /// The tool approval requests of the prompts in `prompts`.
    #[serde(default)]
    pub(crate) tool_approvals: BTreeMap<Uuid, ApprovalRecord>,
    /// The last [`RECENT_FINISHED_PROMPTS`] prompts to finish, oldest first.
    #[serde(default)]
    pub(crate) finished: VecDeque<Uuid>,
    /// The last [`RECENT_CHECKPOINTS`] checkpoint ids, in the order they were taken.
    #[serde(default)]
    pub(crate) checkpoints: Vec<Uuid>,
    #[serde(default)]
    pub(crate) pending_restore: Option<Uuid>,
    #[serde(default)]
    pub(crate) opencode_session_id: Option<String>,
    #[serde(default)]
    pub(crate) sandbox_id: Option<String>,
}

impl Aggregate for Session {
    const TYPE: &'static str = "session";
    type Command = SessionCommand;
    type Event = SessionEvent;
    type Error = DomainError;
    type Services = SessionPolicy;

    async fn handle(
        &mut self,
        command: Self::Command,
        policy: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        // Deciding everything before writing anything keeps a refusal all-or-nothing: no event
        // of a refused command is ever applied.
        for event in self.decide(command, policy)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            SessionEvent::SessionStarted(e) => {
                self.status = SessionStatus::Active;
                self.session_id = Some(e.session_id);
                self.workspace_id = e.workspace_id;
                self.feature_id = e.feature_id;
                self.title = e.title;
                self.repository_url = e.repository_url;
                self.base_branch = e.base_branch;
                self.session_branch = e.session_branch;
                self.started_by = e.started_by;
            }
            SessionEvent::ParticipantJoined(e) => {
                if self.participant(&e.user_id).is_none() {
                    self.participants.push(Participant {
                        user_id: e.user_id,
                        name: e.name,
                        role: e.role,
                    });
                }
            }
            SessionEvent::ParticipantLeft(e) => {
                self.participants.retain(|p| p.user_id != e.user_id);
            }
            SessionEvent::PromptSubmitted(e) => {
                self.prompts.insert(
                    e.prompt_id,
                    PromptRecord {
                        author_id: e.author_id,
                        status: PromptStatus::Queued,
                        plan_id: None,
                    },
                );
                self.queue.push(e.prompt_id);
            }
            SessionEvent::PromptStarted(e) => {
                self.queue.retain(|id| *id != e.prompt_id);
                self.running = Some(e.prompt_id);
                self.set_prompt_status(e.prompt_id, PromptStatus::Running);
            }
            SessionEvent::PromptCompleted(e) => {
                self.end_prompt(e.prompt_id, PromptStatus::Completed)
            }
            SessionEvent::PromptFailed(e) => self.end_prompt(e.prompt_id, PromptStatus::Failed),
            SessionEvent::PromptCancelled(e) => {
                self.end_prompt(e.prompt_id, PromptStatus::Cancelled)
            }
            SessionEvent::PlanProposed(e) => {
                self.plans.insert(
                    e.plan_id,
                    PlanRecord {
                        prompt_id: e.prompt_id,
                        status: PlanStatus::Pending,
                    },
                );
                if let Some(prompt) = self.prompts.get_mut(&e.prompt_id) {
                    prompt.plan_id = Some(e.plan_id);
                }
            }
            SessionEvent::PlanApproved(e) => self.set_plan_status(e.plan_id, PlanStatus::Approved),
            SessionEvent::PlanRejected(e) => self.set_plan_status(e.plan_id, PlanStatus::Rejected),
            SessionEvent::ToolApprovalRequested(e) => {
                self.tool_approvals.insert(
                    e.request_id,
                    ApprovalRecord {
                        prompt_id: e.prompt_id,
                        status: ApprovalStatus::Open,
                    },
                );
            }
            SessionEvent::ToolApprovalGranted(e) => {
                self.set_approval_status(e.request_id, ApprovalStatus::Granted);
            }
            SessionEvent::ToolApprovalDenied(e) => {
                self.set_approval_status(e.request_id, ApprovalStatus::Denied);
            }
            SessionEvent::CheckpointTaken(e) => {
                self.checkpoints.push(e.checkpoint_id);
                if self.checkpoints.len() > RECENT_CHECKPOINTS {
                    self.checkpoints.remove(0);
                }
            }
            SessionEvent::RestoreRequested(e) => self.pending_restore = Some(e.checkpoint_id),
            SessionEvent::CheckpointRestored(_) => self.pending_restore = None,
            SessionEvent::SandboxStarted(e) => {
                self.sandbox_id = Some(e.sandbox_id);
                self.opencode_session_id = Some(e.opencode_session_id);
            }
            SessionEvent::SandboxStopped(_) => {
                // The agent session lived inside the sandbox, so it goes with it.
                self.sandbox_id = None;
                self.opencode_session_id = None;
            }
            SessionEvent::SessionCompleted(_) => self.status = SessionStatus::Completed,
            SessionEvent::SessionFailed(_) => self.status = SessionStatus::Failed,
            SessionEvent::SessionArchived(_) => self.status = SessionStatus::Archived,
            // Recorded for the read models and the audit trail; no rule depends on them.
            SessionEvent::ToolExecuted(_)
            | SessionEvent::AgentMessageRecorded(_)
            | SessionEvent::UsageRecorded(_)
            | SessionEvent::BudgetThresholdReached(_)
            | SessionEvent::CheckpointRequested(_)
            | SessionEvent::PushRequested(_)
            | SessionEvent::BranchPushed(_) => {}
        }
    }
}

impl Session {
    pub fn status(&self) -> SessionStatus {
        self.status
    }

    /// The session's id, once started.
    pub fn id(&self) -> Option<Uuid> {
        self.session_id
    }

    /// The workspace the session belongs to; empty before it starts.
    pub fn workspace_id(&self) -> &str {
        &self.workspace_id
    }

    pub fn feature_id(&self) -> Option<Uuid> {
        self.feature_id
    }

    pub fn title(&self) -> &str {
        &self.title
    }

    pub fn repository_url(&self) -> &str {
        &self.repository_url
    }

    pub fn base_branch(&self) -> &str {
        &self.base_branch
    }

    pub fn session_branch(&self) -> &str {
        &self.session_branch
    }

    /// User id of the person who started the session.
    pub fn started_by(&self) -> &str {
        &self.started_by
    }

    /// Current participants, in the order they joined.
    pub fn participants(&self) -> &[Participant] {
        &self.participants
    }

    pub fn participant(&self, user_id: &str) -> Option<&Participant> {
        self.participants.iter().find(|p| p.user_id == user_id)
    }

    /// Queued prompt ids, next to run first.
    pub fn queue(&self) -> &[Uuid] {
        &self.queue
    }

    /// The prompt the agent is working on, if any.
    pub fn running_prompt(&self) -> Option<Uuid> {
        self.running
    }

    /// An open or recently finished prompt.
    pub fn prompt(&self, prompt_id: Uuid) -> Option<&PromptRecord> {
        self.prompts.get(&prompt_id)
    }

    pub fn plan(&self, plan_id: Uuid) -> Option<&PlanRecord> {
        self.plans.get(&plan_id)
    }

    pub fn tool_approval(&self, request_id: Uuid) -> Option<&ApprovalRecord> {
        self.tool_approvals.get(&request_id)
    }

    /// Tool approval requests still awaiting an answer, by request id.
    pub fn open_tool_approvals(&self) -> impl Iterator<Item = (Uuid, &ApprovalRecord)> {
        self.tool_approvals
            .iter()
            .filter(|(_, r)| r.status == ApprovalStatus::Open)
            .map(|(id, r)| (*id, r))
    }

    /// The latest checkpoint ids (up to [`RECENT_CHECKPOINTS`]) in the order they were taken.
    pub fn checkpoints(&self) -> &[Uuid] {
        &self.checkpoints
    }

    /// The checkpoint a restore was requested for and not yet recorded.
    pub fn pending_restore(&self) -> Option<Uuid> {
        self.pending_restore
    }

    pub fn sandbox_id(&self) -> Option<&str> {
        self.sandbox_id.as_deref()
    }

    pub fn opencode_session_id(&self) -> Option<&str> {
        self.opencode_session_id.as_deref()
    }

    fn set_prompt_status(&mut self, prompt_id: Uuid, status: PromptStatus) {
        if let Some(prompt) = self.prompts.get_mut(&prompt_id) {
            prompt.status = status;
        }
    }

    fn end_prompt(&mut self, prompt_id: Uuid, status: PromptStatus) {
        self.set_prompt_status(prompt_id, status);
        self.queue.retain(|id| *id != prompt_id);
        if self.running == Some(prompt_id) {
            self.running = None;
        }
        if self.prompts.contains_key(&prompt_id) && !self.finished.contains(&prompt_id) {
            self.finished.push_back(prompt_id);
        }
        while self.finished.len() > RECENT_FINISHED_PROMPTS {
            if let Some(forgotten) = self.finished.pop_front() {
                self.forget_prompt(forgotten);
            }
        }
    }

    /// Drops a finished prompt and everything of it from the state.
    fn forget_prompt(&mut self, prompt_id: Uuid) {
        self.prompts.remove(&prompt_id);
        self.plans.retain(|_, plan| plan.prompt_id != prompt_id);
        self.tool_approvals
            .retain(|_, request| request.prompt_id != prompt_id);
    }

    fn set_plan_status(&mut self, plan_id: Uuid, status: PlanStatus) {
        if let Some(plan) = self.plans.get_mut(&plan_id) {
            plan.status = status;
        }
    }

    fn set_approval_status(&mut self, request_id: Uuid, status: ApprovalStatus) {
        if let Some(request) = self.tool_approvals.get_mut(&request_id) {
            request.status = status;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// A session with something in every field, so the round trip covers them all.
    fn busy_session() -> Session {
        let events: Vec<SessionEvent> = vec![
            SessionStarted {
                session_id: id(1),
                workspace_id: "ws".into(),
                feature_id: Some(id(2)),
                title: "t".into(),
                repository_url: "https://example.test/repo.git".into(),
                base_branch: "main".into(),
                session_branch: "canopy/t".into(),
                started_by: "alice".into(),
            }
            .into(),
            ParticipantJoined {
                user_id: "alice".into(),
                name: "Alice".into(),
                role: Role::Owner,
            }
            .into(),
            PromptSubmitted {
                prompt_id: id(10),
                author_id: "alice".into(),
                author_name: "Alice".into(),
                author_email: None,
                text: "first".into(),
            }
            .into(),
            PromptSubmitted {
                prompt_id: id(11),
                author_id: "alice".into(),
                author_name: "Alice".into(),
                author_email: None,
                text: "second".into(),
            }
            .into(),
            PromptStarted { prompt_id: id(10) }.into(),
            PlanProposed {
                plan_id: id(20),
                prompt_id: id(10),
                summary: "s".into(),
                steps: vec!["a".into()],
            }
            .into(),
            PlanApproved {
                plan_id: id(20),
                prompt_id: id(10),
                reviewer_id: "alice".into(),
                reviewer_name: "Alice".into(),
            }
            .into(),
            ToolApprovalRequested {
                request_id: id(30),
                prompt_id: id(10),
                call_id: "call_1".into(),
                tool: "bash".into(),
                input_summary: "ls".into(),
            }
            .into(),
            CheckpointTaken {
                checkpoint_id: id(40),
                prompt_id: Some(id(10)),
                label: None,
                commit_sha: "abc".into(),
                files_changed: vec![],
                trigger: CheckpointTrigger::Auto,
            }
            .into(),
            RestoreRequested {
                checkpoint_id: id(40),
                requested_by: "alice".into(),
            }
            .into(),
            SandboxStarted {
                sandbox_id: "sbx".into(),
                opencode_session_id: "ses_1".into(),
            }
            .into(),
        ];
        let mut session = Session::default();
        for event in events {
            session.apply(event);
        }
        session
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let session = busy_session();
        let json = serde_json::to_string(&session).unwrap();
        let back: Session = serde_json::from_str(&json).unwrap();
        assert_eq!(back, session);
        // Same state, same bytes: snapshots can be compared and deduplicated.
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
    }

    #[test]
    fn missing_fields_of_the_current_shape_default() {
        let session: Session = serde_json::from_str(r#"{"shape":2}"#).unwrap();
        assert_eq!(session, Session::default());
    }

    #[test]
    fn a_snapshot_of_another_shape_does_not_decode() {
        // the first layout had no `shape` and kept every prompt
        let first = r#"{"status":"active","queue":[],"prompts":{}}"#;
        assert!(serde_json::from_str::<Session>(first).is_err());
        assert!(serde_json::from_str::<Session>(r#"{"shape":3}"#).is_err());
    }
}
