//! The turn driver: submit one prompt and follow it to its end, with the client's own limits.
//!
//! OpenCode does not bound a turn. It retries a failing model for about a minute, calls a model
//! whose stream was cut again at once and forever, and waits for a model that never answers as
//! long as the connection stays open. So [`run_turn`] watches the session's events and stops the
//! turn (`POST /session/{id}/abort`) when one of the [`TurnPolicy`] limits trips:
//!
//! - no event about the session for [`TurnPolicy::inactivity_timeout`] (a hung model; time spent
//!   waiting for a permission decision does not count),
//! - the whole turn past [`TurnPolicy::turn_timeout`],
//! - OpenCode retrying the model call more than [`TurnPolicy::max_model_retries`] times,
//! - [`TurnPolicy::max_truncated_steps`] model calls ending without a finish reason (a cut
//!   stream, or a body that is not a stream at all),
//! - more than [`TurnPolicy::max_steps`] model calls.
//!
//! Permission requests go to the [`TurnHandler`], and its reply is posted at once. The result is
//! read back from the session history once the session is idle, so it is complete even where the
//! stream only carried deltas.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use crate::Error;
use crate::client::OpenCodeClient;
use crate::events::{Event, EventStream};
use crate::types::{
    MessageError, MessageInfo, MessageWithParts, Part, PermissionReply, PermissionRequest, Prompt,
    Role, SessionStatus, ToolPart,
};

/// The limits of one turn.
#[derive(Debug, Clone)]
pub struct TurnPolicy {
    /// The longest silence about the session while the turn runs.
    pub inactivity_timeout: Duration,
    /// The longest turn, time waiting for permission decisions included (a decision in
    /// progress is not interrupted; the turn is stopped once it is made).
    pub turn_timeout: Duration,
    /// Model-call retries OpenCode may make (it announces each with a `retry` status) before
    /// the turn is stopped. OpenCode itself gives up after 5, about 70 s in.
    pub max_model_retries: u32,
    /// Model calls ending without a finish reason before the turn is stopped.
    pub max_truncated_steps: usize,
    /// Model calls (assistant messages) in one turn.
    pub max_steps: usize,
    /// How long to wait for the session to go idle after an abort.
    pub abort_timeout: Duration,
}

impl Default for TurnPolicy {
    fn default() -> Self {
        Self {
            inactivity_timeout: Duration::from_secs(180),
            turn_timeout: Duration::from_secs(30 * 60),
            max_model_retries: 2,
            max_truncated_steps: 2,
            max_steps: 100,
            abort_timeout: Duration::from_secs(15),
        }
    }
}

/// What the driver asks of its caller while a turn runs.
pub trait TurnHandler: Send {
    /// Decides a permission request of the turn's session. The turn waits for the answer.
    fn on_permission(
        &mut self,
        request: &PermissionRequest,
    ) -> impl Future<Output = PermissionReply> + Send;

    /// Sees every event about the turn's session, in order (for live progress).
    fn on_event(&mut self, _event: &Event) {}
}

/// A closure answering permission requests is a handler.
impl<F> TurnHandler for F
where
    F: FnMut(&PermissionRequest) -> PermissionReply + Send,
{
    fn on_permission(
        &mut self,
        request: &PermissionRequest,
    ) -> impl Future<Output = PermissionReply> + Send {
        std::future::ready(self(request))
    }
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnEnd {
    /// The agent loop finished on its own.
    Completed,
    /// Someone else aborted the turn (`POST /session/{id}/abort`).
    Aborted,
    /// OpenCode gave up with this error (for example `APIError` once its retries ran out).
    Failed(MessageError),
    /// The driver stopped the turn, for this reason, and the session is idle again.
    Stopped(StopReason),
}

/// Why the driver stopped a turn.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    /// No event about the session for this long: the model (or a tool) hangs.
    Inactive { after: Duration },
    /// The turn ran longer than the turn timeout.
    DeadlineExceeded { after: Duration },
    /// OpenCode was retrying a failing model call (5xx, 429, connection refused).
    ModelRetrying { attempt: u32, message: String },
    /// Model calls ended without a finish reason: the stream is being cut.
    StreamTruncated { steps: usize },
    /// Too many model calls in one turn.
    TooManySteps { steps: usize },
}

