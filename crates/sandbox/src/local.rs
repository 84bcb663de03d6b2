//! The local provider: one bubblewrap sandbox per session on this host.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
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
use crate::egress::{EgressPolicy, EgressProxy, EgressStats};
use crate::git::{self, CloneConfig};
use crate::limits::{Cgroup, CgroupSupport, Limits};
use crate::model_proxy::{ModelProxy, ModelUpstream};
use crate::provider::{
    Commit, CommitRequest, ExecOutput, ExecRequest, PushRequest, SandboxInfo, SandboxProvider,
    SandboxSpec, SandboxStatus,
};
use crate::socket::{BridgeStats, SocketBridge, connect_sandbox_socket};
use crate::uid::UidLease;

/// How the local provider runs sandboxes.
#[derive(Debug, Clone)]
pub struct BubblewrapConfig {
    /// Where sandboxes live (`<root>/<id>/{workspace,home,run,host,control,etc}`). It and every
    /// parent must be root's and not writable by the sandbox uids.
    pub root: PathBuf,
    /// The uids handed to sandboxes, one each.
    pub uids: Range<u32>,
    /// Where uid leases are locked; shared by every provider on the host.
    pub uid_lock_dir: PathBuf,
    /// The model the host-side proxy forwards to, and its key.
    pub model: ModelUpstream,
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
}

impl BubblewrapConfig {
    pub fn new(root: impl Into<PathBuf>, model: ModelUpstream) -> Self {
        Self {
            root: root.into(),
            uids: 620_000..621_000,
            uid_lock_dir: PathBuf::from("/run/canopy-sandbox/uids"),
            model,
            limits: Limits::default(),
            opencode_binary: None,
            shell_binary: None,
            clone: CloneConfig::default(),
            startup_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(5),
            egress: EgressPolicy::Deny,
        }
    }
}

/// The model base URL OpenCode is configured with inside every sandbox.
pub const SANDBOX_MODEL_BASE_URL: &str = "http://127.0.0.1:8080/v1";
/// How long a commit, restore or bundle may run in the sandbox.
const GIT_TIMEOUT: Duration = Duration::from_secs(300);

/// The API key OpenCode is configured with inside: a placeholder, the proxy adds the real one.
pub const SANDBOX_API_KEY_PLACEHOLDER: &str = "sandbox-has-no-key";

