//! The wire types of OpenCode's classic HTTP API, as far as Canopy reads and writes them.
//!
//! Reading is lenient: fields Canopy does not need are ignored, optional fields default, and
//! part, tool-state and status kinds this crate does not know decode to an `Unknown` variant
//! instead of failing, because OpenCode adds kinds between releases.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// `GET /global/health`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Health {
    pub healthy: bool,
    pub version: String,
}

/// A provider and model, as prompts and user messages name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    #[serde(rename = "providerID")]
    pub provider_id: String,
    #[serde(rename = "modelID")]
    pub model_id: String,
}

impl ModelRef {
    pub fn new(provider_id: impl Into<String>, model_id: impl Into<String>) -> Self {
        Self {
            provider_id: provider_id.into(),
            model_id: model_id.into(),
        }
    }
}

/// The agent a prompt runs as. `build` may edit; `plan` is read-only (OpenCode denies edits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agent {
    Build,
    Plan,
    /// Any other primary agent from `GET /agent` or the config.
    Named(String),
}

impl Agent {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Build => "build",
            Self::Plan => "plan",
            Self::Named(name) => name,
        }
    }
}

impl Serialize for Agent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// `allow`, `deny` or `ask`, in permission rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PermissionAction {
    Allow,
    Deny,
    Ask,
}

/// A session-level permission override (`permission` of `POST /session`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionRule {
    /// The permission name: a tool such as `bash`, or `edit` for the file-editing tools.
    pub permission: String,
    pub pattern: String,
    pub action: PermissionAction,
}

/// The body of `POST /session`. Every field is optional.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateSession {
    /// A title given here also stops OpenCode's title-generation model call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(rename = "parentID", skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permission: Option<Vec<PermissionRule>>,
    /// Stored with the session and returned by `GET /session/{id}`; never sent to the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// A session, as `POST /session` and `GET /session/{id}` return it.
#[derive(Debug, Clone, Deserialize)]
pub struct Session {
    pub id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub directory: String,
    #[serde(rename = "parentID", default)]
    pub parent_id: Option<String>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub permission: Option<Vec<PermissionRule>>,
    #[serde(default)]
    pub time: SessionTime,
}

/// Epoch milliseconds.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct SessionTime {
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub updated: i64,
}

/// The body of `POST /session/{id}/prompt_async`.
///
/// The model is not optional here: OpenCode stores the model of each user message and reuses it
/// for later prompts without one, so one bad model would stick to the session.
#[derive(Debug, Clone, Serialize)]
pub struct Prompt {
    pub parts: Vec<PromptPart>,
    pub agent: Agent,
    pub model: ModelRef,
    /// Appended to the end of OpenCode's own system prompt, for this turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

impl Prompt {
    /// A prompt of one text part.
    pub fn text(agent: Agent, model: ModelRef, text: impl Into<String>) -> Self {
        Self {
            parts: vec![PromptPart::text(text)],
            agent,
            model,
            system: None,
        }
    }

    pub fn with_system(mut self, system: impl Into<String>) -> Self {
        self.system = Some(system.into());
        self
    }
}

/// A part of a prompt.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PromptPart {
    Text {
        text: String,
        /// Stored on the part and echoed back in events; never sent to the model.
        #[serde(skip_serializing_if = "Option::is_none")]
        metadata: Option<Value>,
    },
}

impl PromptPart {
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text {
            text: text.into(),
            metadata: None,
        }
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    #[serde(other)]
    Unknown,
}

