//! The server and its script: how requests are answered, recorded and served.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;

/// The model id the fake reports in `/v1/models` and in its answers when a request names none.
pub const SCRIPTED_MODEL_ID: &str = "scripted";

/// The title the default rule answers OpenCode's title-generation requests with.
pub const SCRIPTED_TITLE: &str = "Scripted title";

/// One answer of the fake model.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Answer with this text (streamed one word per chunk), `finish_reason: "stop"`.
    Text(String),
    /// Call these tools (arguments streamed in two pieces each), `finish_reason: "tool_calls"`.
    ToolCalls(Vec<ToolCall>),
    /// Answer with this HTTP status and an OpenAI-style error body carrying `message`.
    Fail { status: u16, message: String },
    /// Start answering `text`, then end the response after `after_chunks` chunks, cleanly as
    /// far as HTTP goes but with no `finish_reason` and no `[DONE]`: a stream cut short
    /// upstream. OpenCode saves the partial answer and calls the model again at once, forever.
    Cut { text: String, after_chunks: usize },
    /// Start answering `text`, then drop the connection after `after_chunks` chunks, leaving
    /// the body unterminated. OpenCode treats it as a failed call and retries with backoff.
    Reset { text: String, after_chunks: usize },
    /// Accept the request and never answer it (until the server is dropped).
    Hang,
}

impl Step {
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text(text.into())
    }

    /// One tool call; `arguments` is the JSON object the model passes.
    pub fn tool(name: impl Into<String>, arguments: Value) -> Self {
        Self::ToolCalls(vec![ToolCall::new(name, arguments)])
    }

    pub fn fail(status: u16, message: impl Into<String>) -> Self {
        Self::Fail {
            status,
            message: message.into(),
        }
    }

    pub fn cut(text: impl Into<String>, after_chunks: usize) -> Self {
        Self::Cut {
            text: text.into(),
            after_chunks,
        }
    }

    pub fn reset(text: impl Into<String>, after_chunks: usize) -> Self {
        Self::Reset {
            text: text.into(),
            after_chunks,
        }
    }
}

/// A tool call the fake model makes.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

impl ToolCall {
    pub fn new(name: impl Into<String>, arguments: Value) -> Self {
        Self {
            name: name.into(),
            arguments,
        }
    }
}

type Predicate = Box<dyn Fn(&RecordedRequest) -> bool + Send + Sync>;
type Responder = Box<dyn Fn(&RecordedRequest) -> Step + Send + Sync>;

struct Rule {
    name: String,
    matches: Predicate,
    respond: Responder,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// How the fake answers: rules first (in the order added), then the next step, then the
/// fallback. Without a fallback, a request that finds the steps used up is answered with a text
/// saying so and recorded as [`Answer::Unscripted`].
#[derive(Debug)]
pub struct Script {
    rules: Vec<Rule>,
    steps: VecDeque<Step>,
    fallback: Option<Step>,
}

impl Default for Script {
    fn default() -> Self {
        Self::new()
    }
}

impl Script {
    /// An empty script with the title rule (see [`Script::without_title_rule`]).
    pub fn new() -> Self {
        Self {
            rules: Vec::new(),
            steps: VecDeque::new(),
            fallback: None,
        }
        .on(
            "title",
            RecordedRequest::is_title_request,
            Step::text(SCRIPTED_TITLE),
        )
    }

    /// An empty script without any rule, so title requests consume steps like any other.
    pub fn without_title_rule() -> Self {
        Self {
            rules: Vec::new(),
            steps: VecDeque::new(),
            fallback: None,
        }
    }

    /// Answers the next request that no rule matches with `step`.
    pub fn then(mut self, step: Step) -> Self {
        self.steps.push_back(step);
        self
    }

    /// Answers every request after the steps are used up with `step` (for example a stream that
    /// is cut every time).
    pub fn then_always(mut self, step: Step) -> Self {
        self.fallback = Some(step);
        self
    }

