//! The local provider: one bubblewrap sandbox per session on this host.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::io::{BufReader, Read};
use std::ops::Range;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use canopy_opencode::{
    BasicAuth, OpenCodeClient, OpenCodeConfig, PermissionAction, ProviderConfig,
};
use futures::future::BoxFuture;
use rustix::process::{Pid, Signal};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Error;
use crate::bwrap::{self, Binaries, Inner, Layout};
use crate::disk::{self, DiskUsage};
use crate::egress::{EgressPolicy, EgressProxy, EgressStats};
use crate::git::{self, CloneConfig};
use crate::limits::{Cgroup, CgroupSupport, Limits};
use crate::mode::SandboxMode;
use crate::model_proxy::{ModelProxy, ModelProxyLimits, ModelUpstream, ModelUsage};
use crate::provider::{
    Commit, CommitRequest, ExecOutput, ExecRequest, PushRequest, SandboxInfo, SandboxProvider,
    SandboxSpec, SandboxStatus,
};
use crate::socket::{BridgeStats, SocketBridge, connect_sandbox_socket};
use crate::uid::UidLease;

/// How the local provider runs sandboxes.
#[derive(Debug, Clone)]
pub struct BubblewrapConfig {
    /// Where sandboxes live (`<root>/<id>/{data/{workspace,home,run},disk.img,host,control,etc}`,
    /// `data` the mount point of the `disk.img` quota as root). As root, it
    /// and every parent must be root's and not writable by the sandbox uids; rootless, the
    /// invoking user's.
    pub root: PathBuf,
    /// The uids handed to sandboxes, one each.
    pub uids: Range<u32>,
    /// Where uid leases are locked; shared by every provider on the host.
    pub uid_lock_dir: PathBuf,
    /// The model the host-side proxy forwards to, and its key.
    pub model: ModelUpstream,
    /// What each sandbox's model calls may use (its token budget among them).
    pub model_limits: ModelProxyLimits,
    pub limits: Limits,
    /// `None`: `canopy_opencode::opencode_binary()`.
    pub opencode_binary: Option<PathBuf>,
    /// The `canopy-sandbox-shell` guard. `None`: `$CANOPY_SANDBOX_SHELL_BIN`, else a file of
    /// that name next to the running executable or in its parent directory.
    pub shell_binary: Option<PathBuf>,
    /// How workspaces are cloned and where pushes may go.
    pub clone: CloneConfig,
    pub startup_timeout: Duration,
    /// From SIGTERM to OpenCode until the sandbox is killed.
    pub stop_timeout: Duration,
    /// Whether sandboxes may reach package registries; [`EgressPolicy::Deny`] by default.
    pub egress: EgressPolicy,
    /// How much of an exec's stdout, and of its stderr, the host reads; a command that prints
    /// more is killed and the exec fails with [`Error::OutputTooLarge`].
    pub exec_output_bytes: usize,
    /// Run [`SandboxMode::Rootless`] even as root (a normal user always does); `uids` and
    /// `uid_lock_dir` then go unused.
    pub force_rootless: bool,
}

impl BubblewrapConfig {
    pub fn new(root: impl Into<PathBuf>, model: ModelUpstream) -> Self {
        Self {
            root: root.into(),
            uids: 620_000..621_000,
            uid_lock_dir: PathBuf::from("/run/canopy-sandbox/uids"),
            model,
            model_limits: ModelProxyLimits::default(),
            limits: Limits::default(),
            opencode_binary: None,
            shell_binary: None,
            clone: CloneConfig::default(),
            startup_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(5),
            egress: EgressPolicy::Deny,
            exec_output_bytes: 16 << 20,
            force_rootless: false,
        }
    }
}

/// The model base URL OpenCode is configured with inside every sandbox.
pub const SANDBOX_MODEL_BASE_URL: &str = "http://127.0.0.1:8080/v1";
/// How long a commit, restore or bundle may run in the sandbox.
const GIT_TIMEOUT: Duration = Duration::from_secs(300);

/// The API key OpenCode is configured with inside: a placeholder, the proxy adds the real one.
pub const SANDBOX_API_KEY_PLACEHOLDER: &str = "sandbox-has-no-key";

/// Sandboxes on this host with bubblewrap. Needs `bwrap`, `prlimit`, `socat`, and as root
/// `setpriv`; see [`SandboxMode`] for what running it as a normal user changes.
#[derive(Debug)]
pub struct BubblewrapProvider {
    config: BubblewrapConfig,
    mode: SandboxMode,
    cgroups: CgroupSupport,
    binaries: Binaries,
    /// Whether each sandbox's disk is an image of its own (root mode, where mounting works);
    /// otherwise its quota is a periodic check.
    disk_hard: bool,
    sandboxes: tokio::sync::Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    /// The host uid that owns the sandbox's files and processes: its leased uid as root, this
    /// process's own rootless.
    uid: u32,
    /// Held while the entry exists (root mode only).
    _lease: Option<UidLease>,
    layout: Layout,
    cgroup: Option<Cgroup>,
    /// Serves every process of the sandbox (OpenCode and execs) while the entry exists.
    egress: Option<EgressProxy>,
    /// The sandbox's model calls across its starts, held against its token budget.
    model_usage: Arc<ModelUsage>,
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    pid: u32,
    exit: watch::Receiver<Option<ExitStatus>>,
    output: Output,
    bridge: SocketBridge,
    _proxy: ModelProxy,
    info: SandboxInfo,
    wall_timer: tokio::task::JoinHandle<()>,
    /// Set when the wall-time cap killed the sandbox.
    wall_time_hit: Arc<AtomicBool>,
    /// Rootless: measures the disk usage and kills the sandbox over its quota.
    disk_watch: Option<tokio::task::JoinHandle<()>>,
    /// What the sandbox used when the disk watch killed it.
    disk_hit: Arc<Mutex<Option<DiskUsage>>>,
}