/// A message's `info`. User and assistant messages share this type; the assistant-only fields
/// are `None` on user messages.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageInfo {
    pub id: String,
    #[serde(rename = "sessionID")]
    pub session_id: String,
    pub role: Role,
    /// On assistant messages: the user message they answer.
    #[serde(rename = "parentID", default)]
    pub parent_id: Option<String>,
    #[serde(default)]
    pub agent: Option<String>,
    /// On user messages.
    #[serde(default)]
    pub model: Option<ModelRef>,
    #[serde(rename = "providerID", default)]
    pub provider_id: Option<String>,
    #[serde(rename = "modelID", default)]
    pub model_id: Option<String>,
    /// `tool-calls`, `stop`, `unknown` (the model's stream ended without a finish reason), ...
    /// It can be set before `time.completed`.
    #[serde(default)]
    pub finish: Option<String>,
    #[serde(default)]
    pub error: Option<MessageError>,
    #[serde(default)]
    pub time: MessageTime,
    #[serde(default)]
    pub tokens: Option<Tokens>,
    /// On user messages: the `system` text of the prompt.
    #[serde(default)]
    pub system: Option<String>,
}

impl MessageInfo {
    /// Whether OpenCode has finished writing this message.
    pub fn is_completed(&self) -> bool {
        self.time.completed.is_some()
    }
}

/// Epoch milliseconds.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct MessageTime {
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub completed: Option<i64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct Tokens {
    #[serde(default)]
    pub input: u64,
    #[serde(default)]
    pub output: u64,
    #[serde(default)]
    pub reasoning: u64,
}

/// An error OpenCode recorded on a message or reported in `session.error`, such as
/// `MessageAbortedError` or `APIError` (the model provider failed after OpenCode's retries).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessageError {
    pub name: String,
    #[serde(default)]
    pub data: Value,
}

impl MessageError {
    pub const ABORTED: &str = "MessageAbortedError";

    pub fn message(&self) -> Option<&str> {
        self.data["message"].as_str()
    }

    pub fn is_aborted(&self) -> bool {
        self.name == Self::ABORTED
    }
}

/// A message with its parts, as `GET /session/{id}/message` returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageWithParts {
    pub info: MessageInfo,
    #[serde(default)]
    pub parts: Vec<Part>,
}

