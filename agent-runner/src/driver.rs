//! One session's driver: reads the session from the event store, decides the next step, does
//! it, and records the result through command-api; again until nothing is left, then retires.
//!
//! The next step is a pure function of what the store says ([`decide`]), so a driver started
//! from scratch (after a crash, on another runner) carries on where the session is:
//! - the session was archived: remove its sandbox;
//! - a prompt runs: no plan yet → plan; a plan awaits a decision → wait (people's time, bounded
//!   by the approval timeout); the plan was rejected → a revised plan, up to the round limit;
//!   approved → build, checkpoint, complete. A prompt whose build was under way on a runner that
//!   died fails with that reason (the lease remembers which prompt was being built), so no work
//!   is done twice;
//! - a person's checkpoint, restore or push request not answered yet → do it;
//! - no prompt runs and one is queued → start the head of the queue;
//! - nothing: retire (the lease is released; the sandbox idles out on its own).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use canopy_domain::SessionStatus;
use canopy_opencode::{Agent, CreateSession, OpenCodeClient, Prompt, PromptPart};
use canopy_process::Backoff;
use canopy_sandbox::{ActiveSandbox, CommitRequest, GitCredentials, PushRequest, SandboxSpec};
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

use crate::plan_text::{self, ParsedPlan};
use crate::record::RecordError;
use crate::supervisor::Supervisor;
use crate::turn::{self, Phase, TurnSetup};
use crate::view::{self, PlanInfo, Request, SessionView, request_key};
use crate::{Ctx, MODEL_PROVIDER_ID, lease};

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Archive,
    Serve(i64, Request),
    Start(Uuid),
    Plan {
        prompt: Uuid,
        rejected: Option<PlanInfo>,
        round: usize,
    },
    Build {
        prompt: Uuid,
        plan: PlanInfo,
    },
    Fail {
        prompt: Uuid,
        reason: String,
    },
    /// Wait for people until this time (or a wake-up).
    Wait(DateTime<Utc>),
    Idle,
}

/// What the driver knows besides the store.
#[derive(Debug, Default, Clone)]
pub struct Local {
    /// The prompt a previous lease holder was building when it died.
    pub orphaned_build: Option<Uuid>,
    /// Requests that failed here (not retried until the driver restarts).
    pub failed_requests: HashSet<i64>,
    pub archived: bool,
    /// A turn that ran here and whose results are not all recorded yet: a failed report is
    /// retried from this, never by running the turn again.
    pub finished: Option<Finished>,
}

/// What a finished turn left to record.
#[derive(Debug, Clone)]
pub enum Finished {
    /// A plan turn: the plan to propose, or why the prompt fails.
    Plan {
        prompt: Uuid,
        round: usize,
        outcome: Result<ParsedPlan, String>,
    },
    /// A build turn: its checkpoint (if anything changed) and how the prompt ends.
    Build {
        prompt: Uuid,
        commit: Option<canopy_sandbox::Commit>,
        outcome: Result<Option<String>, String>,
    },
}