    /// Answers every request `matches` accepts with `step`, without consuming a step.
    pub fn on(
        self,
        name: impl Into<String>,
        matches: impl Fn(&RecordedRequest) -> bool + Send + Sync + 'static,
        step: Step,
    ) -> Self {
        self.on_with(name, matches, move |_| step.clone())
    }

    /// Answers every request `matches` accepts with what `respond` makes of it (for an answer
    /// that quotes the request), without consuming a step. `respond` runs while the script is
    /// locked, so it should be quick.
    pub fn on_with(
        mut self,
        name: impl Into<String>,
        matches: impl Fn(&RecordedRequest) -> bool + Send + Sync + 'static,
        respond: impl Fn(&RecordedRequest) -> Step + Send + Sync + 'static,
    ) -> Self {
        self.rules.push(Rule {
            name: name.into(),
            matches: Box::new(matches),
            respond: Box::new(respond),
        });
        self
    }

    pub(crate) fn answer(&mut self, request: &RecordedRequest) -> (Answer, Step) {
        if let Some(rule) = self.rules.iter().find(|rule| (rule.matches)(request)) {
            return (Answer::Rule(rule.name.clone()), (rule.respond)(request));
        }
        if let Some(step) = self.steps.pop_front() {
            return (Answer::Step, step);
        }
        match &self.fallback {
            Some(step) => (Answer::Fallback, step.clone()),
            None => (
                Answer::Unscripted,
                Step::text("The scripted model has no step left for this request."),
            ),
        }
    }
}

/// Which part of the script answered a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The rule with this name.
    Rule(String),
    /// The next step.
    Step,
    /// The `then_always` step.
    Fallback,
    /// Nothing: the steps were used up and there is no fallback.
    Unscripted,
    /// Not a chat-completions request (for example `/v1/models`).
    NotChat,
}

