//! One OpenCode turn of a prompt (planning or building), under the runner's gate, recorded as
//! it happens.
//!
//! - **The gate.** In the sandbox OpenCode asks before every `bash` command (`question` and
//!   `task` are denied by its config). While planning the runner refuses every ask (OpenCode's
//!   `plan` agent already refuses edits): the plan phase cannot change anything. While building,
//!   a workspace whose policy is `ask` gets a `ToolApprovalRequested` and the command waits for a
//!   person's grant or denial (`once`, or `reject` with the reviewer's comment, which the model
//!   reads); a command that tries to reach the agent's own server (to answer its own asks, start
//!   prompts or change its config) is refused and ends the prompt.
//! - **Recording.** Finished tool parts become `ToolExecuted`, each assistant message's text one
//!   `AgentMessageRecorded` (not one event per delta), each step's tokens and cost a
//!   `UsageRecorded`, in the order they happen; after the turn, whatever the event stream missed
//!   is recorded from OpenCode's history under the same keys.
//! - **Limits.** OpenCode's own hangs, retries and cut streams are stopped by
//!   [`canopy_opencode::run_turn`]; the agent-time limit here excludes the time spent waiting for
//!   people, and a cancelled prompt aborts the turn.
//! - **Budgets.** The turn starts with the sandbox's model proxy held to the tokens the
//!   workspace's budgets leave the session, and its agent-time limit to the session's seconds
//!   left; after each usage it records it reads the budgets again, and a spent one stops the
//!   turn as the agent-time limit does, with a `budget_exhausted:` reason ([`crate::budget`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use canopy_opencode::{
    Event, OpenCodeClient, Part, PermissionReply, PermissionRequest, Prompt, ToolPart, ToolState,
    TurnEnd, TurnHandler, TurnPolicy, run_turn,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

use crate::Ctx;
use crate::budget;
use crate::record::RecordError;
use crate::view::SessionView;

/// Which agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Plan,
    Build,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Plan => "plan",
            Self::Build => "build",
        }
    }
}

/// Everything a turn needs.
#[derive(Debug)]
pub struct TurnSetup<'a> {
    pub ctx: &'a Ctx,
    pub session_id: Uuid,
    pub prompt_id: Uuid,
    pub phase: Phase,
    pub client: &'a OpenCodeClient,
    pub opencode_session: &'a str,
    pub view: Arc<tokio::sync::Mutex<SessionView>>,
    pub wake: tokio::sync::watch::Receiver<u64>,
    /// Whether bash runs without asking a person.
    pub bash_allowed: bool,
}

/// How a turn went, for the driver to record.
#[derive(Debug)]
pub struct TurnReport {
    /// The agent's last text.
    pub final_text: String,
    /// Why the prompt must fail, if it must.
    pub failure: Option<String>,
    /// The prompt stopped running (cancelled) while the turn ran.
    pub cancelled: bool,
}

/// Runs one turn and records what the agent did.
pub async fn run(setup: TurnSetup<'_>, prompt: Prompt) -> TurnReport {
    let budgets = budget::standings(&setup.ctx.pool, setup.session_id, setup.prompt_id)
        .await
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read the budgets; the turn runs without them");
            Vec::new()
        });
    if let Some(reason) = budget::exhausted(&budgets, Duration::ZERO) {
        return TurnReport {
            final_text: String::new(),
            failure: Some(reason),
            cancelled: false,
        };
    }
    let model_usage = setup
        .ctx
        .sandboxes
        .provider()
        .model_usage(&setup.session_id.to_string())
        .await;
    if let Some(usage) = &model_usage {
        let left = budget::tokens_left(&budgets);
        usage.set_ceiling(left.map(|left| usage.tokens().saturating_add(left)));
    }
    let limits = Limits {
        agent_time: setup.ctx.config.agent_time(),
        budget_agent_time: budget::agent_time_left(&budgets),
        budgets: !budgets.is_empty(),
        model_usage,
    };
    let mut report = run_limited(&setup, prompt, &limits).await;
    // A model call the proxy refused fails the turn as the model's error; say why.
    if !report.cancelled
        && limits.budgets
        && report
            .failure
            .as_deref()
            .is_some_and(|f| !f.starts_with(budget::EXHAUSTED))
        && let Ok(now) = budget::standings(&setup.ctx.pool, setup.session_id, setup.prompt_id).await
        && let Some(reason) = budget::exhausted(&now, Duration::ZERO)
    {
        report.failure = Some(reason);
    }
    report
}

