//! Builders that keep the given/when/then tests short: actors, fixed ids, a history builder for the
//! "given" events, and one constructor per command and event.

use canopy_domain::prelude::*;
use cqrs_es::test::{AggregateResultValidator, TestFramework};
use uuid::Uuid;

pub(crate) const WS: &str = "ws-acme";
pub(crate) const OTHER_WS: &str = "ws-globex";

pub(crate) const SESSION: Uuid = Uuid::from_u128(0x5E55);
pub(crate) const FEATURE: Uuid = Uuid::from_u128(0xFEA7);
pub(crate) const P1: Uuid = Uuid::from_u128(0x101);
pub(crate) const P2: Uuid = Uuid::from_u128(0x102);
pub(crate) const P3: Uuid = Uuid::from_u128(0x103);
pub(crate) const PLAN1: Uuid = Uuid::from_u128(0x201);
pub(crate) const PLAN2: Uuid = Uuid::from_u128(0x202);
pub(crate) const REQ1: Uuid = Uuid::from_u128(0x301);
pub(crate) const REQ2: Uuid = Uuid::from_u128(0x302);
pub(crate) const CP1: Uuid = Uuid::from_u128(0x401);
pub(crate) const CP2: Uuid = Uuid::from_u128(0x402);

pub(crate) const TITLE: &str = "Fix the flaky login test";
pub(crate) const REPO: &str = "https://git.example.test/acme/web.git";
pub(crate) const BASE: &str = "main";
pub(crate) const BRANCH: &str = "canopy/fix-login";
pub(crate) const SANDBOX: &str = "sbx-1";

// ---- actors ---------------------------------------------------------------------------------

/// A person in [`WS`] with `role`, whose id and name are derived from the role.
pub(crate) fn person(role: Role) -> Actor {
    Actor::person(
        format!("u-{role}"),
        format!("{role} person"),
        role,
        WS.to_owned(),
    )
}

pub(crate) fn owner() -> Actor {
    person(Role::Owner)
}

pub(crate) fn admin() -> Actor {
    person(Role::Admin)
}

pub(crate) fn member() -> Actor {
    person(Role::Member)
}

/// A second member, to tell "own prompt" from "someone else's prompt".
pub(crate) fn other_member() -> Actor {
    Actor::person("u-other", "Other Member", Role::Member, WS)
}

pub(crate) fn viewer() -> Actor {
    person(Role::Viewer)
}

pub(crate) fn auditor() -> Actor {
    person(Role::Auditor)
}

pub(crate) fn runner() -> Actor {
    Actor::runner("agent-runner", "Agent Runner")
}

/// An owner, but of another workspace.
pub(crate) fn outsider() -> Actor {
    Actor::person("u-outsider", "Outsider", Role::Owner, OTHER_WS)
}

/// The actor for `role`: the runner service for [`Role::Runner`], a person otherwise.
pub(crate) fn actor_for(role: Role) -> Actor {
    if role.is_runner() {
        runner()
    } else {
        person(role)
    }
}

// ---- given ----------------------------------------------------------------------------------

/// The events a session test starts from, built up step by step.
#[derive(Debug, Clone, Default)]
pub(crate) struct History(Vec<SessionEvent>);

impl History {
    /// No events: the session does not exist.
    pub(crate) fn none() -> Self {
        Self::default()
    }

    /// Started by [`owner`], who joined.
    pub(crate) fn started() -> Self {
        Self(started_events(&owner()))
    }

    pub(crate) fn with(mut self, event: impl Into<SessionEvent>) -> Self {
        self.0.push(event.into());
        self
    }

    pub(crate) fn joined(self, actor: &Actor) -> Self {
        self.with(ev::joined(actor))
    }

    pub(crate) fn submitted(self, prompt_id: Uuid, author: &Actor) -> Self {
        self.with(ev::submitted(prompt_id, author, "do it"))
    }

    pub(crate) fn prompt_started(self, prompt_id: Uuid) -> Self {
        self.with(PromptStarted { prompt_id })
    }