impl BubblewrapProvider {
    /// Checks the root, stages the OpenCode binary and the tool shell guard where sandbox uids
    /// can read them, and detects cgroup support.
    pub fn new(config: BubblewrapConfig) -> Result<Self, Error> {
        let prepare = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Prepare { path, source }
        };
        std::fs::create_dir_all(&config.root).map_err(prepare(&config.root))?;
        std::fs::set_permissions(&config.root, std::fs::Permissions::from_mode(0o711))
            .map_err(prepare(&config.root))?;
        let source = match &config.opencode_binary {
            Some(binary) => binary.clone(),
            None => canopy_opencode::opencode_binary()?,
        };
        let binaries = Binaries {
            opencode: stage_binary(&source, &config.root.join(".opencode"), "opencode")?,
            shell: stage_binary(
                &find_shell_binary(config.shell_binary.as_deref())?,
                &config.root.join(".shell"),
                SHELL_BINARY,
            )?,
        };
        config.limits.disk.validate()?;
        let mode = SandboxMode::decide(config.force_rootless);
        let cgroups = match mode {
            SandboxMode::Root => {
                // Disks a crashed run left mounted, of uids no live provider leases.
                disk::sweep(&config.root, |uid| {
                    UidLease::acquire(&config.uid_lock_dir, &(uid..uid + 1), None).ok()
                });
                let cgroups = CgroupSupport::detect();
                cgroups.sweep(|uid| {
                    UidLease::acquire(&config.uid_lock_dir, &(uid..uid + 1), None).ok()
                });
                cgroups
            }
            SandboxMode::Rootless => CgroupSupport::detect_delegated(),
        };
        let disk_hard = match mode {
            SandboxMode::Root => match disk::probe(&config.root) {
                Ok(()) => Ok(()),
                Err(error) => Err(error.to_string()),
            },
            SandboxMode::Rootless => Err("rootless: no image can be mounted".to_owned()),
        };
        tracing::info!(
            mode = mode.as_str(),
            uid = rustix::process::geteuid().as_raw(),
            cgroups = ?cgroups,
            disk_quota_hard = disk_hard.is_ok(),
            "sandbox provider ready"
        );
        if let Err(reason) = &disk_hard {
            tracing::warn!(
                interval = ?config.limits.disk.check_interval,
                %reason,
                "sandbox disk quotas are only checked: a sandbox found over its quota is \
                 stopped, and between two checks it can write past it"
            );
        }
        let disk_hard = disk_hard.is_ok();
        if let CgroupSupport::Unavailable { reason } = &cgroups {
            tracing::warn!(
                mode = mode.as_str(),
                %reason,
                "sandbox memory (memory.max) and process (pids.max) limits are not enforced: \
                 no cgroup per sandbox; only the rlimits (CPU time, file size, RLIMIT_NPROC) and \
                 the tool commands' address-space limit hold"
            );
        }
        Ok(Self {
            config,
            mode,
            cgroups,
            binaries,
            disk_hard,
            sandboxes: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn cgroups(&self) -> &CgroupSupport {
        &self.cgroups
    }

    /// Whether each sandbox's disk quota is a filesystem of its own (root mode, where this host
    /// lets root make and loop-mount an ext4 image) rather than a periodic check (rootless, or
    /// root without loop devices: the start-up log says why).
    pub fn disk_quota_hard(&self) -> bool {
        self.disk_hard
    }

    /// What the sandbox `id` keeps on disk now (its workspace, home and `run`), measured without
    /// following any link; `None` when it is not there (or, as root, not mounted).
    pub async fn disk_usage(&self, id: &str) -> Option<DiskUsage> {
        validate_id(id).ok()?;
        let layout = Layout::new(&self.config.root, id);
        if self.disk_hard && !disk::is_mounted(&layout.data) {
            return None;
        }
        tokio::task::spawn_blocking(move || {
            disk::usage(&[&layout.workspace, &layout.home, &layout.run])
        })
        .await
        .ok()
    }

    /// As root, mounts the sandbox's disk image at its `data` (made on first use; a mount a
    /// crashed run left is reused); rootless, `data` is a plain directory.
    fn mount_disk(&self, layout: &Layout) -> Result<(), Error> {
        if !self.disk_hard {
            return Ok(());
        }
        let io = |source| Error::Prepare {
            path: layout.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&layout.dir).map_err(io)?;
        std::os::unix::fs::chown(&layout.dir, Some(0), Some(0)).map_err(io)?;
        std::fs::set_permissions(&layout.dir, std::fs::Permissions::from_mode(0o711))
            .map_err(io)?;
        disk::ensure_mounted(&layout.image, &layout.data, &self.config.limits.disk)
    }

    fn unmount_disk(&self, layout: &Layout) -> Result<(), Error> {
        if !self.disk_hard {
            return Ok(());
        }
        disk::unmount(&layout.data)
    }

    /// Root or rootless, decided when the provider was made.
    pub fn mode(&self) -> SandboxMode {
        self.mode
    }

    pub fn config(&self) -> &BubblewrapConfig {
        &self.config
    }

    /// Creates the sandbox's directories and workspace without starting anything.
    pub async fn prepare(&self, spec: &SandboxSpec) -> Result<u32, Error> {
        let mut sandboxes = self.sandboxes.lock().await;
        Ok(self.entry(&mut sandboxes, spec)?.uid)
    }

    /// Connects to OpenCode's socket in the sandbox, refusing anything but the sandbox's own
    /// socket (see [`connect_sandbox_socket`]).
    pub async fn connect_opencode(&self, id: &str) -> Result<tokio::net::UnixStream, Error> {
        let (run, uid) = {
            let sandboxes = self.sandboxes.lock().await;
            let entry = sandboxes
                .get(id)
                .ok_or_else(|| Error::NotFound { id: id.to_owned() })?;
            (entry.layout.run.clone(), entry.uid)
        };
        connect_sandbox_socket(&run, bwrap::OPENCODE_SOCKET, uid).await
    }

    /// What the runner-side bridge of a running sandbox refused.
    pub async fn bridge_stats(&self, id: &str) -> Result<Arc<BridgeStats>, Error> {
        let sandboxes = self.sandboxes.lock().await;
        let running = sandboxes
            .get(id)
            .and_then(|entry| entry.running.as_ref())
            .ok_or_else(|| Error::NotRunning { id: id.to_owned() })?;
        Ok(running.bridge.stats().clone())
    }

    /// What the egress proxy of the sandbox let through and refused; `None` when egress is
    /// denied or nothing ran yet.
    pub async fn egress_stats(&self, id: &str) -> Option<Arc<EgressStats>> {
        let sandboxes = self.sandboxes.lock().await;
        sandboxes
            .get(id)
            .and_then(|entry| entry.egress.as_ref())
            .map(|proxy| proxy.stats().clone())
    }

    /// What the sandbox's model calls used and what its model proxy refused, over every start
    /// since the provider first saw it; `None` for an unknown sandbox.
    pub async fn model_usage(&self, id: &str) -> Option<Arc<ModelUsage>> {
        let sandboxes = self.sandboxes.lock().await;
        sandboxes.get(id).map(|entry| entry.model_usage.clone())
    }

    /// Waits until the running sandbox `id` exits on its own (or is stopped), and says how.
    pub async fn wait_exited(&self, id: &str) -> Result<SandboxStatus, Error> {
        let mut exit = {
            let sandboxes = self.sandboxes.lock().await;
            sandboxes
                .get(id)
                .and_then(|entry| entry.running.as_ref())
                .map(|running| running.exit.clone())
                .ok_or_else(|| Error::NotRunning { id: id.to_owned() })?
        };
        let _ = exit.wait_for(Option::is_some).await;
        self.status_of(id).await
    }

    /// Processes the memory cgroup killed in this sandbox (0 without cgroups).
    pub async fn oom_kills(&self, id: &str) -> u64 {
        let sandboxes = self.sandboxes.lock().await;
        sandboxes
            .get(id)
            .and_then(|entry| entry.cgroup.as_ref())
            .map(Cgroup::oom_kills)
            .unwrap_or(0)
    }

    fn entry<'a>(
        &self,
        sandboxes: &'a mut HashMap<String, Entry>,
        spec: &SandboxSpec,
    ) -> Result<&'a mut Entry, Error> {
        validate_id(&spec.id)?;
        if !sandboxes.contains_key(&spec.id) {
            let layout = Layout::new(&self.config.root, &spec.id);
            if self.disk_hard && !layout.image.exists() {
                // Refused before an image is made; `prepare_layout` checks again.
                git::check_scheme(&spec.repository, &self.config.clone.allowed_schemes)?;
            }
            self.mount_disk(&layout)?;
            let created = self.entry_at(layout, spec);
            if created.is_err() {
                let _ = self.unmount_disk(&Layout::new(&self.config.root, &spec.id));
            }
            sandboxes.insert(spec.id.clone(), created?);
        }
        sandboxes.get_mut(&spec.id).ok_or_else(|| Error::NotFound {
            id: spec.id.clone(),
        })
    }