/// Decides the next step from the session's state.
pub fn decide(
    view: &SessionView,
    local: &Local,
    max_plan_rounds: usize,
    approval_timeout: Duration,
    now: DateTime<Utc>,
) -> Next {
    let session = &view.session;
    match session.status() {
        SessionStatus::Archived if !local.archived => return Next::Archive,
        SessionStatus::Active => {}
        _ => return Next::Idle,
    }
    let request = view
        .next_request()
        .filter(|(sequence, _)| !local.failed_requests.contains(sequence))
        .map(|(sequence, request)| Next::Serve(sequence, request.clone()));
    if let Some(prompt) = session.running_prompt() {
        if local.orphaned_build == Some(prompt) {
            return Next::Fail {
                prompt,
                reason: "the runner building this prompt stopped before it finished; what it \
                         changed is kept in the workspace, and the queue goes on"
                    .to_owned(),
            };
        }
        let plans: Vec<&PlanInfo> = view.plans_of(prompt).collect();
        let Some(latest) = plans.last() else {
            return request.unwrap_or(Next::Plan {
                prompt,
                rejected: None,
                round: 1,
            });
        };
        return match &latest.verdict {
            None => {
                let deadline = latest.proposed_at
                    + chrono::Duration::from_std(approval_timeout).unwrap_or(chrono::Duration::MAX);
                if now >= deadline {
                    Next::Fail {
                        prompt,
                        reason: format!(
                            "no one decided on the plan within {} s",
                            approval_timeout.as_secs()
                        ),
                    }
                } else {
                    request.unwrap_or(Next::Wait(deadline))
                }
            }
            Some(verdict) if verdict.approved => Next::Build {
                prompt,
                plan: (*latest).clone(),
            },
            Some(verdict) => {
                if plans.len() >= max_plan_rounds {
                    Next::Fail {
                        prompt,
                        reason: format!(
                            "the plan was rejected {} times; the last comment: {}",
                            plans.len(),
                            verdict.comment.as_deref().unwrap_or_default()
                        ),
                    }
                } else {
                    request.unwrap_or(Next::Plan {
                        prompt,
                        rejected: Some((*latest).clone()),
                        round: plans.len() + 1,
                    })
                }
            }
        };
    }
    if let Some(request) = request {
        return request;
    }
    match session.queue().first() {
        Some(&head) => Next::Start(head),
        None => Next::Idle,
    }
}

/// The sandbox, OpenCode client and OpenCode session a driver works with.
struct AgentHandle {
    _sandbox: ActiveSandbox,
    client: OpenCodeClient,
    opencode_session: String,
}

/// Drives `session_id` until it has nothing to do, the runner stops, or the lease is lost.
pub(crate) async fn drive(
    ctx: Arc<Ctx>,
    supervisor: Supervisor,
    session_id: Uuid,
    wake: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
) {
    let lost = Arc::new(AtomicBool::new(false));
    let renewal = tokio::spawn(renew(ctx.clone(), session_id, lost.clone()));
    let mut driver = Driver {
        ctx,
        supervisor,
        session_id,
        view: Arc::new(tokio::sync::Mutex::new(SessionView::new(session_id))),
        wake,
        stop,
        lost,
        local: Local::default(),
        agent: None,
    };
    driver.run().await;
    renewal.abort();
}

struct Driver {
    ctx: Arc<Ctx>,
    supervisor: Supervisor,
    session_id: Uuid,
    view: Arc<tokio::sync::Mutex<SessionView>>,
    wake: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    lost: Arc<AtomicBool>,
    local: Local,
    agent: Option<AgentHandle>,
}