impl MessageWithParts {
    /// The text of the message's text parts, joined.
    pub fn text(&self) -> String {
        self.parts
            .iter()
            .filter_map(|part| match part {
                Part::Text(text) => Some(text.text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("")
    }
}

/// A part of a message.
#[derive(Debug, Clone)]
pub enum Part {
    Text(TextPart),
    Reasoning(TextPart),
    Tool(ToolPart),
    StepStart(PartRef),
    StepFinish(StepFinishPart),
    /// Files changed by a step.
    Patch(PatchPart),
    /// A part kind this crate does not know (`file`, `agent`, `subtask`, ...), kept whole.
    Unknown {
        part_type: String,
        part: PartRef,
        raw: Value,
    },
}

impl Part {
    pub fn id(&self) -> &str {
        &self.part_ref().id
    }

    pub fn message_id(&self) -> &str {
        &self.part_ref().message_id
    }

    fn part_ref(&self) -> &PartRef {
        match self {
            Self::Text(part) | Self::Reasoning(part) => &part.part,
            Self::Tool(part) => &part.part,
            Self::StepStart(part) => part,
            Self::StepFinish(part) => &part.part,
            Self::Patch(part) => &part.part,
            Self::Unknown { part, .. } => part,
        }
    }
}

impl<'de> Deserialize<'de> for Part {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Value::deserialize(deserializer)?;
        let part_type = raw["type"].as_str().unwrap_or_default().to_owned();
        let part = match part_type.as_str() {
            "text" => Self::Text(from_value(raw)?),
            "reasoning" => Self::Reasoning(from_value(raw)?),
            "tool" => Self::Tool(from_value(raw)?),
            "step-start" => Self::StepStart(from_value(raw)?),
            "step-finish" => Self::StepFinish(from_value(raw)?),
            "patch" => Self::Patch(from_value(raw)?),
            _ => Self::Unknown {
                part: from_value(raw.clone())?,
                part_type,
                raw,
            },
        };
        Ok(part)
    }
}

fn from_value<T: DeserializeOwned, E: serde::de::Error>(value: Value) -> Result<T, E> {
    serde_json::from_value(value).map_err(E::custom)
}

/// The ids every part carries.
#[derive(Debug, Clone, Deserialize)]
pub struct PartRef {
    pub id: String,
    #[serde(rename = "sessionID")]
    pub session_id: String,
    #[serde(rename = "messageID")]
    pub message_id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextPart {
    #[serde(flatten)]
    pub part: PartRef,
    #[serde(default)]
    pub text: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StepFinishPart {
    #[serde(flatten)]
    pub part: PartRef,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub tokens: Option<Tokens>,
    /// What the step cost, in US dollars, as the provider's pricing says (0 when unknown).
    #[serde(default)]
    pub cost: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PatchPart {
    #[serde(flatten)]
    pub part: PartRef,
    #[serde(default)]
    pub files: Vec<String>,
}

/// A tool call of the model and what became of it.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolPart {
    #[serde(flatten)]
    pub part: PartRef,
    pub tool: String,
    #[serde(rename = "callID", default)]
    pub call_id: String,
    pub state: ToolState,
}

/// `pending` → `running` → `completed` or `error`. A tool waiting for a permission reply shows
/// as `running`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum ToolState {
    Pending {
        #[serde(default)]
        input: Value,
    },
    Running {
        #[serde(default)]
        input: Value,
        #[serde(default)]
        metadata: Option<Value>,
    },
    Completed {
        #[serde(default)]
        input: Value,
        #[serde(default)]
        output: String,
        #[serde(default)]
        title: Option<String>,
        #[serde(default)]
        metadata: Option<Value>,
        #[serde(default)]
        time: ToolTime,
    },
    Error {
        #[serde(default)]
        input: Value,
        #[serde(default)]
        error: String,
        #[serde(default)]
        time: ToolTime,
    },
    #[serde(other)]
    Unknown,
}

/// When a tool call started and ended, epoch milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct ToolTime {
    #[serde(default)]
    pub start: i64,
    #[serde(default)]
    pub end: Option<i64>,
}

impl ToolTime {
    /// How long the call ran (0 when unknown).
    pub fn duration_ms(&self) -> u64 {
        self.end
            .map(|end| u64::try_from(end - self.start).unwrap_or(0))
            .unwrap_or(0)
    }
}

impl ToolState {
    pub fn input(&self) -> Option<&Value> {
        match self {
            Self::Pending { input }
            | Self::Running { input, .. }
            | Self::Completed { input, .. }
            | Self::Error { input, .. } => Some(input),
            Self::Unknown => None,
        }
    }

    /// Whether the tool call is over (completed or failed).
    pub fn is_finished(&self) -> bool {
        matches!(self, Self::Completed { .. } | Self::Error { .. })
    }
}

/// What a session is doing, from `session.status` and `GET /session/status`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SessionStatus {
    Idle,
    Busy,
    /// OpenCode is waiting to call the model again after it failed (HTTP 5xx, 429, refused).
    Retry {
        attempt: u32,
        #[serde(default)]
        message: String,
        /// When the next attempt starts, epoch milliseconds.
        #[serde(default)]
        next: i64,
    },
    #[serde(other)]
    Unknown,
}

/// A tool call waiting for the user's decision (`permission.asked`, `GET /permission`).
#[derive(Debug, Clone, Deserialize)]
pub struct PermissionRequest {
    pub id: String,
    #[serde(rename = "sessionID")]
    pub session_id: String,
    /// The permission asked for: `bash`, `edit`, ...
    pub permission: String,
    /// What exactly would run: for bash, each sub-command.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// The glob patterns an `always` reply would approve (for every session of the server).
    #[serde(default)]
    pub always: Vec<String>,
    #[serde(default)]
    pub metadata: Value,
    #[serde(default)]
    pub tool: Option<PermissionTool>,
}

/// The tool call a permission request belongs to.
#[derive(Debug, Clone, Deserialize)]
pub struct PermissionTool {
    #[serde(rename = "messageID")]
    pub message_id: String,
    #[serde(rename = "callID")]
    pub call_id: String,
}

/// The answer to a permission request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PermissionReply {
    /// Run this call.
    Once,
    /// Run this call and approve its `always` patterns for the whole server process.
    Always,
    /// Refuse the call. Without a message OpenCode ends the turn; with one, the message goes to
    /// the model as the tool's result and the turn goes on.
    Reject { message: Option<String> },
}