    /// A new entry for the sandbox at `layout` (its disk mounted): its uid and directories, its
    /// workspace cloned on first use.
    fn entry_at(&self, layout: Layout, spec: &SandboxSpec) -> Result<Entry, Error> {
        let previous_owner = std::fs::metadata(&layout.workspace)
            .ok()
            .map(|meta| meta.uid());
        let (uid, lease) = match self.mode {
            SandboxMode::Root => {
                let lease = UidLease::acquire(
                    &self.config.uid_lock_dir,
                    &self.config.uids,
                    previous_owner,
                )?;
                (lease.uid(), Some(lease))
            }
            SandboxMode::Rootless => (rustix::process::geteuid().as_raw(), None),
        };
        prepare_layout(
            &layout,
            spec,
            self.mode,
            uid,
            &self.config,
            self.cgroups.is_available(),
        )?;
        Ok(Entry {
            uid,
            _lease: lease,
            layout,
            cgroup: None,
            egress: None,
            model_usage: Arc::default(),
            running: None,
        })
    }

    /// The sandbox's cgroup, (re)created before every spawn: stopping removes it, and so may
    /// another provider's sweep while the uid is not leased. Named by uid as root (the sweep
    /// knows a uid's lease), by sandbox id rootless (every sandbox has the same uid).
    fn ensure_cgroup(&self, entry: &mut Entry) -> Result<(), Error> {
        let name = match self.mode {
            SandboxMode::Root => format!("uid-{}", entry.uid),
            SandboxMode::Rootless => format!("sandbox-{}", entry.layout.id()),
        };
        entry.cgroup = self
            .cgroups
            .create(&name, &self.config.limits)
            .map_err(|source| Error::Prepare {
                path: PathBuf::from("/sys/fs/cgroup"),
                source,
            })?;
        Ok(())
    }

    /// Starts the sandbox's egress proxy when the policy allows any host and none runs.
    fn ensure_egress(&self, entry: &mut Entry) -> Result<(), Error> {
        let EgressPolicy::AllowHosts(hosts) = &self.config.egress else {
            return Ok(());
        };
        if entry.egress.is_none() {
            entry.egress = Some(EgressProxy::start(
                &entry.layout.host.join(bwrap::EGRESS_SOCKET),
                entry.uid,
                hosts,
            )?);
        }
        Ok(())
    }