/// What holds a turn back besides OpenCode's own limits.
#[derive(Debug)]
struct Limits {
    /// The configured agent-time limit of a turn.
    agent_time: Duration,
    /// What the session's agent-time budget leaves, when one is set.
    budget_agent_time: Option<Duration>,
    /// Whether any budget applies (then they are read again after each recorded usage).
    budgets: bool,
    /// The sandbox's model usage, whose ceiling closes when a budget is spent.
    model_usage: Option<Arc<canopy_sandbox::ModelUsage>>,
}

async fn run_limited(setup: &TurnSetup<'_>, prompt: Prompt, limits: &Limits) -> TurnReport {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let (reports, receiver) = mpsc::unbounded_channel();
    let mut handler = Handler {
        setup,
        shared: shared.clone(),
        reports,
    };
    let config = &setup.ctx.config;
    let policy = TurnPolicy {
        inactivity_timeout: config.inactivity_timeout(),
        // The agent-time limit (people's time excluded) is the watcher's; this is an outer bound.
        turn_timeout: config.agent_time() + config.approval_timeout,
        max_steps: config.max_steps,
        ..TurnPolicy::default()
    };
    let recorder = record_reports(setup, receiver, shared.clone());
    let started = Instant::now();
    let work = async {
        let outcome = {
            let turn = run_turn(
                setup.client,
                setup.opencode_session,
                &prompt,
                &mut handler,
                &policy,
            );
            tokio::pin!(turn);
            let watch = watch_turn(setup, &shared, started, limits);
            tokio::pin!(watch);
            tokio::select! {
                outcome = &mut turn => outcome,
                never = &mut watch => match never {},
            }
        };
        // Closes the reports channel, so the recorder finishes.
        drop(handler);
        outcome
    };
    let (outcome, ()) = tokio::join!(work, recorder);

    let mut report = TurnReport {
        final_text: String::new(),
        failure: None,
        cancelled: false,
    };
    match outcome {
        Ok(outcome) => {
            report.final_text = outcome.final_text();
            // Whatever the event stream missed, from the history (same keys: no duplicates).
            let missed: Vec<Report> = outcome
                .assistant_messages()
                .flat_map(|message| {
                    let mut items: Vec<Report> =
                        message.parts.iter().filter_map(Report::from_part).collect();
                    if message.info.is_completed() {
                        items.push(Report::Message {
                            message_id: message.info.id.clone(),
                            text: message.text(),
                        });
                    }
                    items
                })
                .collect();
            for item in missed {
                record_one(setup, &shared, item).await;
            }
            let failure = match &outcome.end {
                TurnEnd::Completed | TurnEnd::Aborted => None,
                TurnEnd::Failed(error) => Some(format!(
                    "the model failed: {}",
                    error.message().unwrap_or(&error.name)
                )),
                TurnEnd::Stopped(reason) => Some(format!("the turn was stopped: {reason:?}")),
            };
            let shared = shared.lock().unwrap_or_else(|p| p.into_inner());
            report.cancelled = shared.cancelled;
            report.failure =
                shared
                    .failure
                    .clone()
                    .or(if shared.cancelled { None } else { failure });
        }
        Err(error) => {
            let shared = shared.lock().unwrap_or_else(|p| p.into_inner());
            report.cancelled = shared.cancelled;
            report.failure = Some(
                shared
                    .failure
                    .clone()
                    .unwrap_or_else(|| format!("the runner lost the agent: {error}")),
            );
        }
    }
    report
}

/// What the handler, the watcher and the recorder share.
#[derive(Debug, Default)]
struct Shared {
    /// Since when a person's decision is awaited (time that is not the agent's).
    waiting_since: Option<Instant>,
    waited: Duration,
    failure: Option<String>,
    cancelled: bool,
    aborted: bool,
    /// Keys recorded in this turn.
    recorded: HashSet<String>,
    /// Calls the gate refused.
    denied_calls: HashSet<String>,
    /// How long each call waited for a person (not part of its run time).
    call_waits: HashMap<String, Duration>,
    /// Text parts by message, as last updated.
    texts: HashMap<String, Vec<(String, String)>>,
    /// A usage was recorded since the watcher last read the budgets.
    usage_recorded: bool,
}