impl PermissionReply {
    pub fn reject_with(message: impl Into<String>) -> Self {
        Self::Reject {
            message: Some(message.into()),
        }
    }
}

impl Serialize for PermissionReply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Body<'a> {
            reply: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            message: Option<&'a str>,
        }
        let body = match self {
            Self::Once => Body {
                reply: "once",
                message: None,
            },
            Self::Always => Body {
                reply: "always",
                message: None,
            },
            Self::Reject { message } => Body {
                reply: "reject",
                message: message.as_deref(),
            },
        };
        body.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for PermissionReply {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match String::deserialize(deserializer)?.as_str() {
            "once" => Ok(Self::Once),
            "always" => Ok(Self::Always),
            "reject" => Ok(Self::Reject { message: None }),
            other => Err(D::Error::custom(format!(
                "unknown permission reply {other}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parts_decode_by_type_and_keep_unknown_kinds() {
        let parts: Vec<Part> = serde_json::from_value(json!([
            { "id": "prt_1", "sessionID": "ses_1", "messageID": "msg_1", "type": "tool",
              "tool": "bash", "callID": "call_1",
              "state": { "status": "completed", "input": { "command": "ls" }, "output": "a\n",
                         "title": "ls", "metadata": { "exit": 0 }, "time": { "start": 1, "end": 2 } } },
            { "id": "prt_2", "sessionID": "ses_1", "messageID": "msg_1", "type": "tool",
              "tool": "write", "callID": "call_2", "state": { "status": "waiting-for-godot" } },
            { "id": "prt_3", "sessionID": "ses_1", "messageID": "msg_1", "type": "subtask",
              "prompt": "p" },
            { "id": "prt_4", "sessionID": "ses_1", "messageID": "msg_1", "type": "text", "text": "hi" },
        ]))
        .unwrap();
        let Part::Tool(bash) = &parts[0] else {
            panic!("not a tool part: {:?}", parts[0])
        };
        let ToolState::Completed { input, output, .. } = &bash.state else {
            panic!("not completed: {:?}", bash.state)
        };
        assert_eq!(input["command"], "ls");
        assert_eq!(output, "a\n");
        assert!(matches!(&parts[1], Part::Tool(t) if matches!(t.state, ToolState::Unknown)));
        assert!(matches!(&parts[2], Part::Unknown { part_type, .. } if part_type == "subtask"));
        assert_eq!(parts[3].id(), "prt_4");
    }

    #[test]
    fn permission_replies_serialize_as_opencode_expects() {
        let body = |reply: PermissionReply| serde_json::to_value(reply).unwrap();
        assert_eq!(body(PermissionReply::Once), json!({ "reply": "once" }));
        assert_eq!(
            body(PermissionReply::reject_with("no")),
            json!({ "reply": "reject", "message": "no" })
        );
        assert_eq!(
            body(PermissionReply::Reject { message: None }),
            json!({ "reply": "reject" })
        );
    }

    #[test]
    fn prompts_always_name_agent_and_model() {
        let prompt = Prompt::text(Agent::Plan, ModelRef::new("fake", "scripted"), "hi")
            .with_system("be brief");
        assert_eq!(
            serde_json::to_value(prompt).unwrap(),
            json!({
                "parts": [{ "type": "text", "text": "hi" }],
                "agent": "plan",
                "model": { "providerID": "fake", "modelID": "scripted" },
                "system": "be brief",
            })
        );
    }
}