    fn spawn(
        &self,
        entry: &Entry,
        inner: &Inner<'_>,
        stdout: Stdio,
    ) -> Result<std::process::Child, Error> {
        let argv = bwrap::command_line(
            &entry.layout,
            self.mode,
            entry.uid,
            &self.binaries,
            &self.config.limits,
            entry.cgroup.as_ref(),
            &self.config.egress,
            inner,
        );
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        canopy_process::spawn_tied(command).map_err(|source| Error::Spawn {
            program: format!("bwrap ({} mode, through sh and prlimit)", self.mode),
            source,
        })
    }

    async fn start_sandbox(&self, spec: SandboxSpec) -> Result<SandboxInfo, Error> {
        let began = Instant::now();
        let mut sandboxes = self.sandboxes.lock().await;
        let entry = self.entry(&mut sandboxes, &spec)?;
        if let Some(running) = &entry.running {
            if running.exit.borrow().is_none() {
                return Ok(running.info.clone());
            }
            entry.running = None;
        }
        self.mount_disk(&entry.layout)?;
        if !self.disk_quota_hard() {
            // Rootless the quota is a check: a sandbox already over it does not start (the
            // watch would kill it during its start-up).
            let quota = self.config.limits.disk;
            let layout = entry.layout.clone();
            let used = tokio::task::spawn_blocking(move || {
                disk::usage(&[&layout.workspace, &layout.home, &layout.run])
            })
            .await
            .unwrap_or_default();
            if used.exceeds(&quota) {
                return Err(Error::DiskQuotaExceeded {
                    id: spec.id.clone(),
                    used_bytes: used.bytes,
                    used_inodes: used.inodes,
                    quota_bytes: quota.bytes,
                    quota_inodes: quota.inodes,
                });
            }
        }
        self.ensure_cgroup(entry)?;
        self.ensure_egress(entry)?;
        let uid = entry.uid;
        let layout = entry.layout.clone();
        crate::socket::remove_stale(&layout.run.join(bwrap::OPENCODE_SOCKET))?;
        let proxy = ModelProxy::start_with(
            &layout.host.join(bwrap::MODEL_SOCKET),
            uid,
            self.config.model.clone(),
            self.config.model_limits.clone(),
            entry.model_usage.clone(),
        )?;
        let config = OpenCodeConfig::new(ProviderConfig {
            provider_id: spec.provider_id.clone(),
            base_url: SANDBOX_MODEL_BASE_URL.to_owned(),
            api_key: SANDBOX_API_KEY_PLACEHOLDER.to_owned(),
            model_id: spec.model_id.clone(),
        })
        // The runner answers every bash request: it is the gate.
        .permission("bash", PermissionAction::Ask)
        .permission("edit", PermissionAction::Allow)
        // Paths outside the workspace ask the runner, which refuses OpenCode's own process
        // files (`/proc/self/environ` holds its password: its read tool runs unguarded) and
        // data, and allows the rest.
        .permission("external_directory", PermissionAction::Ask)
        .permission("question", PermissionAction::Deny)
        .permission("task", PermissionAction::Deny)
        .permission("webfetch", PermissionAction::Deny)
        .to_json()
        .to_string();
        let password_file = layout.host.join(bwrap::PASSWORD_FILE);
        let auth = BasicAuth::opencode(hex::encode(rand::random::<[u8; 32]>()));
        write_password(&password_file, &auth.password, uid)?;
        let spawned = self.spawn(
            entry,
            &Inner::OpenCode {
                config_json: &config,
            },
            Stdio::piped(),
        );
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let _ = std::fs::remove_file(&password_file);
                return Err(error);
            }
        };
        let pid = child.id();
        let output = Output::default();
        if let Some(stdout) = child.stdout.take() {
            output.follow(stdout);
        }
        if let Some(stderr) = child.stderr.take() {
            output.follow(stderr);
        }
        let (exit_tx, exit) = watch::channel(None);
        std::thread::Builder::new()
            .name(format!("sandbox-{pid}-wait"))
            .spawn(move || {
                let status = child.wait().ok();
                let _ = exit_tx.send(status);
            })
            .map_err(|source| Error::Spawn {
                program: "a thread to wait for the sandbox".to_owned(),
                source,
            })?;
        let control = layout.control.join(bwrap::OPENCODE_SOCKET);
        let bridge = SocketBridge::start(&control, &layout.run, bwrap::OPENCODE_SOCKET, uid)?;
        let wall = self.config.limits.max_wall_time;
        let wall_time_hit = Arc::new(AtomicBool::new(false));
        let hit = wall_time_hit.clone();
        let wall_timer = tokio::spawn(async move {
            tokio::time::sleep_until(began + wall).await;
            tracing::warn!(pid, "sandbox reached its wall-time limit; killing it");
            hit.store(true, Ordering::Relaxed);
            // The whole tree at once: bwrap's own death reaches its namespace only through a
            // parent-death signal, which lands a moment later, and until then OpenCode answers.
            for process in tree_of(pid).into_iter().rev() {
                kill(process, Signal::KILL);
            }
        });
        let disk_hit = Arc::new(Mutex::new(None));
        let disk_watch = (!self.disk_quota_hard()).then(|| {
            watch_disk(
                pid,
                layout.clone(),
                self.config.limits.disk,
                disk_hit.clone(),
            )
        });
        let info = SandboxInfo {
            id: spec.id.clone(),
            uid,
            opencode_socket: control.clone(),
            opencode_directory: PathBuf::from(bwrap::SANDBOX_WORKSPACE),
            opencode_auth: auth,
            workspace: layout.workspace.clone(),
            startup: Duration::ZERO,
        };
        let mut running = Running {
            pid,
            exit,
            output,
            bridge,
            _proxy: proxy,
            info,
            wall_timer,
            wall_time_hit,
            disk_watch,
            disk_hit,
        };
        let healthy = wait_healthy(
            &running,
            began + self.config.startup_timeout,
            self.config.startup_timeout,
        )
        .await;
        // OpenCode read it at its start; no prompt has run yet.
        let removed = std::fs::remove_file(&password_file).map_err(|source| Error::Prepare {
            path: password_file.clone(),
            source,
        });
        if let Err(error) = healthy.and(removed) {
            kill(pid, Signal::KILL);
            running.wall_timer.abort();
            if let Some(watch) = &running.disk_watch {
                watch.abort();
            }
            return Err(error);
        }
        running.info.startup = began.elapsed();
        tracing::info!(id = %spec.id, uid, mode = self.mode.as_str(), startup = ?running.info.startup, "sandbox started");
        let info = running.info.clone();
        entry.running = Some(running);
        Ok(info)
    }

    async fn exec_in(&self, id: &str, request: ExecRequest) -> Result<ExecOutput, Error> {
        self.run_script(id, &request.script, &[], request.timeout)
            .await
    }

    /// Runs `script` with `args` as `$1`… in a fresh sandbox process of `id`.
    async fn run_script(
        &self,
        id: &str,
        script: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, Error> {
        let mut child = {
            let mut sandboxes = self.sandboxes.lock().await;
            let entry = sandboxes
                .get_mut(id)
                .ok_or_else(|| Error::NotFound { id: id.to_owned() })?;
            self.mount_disk(&entry.layout)?;
            self.ensure_cgroup(entry)?;
            self.ensure_egress(entry)?;
            self.spawn(entry, &Inner::Script { script, args }, Stdio::piped())?
        };
        let pid = child.id();
        let limit = self.config.exec_output_bytes;
        let spawn_error = |source| Error::Spawn {
            program: "exec".to_owned(),
            source,
        };
        let stdout = child
            .stdout
            .take()
            .map(tokio::process::ChildStdout::from_std)
            .transpose()
            .map_err(spawn_error)?;
        let stderr = child
            .stderr
            .take()
            .map(tokio::process::ChildStderr::from_std)
            .transpose()
            .map_err(spawn_error)?;
        let waiting = tokio::task::spawn_blocking(move || child.wait());
        let finished = tokio::time::timeout(timeout, async {
            let output = tokio::try_join!(
                read_capped(stdout, limit, "stdout"),
                read_capped(stderr, limit, "stderr"),
            );
            if output.is_err() {
                // Past the limit: stop it now rather than read (or wait for) the rest.
                kill(pid, Signal::KILL);
            }
            (output, waiting.await)
        })
        .await;
        let Ok((output, status)) = finished else {
            kill(pid, Signal::KILL);
            return Ok(ExecOutput {
                code: None,
                timed_out: true,
                stdout: String::new(),
                stderr: String::new(),
            });
        };
        let status = status
            .map_err(|error| Error::Command {
                what: "waiting for exec".to_owned(),
                detail: error.to_string(),
            })?
            .map_err(spawn_error)?;
        let (stdout, stderr) = output.map_err(|capped| match capped {
            Capped::TooLarge { stream } => Error::OutputTooLarge {
                what: "the exec".to_owned(),
                stream,
                limit,
            },
            Capped::Read(error) => Error::Command {
                what: "reading the exec's output".to_owned(),
                detail: error.to_string(),
            },
        })?;
        Ok(ExecOutput {
            code: status.code(),
            timed_out: false,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// Runs a git script in the sandbox; its stdout when it succeeded.
    async fn sandbox_git(
        &self,
        id: &str,
        what: &str,
        script: &str,
        args: &[String],
    ) -> Result<String, Error> {
        let output = self.run_script(id, script, args, GIT_TIMEOUT).await?;
        if output.code == Some(0) {
            return Ok(output.stdout);
        }
        let how = if output.timed_out {
            format!("timed out after {GIT_TIMEOUT:?}")
        } else {
            format!("exit {:?}", output.code)
        };
        Err(Error::SandboxGit {
            what: what.to_owned(),
            detail: format!("{how}: {}", output.stderr.trim()),
        })
    }

    async fn commit_in(&self, id: &str, request: CommitRequest) -> Result<Commit, Error> {
        let (script, args) = git::commit_script(&request)?;
        let stdout = self.sandbox_git(id, "commit", &script, &args).await?;
        git::parse_commit(&stdout)
    }

    async fn restore_in(&self, id: &str, sha: &str) -> Result<(), Error> {
        git::validate_sha(sha)?;
        self.sandbox_git(id, "restore", &git::restore_script(), &[sha.to_owned()])
            .await
            .map(|_| ())
    }

    async fn push_from(&self, id: &str, request: PushRequest) -> Result<String, Error> {
        validate_branch(&request.branch)?;
        git::check_scheme(&request.remote_url, &self.config.clone.allowed_schemes)?;
        let (workspace, uid) = {
            let sandboxes = self.sandboxes.lock().await;
            let entry = sandboxes
                .get(id)
                .ok_or_else(|| Error::NotFound { id: id.to_owned() })?;
            (entry.layout.workspace.clone(), entry.uid)
        };
        self.sandbox_git(id, "bundle", &git::bundle_script(), &[])
            .await?;
        let clone = self.config.clone.clone();
        let root = self.config.root.clone();
        tokio::task::spawn_blocking(move || {
            let scratch = tempfile::Builder::new()
                .prefix(".push-")
                .tempdir_in(&root)
                .map_err(|source| Error::Prepare {
                    path: root.clone(),
                    source,
                })?;
            let bundle = scratch.path().join("push.bundle");
            git::take_bundle(&workspace, uid, clone.max_bytes, &bundle)?;
            git::push_bundle(
                scratch.path(),
                &bundle,
                &request.remote_url,
                &request.branch,
                request.credentials.as_ref(),
                &clone.allowed_schemes,
            )
        })
        .await
        .map_err(|error| Error::Command {
            what: "push".to_owned(),
            detail: error.to_string(),
        })?
    }

    async fn stop_sandbox(&self, id: &str) -> Result<(), Error> {
        let (running, cgroup, layout) = {
            let mut sandboxes = self.sandboxes.lock().await;
            let entry = sandboxes
                .get_mut(id)
                .ok_or_else(|| Error::NotFound { id: id.to_owned() })?;
            (
                entry.running.take(),
                entry.cgroup.clone(),
                entry.layout.clone(),
            )
        };
        let Some(running) = running else {
            // An exec may have mounted the disk of a stopped sandbox.
            return self.unmount_stopped(id, &layout).await;
        };
        running.wall_timer.abort();
        if let Some(watch) = &running.disk_watch {
            watch.abort();
        }
        let mut exit = running.exit.clone();
        if exit.borrow().is_none() {
            // bwrap does not forward signals: a graceful stop is SIGTERM to OpenCode itself.
            match find_descendant(running.pid, "opencode") {
                Some(opencode) => kill(opencode, Signal::TERM),
                None => kill(running.pid, Signal::KILL),
            }
            let stopped =
                tokio::time::timeout(self.config.stop_timeout, exit.wait_for(Option::is_some))
                    .await
                    .is_ok();
            if !stopped {
                tracing::warn!(id, "sandbox ignored SIGTERM; killing it");
                kill(running.pid, Signal::KILL);
                let _ =
                    tokio::time::timeout(self.config.stop_timeout, exit.wait_for(Option::is_some))
                        .await;
            }
        }
        if let Some(cgroup) = cgroup {
            cgroup.remove().await;
        }
        // Kept for a resume; mounted again at the next start.
        self.unmount_stopped(id, &layout).await?;
        tracing::info!(id, "sandbox stopped");
        Ok(())
    }

    /// Unmounts the disk of `id` unless a start got in since the stop began (under the lock
    /// every mount is made under).
    async fn unmount_stopped(&self, id: &str, layout: &Layout) -> Result<(), Error> {
        let sandboxes = self.sandboxes.lock().await;
        if sandboxes
            .get(id)
            .is_some_and(|entry| entry.running.is_some())
        {
            return Ok(());
        }
        self.unmount_disk(layout)
    }

    async fn status_of(&self, id: &str) -> Result<SandboxStatus, Error> {
        validate_id(id)?;
        let sandboxes = self.sandboxes.lock().await;
        let Some(entry) = sandboxes.get(id) else {
            let layout = Layout::new(&self.config.root, id);
            // As root the workspace is in the image, which is not mounted while stopped.
            let exists = layout.workspace.exists() || layout.image.exists();
            return Ok(if exists {
                SandboxStatus::Stopped
            } else {
                SandboxStatus::Absent
            });
        };
        Ok(match &entry.running {
            None => SandboxStatus::Stopped,
            Some(running) => match *running.exit.borrow() {
                None => SandboxStatus::Running { pid: running.pid },
                Some(status) => {
                    let disk_hit = *running.disk_hit.lock().unwrap_or_else(|p| p.into_inner());
                    let cap = if running.wall_time_hit.load(Ordering::Relaxed) {
                        " (killed at the wall-time limit)".to_owned()
                    } else if let Some(used) = disk_hit {
                        format!(
                            " ({}: {} bytes and {} inodes used, {} and {} allowed)",
                            crate::DISK_QUOTA_EXIT,
                            used.bytes,
                            used.inodes,
                            self.config.limits.disk.bytes,
                            self.config.limits.disk.inodes
                        )
                    } else {
                        String::new()
                    };
                    SandboxStatus::Exited {
                        status: format!("{status}{cap}; last output:\n{}", running.output.tail()),
                    }
                }
            },
        })
    }

    async fn remove_sandbox(&self, id: &str) -> Result<(), Error> {
        validate_id(id)?;
        if self.sandboxes.lock().await.contains_key(id) {
            self.stop_sandbox(id).await?;
        }
        let entry = self.sandboxes.lock().await.remove(id);
        if let Some(cgroup) = entry.as_ref().and_then(|entry| entry.cgroup.as_ref()) {
            cgroup.remove().await;
        }
        let layout = Layout::new(&self.config.root, id);
        // Also a mount a crashed run left: the removal must never reach into a mounted image.
        self.unmount_disk(&layout)?;
        let dir = layout.dir;
        match std::fs::remove_dir_all(&dir) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(Error::Prepare {
                path: dir,
                source: error,
            }),
            _ => Ok(()),
        }
    }
}

impl SandboxProvider for BubblewrapProvider {
    fn start(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxInfo, Error>> {
        Box::pin(self.start_sandbox(spec))
    }

    fn exec<'a>(
        &'a self,
        id: &'a str,
        request: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecOutput, Error>> {
        Box::pin(self.exec_in(id, request))
    }

    fn stop<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.stop_sandbox(id))
    }

    fn status<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<SandboxStatus, Error>> {
        Box::pin(self.status_of(id))
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.remove_sandbox(id))
    }

    fn commit<'a>(
        &'a self,
        id: &'a str,
        request: CommitRequest,
    ) -> BoxFuture<'a, Result<Commit, Error>> {
        Box::pin(self.commit_in(id, request))
    }

    fn restore<'a>(&'a self, id: &'a str, commit_sha: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.restore_in(id, commit_sha))
    }

    fn push<'a>(
        &'a self,
        id: &'a str,
        request: PushRequest,
    ) -> BoxFuture<'a, Result<String, Error>> {
        Box::pin(self.push_from(id, request))
    }

    fn model_usage<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Arc<ModelUsage>>> {
        Box::pin(BubblewrapProvider::model_usage(self, id))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.wall_timer.abort();
        if let Some(watch) = &self.disk_watch {
            watch.abort();
        }
        if self.exit.borrow().is_none() {
            kill(self.pid, Signal::KILL);
        }
    }
}