impl Shared {
    fn agent_time(&self, started: Instant) -> Duration {
        let waiting = self
            .waiting_since
            .map(|since| since.elapsed())
            .unwrap_or_default();
        started.elapsed().saturating_sub(self.waited + waiting)
    }
}

/// Something to record.
#[derive(Debug)]
enum Report {
    Tool(Box<ToolPart>),
    Message {
        message_id: String,
        text: String,
    },
    Usage {
        part_id: String,
        tokens_in: u64,
        tokens_out: u64,
        cost: f64,
    },
}

impl Report {
    fn from_part(part: &Part) -> Option<Self> {
        match part {
            Part::Tool(tool) if tool.state.is_finished() => {
                Some(Self::Tool(Box::new(tool.clone())))
            }
            Part::StepFinish(step) => {
                let tokens = step.tokens.unwrap_or_default();
                Some(Self::Usage {
                    part_id: step.part.id.clone(),
                    tokens_in: tokens.input,
                    tokens_out: tokens.output + tokens.reasoning,
                    cost: step.cost,
                })
            }
            _ => None,
        }
    }
}

struct Handler<'s, 'a> {
    setup: &'s TurnSetup<'a>,
    shared: Arc<Mutex<Shared>>,
    reports: mpsc::UnboundedSender<Report>,
}

impl TurnHandler for Handler<'_, '_> {
    async fn on_permission(&mut self, request: &PermissionRequest) -> PermissionReply {
        let reply = self.decide(request).await;
        if let PermissionReply::Reject { .. } = reply
            && let Some(tool) = &request.tool
        {
            self.lock().denied_calls.insert(tool.call_id.clone());
        }
        reply
    }

    fn on_event(&mut self, event: &Event) {
        match event {
            Event::MessagePartUpdated {
                part: Part::Text(text),
                ..
            } => {
                let mut shared = self.lock();
                let parts = shared
                    .texts
                    .entry(text.part.message_id.clone())
                    .or_default();
                match parts.iter_mut().find(|(id, _)| *id == text.part.id) {
                    Some((_, current)) => current.clone_from(&text.text),
                    None => parts.push((text.part.id.clone(), text.text.clone())),
                }
            }
            Event::MessagePartUpdated { part, .. } => {
                if let Some(report) = Report::from_part(part) {
                    let _ = self.reports.send(report);
                }
            }
            Event::MessageUpdated { info, .. }
                if info.role == canopy_opencode::Role::Assistant && info.is_completed() =>
            {
                let text = self
                    .lock()
                    .texts
                    .get(&info.id)
                    .map(|parts| {
                        parts
                            .iter()
                            .map(|(_, t)| t.as_str())
                            .collect::<Vec<_>>()
                            .join("")
                    })
                    .unwrap_or_default();
                let _ = self.reports.send(Report::Message {
                    message_id: info.id.clone(),
                    text,
                });
            }
            _ => {}
        }
    }
}