impl Driver {
    async fn run(&mut self) {
        match lease::building(&self.ctx.pool, self.session_id).await {
            Ok(orphaned) => self.local.orphaned_build = orphaned,
            Err(error) => tracing::warn!(%error, "cannot read the session's lease"),
        }
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            if self.lost.load(Ordering::Relaxed) {
                tracing::warn!(session = %self.session_id, "lease lost; another runner drives the session");
                self.supervisor.forget(self.session_id).await;
                return;
            }
            if *self.stop.borrow() {
                self.agent = None;
                self.supervisor.hand_back(self.session_id).await;
                return;
            }
            let seen = *self.wake.borrow_and_update();
            let next = {
                let mut view = self.view.lock().await;
                if let Err(error) = view.refresh(&self.ctx.pool).await {
                    tracing::warn!(%error, session = %self.session_id, "cannot read the session");
                    drop(view);
                    self.pause(backoff.next_delay()).await;
                    continue;
                }
                decide(
                    &view,
                    &self.local,
                    self.ctx.config.max_plan_rounds,
                    self.ctx.config.approval_timeout,
                    Utc::now(),
                )
            };
            backoff.reset();
            tracing::debug!(session = %self.session_id, ?next, "next step");
            let result = match next {
                Next::Idle => {
                    self.agent = None;
                    if self.supervisor.retire(self.session_id, seen).await {
                        return;
                    }
                    Ok(())
                }
                Next::Wait(until) => {
                    // People's time: the sandbox may idle out meanwhile.
                    self.agent = None;
                    let left = (until - Utc::now()).to_std().unwrap_or_default();
                    self.pause(left.min(Duration::from_secs(5))).await;
                    Ok(())
                }
                Next::Archive => self.archive().await,
                Next::Start(prompt) => self.start(prompt).await,
                Next::Plan {
                    prompt,
                    rejected,
                    round,
                } => self.plan(prompt, rejected, round).await,
                Next::Build { prompt, plan } => self.build(prompt, plan).await,
                Next::Fail { prompt, reason } => self.fail(prompt, &reason).await,
                Next::Serve(sequence, request) => self.serve(sequence, request).await,
            };
            if let Err(error) = result {
                tracing::warn!(%error, session = %self.session_id, "step failed; trying again");
                self.pause(backoff.next_delay()).await;
            }
        }
    }

    /// Waits for a wake-up, the stop signal, or `at_most`.
    async fn pause(&mut self, at_most: Duration) {
        tokio::select! {
            _ = self.wake.changed() => {}
            _ = self.stop.changed() => {}
            _ = tokio::time::sleep(at_most) => {}
        }
    }

    /// Posts, treating a refusal as "the session moved on" (the next loop reads why).
    async fn report(&self, path: &str, key: &str, body: serde_json::Value) -> anyhow::Result<()> {
        match self
            .ctx
            .recorder
            .post(self.session_id, path, key, &body)
            .await
        {
            Ok(_) => Ok(()),
            Err(error @ RecordError::Refused { .. }) => {
                tracing::info!(%error, session = %self.session_id, "report refused; the session moved on");
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn start(&mut self, prompt: Uuid) -> anyhow::Result<()> {
        self.report(
            &format!("prompts/{prompt}/start"),
            &format!("start:{prompt}"),
            json!({}),
        )
        .await
    }

    async fn fail(&mut self, prompt: Uuid, reason: &str) -> anyhow::Result<()> {
        let reason = crate::redact::truncate(reason, 3000);
        self.report(
            &format!("prompts/{prompt}/fail"),
            &format!("fail:{prompt}"),
            json!({ "reason": reason }),
        )
        .await?;
        if self.local.orphaned_build == Some(prompt) {
            self.local.orphaned_build = None;
        }
        lease::set_building(&self.ctx.pool, self.session_id, &self.ctx.runner_id, None).await?;
        Ok(())
    }

    async fn archive(&mut self) -> anyhow::Result<()> {
        self.agent = None;
        self.ctx
            .sandboxes
            .archive(&self.session_id.to_string())
            .await?;
        self.ctx.forget_sandbox(self.session_id);
        self.local.archived = true;
        Ok(())
    }

    /// The session's sandbox and OpenCode session, started or resumed, and recorded.
    async fn agent(&mut self) -> anyhow::Result<&AgentHandle> {
        if self.agent.is_none() {
            let agent = self.start_agent().await?;
            self.agent = Some(agent);
        }
        Ok(self.agent.as_ref().expect("just set"))
    }

    async fn start_agent(&mut self) -> anyhow::Result<AgentHandle> {
        let (spec, recorded_sandbox, started_at, last_session, title, last_sequence) = {
            let view = self.view.lock().await;
            let session = &view.session;
            (
                SandboxSpec {
                    id: self.session_id.to_string(),
                    repository: session.repository_url().to_owned(),
                    branch: session.session_branch().to_owned(),
                    provider_id: MODEL_PROVIDER_ID.to_owned(),
                    model_id: self.ctx.model.model_id.clone(),
                },
                session.sandbox_id().map(str::to_owned),
                view.sandbox_started_at,
                view.last_opencode_session.clone(),
                session.title().to_owned(),
                view.last_sequence,
            )
        };
        let sandbox = {
            let _start = self.ctx.sandbox_starts.acquire().await?;
            self.ctx.sandboxes.acquire(spec).await?
        };
        let client = OpenCodeClient::new(sandbox.info().client_config())?;
        let mine = self.ctx.sandbox_name(self.session_id);
        // Resume the OpenCode session of the last sandbox when its data is still there.
        let opencode_session = match &last_session {
            Some(id) if client.session(id).await.is_ok() => id.clone(),
            _ => {
                client
                    .create_session(&CreateSession {
                        title: Some(title),
                        ..CreateSession::default()
                    })
                    .await?
                    .id
            }
        };
        let up_to_date = recorded_sandbox.as_deref() == Some(mine.as_str())
            && last_session.as_deref() == Some(opencode_session.as_str());
        if !up_to_date {
            if let Some(other) = recorded_sandbox {
                // A sandbox of a runner that is gone (or an earlier one of ours).
                self.report(
                    "sandbox/stopped",
                    &format!(
                        "sandbox-stopped:{}:{}",
                        self.session_id,
                        started_at.unwrap_or_default()
                    ),
                    json!({ "sandbox_id": other, "reason": "replaced: the runner that ran it stopped" }),
                )
                .await?;
            }
            self.report(
                "sandbox/started",
                &format!("sandbox-started:{}:{last_sequence}", self.session_id),
                json!({ "sandbox_id": mine, "opencode_session_id": opencode_session }),
            )
            .await?;
        }
        self.ctx.remember_sandbox(self.session_id);
        Ok(AgentHandle {
            _sandbox: sandbox,
            client,
            opencode_session,
        })
    }

    /// The system text: participants, and the feature's learnings and decisions.
    async fn system_text(&self) -> String {
        let (title, participants, feature_id) = {
            let view = self.view.lock().await;
            let session = &view.session;
            (
                session.title().to_owned(),
                session
                    .participants()
                    .iter()
                    .map(|p| (p.name.clone(), p.role.as_str().to_owned()))
                    .collect::<Vec<_>>(),
                session.feature_id(),
            )
        };
        let feature = match feature_id {
            Some(feature_id) => view::feature_context(&self.ctx.pool, feature_id, 20)
                .await
                .map_err(|error| tracing::warn!(%error, "cannot read the feature's learnings"))
                .ok(),
            None => None,
        };
        plan_text::system_text(&title, &participants, feature.as_ref())
    }

    async fn run_turn(
        &mut self,
        prompt: Uuid,
        phase: Phase,
        text: String,
    ) -> anyhow::Result<turn::TurnReport> {
        let system = self.system_text().await;
        let workspace = self.view.lock().await.session.workspace_id().to_owned();
        let bash_allowed = self.ctx.config.bash_allow_workspaces.contains(&workspace);
        let model = self.ctx.model.clone();
        let ctx = self.ctx.clone();
        let view = self.view.clone();
        let wake = self.wake.clone();
        let session_id = self.session_id;
        let agent = self.agent().await?;
        let request = Prompt {
            parts: vec![PromptPart::text(text)],
            agent: match phase {
                Phase::Plan => Agent::Plan,
                Phase::Build => Agent::Build,
            },
            model,
            system: Some(system),
        };
        let setup = TurnSetup {
            ctx: &ctx,
            session_id,
            prompt_id: prompt,
            phase,
            client: &agent.client,
            opencode_session: &agent.opencode_session,
            view,
            wake,
            bash_allowed,
        };
        Ok(turn::run(setup, request).await)
    }

    async fn plan(
        &mut self,
        prompt: Uuid,
        rejected: Option<PlanInfo>,
        round: usize,
    ) -> anyhow::Result<()> {
        let finished = match self.local.finished.take() {
            Some(Finished::Plan {
                prompt: p,
                round: r,
                outcome,
            }) if p == prompt && r == round => Some(outcome),
            _ => None,
        };
        let outcome = match finished {
            Some(outcome) => outcome,
            None => match self.plan_turn(prompt, rejected).await? {
                Some(outcome) => outcome,
                // Cancelled meanwhile.
                None => return Ok(()),
            },
        };
        self.local.finished = Some(Finished::Plan {
            prompt,
            round,
            outcome: outcome.clone(),
        });
        match outcome {
            Ok(ParsedPlan { summary, steps }) => {
                let plan_id = Uuid::new_v5(&prompt, format!("plan:{round}").as_bytes());
                self.report(
                    "plans",
                    &format!("plan:{prompt}:{round}"),
                    json!({ "plan_id": plan_id, "prompt_id": prompt, "summary": summary, "steps": steps }),
                )
                .await?;
            }
            Err(reason) => self.fail(prompt, &reason).await?,
        }
        self.local.finished = None;
        Ok(())
    }

    /// Runs the plan turn: the plan, or why the prompt fails; `None` when it was cancelled.
    async fn plan_turn(
        &mut self,
        prompt: Uuid,
        rejected: Option<PlanInfo>,
    ) -> anyhow::Result<Option<Result<ParsedPlan, String>>> {
        let info = self.view.lock().await.prompts.get(&prompt).cloned();
        let Some(info) = info else {
            return Ok(Some(Err("the prompt's text is missing".to_owned())));
        };
        let text = match &rejected {
            None => plan_text::plan_request(&info),
            Some(plan) => plan_text::revise_request(&info, plan),
        };
        let report = match self.run_turn(prompt, Phase::Plan, text).await {
            Ok(report) => report,
            Err(error) => {
                self.agent = None;
                return Ok(Some(Err(format!("the agent could not start: {error:#}"))));
            }
        };
        if report.cancelled {
            return Ok(None);
        }
        if let Some(reason) = report.failure {
            return Ok(Some(Err(reason)));
        }
        Ok(Some(plan_text::parse_plan(&report.final_text).ok_or_else(
            || "the agent answered with no plan".to_owned(),
        )))
    }

    async fn build(&mut self, prompt: Uuid, plan: PlanInfo) -> anyhow::Result<()> {
        let finished = match self.local.finished.take() {
            Some(Finished::Build {
                prompt: p,
                commit,
                outcome,
            }) if p == prompt => Some((commit, outcome)),
            _ => None,
        };
        let (commit, outcome) = match finished {
            Some(finished) => finished,
            None => match self.build_turn(prompt, &plan).await? {
                Some(finished) => finished,
                None => {
                    lease::set_building(&self.ctx.pool, self.session_id, &self.ctx.runner_id, None)
                        .await?;
                    return Ok(());
                }
            },
        };
        self.local.finished = Some(Finished::Build {
            prompt,
            commit: commit.clone(),
            outcome: outcome.clone(),
        });
        if let Some(commit) = commit {
            let checkpoint_id = Uuid::new_v5(&prompt, b"checkpoint");
            self.report(
                "checkpoints",
                &format!("ckpt:{prompt}"),
                json!({
                    "checkpoint_id": checkpoint_id,
                    "prompt_id": prompt,
                    "commit_sha": commit.sha,
                    "files_changed": commit.files_changed,
                    "trigger": "auto",
                }),
            )
            .await?;
        }
        match outcome {
            Err(reason) => self.fail(prompt, &reason).await?,
            Ok(summary) => {
                self.report(
                    &format!("prompts/{prompt}/complete"),
                    &format!("complete:{prompt}"),
                    json!({ "summary": summary }),
                )
                .await?;
            }
        }
        self.local.finished = None;
        lease::set_building(&self.ctx.pool, self.session_id, &self.ctx.runner_id, None).await?;
        Ok(())
    }

    /// Runs the build turn and commits what it changed: the checkpoint's commit and the
    /// prompt's summary, or why it fails; `None` when it was cancelled.
    #[allow(clippy::type_complexity)]
    async fn build_turn(
        &mut self,
        prompt: Uuid,
        plan: &PlanInfo,
    ) -> anyhow::Result<
        Option<(
            Option<canopy_sandbox::Commit>,
            Result<Option<String>, String>,
        )>,
    > {
        let info = self.view.lock().await.prompts.get(&prompt).cloned();
        let Some(info) = info else {
            return Ok(Some((None, Err("the prompt's text is missing".to_owned()))));
        };
        lease::set_building(
            &self.ctx.pool,
            self.session_id,
            &self.ctx.runner_id,
            Some(prompt),
        )
        .await?;
        let text = plan_text::build_request(&info, plan);
        let report = match self.run_turn(prompt, Phase::Build, text).await {
            Ok(report) => report,
            Err(error) => {
                self.agent = None;
                return Ok(Some((
                    None,
                    Err(format!("the agent could not start: {error:#}")),
                )));
            }
        };
        if report.cancelled {
            return Ok(None);
        }
        // What was done is kept, failed or not.
        let author = CommitRequest {
            author_name: info.author_name.clone(),
            author_email: info
                .author_email
                .clone()
                .unwrap_or_else(|| synthesized_email(&info.author_id)),
            message: format!(
                "{}\n\nCanopy prompt {prompt} by {}, plan approved by {}",
                crate::redact::truncate(&plan.summary, 200),
                info.author_name,
                plan.verdict
                    .as_ref()
                    .map(|v| v.reviewer_name.as_str())
                    .unwrap_or("a reviewer")
            ),
        };
        let commit = match self
            .ctx
            .sandboxes
            .provider()
            .commit(&self.session_id.to_string(), author)
            .await
        {
            Ok(commit) if commit.created => Some(commit),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(%error, %prompt, "could not take the prompt's checkpoint");
                None
            }
        };
        let outcome = match report.failure {
            Some(reason) => Err(reason),
            None => {
                let summary = report.final_text.trim();
                Ok((!summary.is_empty()).then(|| self.ctx.redactor.clean(summary, 4000)))
            }
        };
        Ok(Some((commit, outcome)))
    }

    async fn serve(&mut self, sequence: i64, request: Request) -> anyhow::Result<()> {
        let result = self.serve_request(sequence, &request).await;
        if let Err(error) = &result {
            tracing::warn!(%error, session = %self.session_id, sequence, ?request, "request failed");
            self.local.failed_requests.insert(sequence);
        }
        Ok(())
    }

    async fn serve_request(&mut self, sequence: i64, request: &Request) -> anyhow::Result<()> {
        let id = self.session_id.to_string();
        // Git operations need the sandbox's workspace registered with the provider.
        self.agent().await?;
        let provider = self.ctx.sandboxes.provider().clone();
        match request {
            Request::Checkpoint {
                requested_by,
                label,
            } => {
                let name = self.view.lock().await.name_of(requested_by);
                let commit = provider
                    .commit(
                        &id,
                        CommitRequest {
                            author_name: name.clone(),
                            author_email: synthesized_email(requested_by),
                            message: label
                                .clone()
                                .unwrap_or_else(|| format!("Checkpoint requested by {name}")),
                        },
                    )
                    .await?;
                self.report(
                    "checkpoints",
                    &request_key(sequence, "checkpoint"),
                    json!({
                        "checkpoint_id": Uuid::new_v5(&self.session_id, format!("req:{sequence}").as_bytes()),
                        "label": label,
                        "commit_sha": commit.sha,
                        "files_changed": commit.files_changed,
                        "trigger": "manual",
                    }),
                )
                .await
            }
            Request::Restore { checkpoint_id } => {
                let sha = self
                    .view
                    .lock()
                    .await
                    .checkpoint_commits
                    .get(checkpoint_id)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("checkpoint {checkpoint_id} has no commit"))?;
                provider.restore(&id, &sha).await?;
                self.report(
                    "restores",
                    &request_key(sequence, "restore"),
                    json!({ "checkpoint_id": checkpoint_id }),
                )
                .await
            }
            Request::Push { branch } => {
                let remote_url = self.view.lock().await.session.repository_url().to_owned();
                let credentials =
                    match (&self.ctx.config.git_username, &self.ctx.config.git_password) {
                        (Some(username), Some(password)) => Some(GitCredentials {
                            username: username.clone(),
                            password: password.clone(),
                        }),
                        _ => None,
                    };
                let sha = provider
                    .push(
                        &id,
                        PushRequest {
                            remote_url,
                            branch: branch.clone(),
                            credentials,
                        },
                    )
                    .await?;
                self.report(
                    "pushes",
                    &request_key(sequence, "push"),
                    json!({ "branch": branch, "commit_sha": sha }),
                )
                .await
            }
        }
    }
}

