//! The one error type of the client and the process manager.

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong talking to, or starting, an OpenCode server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no opencode binary at {path} (run scripts/setup.sh, or set CANOPY_OPENCODE_BIN)")]
    BinaryNotFound { path: PathBuf },

    #[error("could not prepare {path} for opencode")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("could not start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("opencode exited before it was ready ({status}); last output: {output}")]
    ExitedEarly { status: String, output: String },

    #[error("opencode was not ready within {after:?}; last output: {output}")]
    StartupTimeout { after: Duration, output: String },

    #[error("opencode (pid {pid}) did not exit after sigkill")]
    StopTimeout { pid: u32 },

    #[error("{url} is not a base url: {reason}")]
    InvalidBaseUrl { url: String, reason: String },

    #[error("could not build the http client")]
    ClientBuild(#[source] reqwest::Error),

    #[error("{method} {path} failed")]
    Request {
        method: String,
        path: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("{method} {path} got no answer within {after:?}")]
    Timeout {
        method: String,
        path: String,
        after: Duration,
    },

    /// The server answered with an error status. `name` is OpenCode's error name when the body
    /// has one (`NotFoundError`, `BadRequest`, `UnknownError`, `PermissionNotFoundError`).
    #[error("{method} {path} answered {status}: {message}")]
    Status {
        method: String,
        path: String,
        status: u16,
        name: Option<String>,
        message: String,
    },

    #[error("could not decode the answer to {method} {path}")]
    Decode {
        method: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },

    /// The answer was larger than the client reads ([`crate::ClientConfig::max_body_bytes`]).
    #[error("{method} {path} answered with a body larger than {limit} bytes")]
    TooLarge {
        method: String,
        path: String,
        limit: usize,
    },

    #[error("the event stream broke: {0}")]
    EventStream(String),

    /// One event was larger than the client reads ([`crate::ClientConfig::max_event_bytes`]).
    #[error("the event stream sent an event larger than {limit} bytes")]
    EventTooLarge { limit: usize },

    #[error("the event stream sent nothing, not even a heartbeat, for {0:?}")]
    EventStreamStalled(Duration),
}

impl Error {
    /// Whether the server said the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Status { status: 404, .. })
    }
}