    /// `prompt_id` by [`member`], submitted and started.
    pub(crate) fn running(self, prompt_id: Uuid) -> Self {
        self.submitted(prompt_id, &member())
            .prompt_started(prompt_id)
    }

    pub(crate) fn prompt_completed(self, prompt_id: Uuid) -> Self {
        self.with(PromptCompleted {
            prompt_id,
            summary: None,
        })
    }

    pub(crate) fn prompt_failed(self, prompt_id: Uuid) -> Self {
        self.with(PromptFailed {
            prompt_id,
            reason: "model error".into(),
        })
    }

    pub(crate) fn prompt_cancelled(self, prompt_id: Uuid, was_running: bool) -> Self {
        self.with(PromptCancelled {
            prompt_id,
            cancelled_by: owner().id,
            was_running,
        })
    }

    pub(crate) fn plan_proposed(self, plan_id: Uuid, prompt_id: Uuid) -> Self {
        self.with(ev::plan_proposed(plan_id, prompt_id))
    }

    pub(crate) fn plan_approved(self, plan_id: Uuid, prompt_id: Uuid) -> Self {
        self.with(ev::plan_approved(plan_id, prompt_id, &owner()))
    }

    pub(crate) fn plan_rejected(self, plan_id: Uuid, prompt_id: Uuid) -> Self {
        self.with(PlanRejected {
            plan_id,
            prompt_id,
            reviewer_id: owner().id,
            reviewer_name: owner().name,
            comment: "too broad".into(),
        })
    }

    pub(crate) fn tool_requested(self, request_id: Uuid, prompt_id: Uuid) -> Self {
        self.with(ev::tool_requested(request_id, prompt_id))
    }

    pub(crate) fn tool_granted(self, request_id: Uuid, prompt_id: Uuid) -> Self {
        self.with(ev::tool_granted(request_id, prompt_id, &owner()))
    }

    pub(crate) fn checkpoint(self, checkpoint_id: Uuid) -> Self {
        self.with(ev::checkpoint_taken(checkpoint_id, None))
    }

    pub(crate) fn sandbox(self, sandbox_id: &str) -> Self {
        self.with(SandboxStarted {
            sandbox_id: sandbox_id.into(),
            opencode_session_id: "ses_1".into(),
        })
    }

    pub(crate) fn completed(self) -> Self {
        self.with(SessionCompleted {
            completed_by: owner().id,
        })
    }

    pub(crate) fn failed(self) -> Self {
        self.with(SessionFailed {
            reason: "sandbox lost".into(),
        })
    }

    pub(crate) fn archived(self) -> Self {
        self.with(SessionArchived {
            archived_by: owner().id,
        })
    }

    /// The state these events fold into.
    pub(crate) fn state(self) -> Session {
        use cqrs_es::Aggregate;
        let mut session = Session::default();
        for event in self.0 {
            session.apply(event);
        }
        session
    }

    pub(crate) fn when(self, command: SessionCommand) -> AggregateResultValidator<Session> {
        self.when_under(SessionPolicy::default(), command)
    }

    /// [`when`](Self::when), with the service's limits set to `policy`.
    pub(crate) fn when_under(
        self,
        policy: SessionPolicy,
        command: SessionCommand,
    ) -> AggregateResultValidator<Session> {
        TestFramework::<Session>::with(policy)
            .given(self.0)
            .when(command)
    }
}

fn started_events(starter: &Actor) -> Vec<SessionEvent> {
    vec![
        SessionStarted {
            session_id: SESSION,
            workspace_id: WS.into(),
            feature_id: Some(FEATURE),
            title: TITLE.into(),
            repository_url: REPO.into(),
            base_branch: BASE.into(),
            session_branch: BRANCH.into(),
            started_by: starter.id.clone(),
        }
        .into(),
        ev::joined(starter),
    ]
}

