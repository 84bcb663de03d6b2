//! Sandboxes for the agent: where OpenCode runs the code a prompt asks for.
//!
//! - [`SandboxProvider`] is the port (start, exec, stop, status, remove) the agent runner holds
//!   as `Arc<dyn SandboxProvider>`; [`BubblewrapProvider`] is the local implementation.
//! - A bubblewrap sandbox per session, each with its own uid ([`BubblewrapConfig::uids`]): the
//!   workspace (a clone of the session's repository on its own branch), a home and a
//!   size-capped `/tmp` are the only writable places; the rest is a minimal read-only view.
//!   Every namespace is private, the network included.
//! - The runner reaches OpenCode through a unix socket (a [`SocketBridge`] that refuses
//!   anything but the sandbox's own socket); OpenCode reaches its model only through the
//!   host-side [`ModelProxy`], which adds the API key the sandbox never sees.
//! - Egress ([`EgressPolicy`]) is off by default. When a config allows package registries, an
//!   [`EgressProxy`] on the host tunnels HTTPS to exactly those host names, never to an address
//!   inside the host or its networks; the sandbox's own network stays private.
//! - [`Limits`]: memory and processes per sandbox by cgroup ([`CgroupSupport`]), CPU time and
//!   file size by rlimit, a wall-time cap.
//! - [`SandboxManager`]: start on the first prompt, stop when idle, resume, remove on archive.
//! - OpenCode's API has a fresh password per start that only the host holds; every agent tool
//!   command runs through the [`tool_shell`] guard (Landlock: no write outside the workspace
//!   and `/tmp`, no TCP to OpenCode or the model bridge, no ptrace of OpenCode).
//! - Git on a workspace never runs as root: the clone runs as the sandbox uid, commits and
//!   restores in a fresh sandbox process, and a push sends a bundle of HEAD from a host-owned
//!   repository that never reads the workspace's config.

mod bwrap;
mod egress;
mod error;
mod git;
mod lifecycle;
mod limits;
mod local;
mod model_proxy;
mod provider;
mod socket;
mod spawn;
pub mod tool_shell;
mod uid;

pub use egress::{EgressPolicy, EgressProxy, EgressStats};
pub use error::Error;
pub use git::CloneConfig;
pub use lifecycle::{ActiveSandbox, LifecycleEvent, SandboxManager, StopReason};
pub use limits::{CgroupSupport, Limits};
pub use local::{
    BubblewrapConfig, BubblewrapProvider, SANDBOX_API_KEY_PLACEHOLDER, SANDBOX_MODEL_BASE_URL,
};
pub use model_proxy::{ModelProxy, ModelUpstream};
pub use provider::{
    Commit, CommitRequest, ExecOutput, ExecRequest, GitCredentials, PushRequest, SandboxInfo,
    SandboxProvider, SandboxSpec, SandboxStatus,
};
pub use socket::{BridgeStats, SocketBridge, connect_sandbox_socket};
