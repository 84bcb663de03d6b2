//! A typed client for the OpenCode server (`opencode serve`), which the agent runner drives.
//!
//! - [`OpenCodeServer`] starts the pinned binary ([`opencode_binary`]) as a child process with an
//!   isolated HOME, the config in `OPENCODE_CONFIG_CONTENT` ([`OpenCodeConfig`]), and no
//!   outbound calls of its own; it waits for readiness and stops the process group.
//! - [`OpenCodeClient`] is the HTTP client (TCP or a unix socket, see [`Transport`]) for
//!   sessions, `prompt_async`, history, permissions, abort, and the `/event` SSE stream as typed
//!   [`Event`]s. Every request has the client's own timeout.
//! - [`run_turn`] drives one prompt to its end: answers permission requests through a
//!   [`TurnHandler`], stops turns that OpenCode would let run forever (a hung, failing or cut
//!   model stream), and returns the turn's messages and tool calls in order.
//!
//! Written against OpenCode [`OPENCODE_VERSION`], as observed in
//! `shared/reference/opencode-server.md`.

mod binary;
mod client;
mod config;
mod error;
mod events;
mod server;
mod turn;
mod types;

pub use binary::{OPENCODE_BIN_ENV, OPENCODE_VERSION, install_prefix, opencode_binary};
pub use client::{BasicAuth, ClientConfig, OpenCodeClient, Transport};
pub use config::{OpenCodeConfig, ProviderConfig};
pub use error::Error;
pub use events::{Event, EventStream};
pub use server::{OpenCodeServer, ServerConfig};
pub use turn::{
    PermissionDecision, StopReason, TurnEnd, TurnError, TurnHandler, TurnOutcome, TurnPolicy,
    run_turn,
};
pub use types::{
    Agent, CreateSession, Health, MessageError, MessageInfo, MessageTime, MessageWithParts,
    ModelRef, Part, PartRef, PatchPart, PermissionAction, PermissionReply, PermissionRequest,
    PermissionRule, PermissionTool, Prompt, PromptPart, Role, Session, SessionStatus, SessionTime,
    StepFinishPart, TextPart, Tokens, ToolPart, ToolState, ToolTime,
};