async fn wait_healthy(
    running: &Running,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    let client = OpenCodeClient::new(running.info.client_config())?;
    loop {
        if let Some(status) = *running.exit.borrow() {
            return Err(Error::ExitedEarly {
                status: status.to_string(),
                output: running.output.tail(),
            });
        }
        // The socket exists before OpenCode listens; only an answer means ready.
        if let Ok(health) = client.health_within(Duration::from_secs(1)).await
            && health.healthy
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::StartupTimeout {
                after: timeout,
                output: running.output.tail(),
            });
        }
        let mut exit = running.exit.clone();
        let _ =
            tokio::time::timeout(Duration::from_millis(100), exit.wait_for(Option::is_some)).await;
    }
}

/// Rootless: measures the sandbox's workspace, home and `run` every `quota.check_interval`
/// and, once over the quota, kills the sandbox (process tree of `pid`) and notes what it used.
fn watch_disk(
    pid: u32,
    layout: Layout,
    quota: crate::DiskQuota,
    hit: Arc<Mutex<Option<DiskUsage>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(quota.check_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let measured = layout.clone();
            let Ok(used) = tokio::task::spawn_blocking(move || {
                disk::usage(&[&measured.workspace, &measured.home, &measured.run])
            })
            .await
            else {
                continue;
            };
            if !used.exceeds(&quota) {
                continue;
            }
            tracing::warn!(
                pid,
                bytes = used.bytes,
                inodes = used.inodes,
                "sandbox is over its disk quota; killing it"
            );
            *hit.lock().unwrap_or_else(|p| p.into_inner()) = Some(used);
            for process in tree_of(pid).into_iter().rev() {
                kill(process, Signal::KILL);
            }
            return;
        }
    })
}