/// A permission request of the turn and the reply the handler gave.
#[derive(Debug, Clone)]
pub struct PermissionDecision {
    pub request: PermissionRequest,
    pub reply: PermissionReply,
}

/// The result of [`run_turn`].
#[derive(Debug, Clone)]
pub struct TurnOutcome {
    pub end: TurnEnd,
    /// The turn's messages from the session history: its user message, then the assistant
    /// messages (one per model call), in order.
    pub messages: Vec<MessageWithParts>,
    pub permissions: Vec<PermissionDecision>,
    pub elapsed: Duration,
}

impl TurnOutcome {
    pub fn assistant_messages(&self) -> impl Iterator<Item = &MessageWithParts> {
        self.messages
            .iter()
            .filter(|message| message.info.role == Role::Assistant)
    }

    /// The tool calls of the turn, in the order the model made them.
    pub fn tool_parts(&self) -> Vec<&ToolPart> {
        self.assistant_messages()
            .flat_map(|message| &message.parts)
            .filter_map(|part| match part {
                Part::Tool(tool) => Some(tool),
                _ => None,
            })
            .collect()
    }

    /// The last assistant message.
    pub fn final_message(&self) -> Option<&MessageWithParts> {
        self.assistant_messages().last()
    }

    /// The text of the last assistant message.
    pub fn final_text(&self) -> String {
        self.final_message()
            .map(MessageWithParts::text)
            .unwrap_or_default()
    }
}

/// Why [`run_turn`] could not report a turn.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    Client(#[from] Error),

    #[error("the event stream ended in the middle of the turn")]
    EventStreamEnded,

    /// The driver aborted the turn but the session did not go idle.
    #[error("the turn was aborted ({reason:?}) but the session did not go idle within {after:?}")]
    AbortNotConfirmed { reason: StopReason, after: Duration },
}

/// Sends `prompt` to the session and follows the turn until the session is idle again,
/// answering permission requests with `handler` and stopping the turn when a `policy` limit
/// trips.
///
/// The session should be idle when this is called, and `client` must be for the session's
/// directory: the event stream only carries that directory's sessions. Errors are for turns the
/// driver could not follow (the server unreachable, the event stream gone); once the prompt is
/// sent, the driver tries to abort the turn before returning one, so nothing runs unwatched.
pub async fn run_turn<H: TurnHandler>(
    client: &OpenCodeClient,
    session_id: &str,
    prompt: &Prompt,
    handler: &mut H,
    policy: &TurnPolicy,
) -> Result<TurnOutcome, TurnError> {
    let started = Instant::now();
    let mut events = client.events().await?;
    // The stream has no replay: the prompt may only go out once the subscription is live.
    wait_connected(&mut events, client.config().request_timeout).await?;
    // Message ids sort by time, so the turn's messages are the ones after the newest one now.
    // Events about earlier turns can still arrive (the summary update after an idle).
    let before = client
        .latest_messages(session_id, 1)
        .await?
        .pop()
        .map(|message| message.info.id);
    client.prompt_async(session_id, prompt).await?;

    let mut turn = Turn::new(session_id, before);
    let stop = match follow(client, &mut events, handler, policy, &mut turn, started).await {
        Ok(stop) => stop,
        Err(error) => {
            // Nobody would watch the turn any more: do not leave it running.
            abort_quietly(client, session_id).await;
            return Err(error);
        }
    };
    if let Some(reason) = &stop {
        tracing::info!(session = %session_id, ?reason, "stopping the turn");
        client.abort(session_id).await?;
        turn.aborted = true;
        settle_after_abort(client, &mut events, handler, policy, &mut turn, reason).await?;
    }

    let messages: Vec<MessageWithParts> = client
        .messages(session_id)
        .await?
        .into_iter()
        .filter(|message| turn.is_after_start(&message.info.id))
        .collect();
    let recorded_error = messages
        .iter()
        .rev()
        .find(|message| message.info.role == Role::Assistant)
        .and_then(|message| message.info.error.clone())
        .or(turn.error);
    let end = match (stop, recorded_error) {
        (Some(reason), _) => TurnEnd::Stopped(reason),
        (None, Some(error)) if error.is_aborted() => TurnEnd::Aborted,
        (None, Some(error)) => TurnEnd::Failed(error),
        (None, None) => TurnEnd::Completed,
    };
    Ok(TurnOutcome {
        end,
        messages,
        permissions: turn.permissions,
        elapsed: started.elapsed(),
    })
}