/// A request the fake received, in arrival order.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// 0 for the first request the server received.
    pub index: usize,
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    /// The JSON body (`null` without a body, `{"_raw": "..."}` when it was not JSON).
    pub body: Value,
    pub answer: Answer,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn is_streaming(&self) -> bool {
        self.body["stream"].as_bool().unwrap_or(false)
    }

    pub fn messages(&self) -> &[Value] {
        self.body["messages"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The text of every system message, joined by newlines.
    pub fn system_text(&self) -> String {
        self.texts_of("system").join("\n")
    }

    /// The text of the last user message (its text parts joined).
    pub fn last_user_text(&self) -> String {
        self.texts_of("user").pop().unwrap_or_default()
    }

    /// The names of the tools the request offers.
    pub fn tool_names(&self) -> Vec<String> {
        self.body["tools"]
            .as_array()
            .map(|tools| {
                tools
                    .iter()
                    .filter_map(|tool| tool["function"]["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The contents of the `tool` messages (tool results sent back to the model), in order.
    pub fn tool_results(&self) -> Vec<String> {
        self.texts_of("tool")
    }

    /// OpenCode's session-title request: no tools, and a system prompt of the title generator.
    pub fn is_title_request(&self) -> bool {
        self.tool_names().is_empty() && self.system_text().contains("title generator")
    }

    /// What the person asked in the last user message: its text parts without the
    /// `<system-reminder>` parts OpenCode appends (plan mode, a switch back to build), joined by
    /// newlines and trimmed. All of its text when it has nothing but reminders.
    pub fn last_user_request(&self) -> String {
        let Some(message) = self.last_user_message() else {
            return String::new();
        };
        let parts = text_parts(&message["content"]);
        let asked: Vec<&str> = parts
            .iter()
            .copied()
            .filter(|text| !is_system_reminder(text))
            .collect();
        if asked.is_empty() {
            parts.concat().trim().to_owned()
        } else {
            asked.join("\n").trim().to_owned()
        }
    }

    /// A request of OpenCode's plan agent: its last user message carries the plan-mode system
    /// reminder (OpenCode 1.18 adds it to the newest user message on every call of a plan turn
    /// and does not keep it in the history, so an earlier plan turn does not count).
    pub fn is_plan_request(&self) -> bool {
        self.last_user_message().is_some_and(|message| {
            text_parts(&message["content"]).into_iter().any(|text| {
                is_system_reminder(text)
                    && PLAN_REMINDER_MARKERS
                        .iter()
                        .any(|marker| text.contains(marker))
            })
        })
    }

    /// The messages after the last user message: the agent's steps in the current turn (all
    /// messages when there is no user message).
    pub fn messages_since_last_user(&self) -> &[Value] {
        let messages = self.messages();
        match messages
            .iter()
            .rposition(|message| message["role"] == "user")
        {
            Some(last) => &messages[last + 1..],
            None => messages,
        }
    }

    /// The contents of the tool results after the last user message, in order.
    pub fn tool_results_since_last_user(&self) -> Vec<String> {
        self.messages_since_last_user()
            .iter()
            .filter(|message| message["role"] == "tool")
            .map(|message| content_text(&message["content"]))
            .collect()
    }

    /// When the last message is a tool result: the name of the tool that produced it, found
    /// through the assistant tool call it answers (`tool` messages carry only the call id).
    pub fn last_tool_name(&self) -> Option<String> {
        let (last, earlier) = self.messages().split_last()?;
        if last["role"] != "tool" {
            return None;
        }
        let call_id = last["tool_call_id"].as_str()?;
        earlier
            .iter()
            .rev()
            .filter_map(|message| message["tool_calls"].as_array())
            .flatten()
            .find(|call| call["id"] == call_id)
            .and_then(|call| call["function"]["name"].as_str())
            .map(str::to_owned)
    }

    fn last_user_message(&self) -> Option<&Value> {
        self.messages()
            .iter()
            .rev()
            .find(|message| message["role"] == "user")
    }

    fn texts_of(&self, role: &str) -> Vec<String> {
        self.messages()
            .iter()
            .filter(|message| message["role"] == role)
            .map(|message| content_text(&message["content"]))
            .collect()
    }
}

/// What marks OpenCode 1.18's plan-mode reminders: the classic one ("CRITICAL: Plan mode
/// ACTIVE - you are in READ-ONLY phase") and the experimental plan-file one ("Plan mode is
/// active."). The reminder of a switch back to build mentions neither.
const PLAN_REMINDER_MARKERS: [&str; 2] = ["Plan mode ACTIVE", "Plan mode is active"];

/// A chat-completions `content`: a string, or an array of parts whose text parts are joined.
fn content_text(content: &Value) -> String {
    text_parts(content).concat()
}

/// The text parts of a chat-completions `content` (a string is one part).
fn text_parts(content: &Value) -> Vec<&str> {
    match content {
        Value::String(text) => vec![text.as_str()],
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part["text"].as_str())
            .collect(),
        _ => Vec::new(),
    }
}

/// A text part OpenCode added for the model rather than the person typed.
fn is_system_reminder(text: &str) -> bool {
    text.trim_start().starts_with("<system-reminder>")
}

/// The running fake. [`ModelServer::start`] puts it on a free port of `127.0.0.1` (tests),
/// [`ModelServer::start_on`] on a chosen address (a product's demo model).
///
/// Stopping: [`ModelServer::shutdown`] stops accepting, releases hung requests, lets answers in
/// flight finish and waits for the server to end. Dropping it stops it at once: hung requests
/// are released and the serving task is aborted, cutting any answer still streaming.
#[derive(Debug)]
pub struct ModelServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    recorded: watch::Receiver<usize>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    script: Mutex<Script>,
    requests: Mutex<Vec<RecordedRequest>>,
    recorded: watch::Sender<usize>,
    shutdown: watch::Receiver<bool>,
}

impl ModelServer {
    /// Starts the fake on a free port of 127.0.0.1 with `script`.
    pub async fn start(script: Script) -> Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), script).await
    }

    /// Starts the fake on `addr` with `script` (port 0 picks a free port; [`Self::addr`] says
    /// which).
    pub async fn start_on(addr: SocketAddr, script: Script) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the scripted model server to {addr}"))?;
        let addr = listener
            .local_addr()
            .context("read the scripted model server's address")?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (recorded_tx, recorded) = watch::channel(0);
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            requests: Mutex::new(Vec::new()),
            recorded: recorded_tx,
            shutdown: shutdown_rx.clone(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .with_state(shared.clone());
        let mut stop = shutdown_rx;
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            });
            if let Err(error) = serve.await {
                tracing::warn!(%error, "scripted model server stopped");
            }
        });
        Ok(Self {
            addr,
            shared,
            recorded,
            shutdown,
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL an OpenAI-compatible client is configured with: `http://ADDR:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops the server gracefully: no new connections, hung requests released, answers in
    /// flight finished; returns when it has stopped.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Err(error) = (&mut self.task).await
            && !error.is_cancelled()
        {
            tracing::warn!(%error, "scripted model server task failed");
        }
    }

    /// Appends steps to the script, for a test that scripts one turn at a time.
    pub fn push(&self, steps: impl IntoIterator<Item = Step>) {
        lock(&self.shared.script).steps.extend(steps);
    }

    /// Steps not consumed yet.
    pub fn steps_left(&self) -> usize {
        lock(&self.shared.script).steps.len()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// The chat requests answered by steps or the fallback (not by a rule), in arrival order.
    pub fn scripted_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|request| matches!(request.answer, Answer::Step | Answer::Fallback))
            .collect()
    }

    /// Waits until at least `count` requests have arrived (any kind) and returns them all.
    pub async fn wait_for_requests(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>> {
        let mut recorded = self.recorded.clone();
        tokio::time::timeout(timeout, recorded.wait_for(|seen| *seen >= count))
            .await
            .with_context(|| {
                format!(
                    "the scripted model saw {} requests within {timeout:?}, expected {count}",
                    *self.recorded.borrow()
                )
            })?
            .context("the scripted model server is gone")?;
        Ok(self.requests())
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        // Hung requests wait for this signal; graceful shutdown would wait for them otherwise.
        let _ = self.shutdown.send(true);
        self.task.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// Records a chat request and picks its answer, atomically, so answers follow arrival order.
    fn answer(&self, mut request: RecordedRequest) -> (usize, Step) {
        let mut script = lock(&self.script);
        let (answer, step) = script.answer(&request);
        request.answer = answer;
        (self.record(request), step)
    }

    /// Records a request; returns its index.
    fn record(&self, mut request: RecordedRequest) -> usize {
        let index = {
            let mut requests = lock(&self.requests);
            request.index = requests.len();
            requests.push(request);
            requests.len() - 1
        };
        self.recorded.send_modify(|seen| *seen = index + 1);
        index
    }
}

fn recorded(method: &str, path: &str, headers: &HeaderMap, body: &[u8]) -> RecordedRequest {
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .unwrap_or_else(|_| json!({ "_raw": String::from_utf8_lossy(body) }))
    };
    RecordedRequest {
        index: 0,
        method: method.to_owned(),
        path: path.to_owned(),
        headers: headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        answer: Answer::Step,
    }
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let mut request = recorded("GET", "/v1/models", &headers, &[]);
    request.answer = Answer::NotChat;
    shared.record(request);
    axum::Json(json!({
        "object": "list",
        "data": [{ "id": SCRIPTED_MODEL_ID, "object": "model", "owned_by": "canopy" }],
    }))
    .into_response()
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = recorded("POST", "/v1/chat/completions", &headers, &body);
    let stream = request.is_streaming();
    let model = request.body["model"]
        .as_str()
        .unwrap_or(SCRIPTED_MODEL_ID)
        .to_owned();
    let (index, step) = shared.answer(request);
    let reply = Reply {
        id: format!("chatcmpl-scripted-{index}"),
        model,
        call_prefix: format!("call_{index}"),
    };
    match step {
        Step::Fail { status, message } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = json!({ "error": { "message": message, "type": "server_error" } });
            (status, axum::Json(body)).into_response()
        }
        Step::Hang => {
            let mut stop = shared.shutdown.clone();
            let _ = stop.wait_for(|stopped| *stopped).await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        step if stream => reply.streamed(step),
        step => reply.whole(step),
    }
}

/// Builds the answer to one request.
struct Reply {
    id: String,
    model: String,
    call_prefix: String,
}

fn usage() -> Value {
    json!({ "prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110 })
}

impl Reply {
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": now_secs(),
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }],
        })
    }

    /// The SSE chunks of a complete answer, without the usage chunk and `[DONE]`.
    fn chunks(&self, step: &Step) -> Vec<Value> {
        let mut chunks = vec![self.chunk(json!({ "role": "assistant", "content": "" }), None)];
        match step {
            Step::Text(text) | Step::Cut { text, .. } | Step::Reset { text, .. } => {
                for (i, word) in text.split(' ').enumerate() {
                    let piece = if i == 0 {
                        word.to_owned()
                    } else {
                        format!(" {word}")
                    };
                    chunks.push(self.chunk(json!({ "content": piece }), None));
                }
                chunks.push(self.chunk(json!({}), Some("stop")));
            }
            Step::ToolCalls(calls) => {
                for (i, call) in calls.iter().enumerate() {
                    let arguments = call.arguments.to_string();
                    // Split on a char boundary: clients must join argument pieces themselves.
                    let mut half = arguments.len() / 2;
                    while !arguments.is_char_boundary(half) {
                        half -= 1;
                    }
                    chunks.push(self.chunk(
                        json!({ "tool_calls": [{
                            "index": i,
                            "id": format!("{}_{i}", self.call_prefix),
                            "type": "function",
                            "function": { "name": call.name, "arguments": "" },
                        }] }),
                        None,
                    ));
                    for piece in [&arguments[..half], &arguments[half..]] {
                        chunks.push(self.chunk(
                            json!({ "tool_calls": [{ "index": i, "function": { "arguments": piece } }] }),
                            None,
                        ));
                    }
                }
                chunks.push(self.chunk(json!({}), Some("tool_calls")));
            }
            Step::Fail { .. } | Step::Hang => {}
        }
        chunks
    }

    fn streamed(&self, step: Step) -> Response {
        let frame = |value: &Value| Bytes::from(format!("data: {value}\n\n"));
        let mut frames: Vec<Bytes> = self.chunks(&step).iter().map(frame).collect();
        let body = if let Step::Reset { after_chunks, .. } = step {
            frames.truncate(after_chunks);
            reset_body(frames)
        } else if let Step::Cut { after_chunks, .. } = step {
            frames.truncate(after_chunks);
            Body::from_stream(futures::stream::iter(
                frames.into_iter().map(Ok::<_, std::io::Error>),
            ))
        } else {
            let usage = json!({
                "id": self.id, "object": "chat.completion.chunk", "created": now_secs(),
                "model": self.model, "choices": [], "usage": usage(),
            });
            frames.push(frame(&usage));
            frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
            Body::from_stream(futures::stream::iter(
                frames.into_iter().map(Ok::<_, std::io::Error>),
            ))
        };
        (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response()
    }

    fn whole(&self, step: Step) -> Response {
        let (message, finish_reason) = match &step {
            Step::ToolCalls(calls) => {
                let calls: Vec<Value> = calls
                    .iter()
                    .enumerate()
                    .map(|(i, call)| {
                        json!({
                            "id": format!("{}_{i}", self.call_prefix),
                            "type": "function",
                            "function": { "name": call.name, "arguments": call.arguments.to_string() },
                        })
                    })
                    .collect();
                (
                    json!({ "role": "assistant", "content": null, "tool_calls": calls }),
                    "tool_calls",
                )
            }
            Step::Text(text) | Step::Cut { text, .. } | Step::Reset { text, .. } => {
                (json!({ "role": "assistant", "content": text }), "stop")
            }
            Step::Fail { .. } | Step::Hang => {
                (json!({ "role": "assistant", "content": "" }), "stop")
            }
        };
        let body = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": now_secs(),
            "model": self.model,
            "choices": [{ "index": 0, "message": message, "finish_reason": finish_reason }],
            "usage": usage(),
        })
        .to_string();
        // A whole answer has no chunks: cut it inside its JSON, so what arrives never parses.
        let start = || Bytes::from(body.clone()).slice(..16);
        match step {
            Step::Cut { .. } => {
                return ([(header::CONTENT_TYPE, "application/json")], start()).into_response();
            }
            Step::Reset { .. } => {
                return (
                    [(header::CONTENT_TYPE, "application/json")],
                    reset_body(vec![start()]),
                )
                    .into_response();
            }
            _ => {}
        }
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// A body that sends `frames`, then fails, which makes hyper drop the connection without
/// terminating the chunked body: what a client sees when the network or the provider dies.
fn reset_body(frames: Vec<Bytes>) -> Body {
    let sent = futures::stream::iter(frames.into_iter().map(Ok::<_, std::io::Error>));
    let cut = futures::stream::once(async {
        // Let the frames reach the client before the connection goes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "scripted connection reset",
        ))
    });
    Body::from_stream(sent.chain(cut))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(server: &ModelServer, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/chat/completions", server.base_url()))
            .json(&body)
            .send()
            .await
            .expect("send")
    }

    /// The `data:` payloads of an SSE body, in order.
    fn data_lines(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .map(str::to_owned)
            .collect()
    }

    fn chat(stream: bool, user: &str) -> Value {
        json!({
            "model": "scripted",
            "stream": stream,
            "messages": [{ "role": "system", "content": "You are a helper." }, { "role": "user", "content": user }],
            "tools": [{ "type": "function", "function": { "name": "bash", "parameters": {} } }],
        })
    }

    #[tokio::test]
    async fn streams_tool_calls_then_text_and_records_requests() {
        let script = Script::new()
            .then(Step::tool(
                "write",
                json!({ "filePath": "a.txt", "content": "é\n" }),
            ))
            .then(Step::text("all done"));
        let server = ModelServer::start(script).await.unwrap();

        let first = post(&server, chat(true, "go")).await;
        assert_eq!(first.headers()["content-type"], "text/event-stream");
        let data = data_lines(&first.text().await.unwrap());
        assert_eq!(data.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let arguments: String = chunks
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&arguments).unwrap(),
            json!({ "filePath": "a.txt", "content": "é\n" })
        );
        let name = chunks
            .iter()
            .find_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["name"].as_str());
        assert_eq!(name, Some("write"));
        let finishes: Vec<&str> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
            .collect();
        assert_eq!(finishes, ["tool_calls"]);
        assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], 110);

        let second = post(&server, chat(false, "again")).await;
        let body: Value = second.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "all done");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");

        let requests = server.requests();
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].last_user_text(), "go");
        assert_eq!(requests[1].tool_names(), ["bash"]);
        assert_eq!(server.steps_left(), 0);
    }

    #[tokio::test]
    async fn title_requests_do_not_consume_steps() {
        let server = ModelServer::start(Script::new().then(Step::text("real answer")))
            .await
            .unwrap();
        let title = json!({
            "model": "scripted", "stream": false,
            "messages": [
                { "role": "system", "content": "You are a title generator. You output ONLY a thread title." },
                { "role": "user", "content": "Generate a title for this conversation:\n" },
                { "role": "user", "content": "hello" },
            ],
        });
        let body: Value = post(&server, title).await.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], SCRIPTED_TITLE);
        let body: Value = post(&server, chat(false, "hi")).await.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "real answer");
        let answers: Vec<Answer> = server.requests().into_iter().map(|r| r.answer).collect();
        assert_eq!(answers, [Answer::Rule("title".into()), Answer::Step]);
        assert_eq!(server.scripted_requests().len(), 1);
    }

    /// Reads a body to its end: the bytes, and whether it ended in an error.
    async fn read_all(response: reqwest::Response) -> (String, bool) {
        let mut stream = response.bytes_stream();
        let mut received = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(bytes) => received.extend_from_slice(&bytes),
                Err(_) => return (String::from_utf8(received).unwrap(), true),
            }
        }
        (String::from_utf8(received).unwrap(), false)
    }

    #[tokio::test]
    async fn fails_cuts_resets_and_hangs_as_scripted() {
        let script = Script::new()
            .then(Step::fail(500, "scripted failure"))
            .then(Step::cut("one two three four", 2))
            .then(Step::reset("one two three four", 3))
            .then(Step::Hang);
        let server = ModelServer::start(script).await.unwrap();

        let failed = post(&server, chat(true, "a")).await;
        assert_eq!(failed.status(), 500);
        let body: Value = failed.json().await.unwrap();
        assert_eq!(body["error"]["message"], "scripted failure");

        let (cut, broken) = read_all(post(&server, chat(true, "b")).await).await;
        assert!(!broken, "a cut stream ends cleanly as far as http goes");
        let data = data_lines(&cut);
        assert_eq!(data.len(), 2, "role chunk and one word: {data:?}");
        assert!(!cut.contains("finish_reason\":\"") && !cut.contains("[DONE]"));

        let (reset, broken) = read_all(post(&server, chat(true, "c")).await).await;
        assert!(broken, "a reset body must not end cleanly");
        assert_eq!(data_lines(&reset).len(), 3);

        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let hung = client
            .post(format!("{}/chat/completions", server.base_url()))
            .json(&chat(true, "d"))
            .send()
            .await;
        assert!(hung.unwrap_err().is_timeout());
        let requests = server
            .wait_for_requests(4, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(requests[3].last_user_text(), "d");
    }

    #[tokio::test]
    async fn starts_on_a_chosen_address_and_shuts_down_releasing_hung_requests() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let chosen = free.local_addr().unwrap();
        drop(free);
        let server = ModelServer::start_on(chosen, Script::new().then(Step::Hang))
            .await
            .unwrap();
        assert_eq!(server.addr(), chosen);
        assert_eq!(server.base_url(), format!("http://{chosen}/v1"));

        let url = format!("{}/chat/completions", server.base_url());
        let hung = tokio::spawn({
            let url = url.clone();
            async move {
                reqwest::Client::new()
                    .post(url)
                    .json(&chat(true, "wait"))
                    .send()
                    .await
            }
        });
        server
            .wait_for_requests(1, Duration::from_secs(5))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.shutdown())
            .await
            .expect("shutdown waits for nothing but the released requests");
        let released = hung.await.unwrap().expect("the hung request is answered");
        assert_eq!(released.status(), 503);
        let after = reqwest::Client::new()
            .post(url)
            .json(&chat(true, "late"))
            .send()
            .await;
        assert!(after.unwrap_err().is_connect(), "nothing listens any more");
    }

    #[tokio::test]
    async fn fallback_repeats_and_unscripted_requests_are_marked() {
        let server = ModelServer::start(Script::new().then_always(Step::text("again")))
            .await
            .unwrap();
        for _ in 0..2 {
            let body: Value = post(&server, chat(false, "x")).await.json().await.unwrap();
            assert_eq!(body["choices"][0]["message"]["content"], "again");
        }
        let bare = ModelServer::start(Script::new()).await.unwrap();
        post(&bare, chat(false, "x")).await;
        assert_eq!(bare.requests()[0].answer, Answer::Unscripted);

        let models: Value = reqwest::get(format!("{}/models", bare.base_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(models["data"][0]["id"], SCRIPTED_MODEL_ID);
        assert_eq!(bare.requests()[1].answer, Answer::NotChat);
    }
}
