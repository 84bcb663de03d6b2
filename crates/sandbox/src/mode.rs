//! Who a sandbox runs as: decided once, when the provider starts.
//!
//! As root ([`SandboxMode::Root`]) every sandbox gets its own uid (leased, see `uid.rs`), its
//! files are chowned to it and its processes drop to it with `setpriv` before bwrap. As a normal
//! user, or when forced ([`SandboxMode::Rootless`]), nothing can change uid: every sandbox runs
//! as the invoking user inside bwrap's own user namespace, where it appears as
//! [`ROOTLESS_SANDBOX_UID`] with no capabilities. Sandboxes then share one host uid; their
//! mount, pid and network namespaces still keep them apart (docs/security.md says what that
//! does not cover).

/// How the local provider isolates sandboxes from each other and from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// One leased uid per sandbox, chowned files, `setpriv`, cgroups under `/sys/fs/cgroup`.
    Root,
    /// The invoking user's uid for every sandbox, inside bwrap's user namespace; cgroups only in
    /// a delegated cgroup v2 subtree.
    Rootless,
}

/// The uid (and gid) a rootless sandbox's processes have inside their user namespace. Not 0:
/// a process that is root there would hold capabilities over the files mapped into it.
pub const ROOTLESS_SANDBOX_UID: u32 = 1000;

impl SandboxMode {
    /// Root mode when this process is root and `force_rootless` is off; rootless otherwise.
    pub fn decide(force_rootless: bool) -> Self {
        if force_rootless || !rustix::process::geteuid().is_root() {
            Self::Rootless
        } else {
            Self::Root
        }
    }

    /// `root` or `rootless`, as logs and the runner's status say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::Rootless => "rootless",
        }
    }

    /// The uid the sandbox's processes see as their own, given the host uid that owns them.
    pub fn uid_inside(self, host_uid: u32) -> u32 {
        match self {
            Self::Root => host_uid,
            Self::Rootless => ROOTLESS_SANDBOX_UID,
        }
    }
}

impl std::fmt::Display for SandboxMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Gives `path` to `uid` unless this process is already `uid` (rootless: everything is ours,
/// and a normal user may not chown).
pub(crate) fn chown_to(path: &std::path::Path, uid: u32) -> std::io::Result<()> {
    if rustix::process::geteuid().as_raw() == uid {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
}
