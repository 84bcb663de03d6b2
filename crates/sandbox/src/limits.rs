//! Resource limits: what a sandbox may use, and the cgroup that enforces the memory and process
//! limits for the sandbox as a whole.
//!
//! Memory cannot be an rlimit: `RLIMIT_AS` crashes OpenCode (Bun reserves tens of GB of address
//! space), so the whole sandbox goes into a memory cgroup, v1 or v2, whichever the host has and
//! lets root write. Where neither is writable, [`CgroupSupport::Unavailable`] says why and only
//! the rlimits hold: tool commands then get an address-space limit from their shell instead.
//! `RLIMIT_NPROC` counts a uid's processes host-wide, which is per sandbox because every sandbox
//! has its own uid; the pids cgroup is the sharper limit when there is one.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The limits of one sandbox.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Memory of the whole sandbox (cgroup). OpenCode alone uses about 650 MB.
    pub memory_bytes: u64,
    /// Processes of the whole sandbox (cgroup `pids.max`).
    pub pids: u64,
    /// `RLIMIT_NPROC` for the sandbox uid.
    pub nproc: u64,
    /// `RLIMIT_CPU` of every process, OpenCode's server included (its total CPU time).
    pub process_cpu_seconds: u64,
    /// `RLIMIT_CPU` of each agent tool command (set by the shell the bash tool runs).
    pub command_cpu_seconds: u64,
    /// `RLIMIT_AS` of each tool command when there is no memory cgroup (never on OpenCode).
    pub command_address_space_bytes: u64,
    /// `RLIMIT_FSIZE`: the largest file any process may write.
    pub file_size_bytes: u64,
    /// Size of the private `/tmp`.
    pub tmp_bytes: u64,
    /// The sandbox is stopped this long after it started, whatever it is doing.
    pub max_wall_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 4 << 30,
            pids: 512,
            nproc: 1024,
            process_cpu_seconds: 4 * 3600,
            command_cpu_seconds: 600,
            command_address_space_bytes: 4 << 30,
            file_size_bytes: 4 << 30,
            tmp_bytes: 512 << 20,
            max_wall_time: Duration::from_secs(8 * 3600),
        }
    }
}

/// Which cgroup interface this host offers to this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSupport {
    /// Separate `memory` and `pids` hierarchies under `/sys/fs/cgroup`.
    V1 { memory: PathBuf, pids: PathBuf },
    /// The unified hierarchy; sandboxes go under `root`.
    V2 { root: PathBuf },
    /// Neither is writable here; memory and pids are then not limited per sandbox.
    Unavailable { reason: String },
}

/// The parent group every sandbox's cgroup goes under.
const PARENT: &str = "canopy-sandbox";

impl CgroupSupport {
    /// Detects the layout and checks that a group can be created (and removed) under it.
    pub fn detect() -> Self {
        let base = Path::new("/sys/fs/cgroup");
        let support = if base.join("cgroup.controllers").is_file() {
            Self::V2 {
                root: base.join(PARENT),
            }
        } else if base.join("memory").is_dir() && base.join("pids").is_dir() {
            Self::V1 {
                memory: base.join("memory").join(PARENT),
                pids: base.join("pids").join(PARENT),
            }
        } else {
            return Self::Unavailable {
                reason: "no cgroup v2 and no v1 memory+pids hierarchies at /sys/fs/cgroup".into(),
            };
        };
        match support.prepare_parent() {
            Ok(()) => support,
            Err(error) => Self::Unavailable {
                reason: format!("cannot create cgroups: {error}"),
            },
        }
    }

    pub fn is_available(&self) -> bool {
        !matches!(self, Self::Unavailable { .. })
    }

    fn prepare_parent(&self) -> std::io::Result<()> {
        match self {
            Self::V1 { memory, pids } => {
                std::fs::create_dir_all(memory)?;
                std::fs::create_dir_all(pids)
            }
            Self::V2 { root } => {
                std::fs::create_dir_all(root)?;
                // Controllers must be enabled in the parent for the children to have them.
                std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids")
            }
            Self::Unavailable { .. } => Ok(()),
        }
    }

    /// Removes the empty groups of uids nobody leases (left by a crashed process): `lease`
    /// returns a guard while it holds the uid.
    pub(crate) fn sweep<L>(&self, lease: impl Fn(u32) -> Option<L>) {
        let parents = match self {
            Self::V1 { memory, pids } => vec![memory.clone(), pids.clone()],
            Self::V2 { root } => vec![root.clone()],
            Self::Unavailable { .. } => return,
        };
        for parent in parents {
            let Ok(children) = std::fs::read_dir(&parent) else {
                continue;
            };
            for child in children.flatten() {
                let name = child.file_name();
                let Some(uid) = name
                    .to_str()
                    .and_then(|name| name.strip_prefix("uid-"))
                    .and_then(|uid| uid.parse().ok())
                else {
                    continue;
                };
                if let Some(_held) = lease(uid) {
                    // Fails while processes are inside, which is what keeps live groups.
                    let _ = std::fs::remove_dir(child.path());
                }
            }
        }
    }

    /// Creates (or reuses) the cgroup `name` with `limits`; `None` when unavailable.
    pub(crate) fn create(&self, name: &str, limits: &Limits) -> std::io::Result<Option<Cgroup>> {
        let cgroup = match self {
            Self::V1 { memory, pids } => {
                let cgroup = Cgroup {
                    dirs: vec![memory.join(name), pids.join(name)],
                    v2: false,
                };
                for dir in &cgroup.dirs {
                    create_dir(dir)?;
                }
                std::fs::write(
                    cgroup.dirs[0].join("memory.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                )?;
                std::fs::write(cgroup.dirs[1].join("pids.max"), limits.pids.to_string())?;
                cgroup
            }
            Self::V2 { root } => {
                let cgroup = Cgroup {
                    dirs: vec![root.join(name)],
                    v2: true,
                };
                create_dir(&cgroup.dirs[0])?;
                std::fs::write(
                    cgroup.dirs[0].join("memory.max"),
                    limits.memory_bytes.to_string(),
                )?;
                // No swap: the memory limit must not turn into swapping.
                let _ = std::fs::write(cgroup.dirs[0].join("memory.swap.max"), "0");
                std::fs::write(cgroup.dirs[0].join("pids.max"), limits.pids.to_string())?;
                cgroup
            }
            Self::Unavailable { .. } => return Ok(None),
        };
        Ok(Some(cgroup))
    }
}

fn create_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(error) if error.kind() != std::io::ErrorKind::AlreadyExists => Err(error),
        _ => Ok(()),
    }
}

/// The cgroup (one dir per hierarchy) of one sandbox.
#[derive(Debug, Clone)]
pub(crate) struct Cgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl Cgroup {
    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    /// How many processes the kernel killed for going over the memory limit.
    pub(crate) fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            self.dirs[0].join("memory.events")
        } else {
            self.dirs[0].join("memory.oom_control")
        };
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("oom_kill "))
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Removes the groups; they must be empty, which takes a moment after the last exit.
    pub(crate) async fn remove(&self) {
        for dir in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    }
}