/// Runs `command` against `history` and returns the raw result, for tests that only care whether
/// it was allowed.
pub(crate) fn outcome(
    history: History,
    command: SessionCommand,
) -> Result<Vec<SessionEvent>, DomainError> {
    history.when(command).inspect_result()
}

// ---- events ---------------------------------------------------------------------------------

/// Event constructors used both as "given" and as "then".
pub(crate) mod ev {
    use super::*;

    pub(crate) fn session_started(starter: &Actor) -> Vec<SessionEvent> {
        started_events(starter)
    }

    pub(crate) fn joined(actor: &Actor) -> SessionEvent {
        ParticipantJoined {
            user_id: actor.id.clone(),
            name: actor.name.clone(),
            role: actor.role,
        }
        .into()
    }

    pub(crate) fn submitted(prompt_id: Uuid, author: &Actor, text: &str) -> SessionEvent {
        PromptSubmitted {
            prompt_id,
            author_id: author.id.clone(),
            author_name: author.name.clone(),
            author_email: author.email.clone(),
            text: text.into(),
        }
        .into()
    }

    pub(crate) fn cancelled(prompt_id: Uuid, by: &Actor, was_running: bool) -> SessionEvent {
        PromptCancelled {
            prompt_id,
            cancelled_by: by.id.clone(),
            was_running,
        }
        .into()
    }

    pub(crate) fn plan_proposed(plan_id: Uuid, prompt_id: Uuid) -> SessionEvent {
        PlanProposed {
            plan_id,
            prompt_id,
            summary: "touch the login test only".into(),
            steps: vec!["read the test".into(), "fix the race".into()],
        }
        .into()
    }

    pub(crate) fn plan_approved(plan_id: Uuid, prompt_id: Uuid, reviewer: &Actor) -> SessionEvent {
        PlanApproved {
            plan_id,
            prompt_id,
            reviewer_id: reviewer.id.clone(),
            reviewer_name: reviewer.name.clone(),
        }
        .into()
    }

    pub(crate) fn tool_requested(request_id: Uuid, prompt_id: Uuid) -> SessionEvent {
        ToolApprovalRequested {
            request_id,
            prompt_id,
            call_id: "call_7".into(),
            tool: "bash".into(),
            input_summary: "npm test".into(),
        }
        .into()
    }

    pub(crate) fn tool_granted(
        request_id: Uuid,
        prompt_id: Uuid,
        reviewer: &Actor,
    ) -> SessionEvent {
        ToolApprovalGranted {
            request_id,
            prompt_id,
            reviewer_id: reviewer.id.clone(),
            reviewer_name: reviewer.name.clone(),
        }
        .into()
    }

    pub(crate) fn tool_executed(
        prompt_id: Uuid,
        tool: &str,
        phase: ToolPhase,
        status: ToolStatus,
    ) -> SessionEvent {
        ToolExecuted {
            prompt_id,
            call_id: "call_1".into(),
            tool: tool.into(),
            phase,
            input_summary: "in".into(),
            output_summary: "out".into(),
            status,
            duration_ms: 12,
        }
        .into()
    }

    pub(crate) fn checkpoint_taken(checkpoint_id: Uuid, prompt_id: Option<Uuid>) -> SessionEvent {
        CheckpointTaken {
            checkpoint_id,
            prompt_id,
            label: Some("green tests".into()),
            commit_sha: "0a1b2c3".into(),
            files_changed: vec!["src/login.test.ts".into()],
            trigger: CheckpointTrigger::Auto,
        }
        .into()
    }

