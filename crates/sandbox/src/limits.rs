//! Resource limits: what a sandbox may use, and the cgroup that enforces the memory and process
//! limits for the sandbox as a whole.
//!
//! Memory cannot be an rlimit: `RLIMIT_AS` crashes OpenCode (Bun reserves tens of GB of address
//! space), so the whole sandbox goes into a memory cgroup, v1 or v2, whichever the host has and
//! lets root write. Where neither is writable, [`CgroupSupport::Unavailable`] says why and only
//! the rlimits hold: tool commands then get an address-space limit from their shell instead.
//! `RLIMIT_NPROC` counts a uid's processes host-wide, which is per sandbox because every sandbox
//! has its own uid; the pids cgroup is the sharper limit when there is one.
//!
//! Tested on real cgroups: v1 only (the development hosts are v1/hybrid). The v2 path is tested
//! against a temp dir standing in for the mount: detection, the controllers check, the
//! `cgroup.subtree_control` write and the files and contents of a group. Untested on a real v2
//! mount: that the kernel accepts those writes, joining through `cgroup.procs`, removal, and a
//! systemd host, where `/sys/fs/cgroup/canopy-sandbox` may need a delegated subtree (or
//! `systemd-run --scope`) before root may enable controllers there.

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
    /// What the sandbox may keep on the host's disk (workspace, home and `run` together).
    pub disk: crate::disk::DiskQuota,
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
            disk: crate::disk::DiskQuota::default(),
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
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    /// Rootless: sandboxes' groups go under `canopy-sandbox` in the cgroup v2 group this
    /// process is in, when it is a subtree delegated to this user (writable, and the kernel lets
    /// it enable memory and pids for its children, which it refuses while processes live in it).
    pub fn detect_delegated() -> Self {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self::detect_delegated_at(Path::new("/sys/fs/cgroup"), &own)
    }

    /// [`CgroupSupport::detect_delegated`] with `base` for `/sys/fs/cgroup` and `proc_cgroup`
    /// for the contents of `/proc/self/cgroup`.
    fn detect_delegated_at(base: &Path, proc_cgroup: &str) -> Self {
        if !base.join("cgroup.controllers").is_file() {
            return Self::Unavailable {
                reason: format!(
                    "rootless sandboxes use only a delegated cgroup v2 subtree, and {} is not cgroup v2",
                    base.display()
                ),
            };
        }
        let Some(own) = proc_cgroup
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
        else {
            return Self::Unavailable {
                reason: "this process is in no cgroup v2 group".to_owned(),
            };
        };
        let own = base.join(own.trim().trim_start_matches('/'));
        if let Err(error) = std::fs::write(own.join("cgroup.subtree_control"), "+memory +pids") {
            return Self::Unavailable {
                reason: format!(
                    "cannot enable memory and pids for the children of {} (this process's cgroup; \
                     rootless sandboxes need it delegated and free of processes): {error}",
                    own.display()
                ),
            };
        }
        Self::detect_at(&own)
    }

    /// [`CgroupSupport::detect`] with `base` for `/sys/fs/cgroup` (a temp dir in tests).
    fn detect_at(base: &Path) -> Self {
        let support = if base.join("cgroup.controllers").is_file() {
            // v2: a child has a controller only if its parent offers it.
            let offered =
                std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
            let missing: Vec<_> = ["memory", "pids"]
                .into_iter()
                .filter(|wanted| !offered.split_whitespace().any(|c| c == *wanted))
                .collect();
            if !missing.is_empty() {
                return Self::Unavailable {
                    reason: format!(
                        "the cgroup v2 root does not offer the {} controller(s)",
                        missing.join(" and ")
                    ),
                };
            }
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
        let Some((cgroup, writes)) = self.plan(name, limits) else {
            return Ok(None);
        };
        for dir in &cgroup.dirs {
            create_dir(dir)?;
        }
        for write in writes {
            match std::fs::write(&write.file, &write.content) {
                Err(error) if write.required => return Err(error),
                _ => {}
            }
        }
        Ok(Some(cgroup))
    }

    /// The directories and limit files of the cgroup `name`, without touching anything.
    fn plan(&self, name: &str, limits: &Limits) -> Option<(Cgroup, Vec<LimitWrite>)> {
        let write = |file: PathBuf, content: String, required: bool| LimitWrite {
            file,
            content,
            required,
        };
        match self {
            Self::V1 { memory, pids } => {
                let (memory, pids) = (memory.join(name), pids.join(name));
                let writes = vec![
                    write(
                        memory.join("memory.limit_in_bytes"),
                        limits.memory_bytes.to_string(),
                        true,
                    ),
                    write(pids.join("pids.max"), limits.pids.to_string(), true),
                ];
                let cgroup = Cgroup {
                    dirs: vec![memory, pids],
                    v2: false,
                };
                Some((cgroup, writes))
            }
            Self::V2 { root } => {
                let dir = root.join(name);
                let writes = vec![
                    write(
                        dir.join("memory.max"),
                        limits.memory_bytes.to_string(),
                        true,
                    ),
                    // No swap: the memory limit must not turn into swapping. Optional, as a
                    // kernel without swap accounting has no such file.
                    write(dir.join("memory.swap.max"), "0".to_owned(), false),
                    write(dir.join("pids.max"), limits.pids.to_string(), true),
                ];
                let cgroup = Cgroup {
                    dirs: vec![dir],
                    v2: true,
                };
                Some((cgroup, writes))
            }
            Self::Unavailable { .. } => None,
        }
    }
}

