//! Sandboxes for the agent: where OpenCode runs the code a prompt asks for.
//!
//! - [`SandboxProvider`] is the port (start, exec, stop, status, remove) the agent runner holds
//!   as `Arc<dyn SandboxProvider>`; [`BubblewrapProvider`] is the local implementation.
//! - [`SandboxMode`], decided once at start-up: as root every sandbox has its own uid
//!   ([`BubblewrapConfig::uids`]); rootless (a normal user, or [`BubblewrapConfig::force_rootless`])
//!   every sandbox runs as the invoking user in bwrap's own user namespace.
//! - A bubblewrap sandbox per session, each with its own uid as root: the
//!   workspace (a clone of the session's repository on its own branch), a home and a
//!   size-capped `/tmp` are the only writable places; the rest is a minimal read-only view.
//!   Every namespace is private, the network included.
//! - The runner reaches OpenCode through a unix socket (a [`SocketBridge`] that refuses
//!   anything but the sandbox's own socket); OpenCode reaches its model only through the
//!   host-side [`ModelProxy`], which adds the API key the sandbox never sees, lets through only
//!   the two endpoints OpenCode calls, follows no redirect and holds each sandbox to its token
//!   budget ([`ModelProxyLimits`], counted in a [`ModelUsage`]).
//! - The host reads what a sandbox produces only up to a size: an exec's output
//!   ([`BubblewrapConfig::exec_output_bytes`]), OpenCode's answers and events (the client's
//!   limits), its log lines, the egress proxy's request heads and TLS hellos.
//! - Egress ([`EgressPolicy`]) is off by default. When a config allows package registries, an
//!   [`EgressProxy`] on the host tunnels HTTPS to exactly those host names, never to an address
//!   inside the host or its networks; the sandbox's own network stays private.
//! - [`Limits`]: memory and processes per sandbox by cgroup ([`CgroupSupport`]), CPU time and
//!   file size by rlimit, a wall-time cap, and a disk quota ([`DiskQuota`]: bytes and inodes of
//!   the workspace, home and `run`; as root an ext4 image of its own per sandbox, rootless a
//!   periodic check that stops a sandbox over it).
//! - [`SandboxManager`]: start on the first prompt, stop when idle, resume, remove on archive.
//! - OpenCode's API has a fresh password per start that only the host holds; every agent tool
//!   command runs through the [`tool_shell`] guard (Landlock: no write outside the workspace
//!   and `/tmp`, no TCP to OpenCode or the model bridge, no ptrace of OpenCode).
//! - Git on a workspace never runs as root: the clone runs as the sandbox uid (rootless: the
//!   invoking user), commits and
//!   restores in a fresh sandbox process, and a push sends a bundle of HEAD from a host-owned
//!   repository that never reads the workspace's config.

mod bwrap;
mod disk;
mod egress;
mod error;
mod git;
mod lifecycle;
mod limits;
mod local;
mod mode;
mod model_proxy;
mod provider;
mod seccomp;
mod socket;
pub mod tool_shell;
mod uid;

pub use disk::{DiskQuota, DiskUsage, MIN_DISK_BYTES, MIN_DISK_INODES};
pub use egress::{EgressPolicy, EgressProxy, EgressStats, is_public};
pub use error::Error;
pub use git::CloneConfig;
pub use lifecycle::{ActiveSandbox, DISK_QUOTA_EXIT, LifecycleEvent, SandboxManager, StopReason};
pub use limits::{CgroupSupport, Limits};
pub use local::{
    BubblewrapConfig, BubblewrapProvider, SANDBOX_API_KEY_PLACEHOLDER, SANDBOX_MODEL_BASE_URL,
};
pub use mode::{ROOTLESS_SANDBOX_UID, SandboxMode};
pub use model_proxy::{ModelProxy, ModelProxyLimits, ModelUpstream, ModelUsage};
pub use provider::{
    Commit, CommitRequest, ExecOutput, ExecRequest, GitCredentials, PushRequest, SandboxInfo,
    SandboxProvider, SandboxSpec, SandboxStatus,
};
pub use socket::{BridgeStats, SocketBridge, connect_sandbox_socket};