    /// One event of every session event type, with every optional field filled.
    pub(crate) fn one_of_each() -> Vec<SessionEvent> {
        let mut events = started_events(&owner());
        events.extend([
            ParticipantLeft {
                user_id: member().id,
            }
            .into(),
            submitted(P1, &member(), "hi"),
            PromptStarted { prompt_id: P1 }.into(),
            PromptCompleted {
                prompt_id: P1,
                summary: Some("done".into()),
            }
            .into(),
            PromptFailed {
                prompt_id: P1,
                reason: "x".into(),
            }
            .into(),
            cancelled(P1, &owner(), true),
            plan_proposed(PLAN1, P1),
            plan_approved(PLAN1, P1, &owner()),
            PlanRejected {
                plan_id: PLAN1,
                prompt_id: P1,
                reviewer_id: owner().id,
                reviewer_name: owner().name,
                comment: "no".into(),
            }
            .into(),
            tool_requested(REQ1, P1),
            tool_granted(REQ1, P1, &owner()),
            ToolApprovalDenied {
                request_id: REQ1,
                prompt_id: P1,
                reviewer_id: owner().id,
                reviewer_name: owner().name,
                comment: Some("not now".into()),
            }
            .into(),
            tool_executed(P1, "read", ToolPhase::Plan, ToolStatus::Completed),
            AgentMessageRecorded {
                prompt_id: P1,
                message_id: "msg_1".into(),
                text: "hello".into(),
            }
            .into(),
            UsageRecorded {
                prompt_id: P1,
                input_tokens: 10,
                output_tokens: 20,
                cost_micro_usd: 30,
            }
            .into(),
            CheckpointRequested {
                requested_by: member().id,
                label: Some("before refactor".into()),
            }
            .into(),
            checkpoint_taken(CP1, Some(P1)),
            RestoreRequested {
                checkpoint_id: CP1,
                requested_by: owner().id,
            }
            .into(),
            CheckpointRestored { checkpoint_id: CP1 }.into(),
            PushRequested {
                requested_by: owner().id,
                branch: BRANCH.into(),
            }
            .into(),
            BranchPushed {
                branch: BRANCH.into(),
                commit_sha: "0a1b2c3".into(),
            }
            .into(),
            SandboxStarted {
                sandbox_id: SANDBOX.into(),
                opencode_session_id: "ses_1".into(),
            }
            .into(),
            SandboxStopped {
                sandbox_id: SANDBOX.into(),
                reason: "idle".into(),
            }
            .into(),
            SessionCompleted {
                completed_by: owner().id,
            }
            .into(),
            SessionFailed { reason: "x".into() }.into(),
            SessionArchived {
                archived_by: owner().id,
            }
            .into(),
            BudgetThresholdReached {
                workspace_id: WS.into(),
                budget: BudgetKind::WorkspaceMonthlyCost,
                scope: "workspace".into(),
                period: "2026-12".into(),
                percent: 80,
                limit: 100,
                spent: 80,
            }
            .into(),
        ]);
        events
    }
}

// ---- commands -------------------------------------------------------------------------------

/// Command constructors with sensible defaults; runner commands use [`runner`] as actor.
pub(crate) mod cmd {
    use super::*;

    pub(crate) fn start_session(actor: &Actor) -> SessionCommand {
        SessionCommand::StartSession {
            actor: actor.clone(),
            session_id: SESSION,
            workspace_id: WS.into(),
            feature_id: Some(FEATURE),
            title: TITLE.into(),
            repository_url: REPO.into(),
            base_branch: BASE.into(),
            session_branch: BRANCH.into(),
        }
    }

    pub(crate) fn join(actor: &Actor) -> SessionCommand {
        SessionCommand::JoinSession {
            actor: actor.clone(),
        }
    }

    pub(crate) fn leave(actor: &Actor) -> SessionCommand {
        SessionCommand::LeaveSession {
            actor: actor.clone(),
        }
    }

    pub(crate) fn submit(actor: &Actor, prompt_id: Uuid, text: &str) -> SessionCommand {
        SessionCommand::SubmitPrompt {
            actor: actor.clone(),
            prompt_id,
            text: text.into(),
        }
    }

    pub(crate) fn cancel(actor: &Actor, prompt_id: Uuid) -> SessionCommand {
        SessionCommand::CancelPrompt {
            actor: actor.clone(),
            prompt_id,
        }
    }

    pub(crate) fn start_prompt(prompt_id: Uuid) -> SessionCommand {
        SessionCommand::StartPrompt {
            actor: runner(),
            prompt_id,
        }
    }