/// Follows the turn's events until it is over (`None`) or a limit trips (`Some`).
async fn follow<H: TurnHandler>(
    client: &OpenCodeClient,
    events: &mut EventStream,
    handler: &mut H,
    policy: &TurnPolicy,
    turn: &mut Turn<'_>,
    started: Instant,
) -> Result<Option<StopReason>, TurnError> {
    let mut last_activity = Instant::now();
    let deadline = started + policy.turn_timeout;
    loop {
        // Checked here as well: a timeout only fires when no event is ready, and a model whose
        // stream is cut keeps events coming.
        if Instant::now() >= deadline {
            return Ok(Some(StopReason::DeadlineExceeded {
                after: policy.turn_timeout,
            }));
        }
        let wake = (last_activity + policy.inactivity_timeout).min(deadline);
        let event = match tokio::time::timeout_at(wake, events.next()).await {
            Err(_) if Instant::now() >= deadline => {
                return Ok(Some(StopReason::DeadlineExceeded {
                    after: policy.turn_timeout,
                }));
            }
            Err(_) => {
                return Ok(Some(StopReason::Inactive {
                    after: policy.inactivity_timeout,
                }));
            }
            Ok(Some(event)) => event?,
            Ok(None) => return Err(TurnError::EventStreamEnded),
        };
        if event.session_id() != Some(turn.session_id) {
            continue;
        }
        last_activity = Instant::now();
        handler.on_event(&event);
        match turn.observe(&event, policy) {
            Observed::Continue => {}
            Observed::Over => return Ok(None),
            Observed::Stop(reason) => return Ok(Some(reason)),
            Observed::Permission(request) => {
                let reply = handler.on_permission(&request).await;
                match client.reply_permission(&request.id, &reply).await {
                    Ok(()) => {}
                    // Already answered elsewhere, or the turn moved on: nothing to do.
                    Err(error) if error.is_not_found() => {
                        tracing::debug!(request = %request.id, "permission request is gone")
                    }
                    Err(error) => return Err(error.into()),
                }
                turn.permissions.push(PermissionDecision { request, reply });
                // The wait for a decision is not the session's silence.
                last_activity = Instant::now();
            }
        }
    }
}

/// After an abort: waits until the session is idle and the aborted step is written, or failing
/// that, asks for the session's status.
async fn settle_after_abort<H: TurnHandler>(
    client: &OpenCodeClient,
    events: &mut EventStream,
    handler: &mut H,
    policy: &TurnPolicy,
    turn: &mut Turn<'_>,
    reason: &StopReason,
) -> Result<(), TurnError> {
    let settled = async {
        while let Some(Ok(event)) = events.next().await {
            if event.session_id() != Some(turn.session_id) {
                continue;
            }
            handler.on_event(&event);
            // Limits no longer matter, and nothing can ask for permission once aborted.
            if let Observed::Over = turn.observe(&event, policy) {
                return true;
            }
        }
        false
    };
    if tokio::time::timeout(policy.abort_timeout, settled)
        .await
        .unwrap_or(false)
    {
        return Ok(());
    }
    // The stream may have missed it; the status map leaves idle sessions out.
    if !client
        .session_statuses()
        .await?
        .contains_key(turn.session_id)
    {
        return Ok(());
    }
    Err(TurnError::AbortNotConfirmed {
        reason: reason.clone(),
        after: policy.abort_timeout,
    })
}