/// One limit file to write when a cgroup is created.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LimitWrite {
    file: PathBuf,
    content: String,
    /// A failure fails the sandbox's start; otherwise it is ignored.
    required: bool,
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

#[cfg(test)]
mod tests {
    use super::*;

    const V2_CONTROLLERS: &str = "cpuset cpu io memory hugetlb pids rdma misc\n";

    fn limits() -> Limits {
        Limits {
            memory_bytes: 3 << 30,
            pids: 77,
            ..Limits::default()
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
    }

    /// A temp dir stands in for a cgroup2 mount: the files are plain files, so this checks the
    /// paths and contents written, not what the kernel makes of them.
    #[test]
    fn v2_detection_enables_controllers_and_writes_the_limits_of_a_group() {
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("cgroup.controllers"), V2_CONTROLLERS).unwrap();

        let support = CgroupSupport::detect_at(base.path());

        let root = base.path().join(PARENT);
        assert_eq!(support, CgroupSupport::V2 { root: root.clone() });
        assert_eq!(read(&root.join("cgroup.subtree_control")), "+memory +pids");

        let cgroup = support.create("uid-620007", &limits()).unwrap().unwrap();
        let dir = root.join("uid-620007");
        assert_eq!(read(&dir.join("memory.max")), (3u64 << 30).to_string());
        assert_eq!(read(&dir.join("memory.swap.max")), "0");
        assert_eq!(read(&dir.join("pids.max")), "77");
        assert_eq!(cgroup.procs_files(), vec![dir.join("cgroup.procs")]);

        // v2 reports OOM kills in memory.events (v1 in memory.oom_control).
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(cgroup.oom_kills(), 2);

        // Creating it again (a resume) reuses the group and rewrites the limits.
        let again = Limits {
            pids: 12,
            ..limits()
        };
        support.create("uid-620007", &again).unwrap().unwrap();
        assert_eq!(read(&dir.join("pids.max")), "12");
    }