    pub(crate) fn propose(plan_id: Uuid, prompt_id: Uuid) -> SessionCommand {
        SessionCommand::ProposePlan {
            actor: runner(),
            plan_id,
            prompt_id,
            summary: "touch the login test only".into(),
            steps: vec!["read the test".into(), "fix the race".into()],
        }
    }

    pub(crate) fn approve(actor: &Actor, plan_id: Uuid) -> SessionCommand {
        SessionCommand::ApprovePlan {
            actor: actor.clone(),
            plan_id,
        }
    }

    pub(crate) fn reject(actor: &Actor, plan_id: Uuid, comment: &str) -> SessionCommand {
        SessionCommand::RejectPlan {
            actor: actor.clone(),
            plan_id,
            comment: comment.into(),
        }
    }

    pub(crate) fn request_tool(request_id: Uuid, prompt_id: Uuid) -> SessionCommand {
        SessionCommand::RequestToolApproval {
            actor: runner(),
            request_id,
            prompt_id,
            call_id: "call_7".into(),
            tool: "bash".into(),
            input_summary: "npm test".into(),
        }
    }

    pub(crate) fn grant(actor: &Actor, request_id: Uuid) -> SessionCommand {
        SessionCommand::GrantToolApproval {
            actor: actor.clone(),
            request_id,
        }
    }

    pub(crate) fn deny(actor: &Actor, request_id: Uuid, comment: Option<&str>) -> SessionCommand {
        SessionCommand::DenyToolApproval {
            actor: actor.clone(),
            request_id,
            comment: comment.map(Into::into),
        }
    }

    pub(crate) fn tool(
        prompt_id: Uuid,
        tool: &str,
        phase: ToolPhase,
        status: ToolStatus,
    ) -> SessionCommand {
        SessionCommand::RecordToolExecution {
            actor: runner(),
            prompt_id,
            call_id: "call_1".into(),
            tool: tool.into(),
            phase,
            input_summary: "in".into(),
            output_summary: "out".into(),
            status,
            duration_ms: 12,
        }
    }

    pub(crate) fn message(prompt_id: Uuid, text: &str) -> SessionCommand {
        SessionCommand::RecordAgentMessage {
            actor: runner(),
            prompt_id,
            message_id: "msg_1".into(),
            text: text.into(),
        }
    }

    pub(crate) fn usage(prompt_id: Uuid) -> SessionCommand {
        SessionCommand::RecordUsage {
            actor: runner(),
            prompt_id,
            tokens_in: 1200,
            tokens_out: 340,
            cost_micro_usd: 5600,
        }
    }

    pub(crate) fn request_checkpoint(actor: &Actor, label: Option<&str>) -> SessionCommand {
        SessionCommand::RequestCheckpoint {
            actor: actor.clone(),
            label: label.map(Into::into),
        }
    }

    pub(crate) fn record_checkpoint(
        checkpoint_id: Uuid,
        prompt_id: Option<Uuid>,
    ) -> SessionCommand {
        SessionCommand::RecordCheckpoint {
            actor: runner(),
            checkpoint_id,
            prompt_id,
            label: Some("green tests".into()),
            commit_sha: "0a1b2c3".into(),
            files_changed: vec!["src/login.test.ts".into()],
            trigger: CheckpointTrigger::Auto,
        }
    }

    pub(crate) fn request_restore(actor: &Actor, checkpoint_id: Uuid) -> SessionCommand {
        SessionCommand::RequestRestore {
            actor: actor.clone(),
            checkpoint_id,
        }
    }

    pub(crate) fn record_restore(checkpoint_id: Uuid) -> SessionCommand {
        SessionCommand::RecordRestore {
            actor: runner(),
            checkpoint_id,
        }
    }

    pub(crate) fn request_push(actor: &Actor, branch: Option<&str>) -> SessionCommand {
        SessionCommand::RequestPush {
            actor: actor.clone(),
            branch: branch.map(Into::into),
        }
    }