/// Sandboxes on this host with bubblewrap. Needs root, `bwrap`, `setpriv`, `prlimit`, `socat`.
#[derive(Debug)]
pub struct BubblewrapProvider {
    config: BubblewrapConfig,
    cgroups: CgroupSupport,
    binaries: Binaries,
    sandboxes: tokio::sync::Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    lease: UidLease,
    layout: Layout,
    cgroup: Option<Cgroup>,
    /// Serves every process of the sandbox (OpenCode and execs) while the entry exists.
    egress: Option<EgressProxy>,
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
        let cgroups = CgroupSupport::detect();
        cgroups.sweep(|uid| UidLease::acquire(&config.uid_lock_dir, &(uid..uid + 1), None).ok());
        if let CgroupSupport::Unavailable { reason } = &cgroups {
            tracing::warn!(%reason, "sandboxes get no memory or pids cgroup; only rlimits hold");
        }
        Ok(Self {
            config,
            cgroups,
            binaries,
            sandboxes: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn cgroups(&self) -> &CgroupSupport {
        &self.cgroups
    }

    pub fn config(&self) -> &BubblewrapConfig {
        &self.config
    }

    /// Creates the sandbox's directories and workspace without starting anything.
    pub async fn prepare(&self, spec: &SandboxSpec) -> Result<u32, Error> {
        let mut sandboxes = self.sandboxes.lock().await;
        Ok(self.entry(&mut sandboxes, spec)?.lease.uid())
    }

    /// Connects to OpenCode's socket in the sandbox, refusing anything but the sandbox's own
    /// socket (see [`connect_sandbox_socket`]).
    pub async fn connect_opencode(&self, id: &str) -> Result<tokio::net::UnixStream, Error> {
        let (run, uid) = {
            let sandboxes = self.sandboxes.lock().await;
            let entry = sandboxes
                .get(id)
                .ok_or_else(|| Error::NotFound { id: id.to_owned() })?;
            (entry.layout.run.clone(), entry.lease.uid())
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
            let previous_owner = std::fs::metadata(&layout.workspace)
                .ok()
                .map(|meta| meta.uid());
            let lease =
                UidLease::acquire(&self.config.uid_lock_dir, &self.config.uids, previous_owner)?;
            prepare_layout(
                &layout,
                spec,
                lease.uid(),
                &self.config,
                self.cgroups.is_available(),
            )?;
            sandboxes.insert(
                spec.id.clone(),
                Entry {
                    lease,
                    layout,
                    cgroup: None,
                    egress: None,
                    running: None,
                },
            );
        }
        sandboxes.get_mut(&spec.id).ok_or_else(|| Error::NotFound {
            id: spec.id.clone(),
        })
    }

    /// The sandbox's cgroup, (re)created before every spawn: stopping removes it, and so may
    /// another provider's sweep while the uid is not leased.
    fn ensure_cgroup(&self, entry: &mut Entry) -> Result<(), Error> {
        let name = format!("uid-{}", entry.lease.uid());
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
                entry.lease.uid(),
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
            entry.lease.uid(),
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
        crate::spawn::spawn(command).map_err(|source| Error::Spawn {
            program: "bwrap (through sh, prlimit and setpriv)".to_owned(),
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
        self.ensure_cgroup(entry)?;
        self.ensure_egress(entry)?;
        let uid = entry.lease.uid();
        let layout = entry.layout.clone();
        crate::socket::remove_stale(&layout.run.join(bwrap::OPENCODE_SOCKET))?;
        let proxy = ModelProxy::start(
            &layout.host.join(bwrap::MODEL_SOCKET),
            uid,
            self.config.model.clone(),
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
            kill(pid, Signal::KILL);
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
            return Err(error);
        }
        running.info.startup = began.elapsed();
        tracing::info!(id = %spec.id, uid, startup = ?running.info.startup, "sandbox started");
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
        let child = {
            let mut sandboxes = self.sandboxes.lock().await;
            let entry = sandboxes
                .get_mut(id)
                .ok_or_else(|| Error::NotFound { id: id.to_owned() })?;
            self.ensure_cgroup(entry)?;
            self.ensure_egress(entry)?;
            self.spawn(entry, &Inner::Script { script, args }, Stdio::piped())?
        };
        let pid = child.id();
        let waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
        let (output, timed_out) = match tokio::time::timeout(timeout, waiting).await {
            Ok(output) => (output, false),
            Err(waiting) => {
                let _ = waiting;
                kill(pid, Signal::KILL);
                return Ok(ExecOutput {
                    code: None,
                    timed_out: true,
                    stdout: String::new(),
                    stderr: String::new(),
                });
            }
        };
        let output = output
            .map_err(|error| Error::Command {
                what: "waiting for exec".to_owned(),
                detail: error.to_string(),
            })?
            .map_err(|source| Error::Spawn {
                program: "exec".to_owned(),
                source,
            })?;
        Ok(ExecOutput {
            code: output.status.code(),
            timed_out,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
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
            (entry.layout.workspace.clone(), entry.lease.uid())
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
        let (running, cgroup) = {
            let mut sandboxes = self.sandboxes.lock().await;
            let entry = sandboxes
                .get_mut(id)
                .ok_or_else(|| Error::NotFound { id: id.to_owned() })?;
            (entry.running.take(), entry.cgroup.clone())
        };
        let Some(running) = running else {
            return Ok(());
        };
        running.wall_timer.abort();
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
        tracing::info!(id, "sandbox stopped");
        Ok(())
    }

    async fn status_of(&self, id: &str) -> Result<SandboxStatus, Error> {
        validate_id(id)?;
        let sandboxes = self.sandboxes.lock().await;
        let Some(entry) = sandboxes.get(id) else {
            let exists = Layout::new(&self.config.root, id).workspace.exists();
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
                    let cap = if running.wall_time_hit.load(Ordering::Relaxed) {
                        " (killed at the wall-time limit)"
                    } else {
                        ""
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
        let dir = Layout::new(&self.config.root, id).dir;
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
}

impl Drop for Running {
    fn drop(&mut self) {
        self.wall_timer.abort();
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
fn prepare_layout(
    layout: &Layout,
    spec: &SandboxSpec,
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
    for (dir, mode) in [
        (&layout.dir, 0o711),
        (&layout.host, 0o755),
        (&layout.control, 0o700),
        (&layout.etc, 0o755),
    ] {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::os::unix::fs::chown(dir, Some(0), Some(0)).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io(dir))?;
    }
    for (name, content) in Layout::etc_files(uid, limits, memory_cgroup) {
        let path = layout.etc.join(name);
        std::fs::write(&path, content).map_err(io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(io(&path))?;
    }
    if !layout.workspace.exists() {
        let staging = layout.dir.join("workspace.new");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(io(&staging))?;
        std::os::unix::fs::chown(&staging, Some(uid), Some(uid)).map_err(io(&staging))?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&staging))?;
        if let Err(error) =
            git::clone_as(uid, &spec.repository, &spec.branch, &staging, &config.clone)
        {
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
        let mode = if dir == &layout.run { 0o750 } else { 0o700 };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io(dir))?;
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
    std::os::unix::fs::fchown(&file, Some(uid), Some(uid)).map_err(io)?;
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

/// The first descendant of `pid` (breadth first) whose command name is `comm`.
fn find_descendant(pid: u32, comm: &str) -> Option<u32> {
    let mut queue = VecDeque::from([pid]);
    while let Some(pid) = queue.pop_front() {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if name.trim() == comm {
            return Some(pid);
        }
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        queue.extend(
            children
                .split_whitespace()
                .filter_map(|child| child.parse::<u32>().ok()),
        );
    }
    None
}

/// The last lines the sandbox printed, for error reports.
#[derive(Debug, Clone, Default)]
struct Output {
    lines: Arc<Mutex<VecDeque<String>>>,
}

const OUTPUT_LINES: usize = 40;

impl Output {
    fn follow(&self, pipe: impl Read + Send + 'static) {
        let lines = self.lines.clone();
        let spawned = std::thread::Builder::new()
            .name("sandbox-output".into())
            .spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
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