fn validate_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId { id: id.to_owned() })
    }
}

fn validate_branch(branch: &str) -> Result<(), Error> {
    let ok = !branch.is_empty()
        && !branch.starts_with(['-', '/', '.'])
        && !branch.contains("..")
        && branch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidBranch {
            branch: branch.to_owned(),
        })
    }
}

/// Creates the directories and, on first use, the workspace: cloned as the sandbox uid into a
/// staging directory the uid owns inside the root-owned sandbox directory, then moved in place.
/// Rootless, everything is already the invoking user's: nothing is chowned.
fn prepare_layout(
    layout: &Layout,
    spec: &SandboxSpec,
    mode: SandboxMode,
    uid: u32,
    config: &BubblewrapConfig,
    memory_cgroup: bool,
) -> Result<(), Error> {
    validate_branch(&spec.branch)?;
    if !layout.workspace.exists() {
        // Refused before anything is created; `clone_as` checks again.
        git::check_scheme(&spec.repository, &config.clone.allowed_schemes)?;
    }
    let limits = &config.limits;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Prepare { path, source }
    };
    let root_mode = mode == SandboxMode::Root;
    for (dir, dir_mode) in [
        (&layout.dir, 0o711),
        (&layout.data, 0o711),
        (&layout.host, 0o755),
        (&layout.control, 0o700),
        (&layout.etc, 0o755),
    ] {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        if root_mode {
            std::os::unix::fs::chown(dir, Some(0), Some(0)).map_err(io(dir))?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))
            .map_err(io(dir))?;
    }
    for (name, content) in Layout::etc_files(mode.uid_inside(uid), limits, memory_cgroup) {
        let path = layout.etc.join(name);
        std::fs::write(&path, content).map_err(io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(io(&path))?;
    }
    let filter = layout.etc.join(crate::seccomp::FILE);
    std::fs::write(&filter, crate::seccomp::program()).map_err(io(&filter))?;
    std::fs::set_permissions(&filter, std::fs::Permissions::from_mode(0o644))
        .map_err(io(&filter))?;
    let run_as = match mode {
        SandboxMode::Root => Some(uid),
        SandboxMode::Rootless => None,
    };
    if !layout.workspace.exists() {
        // In `data`: the clone counts against the disk quota and the rename stays on one
        // filesystem.
        let staging = layout.data.join("workspace.new");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(io(&staging))?;
        crate::mode::chown_to(&staging, uid).map_err(io(&staging))?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&staging))?;
        if let Err(error) = git::clone_as(
            run_as,
            &spec.repository,
            &spec.branch,
            &staging,
            &config.clone,
        ) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(error);
        }
        std::fs::rename(&staging, &layout.workspace).map_err(io(&layout.workspace))?;
    }
    for dir in [&layout.workspace, &layout.home, &layout.run] {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let owner = std::fs::symlink_metadata(dir).map_err(io(dir))?.uid();
        if owner != uid {
            chown_tree(dir, uid)?;
        }
        let dir_mode = if dir == &layout.run { 0o750 } else { 0o700 };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))
            .map_err(io(dir))?;
    }
    Ok(())
}