    pub(crate) fn branch_pushed(branch: &str, commit_sha: &str) -> SessionCommand {
        SessionCommand::RecordBranchPushed {
            actor: runner(),
            branch: branch.into(),
            commit_sha: commit_sha.into(),
        }
    }

    pub(crate) fn sandbox_started(sandbox_id: &str) -> SessionCommand {
        SessionCommand::RecordSandboxStarted {
            actor: runner(),
            sandbox_id: sandbox_id.into(),
            opencode_session_id: "ses_1".into(),
        }
    }

    pub(crate) fn sandbox_stopped(sandbox_id: &str) -> SessionCommand {
        SessionCommand::RecordSandboxStopped {
            actor: runner(),
            sandbox_id: sandbox_id.into(),
            reason: "idle".into(),
        }
    }

    pub(crate) fn complete_prompt(prompt_id: Uuid, summary: Option<&str>) -> SessionCommand {
        SessionCommand::CompletePrompt {
            actor: runner(),
            prompt_id,
            summary: summary.map(Into::into),
        }
    }

    pub(crate) fn fail_prompt(prompt_id: Uuid, reason: &str) -> SessionCommand {
        SessionCommand::FailPrompt {
            actor: runner(),
            prompt_id,
            reason: reason.into(),
        }
    }

    pub(crate) fn complete_session(actor: &Actor) -> SessionCommand {
        SessionCommand::CompleteSession {
            actor: actor.clone(),
        }
    }

    pub(crate) fn fail_session(reason: &str) -> SessionCommand {
        SessionCommand::FailSession {
            actor: runner(),
            reason: reason.into(),
        }
    }

    pub(crate) fn archive(actor: &Actor) -> SessionCommand {
        SessionCommand::ArchiveSession {
            actor: actor.clone(),
        }
    }

    /// Replaces the actor of a runner command, to send it as a person.
    pub(crate) fn as_actor(command: SessionCommand, actor: &Actor) -> SessionCommand {
        let mut command = command;
        match &mut command {
            SessionCommand::StartSession { actor: a, .. }
            | SessionCommand::JoinSession { actor: a }
            | SessionCommand::LeaveSession { actor: a }
            | SessionCommand::SubmitPrompt { actor: a, .. }
            | SessionCommand::CancelPrompt { actor: a, .. }
            | SessionCommand::StartPrompt { actor: a, .. }
            | SessionCommand::ProposePlan { actor: a, .. }
            | SessionCommand::ApprovePlan { actor: a, .. }
            | SessionCommand::RejectPlan { actor: a, .. }
            | SessionCommand::RequestToolApproval { actor: a, .. }
            | SessionCommand::GrantToolApproval { actor: a, .. }
            | SessionCommand::DenyToolApproval { actor: a, .. }
            | SessionCommand::RecordToolExecution { actor: a, .. }
            | SessionCommand::RecordAgentMessage { actor: a, .. }
            | SessionCommand::RecordUsage { actor: a, .. }
            | SessionCommand::RecordBudgetThreshold { actor: a, .. }
            | SessionCommand::RequestCheckpoint { actor: a, .. }
            | SessionCommand::RecordCheckpoint { actor: a, .. }
            | SessionCommand::RequestRestore { actor: a, .. }
            | SessionCommand::RecordRestore { actor: a, .. }
            | SessionCommand::RequestPush { actor: a, .. }
            | SessionCommand::RecordBranchPushed { actor: a, .. }
            | SessionCommand::RecordSandboxStarted { actor: a, .. }
            | SessionCommand::RecordSandboxStopped { actor: a, .. }
            | SessionCommand::CompletePrompt { actor: a, .. }
            | SessionCommand::FailPrompt { actor: a, .. }
            | SessionCommand::CompleteSession { actor: a }
            | SessionCommand::FailSession { actor: a, .. }
            | SessionCommand::ArchiveSession { actor: a } => *a = actor.clone(),
        }
        command
    }
}