impl Handler<'_, '_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn decide(&mut self, request: &PermissionRequest) -> PermissionReply {
        let setup = self.setup;
        if request.permission == "external_directory" {
            return match request.patterns.iter().find(|p| off_limits(p)) {
                Some(path) => PermissionReply::reject_with(format!(
                    "`{path}` is off limits: work in /workspace (and /tmp)."
                )),
                None => PermissionReply::Once,
            };
        }
        if setup.phase == Phase::Plan {
            return PermissionReply::reject_with(
                "Planning is read-only: nothing runs until a person approves the plan. \
                 Propose the plan instead.",
            );
        }
        if request.permission != "bash" {
            return PermissionReply::reject_with(format!(
                "`{}` is not allowed in Canopy sessions.",
                request.permission
            ));
        }
        let command = request.metadata["command"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| request.patterns.join(" && "));
        if let Some(what) = reaches_agent_server(&command) {
            let reason = format!(
                "the agent tried to reach its own agent server ({what}) with `{}`; the command was refused",
                setup.ctx.redactor.clean(&command, 500)
            );
            tracing::warn!(session = %setup.session_id, prompt = %setup.prompt_id, %reason, "agent refused");
            self.lock().failure = Some(reason);
            return PermissionReply::reject_with(
                "Refused: commands may not talk to the agent server.",
            );
        }
        if setup.bash_allowed {
            return PermissionReply::Once;
        }
        self.ask_people(request, &command).await
    }

    /// Records the ask and waits for a person's answer (this wait is not agent time).
    async fn ask_people(&mut self, request: &PermissionRequest, command: &str) -> PermissionReply {
        let setup = self.setup;
        let request_id = Uuid::new_v5(
            &setup.prompt_id,
            format!("permission:{}", request.id).as_bytes(),
        );
        let call_id = request
            .tool
            .as_ref()
            .map(|tool| tool.call_id.clone())
            .unwrap_or_else(|| request.id.clone());
        let max = setup.ctx.config.tool_output_bytes;
        let body = json!({
            "request_id": request_id,
            "prompt_id": setup.prompt_id,
            "call_id": call_id,
            "tool": "bash",
            "input_summary": setup.ctx.redactor.clean(command, max),
        });
        let key = format!("ask:{}:{}", setup.prompt_id, request.id);
        if let Err(error) = setup
            .ctx
            .recorder
            .post(setup.session_id, "tool-approvals", &key, &body)
            .await
        {
            tracing::warn!(%error, "could not record the tool approval request; refusing the call");
            return PermissionReply::reject_with("Refused: the request could not be recorded.");
        }
        self.lock().waiting_since = Some(Instant::now());
        let reply = self.wait_for_answer(request_id).await;
        let mut shared = self.lock();
        if let Some(since) = shared.waiting_since.take() {
            shared.waited += since.elapsed();
            *shared.call_waits.entry(call_id).or_default() += since.elapsed();
        }
        reply
    }

    async fn wait_for_answer(&mut self, request_id: Uuid) -> PermissionReply {
        let setup = self.setup;
        let mut wake = setup.wake.clone();
        let timeout = setup.ctx.config.approval_timeout;
        loop {
            {
                let mut view = setup.view.lock().await;
                if let Err(error) = view.refresh(&setup.ctx.pool).await {
                    tracing::warn!(%error, "cannot read the session; still waiting");
                }
                if !view.is_running(setup.prompt_id) {
                    self.lock().cancelled = true;
                    return PermissionReply::Reject { message: None };
                }
                if let Some(approval) = view.approvals.get(&request_id) {
                    if let Some(verdict) = &approval.verdict {
                        return if verdict.approved {
                            PermissionReply::Once
                        } else {
                            PermissionReply::reject_with(format!(
                                "{} denied this command{}",
                                verdict.reviewer_name,
                                verdict
                                    .comment
                                    .as_deref()
                                    .map(|c| format!(": {c}"))
                                    .unwrap_or_default()
                            ))
                        };
                    }
                    let waited = chrono::Utc::now() - approval.requested_at;
                    if waited.to_std().unwrap_or_default() >= timeout {
                        self.lock().failure = Some(format!(
                            "no one answered the agent's request to run a command within {} s",
                            timeout.as_secs()
                        ));
                        return PermissionReply::Reject { message: None };
                    }
                }
            }
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep(STORE_POLL) => {}
            }
        }
    }
}

/// How often a running turn's session is read from the store without a wake-up.
const STORE_POLL: Duration = Duration::from_secs(5);