/// Gives a tree to `uid` without following links (a resumed sandbox may get another uid).
fn chown_tree(path: &Path, uid: u32) -> Result<(), Error> {
    let io = |source| Error::Prepare {
        path: path.to_owned(),
        source,
    };
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).map_err(io)?;
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if meta.is_dir() {
        for child in std::fs::read_dir(path).map_err(io)? {
            chown_tree(&child.map_err(io)?.path(), uid)?;
        }
    }
    Ok(())
}

/// Hard-links (or copies) a binary into a root-owned dir every sandbox uid can read: the
/// installed one may sit under a home only root can enter.
fn stage_binary(source: &Path, dir: &Path, name: &str) -> Result<PathBuf, Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Prepare { path, source }
    };
    let source = std::fs::canonicalize(source).map_err(io(source))?;
    let meta = std::fs::metadata(&source).map_err(io(&source))?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io(dir))?;
    let target = dir.join(format!("{name}-{}-{}", meta.len(), meta.mtime()));
    if !target.is_file() {
        let partial = dir.join(format!(".partial-{}", std::process::id()));
        let _ = std::fs::remove_file(&partial);
        if std::fs::hard_link(&source, &partial).is_err() {
            std::fs::copy(&source, &partial).map_err(io(&partial))?;
        }
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
            .map_err(io(&partial))?;
        std::fs::rename(&partial, &target).map_err(io(&target))?;
    }
    Ok(target)
}

