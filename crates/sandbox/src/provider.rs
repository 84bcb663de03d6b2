//! The port every sandbox implementation fills: start, exec, stop, status (and remove).
//!
//! The agent runner holds an `Arc<dyn SandboxProvider>`. [`crate::BubblewrapProvider`] is the
//! local implementation; remote ones (Daytona, E2B, Modal) fit the same trait later.

use std::path::PathBuf;
use std::time::Duration;

use canopy_opencode::{BasicAuth, ClientConfig};
use futures::future::BoxFuture;

use crate::Error;

/// What a sandbox is made from. One sandbox per Canopy session.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// A path component: 1 to 64 of `[A-Za-z0-9_-]` (the session id fits).
    pub id: String,
    /// The repository the workspace is cloned from on first use (a path or a URL git accepts).
    pub repository: String,
    /// The session's own branch, created in the workspace on first use.
    pub branch: String,
    /// The OpenCode provider id and model id prompts will name. The provider's base URL and key
    /// are the sandbox's business: OpenCode reaches its model through the host-side proxy.
    pub provider_id: String,
    pub model_id: String,
}

/// A running sandbox, as the runner needs it.
#[derive(Debug, Clone)]
pub struct SandboxInfo {
    pub id: String,
    /// The host uid (and gid) everything in the sandbox runs as: its own unprivileged uid as
    /// root; rootless, the invoking user's (uid 1000 inside its user namespace).
    pub uid: u32,
    /// A host-side unix socket, reachable only by root, that leads to `opencode serve` in the
    /// sandbox: give it to `canopy_opencode::ClientConfig::unix_socket`.
    pub opencode_socket: PathBuf,
    /// The directory requests name (`x-opencode-directory`): the workspace as the sandbox sees it.
    pub opencode_directory: PathBuf,
    /// OpenCode's API password, new at every start. Only the host has it: the agent's tools
    /// never see it, so they cannot answer their own permission requests.
    pub opencode_auth: BasicAuth,
    /// The workspace on the host (owned by `uid`; never run host tools on it as root).
    pub workspace: PathBuf,
    /// From the start request to a healthy OpenCode.
    pub startup: Duration,
}

impl SandboxInfo {
    /// How to reach this sandbox's OpenCode: its socket, its password, its directory.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::unix_socket(&self.opencode_socket)
            .with_auth(Some(self.opencode_auth.clone()))
            .with_directory(&self.opencode_directory)
    }
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxStatus {
    /// Nothing on disk or in memory for that id.
    Absent,
    /// The workspace and home exist; no process runs.
    Stopped,
    /// OpenCode is up (it was healthy when the sandbox started).
    Running { pid: u32 },
    /// The sandbox's processes ended without a stop request.
    Exited { status: String },
}

/// A command to run in a fresh sandbox process with the same view (workspace, home, uid,
/// limits, no network) as the session's OpenCode.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Run by `/bin/bash -c` in `/workspace`.
    pub script: String,
    /// Wall time, after which the command is killed.
    pub timeout: Duration,
}

impl ExecRequest {
    pub fn new(script: impl Into<String>) -> Self {
        Self {
            script: script.into(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// What an exec printed and how it ended.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// `None` when it was killed by a signal or the timeout.
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

/// A checkpoint of the whole working tree ([`SandboxProvider::commit`]).
#[derive(Debug, Clone)]
pub struct CommitRequest {
    /// Author and committer; no control characters, `<` or `>`, at most 256 bytes each.
    pub author_name: String,
    pub author_email: String,
    /// At most 64 KiB, not empty.
    pub message: String,
}

/// What [`SandboxProvider::commit`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The new commit, or HEAD when nothing changed.
    pub sha: String,
    /// The paths the commit changed (empty when nothing changed).
    pub files_changed: Vec<String>,
    /// False when nothing changed: `sha` is then HEAD.
    pub created: bool,
}

/// Where [`SandboxProvider::push`] sends the workspace's HEAD.
#[derive(Debug, Clone)]
pub struct PushRequest {
    /// The remote (its scheme must be allowed by the provider's clone config). Never a URL the
    /// workspace configures.
    pub remote_url: String,
    /// The branch created or updated there.
    pub branch: String,
    pub credentials: Option<GitCredentials>,
}

/// HTTP credentials for a push; `Debug` does not print the password.
#[derive(Clone, PartialEq, Eq)]
pub struct GitCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A place to run an agent.
pub trait SandboxProvider: Send + Sync + std::fmt::Debug {
    /// Starts (or resumes) the sandbox of `spec.id`: creates its workspace on first use and
    /// returns once OpenCode in it is healthy. Starting a running sandbox returns it as is.
    fn start(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxInfo, Error>>;
    /// Runs a command in the sandbox's view (it need not be running).
    fn exec<'a>(
        &'a self,
        id: &'a str,
        request: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecOutput, Error>>;
    /// Stops the sandbox's processes; the workspace and OpenCode's data stay for a resume.
    fn stop<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>>;
    fn status<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<SandboxStatus, Error>>;
    /// Stops the sandbox and deletes everything it had (on archive).
    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>>;
    /// Commits the whole working tree as a checkpoint. Runs in a fresh sandbox process (the
    /// exec view: the uid, no network), with hooks and fsmonitor off.
    fn commit<'a>(
        &'a self,
        id: &'a str,
        request: CommitRequest,
    ) -> BoxFuture<'a, Result<Commit, Error>>;
    /// Resets the working tree (tracked and untracked files) to a commit of the workspace.
    fn restore<'a>(&'a self, id: &'a str, commit_sha: &'a str) -> BoxFuture<'a, Result<(), Error>>;
    /// Pushes the workspace's HEAD to `branch` of `remote_url` with the given credentials,
    /// from the host, without running anything the workspace configures. Returns the pushed
    /// sha.
    fn push<'a>(
        &'a self,
        id: &'a str,
        request: PushRequest,
    ) -> BoxFuture<'a, Result<String, Error>>;
    /// What the sandbox's model calls used, where its model proxy counts them (to set its
    /// ceiling); `None` when the provider has no proxy or does not know the sandbox.
    fn model_usage<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Option<std::sync::Arc<crate::model_proxy::ModelUsage>>> {
        let _ = id;
        Box::pin(async { None })
    }
}