/// Watches the running turn: aborts it when the prompt is cancelled or the agent-time limit is
/// reached. Never returns; the turn's end drops it.
async fn watch_turn(
    setup: &TurnSetup<'_>,
    shared: &Arc<Mutex<Shared>>,
    started: Instant,
    limits: &Limits,
) -> std::convert::Infallible {
    let limit = limits.agent_time;
    let budget_limit = limits.budget_agent_time.filter(|left| *left < limit);
    let mut wake = setup.wake.clone();
    let mut running = true;
    let mut last_read = Instant::now();
    loop {
        // A cancel arrives as a wake-up; the store is read then, and every few seconds as a
        // safety net. The agent-time limit needs no read.
        let woken = tokio::select! {
            _ = wake.changed() => true,
            _ = tokio::time::sleep(Duration::from_millis(500)) => false,
        };
        if woken || last_read.elapsed() >= STORE_POLL {
            let mut view = setup.view.lock().await;
            if view.refresh(&setup.ctx.pool).await.is_ok() {
                running = view.is_running(setup.prompt_id);
                last_read = Instant::now();
            }
        }
        // After a recorded usage the ledger has moved: read the budgets again.
        let spent = {
            let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
            let check = limits.budgets && !shared.aborted && shared.usage_recorded;
            shared.usage_recorded = false;
            check.then(|| shared.agent_time(started))
        };
        let spent = match spent {
            Some(agent_time) => {
                match budget::standings(&setup.ctx.pool, setup.session_id, setup.prompt_id).await {
                    Ok(now) => budget::exhausted(&now, agent_time),
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the budgets");
                        None
                    }
                }
            }
            None => None,
        };
        let abort = {
            let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
            if shared.aborted {
                false
            } else if let Some(reason) = spent {
                shared.failure = Some(reason);
                shared.aborted = true;
                true
            } else if let Some(left) = budget_limit
                && shared.agent_time(started) > left
            {
                shared.failure = Some(format!(
                    "{}: the session_agent_seconds budget (session:{}) is spent",
                    budget::EXHAUSTED,
                    setup.session_id
                ));
                shared.aborted = true;
                true
            } else if !running {
                shared.cancelled = true;
                shared.aborted = true;
                true
            } else if shared.agent_time(started) > limit {
                shared.failure = Some(format!(
                    "the agent worked longer than the limit of {} s",
                    limit.as_secs()
                ));
                shared.aborted = true;
                true
            } else {
                false
            }
        };
        if abort {
            let failure = shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .failure
                .clone();
            if let Some(usage) = &limits.model_usage
                && failure
                    .as_deref()
                    .is_some_and(|f| f.starts_with(budget::EXHAUSTED))
            {
                // the proxy refuses whatever the agent still tries before the abort lands
                usage.set_ceiling(Some(usage.tokens()));
            }
            tracing::info!(session = %setup.session_id, prompt = %setup.prompt_id, ?failure, "aborting the turn");
            if let Err(error) = setup.client.abort(setup.opencode_session).await {
                tracing::warn!(%error, "could not abort the turn");
            }
        }
    }
}

async fn record_reports(
    setup: &TurnSetup<'_>,
    mut receiver: mpsc::UnboundedReceiver<Report>,
    shared: Arc<Mutex<Shared>>,
) {
    while let Some(report) = receiver.recv().await {
        record_one(setup, &shared, report).await;
    }
}

/// Records one report unless this turn already did.
async fn record_one(setup: &TurnSetup<'_>, shared: &Arc<Mutex<Shared>>, report: Report) {
    let prompt = setup.prompt_id;
    let max = setup.ctx.config.tool_output_bytes;
    let (path, key, body) = match &report {
        Report::Tool(tool) => {
            // Planning records only the read-only tools (the others were refused, and the
            // domain takes no write tool in a plan phase).
            if setup.phase == Phase::Plan
                && !canopy_domain::session::READ_ONLY_TOOLS.contains(&tool.tool.as_str())
            {
                return;
            }
            let (denied, waited) = {
                let shared = shared.lock().unwrap_or_else(|p| p.into_inner());
                (
                    shared.denied_calls.contains(&tool.call_id),
                    shared
                        .call_waits
                        .get(&tool.call_id)
                        .copied()
                        .unwrap_or_default(),
                )
            };
            let (input, output, status, duration) = match &tool.state {
                ToolState::Completed {
                    input,
                    output,
                    time,
                    ..
                } => (input, output.as_str(), "completed", time.duration_ms()),
                ToolState::Error {
                    input, error, time, ..
                } => (
                    input,
                    error.as_str(),
                    if denied { "denied" } else { "failed" },
                    time.duration_ms(),
                ),
                _ => return,
            };
            // A command is recorded as typed; other inputs as their JSON.
            let input = input["command"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| input.to_string());
            (
                "tool-executions",
                format!("tool:{prompt}:{}", tool.call_id),
                json!({
                    "prompt_id": prompt,
                    "call_id": tool.call_id,
                    "tool": tool.tool,
                    "phase": setup.phase.as_str(),
                    "input_summary": setup.ctx.redactor.clean(&input, max),
                    "output_summary": setup.ctx.redactor.clean(output, max),
                    "status": status,
                    "duration_ms": duration.saturating_sub(waited.as_millis() as u64),
                }),
            )
        }
        Report::Message { message_id, text } => {
            // The plan phase's answer is the plan itself.
            if setup.phase == Phase::Plan || text.trim().is_empty() {
                return;
            }
            (
                "messages",
                format!("msg:{prompt}:{message_id}"),
                json!({
                    "prompt_id": prompt,
                    "message_id": message_id,
                    "text": setup.ctx.redactor.clean(text, 16 * 1024),
                }),
            )
        }
        Report::Usage {
            part_id,
            tokens_in,
            tokens_out,
            cost,
        } => (
            "usage",
            format!("usage:{prompt}:{part_id}"),
            json!({
                "prompt_id": prompt,
                "tokens_in": tokens_in,
                "tokens_out": tokens_out,
                "cost_micro_usd": (cost.max(0.0) * 1_000_000.0).round() as u64,
            }),
        ),
    };
    {
        let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
        if !shared.recorded.insert(key.clone()) {
            return;
        }
    }
    match setup
        .ctx
        .recorder
        .post(setup.session_id, path, &key, &body)
        .await
    {
        Ok(_) => {
            if let Report::Usage { .. } = report {
                shared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .usage_recorded = true;
            }
        }
        // The prompt ended meanwhile (cancelled): nothing more is recorded for it.
        Err(error @ RecordError::Refused { .. }) => {
            tracing::debug!(%error, "report refused")
        }
        Err(error) => {
            tracing::warn!(%error, "report lost");
            shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .recorded
                .remove(&key);
        }
    }
}