const SHELL_BINARY: &str = "canopy-sandbox-shell";
const SHELL_BINARY_ENV: &str = "CANOPY_SANDBOX_SHELL_BIN";

/// The guard binary: configured, else from the environment, else next to the running
/// executable or in its parent directory (test binaries live in `target/*/deps`).
fn find_shell_binary(configured: Option<&Path>) -> Result<PathBuf, Error> {
    let from_env = std::env::var_os(SHELL_BINARY_ENV).map(PathBuf::from);
    let candidates: Vec<PathBuf> = match configured.map(Path::to_owned).or(from_env) {
        Some(path) => vec![path],
        None => {
            let exe = std::env::current_exe().ok();
            let dir = exe.as_deref().and_then(Path::parent);
            dir.into_iter()
                .chain(dir.and_then(Path::parent))
                .map(|dir| dir.join(SHELL_BINARY))
                .collect()
        }
    };
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| Error::ShellBinaryNotFound {
            looked: candidates
                .iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Writes OpenCode's password where only the sandbox uid (and root) can read it.
fn write_password(path: &Path, password: &str, uid: u32) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| Error::Prepare {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io(error)),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)
        .map_err(io)?;
    if rustix::process::geteuid().as_raw() != uid {
        std::os::unix::fs::fchown(&file, Some(uid), Some(uid)).map_err(io)?;
    }
    file.write_all(password.as_bytes()).map_err(io)
}

fn kill(pid: u32, signal: Signal) {
    // Never 0 or 1: those would reach this process's group or every process.
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .filter(|pid| *pid > 1)
        .and_then(Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Why [`read_capped`] stopped reading.
enum Capped {
    TooLarge { stream: &'static str },
    Read(std::io::Error),
}

/// All of `pipe` (nothing when there is none), or [`Capped::TooLarge`] once it passes `limit`
/// bytes: the host never holds more than that of what a sandbox prints.
async fn read_capped(
    pipe: Option<impl tokio::io::AsyncRead + Unpin>,
    limit: usize,
    stream: &'static str,
) -> Result<Vec<u8>, Capped> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let Some(pipe) = pipe else {
        return Ok(bytes);
    };
    pipe.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(Capped::Read)?;
    if bytes.len() > limit {
        return Err(Capped::TooLarge { stream });
    }
    Ok(bytes)
}

/// The first descendant of `pid` (breadth first) whose command name is `comm`.
fn find_descendant(pid: u32, comm: &str) -> Option<u32> {
    tree_of(pid).into_iter().find(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|name| name.trim() == comm)
    })
}

/// `pid` and its descendants, breadth first (parents before their children).
fn tree_of(pid: u32) -> Vec<u32> {
    let mut tree = Vec::new();
    let mut queue = VecDeque::from([pid]);
    while let Some(pid) = queue.pop_front() {
        tree.push(pid);
        // Each thread lists the children it started.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            queue.extend(
                children
                    .split_whitespace()
                    .filter_map(|child| child.parse::<u32>().ok()),
            );
        }
    }
    tree
}

/// The last lines the sandbox printed, for error reports.
#[derive(Debug, Clone, Default)]
struct Output {
    lines: Arc<Mutex<VecDeque<String>>>,
}

const OUTPUT_LINES: usize = 40;
/// What is kept of one line; the sandbox decides how long its lines are.
const OUTPUT_LINE_BYTES: usize = 4096;

impl Output {
    fn follow(&self, pipe: impl Read + Send + 'static) {
        let lines = self.lines.clone();
        let spawned = std::thread::Builder::new()
            .name("sandbox-output".into())
            .spawn(move || {
                let mut pipe = BufReader::new(pipe);
                while let Ok(Some(line)) =
                    canopy_process::read_line_capped(&mut pipe, OUTPUT_LINE_BYTES)
                {
                    tracing::debug!(target: "canopy_sandbox::output", "{line}");
                    let mut lines = lines.lock().unwrap_or_else(|p| p.into_inner());
                    if lines.len() == OUTPUT_LINES {
                        lines.pop_front();
                    }
                    lines.push_back(line);
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot follow the sandbox's output");
        }
    }

    fn tail(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines_are_cut_at_the_limit() {
        let long = "x".repeat(10_000);
        let text = format!("short\r\n{long}\nlast");
        let mut reader = BufReader::with_capacity(64, text.as_bytes());
        let mut lines = Vec::new();
        while let Some(line) = canopy_process::read_line_capped(&mut reader, 100).unwrap() {
            lines.push(line);
        }
        assert_eq!(
            lines,
            [
                "short".to_owned(),
                format!("{} [line cut]", "x".repeat(100)),
                "last".to_owned()
            ]
        );
    }
}