/// What the driver knows about the running turn.
struct Turn<'a> {
    session_id: &'a str,
    /// The newest message id before the prompt.
    before: Option<String>,
    busy: bool,
    user_message: Option<String>,
    /// The driver has aborted the turn.
    aborted: bool,
    /// The session went idle after the turn started.
    idle: bool,
    /// Assistant message ids of the turn, in order of appearance.
    steps: Vec<String>,
    /// Steps not completed yet.
    open_steps: HashSet<String>,
    truncated: HashSet<String>,
    permissions: Vec<PermissionDecision>,
    error: Option<MessageError>,
}

enum Observed {
    Continue,
    /// Idle, with every step of the turn written.
    Over,
    Stop(StopReason),
    Permission(PermissionRequest),
}

impl<'a> Turn<'a> {
    fn new(session_id: &'a str, before: Option<String>) -> Self {
        Self {
            session_id,
            before,
            busy: false,
            user_message: None,
            aborted: false,
            idle: false,
            steps: Vec::new(),
            open_steps: HashSet::new(),
            truncated: HashSet::new(),
            permissions: Vec::new(),
            error: None,
        }
    }

    fn is_after_start(&self, message_id: &str) -> bool {
        self.before
            .as_deref()
            .is_none_or(|before| message_id > before)
    }

    fn observe(&mut self, event: &Event, policy: &TurnPolicy) -> Observed {
        let observed = self.apply(event, policy);
        // An abort announces idle before it writes the aborted step (with its error and its
        // tool parts' final states), and sends idle again after: wait for the step as well.
        if self.idle && self.open_steps.is_empty() {
            return Observed::Over;
        }
        match observed {
            Observed::Stop(_) | Observed::Permission(_) if self.aborted => Observed::Continue,
            observed => observed,
        }
    }

    fn apply(&mut self, event: &Event, policy: &TurnPolicy) -> Observed {
        match event {
            Event::SessionStatus { status, .. } => match status {
                SessionStatus::Busy => {
                    self.busy = true;
                    self.idle = false;
                }
                SessionStatus::Idle => self.went_idle(),
                SessionStatus::Retry {
                    attempt, message, ..
                } => {
                    self.busy = true;
                    if *attempt > policy.max_model_retries {
                        return Observed::Stop(StopReason::ModelRetrying {
                            attempt: *attempt,
                            message: message.clone(),
                        });
                    }
                }
                SessionStatus::Unknown => {}
            },
            Event::SessionIdle { .. } => self.went_idle(),
            Event::SessionError {
                error: Some(error), ..
            } => self.error = Some(error.clone()),
            Event::MessageUpdated { info, .. } if self.is_after_start(&info.id) => {
                match info.role {
                    Role::User => {
                        self.user_message.get_or_insert_with(|| info.id.clone());
                    }
                    Role::Assistant => return self.step_updated(info, policy),
                    Role::Unknown => {}
                }
            }
            Event::PermissionAsked(request) if request.session_id == self.session_id => {
                return Observed::Permission(request.clone());
            }
            _ => {}
        }
        Observed::Continue
    }

    fn step_updated(&mut self, info: &MessageInfo, policy: &TurnPolicy) -> Observed {
        if !info.is_completed() {
            self.open_steps.insert(info.id.clone());
        }
        if !self.steps.contains(&info.id) {
            self.steps.push(info.id.clone());
            if self.steps.len() > policy.max_steps {
                return Observed::Stop(StopReason::TooManySteps {
                    steps: self.steps.len(),
                });
            }
        }
        if !info.is_completed() {
            return Observed::Continue;
        }
        self.open_steps.remove(&info.id);
        // A stream that ends without a finish reason is saved as `unknown`, and OpenCode calls
        // the model again straight away.
        if info.error.is_none() && info.finish.as_deref() == Some("unknown") {
            self.truncated.insert(info.id.clone());
            if self.truncated.len() >= policy.max_truncated_steps {
                return Observed::Stop(StopReason::StreamTruncated {
                    steps: self.truncated.len(),
                });
            }
        }
        Observed::Continue
    }

    /// Idle ends the turn only once the turn has started: idle events of an earlier turn (an
    /// abort sends two pairs) can arrive after the prompt.
    fn went_idle(&mut self) {
        if self.aborted || (self.busy && self.user_message.is_some()) || self.error.is_some() {
            self.idle = true;
        }
    }
}