/// A stable commit address for a person whose token carried no email.
pub fn synthesized_email(user_id: &str) -> String {
    let local: String = user_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let local = if local.is_empty() {
        "user".to_owned()
    } else {
        local
    };
    format!("{local}@users.canopy.invalid")
}

/// Renews the lease every third of its lifetime; sets `lost` when it is no longer ours.
async fn renew(ctx: Arc<Ctx>, session: Uuid, lost: Arc<AtomicBool>) {
    let ttl = ctx.config.lease_ttl();
    loop {
        tokio::time::sleep(ttl / 3).await;
        match lease::renew(&ctx.pool, session, &ctx.runner_id, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(error) => tracing::warn!(%error, %session, "cannot renew the lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_domain::SessionEvent;
    use canopy_domain::session::*;
    use cqrs_es::Aggregate;

    fn view_with(events: Vec<SessionEvent>) -> SessionView {
        let mut view = SessionView::new(Uuid::from_u128(1));
        for event in events {
            if let SessionEvent::PlanProposed(e) = &event {
                view.plans.push(PlanInfo {
                    plan_id: e.plan_id,
                    prompt_id: e.prompt_id,
                    summary: e.summary.clone(),
                    steps: e.steps.clone(),
                    proposed_at: Utc::now() - chrono::Duration::seconds(10),
                    verdict: None,
                });
            }
            view.session.apply(event);
        }
        view
    }

    fn started() -> Vec<SessionEvent> {
        vec![
            SessionStarted {
                session_id: Uuid::from_u128(1),
                workspace_id: "w".into(),
                feature_id: None,
                title: "t".into(),
                repository_url: "https://x/y.git".into(),
                base_branch: "main".into(),
                session_branch: "canopy/t".into(),
                started_by: "ann".into(),
            }
            .into(),
            PromptSubmitted {
                prompt_id: Uuid::from_u128(10),
                author_id: "ann".into(),
                author_name: "Ann".into(),
                author_email: None,
                text: "do it".into(),
            }
            .into(),
        ]
    }

    fn next(view: &SessionView, local: &Local) -> Next {
        decide(view, local, 2, Duration::from_secs(60), Utc::now())
    }

    #[test]
    fn the_queue_head_starts_then_plans_and_waits() {
        let view = view_with(started());
        assert_eq!(
            next(&view, &Local::default()),
            Next::Start(Uuid::from_u128(10))
        );
        let mut events = started();
        events.push(
            PromptStarted {
                prompt_id: Uuid::from_u128(10),
            }
            .into(),
        );
        let view = view_with(events.clone());
        assert!(matches!(
            next(&view, &Local::default()),
            Next::Plan {
                round: 1,
                rejected: None,
                ..
            }
        ));
        events.push(
            PlanProposed {
                plan_id: Uuid::from_u128(20),
                prompt_id: Uuid::from_u128(10),
                summary: "s".into(),
                steps: vec![],
            }
            .into(),
        );
        let view = view_with(events);
        assert!(matches!(next(&view, &Local::default()), Next::Wait(_)));
        // Past the approval timeout the prompt fails.
        let late = decide(
            &view,
            &Local::default(),
            2,
            Duration::from_secs(1),
            Utc::now(),
        );
        assert!(matches!(late, Next::Fail { .. }), "{late:?}");
        // A takeover of a prompt whose build was under way fails it.
        let local = Local {
            orphaned_build: Some(Uuid::from_u128(10)),
            ..Local::default()
        };
        assert!(matches!(next(&view, &local), Next::Fail { .. }));
    }

    #[test]
    fn rejections_revise_until_the_round_limit() {
        let mut view = view_with({
            let mut events = started();
            events.push(
                PromptStarted {
                    prompt_id: Uuid::from_u128(10),
                }
                .into(),
            );
            events
        });
        for round in 1..=2u128 {
            view.plans.push(PlanInfo {
                plan_id: Uuid::from_u128(20 + round),
                prompt_id: Uuid::from_u128(10),
                summary: "s".into(),
                steps: vec![],
                proposed_at: Utc::now(),
                verdict: Some(view::Verdict {
                    approved: false,
                    reviewer_name: "Bo".into(),
                    comment: Some("no".into()),
                }),
            });
            let decided = next(&view, &Local::default());
            if round == 1 {
                assert!(
                    matches!(
                        decided,
                        Next::Plan {
                            round: 2,
                            rejected: Some(_),
                            ..
                        }
                    ),
                    "{decided:?}"
                );
            } else {
                assert!(matches!(decided, Next::Fail { .. }), "{decided:?}");
            }
        }
    }

    #[test]
    fn synthesized_emails_are_stable_and_safe() {
        assert_eq!(
            synthesized_email("dev member"),
            "dev-member@users.canopy.invalid"
        );
        assert_eq!(synthesized_email(""), "user@users.canopy.invalid");
    }
}
