//! The one error type of the crate.

use std::path::PathBuf;
use std::time::Duration;

/// Why a sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid sandbox id {id:?}: use 1 to 64 of [A-Za-z0-9_-]")]
    InvalidId { id: String },
    #[error("invalid branch name {branch:?}")]
    InvalidBranch { branch: String },
    #[error("no sandbox {id}")]
    NotFound { id: String },
    #[error("sandbox {id} is not running")]
    NotRunning { id: String },
    #[error("every sandbox uid in {first}..{end} is taken")]
    NoFreeUid { first: u32, end: u32 },
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("the sandbox exited during startup ({status}); its last output:\n{output}")]
    ExitedEarly { status: String, output: String },
    #[error("opencode in the sandbox was not healthy after {after:?}; last output:\n{output}")]
    StartupTimeout { after: Duration, output: String },
    #[error("refused to connect to {path}: {reason}")]
    UnsafeSocket { path: PathBuf, reason: String },
    #[error("connecting to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid egress host {host:?}: use a host name, not an address or a pattern")]
    InvalidEgressHost { host: String },
    #[error("repository {repository:?} uses the {scheme} scheme; allowed: {allowed:?}")]
    SchemeNotAllowed {
        repository: String,
        scheme: String,
        allowed: Vec<String>,
    },
    #[error("the clone of {repository:?} took longer than {after:?}; it was stopped")]
    CloneTimeout { repository: String, after: Duration },
    #[error("the clone of {repository:?} grew past {max_bytes} bytes; it was stopped")]
    CloneTooLarge { repository: String, max_bytes: u64 },
    #[error("invalid {field}: {reason}")]
    InvalidGitInput { field: &'static str, reason: String },
    #[error("git in the sandbox failed ({what}): {detail}")]
    SandboxGit { what: String, detail: String },
    #[error("refused the push bundle {path}: {reason}")]
    UnsafeBundle { path: PathBuf, reason: String },
    #[error(
        "canopy-sandbox-shell not found ({looked}); build it with cargo build -p canopy-sandbox"
    )]
    ShellBinaryNotFound { looked: String },
    #[error("{what} printed more than {limit} bytes on {stream}; it was stopped")]
    OutputTooLarge {
        what: String,
        stream: &'static str,
        limit: usize,
    },
    #[error(
        "sandbox {id} is over its disk quota ({used_bytes} bytes and {used_inodes} inodes used, \
         {quota_bytes} and {quota_inodes} allowed); it starts again once under it"
    )]
    DiskQuotaExceeded {
        id: String,
        used_bytes: u64,
        used_inodes: u64,
        quota_bytes: u64,
        quota_inodes: u64,
    },
    #[error("invalid disk quota: {reason}")]
    InvalidDiskQuota { reason: String },
    #[error("opencode client: {0}")]
    OpenCode(#[from] canopy_opencode::Error),
}