    #[test]
    fn v2_plan_makes_swap_optional_and_the_limits_required() {
        let support = CgroupSupport::V2 {
            root: PathBuf::from("/sys/fs/cgroup/canopy-sandbox"),
        };
        let (cgroup, writes) = support.plan("uid-1", &limits()).unwrap();
        let dir = Path::new("/sys/fs/cgroup/canopy-sandbox/uid-1");
        assert!(cgroup.v2);
        assert_eq!(cgroup.dirs, vec![dir.to_owned()]);
        let rendered: Vec<_> = writes
            .iter()
            .map(|w| {
                (
                    w.file.strip_prefix(dir).unwrap().to_owned(),
                    w.content.as_str(),
                    w.required,
                )
            })
            .collect();
        assert_eq!(
            rendered,
            vec![
                (PathBuf::from("memory.max"), "3221225472", true),
                (PathBuf::from("memory.swap.max"), "0", false),
                (PathBuf::from("pids.max"), "77", true),
            ]
        );
    }

    #[test]
    fn v2_without_memory_or_pids_controllers_is_unavailable() {
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("cgroup.controllers"), "cpu io hugetlb\n").unwrap();

        match CgroupSupport::detect_at(base.path()) {
            CgroupSupport::Unavailable { reason } => {
                assert!(reason.contains("memory and pids"), "{reason}")
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
        assert!(!base.path().join(PARENT).exists(), "nothing created");
    }

    #[test]
    fn rootless_detection_uses_only_the_delegated_v2_group_of_the_process() {
        // A v1 (or hybrid) host: nothing is tried.
        let v1 = tempfile::tempdir().unwrap();
        for hierarchy in ["memory", "pids"] {
            std::fs::create_dir(v1.path().join(hierarchy)).unwrap();
        }
        match CgroupSupport::detect_delegated_at(v1.path(), "4:memory:/x\n0::/\n") {
            CgroupSupport::Unavailable { reason } => {
                assert!(reason.contains("is not cgroup v2"), "{reason}")
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
        assert!(!v1.path().join("memory").join(PARENT).exists());

        // v2: the group goes under the process's own cgroup, not the root.
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("cgroup.controllers"), V2_CONTROLLERS).unwrap();
        let own = base.path().join("user.slice/user-1001.slice/runner.scope");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(own.join("cgroup.controllers"), V2_CONTROLLERS).unwrap();
        let support = CgroupSupport::detect_delegated_at(
            base.path(),
            "0::/user.slice/user-1001.slice/runner.scope\n",
        );
        assert_eq!(
            support,
            CgroupSupport::V2 {
                root: own.join(PARENT)
            }
        );
        assert_eq!(read(&own.join("cgroup.subtree_control")), "+memory +pids");
        assert!(!base.path().join(PARENT).exists(), "nothing at the root");

        // Not writable (here: not there at all): unavailable, saying where and why.
        match CgroupSupport::detect_delegated_at(base.path(), "0::/system.slice/gone.service\n") {
            CgroupSupport::Unavailable { reason } => {
                assert!(reason.contains("system.slice/gone.service"), "{reason}")
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
    }

    #[test]
    fn v1_detection_writes_memory_and_pids_in_their_hierarchies() {
        let base = tempfile::tempdir().unwrap();
        for hierarchy in ["memory", "pids"] {
            std::fs::create_dir(base.path().join(hierarchy)).unwrap();
        }

        let support = CgroupSupport::detect_at(base.path());

        let memory = base.path().join("memory").join(PARENT);
        let pids = base.path().join("pids").join(PARENT);
        assert_eq!(
            support,
            CgroupSupport::V1 {
                memory: memory.clone(),
                pids: pids.clone()
            }
        );
        let cgroup = support.create("uid-9", &limits()).unwrap().unwrap();
        assert_eq!(
            read(&memory.join("uid-9/memory.limit_in_bytes")),
            (3u64 << 30).to_string()
        );
        assert_eq!(read(&pids.join("uid-9/pids.max")), "77");
        assert_eq!(
            cgroup.procs_files(),
            vec![
                memory.join("uid-9/cgroup.procs"),
                pids.join("uid-9/cgroup.procs")
            ]
        );
    }
}