async fn wait_connected(events: &mut EventStream, timeout: Duration) -> Result<(), TurnError> {
    let connected = async {
        while let Some(event) = events.next().await {
            if let Event::ServerConnected = event? {
                return Ok(());
            }
        }
        Err(TurnError::EventStreamEnded)
    };
    tokio::time::timeout(timeout, connected)
        .await
        .map_err(|_| TurnError::Client(Error::EventStreamStalled(timeout)))?
}

async fn abort_quietly(client: &OpenCodeClient, session_id: &str) {
    if let Err(error) = client.abort(session_id).await {
        tracing::warn!(%error, session = %session_id, "could not abort the turn");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn event(event_type: &str, properties: Value) -> Event {
        Event::from_json(&json!({ "type": event_type, "properties": properties }).to_string())
            .unwrap()
    }

    fn status(kind: Value) -> Event {
        event(
            "session.status",
            json!({ "sessionID": "ses_1", "status": kind }),
        )
    }

    fn message(id: &str, role: &str, completed: bool, finish: Option<&str>) -> Event {
        let mut info =
            json!({ "id": id, "sessionID": "ses_1", "role": role, "time": { "created": 1 } });
        if completed {
            info["time"]["completed"] = json!(2);
        }
        if let Some(finish) = finish {
            info["finish"] = json!(finish);
        }
        event(
            "message.updated",
            json!({ "sessionID": "ses_1", "info": info }),
        )
    }

    fn idle() -> Event {
        event("session.idle", json!({ "sessionID": "ses_1" }))
    }

    fn feed(turn: &mut Turn<'_>, events: &[Event]) -> Vec<&'static str> {
        let policy = TurnPolicy::default();
        events
            .iter()
            .map(|event| match turn.observe(event, &policy) {
                Observed::Continue => "continue",
                Observed::Over => "over",
                Observed::Stop(_) => "stop",
                Observed::Permission(_) => "permission",
            })
            .collect()
    }

    #[test]
    fn idle_before_the_turn_started_is_ignored_and_steps_must_be_written() {
        let mut turn = Turn::new("ses_1", Some("msg_2".to_owned()));
        let seen = feed(
            &mut turn,
            &[
                // Left over from the turn before: an older message, and its idle.
                message("msg_1", "user", false, None),
                idle(),
                message("msg_3", "user", false, None),
                status(json!({ "type": "busy" })),
                message("msg_4", "assistant", false, None),
                // An abort announces idle before it writes the step.
                idle(),
                message("msg_4", "assistant", true, None),
            ],
        );
        assert_eq!(
            seen,
            [
                "continue", "continue", "continue", "continue", "continue", "continue", "over"
            ]
        );
        assert_eq!(turn.user_message.as_deref(), Some("msg_3"));
        assert_eq!(turn.steps, ["msg_4"]);
    }

    #[test]
    fn retries_and_truncated_steps_trip_their_limits() {
        let policy = TurnPolicy {
            max_model_retries: 1,
            max_truncated_steps: 2,
            ..TurnPolicy::default()
        };
        let mut turn = Turn::new("ses_1", None);
        let retry = |attempt: u32| {
            status(json!({ "type": "retry", "attempt": attempt, "message": "boom", "next": 0 }))
        };
        assert!(matches!(
            turn.observe(&retry(1), &policy),
            Observed::Continue
        ));
        assert!(matches!(
            turn.observe(&retry(2), &policy),
            Observed::Stop(StopReason::ModelRetrying { attempt: 2, .. })
        ));

        let mut turn = Turn::new("ses_1", None);
        // The same message repeating does not count twice.
        for _ in 0..3 {
            let observed = turn.observe(
                &message("msg_1", "assistant", true, Some("unknown")),
                &policy,
            );
            assert!(matches!(observed, Observed::Continue));
        }
        assert!(matches!(
            turn.observe(&message("msg_2", "assistant", true, Some("stop")), &policy),
            Observed::Continue
        ));
        assert!(matches!(
            turn.observe(
                &message("msg_3", "assistant", true, Some("unknown")),
                &policy
            ),
            Observed::Stop(StopReason::StreamTruncated { steps: 2 })
        ));
    }
}