/// Paths outside the workspace no agent tool may touch: OpenCode's own process files (its
/// `/proc/self/environ` holds the server password, and its read tool runs outside the guard),
/// its data and config, and the sandbox's control directories.
pub fn off_limits(pattern: &str) -> bool {
    let path = pattern.trim();
    [
        "/proc",
        "/sys",
        "/run",
        "/home",
        "/root",
        "/opt/canopy",
        "/dev/fd",
        "/dev/mem",
    ]
    .iter()
    .any(|prefix| {
        path == *prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/') || rest.starts_with('*'))
    }) || path.starts_with('~')
        || path.contains("..")
}

/// Whether a command reaches for the agent's own server: its port, its socket, its password, or
/// its API's permission, session and config routes. The sandbox refuses such connections
/// anyway (the server wants a password the agent never sees, and Landlock blocks the port); this
/// catches the attempt so it is recorded and ends the prompt.
pub fn reaches_agent_server(command: &str) -> Option<&'static str> {
    let lower = command.to_ascii_lowercase();
    let markers: [(&str, &str); 7] = [
        (":4096", "its port"),
        ("/4096", "its port"),
        ("opencode.sock", "its socket"),
        ("opencode_server_password", "its password"),
        ("/permission", "its permission API"),
        ("/run/canopy", "its control directory"),
        ("prompt_async", "its prompt API"),
    ];
    markers
        .iter()
        .find(|(marker, _)| lower.contains(marker))
        .map(|(_, what)| *what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opencode_own_files_are_off_limits() {
        for path in [
            "/proc/self/environ",
            "/proc/*",
            "/home/sandbox/.local/share/opencode/opencode.db",
            "/run/canopy/opencode.sock",
            "/workspace/../proc/1/environ",
            "~/.config",
        ] {
            assert!(off_limits(path), "{path}");
        }
        for path in [
            "/tmp/build/*",
            "/etc/hosts",
            "/usr/include/*",
            "/dev/null",
            "/opt/tools",
        ] {
            assert!(!off_limits(path), "{path}");
        }
    }

    #[test]
    fn attempts_on_the_agent_server_are_recognised() {
        assert!(reaches_agent_server("curl -s http://127.0.0.1:4096/permission").is_some());
        assert!(reaches_agent_server("exec 3<>/dev/tcp/127.0.0.1/4096").is_some());
        assert!(
            reaches_agent_server("curl --unix-socket /run/canopy/opencode.sock http://x/")
                .is_some()
        );
        assert!(
            reaches_agent_server("cat /proc/*/environ | grep OPENCODE_SERVER_PASSWORD").is_some()
        );
        assert!(reaches_agent_server("ls -la && cargo test").is_none());
    }
}
