//! Running `opencode serve` as a child process.
//!
//! The child gets a scrubbed environment: its own HOME, XDG dirs and TMPDIR under the state dir
//! given (OpenCode keeps its SQLite database, logs, snapshots and config there), the config in
//! `OPENCODE_CONFIG_CONTENT` (nothing written into the project), no models.dev catalog fetch, no
//! auto-update, and npm in offline mode. The last one is because OpenCode runs a background
//! `npm install @opencode-ai/plugin` (63 MB) into every config dir it boots; Canopy uses no
//! plugins, and offline the install fails at once with a logged warning instead of downloading.
//!
//! Readiness is the `opencode server listening on <url>` stdout line followed by a health check
//! with a short per-request timeout: a connection made the instant the server starts listening
//! can be accepted and never answered.
//!
//! The child leads its own process group, so stopping it also reaches the shells its tools run.
//! With [`ServerConfig::die_with_parent`] it is started through `setpriv --pdeathsig KILL`; the
//! kernel ties that signal to the spawning *thread*, so children are spawned from one long-lived
//! thread.

use std::collections::VecDeque;
use std::io::BufReader;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::Error;
use crate::binary::opencode_binary;
use crate::client::{BasicAuth, ClientConfig, OpenCodeClient};

/// How to start an OpenCode server.
#[derive(Clone)]
pub struct ServerConfig {
    /// `None`: [`opencode_binary`].
    pub binary: Option<PathBuf>,
    /// HOME and the XDG dirs go under it; created when missing. One per server.
    pub state_dir: PathBuf,
    /// The server's working directory, its default project.
    pub project_dir: PathBuf,
    /// `OPENCODE_CONFIG_CONTENT`, for example [`crate::OpenCodeConfig::to_json`].
    pub config: Value,
    /// Sets `OPENCODE_SERVER_PASSWORD`: every request then needs basic auth as `opencode`.
    pub password: Option<String>,
    /// `None`: a port that was free a moment ago.
    pub port: Option<u16>,
    /// From spawning to a healthy server.
    pub startup_timeout: Duration,
    /// Each readiness health check.
    pub health_timeout: Duration,
    /// From SIGTERM to SIGKILL in [`OpenCodeServer::stop`].
    pub stop_timeout: Duration,
    /// Start through `setpriv --pdeathsig KILL`, so the server dies with this process.
    pub die_with_parent: bool,
    /// Passed as `--print-logs --log-level`; the lines go to `tracing` at debug level.
    pub log_level: Option<String>,
    /// More environment variables, set last (they can override the defaults).
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("binary", &self.binary)
            .field("state_dir", &self.state_dir)
            .field("project_dir", &self.project_dir)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("port", &self.port)
            .field("startup_timeout", &self.startup_timeout)
            .field("die_with_parent", &self.die_with_parent)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    pub fn new(
        state_dir: impl Into<PathBuf>,
        project_dir: impl Into<PathBuf>,
        config: Value,
    ) -> Self {
        Self {
            binary: None,
            state_dir: state_dir.into(),
            project_dir: project_dir.into(),
            config,
            password: None,
            port: None,
            startup_timeout: Duration::from_secs(30),
            health_timeout: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(5),
            die_with_parent: true,
            log_level: Some("WARN".to_owned()),
            env: Vec::new(),
        }
    }

    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }
}

/// A running `opencode serve`. Dropping it kills the process group; [`OpenCodeServer::stop`]
/// stops it gracefully.
#[derive(Debug)]
pub struct OpenCodeServer {
    pid: u32,
    base_url: String,
    auth: Option<BasicAuth>,
    project_dir: PathBuf,
    state_dir: PathBuf,
    exit: watch::Receiver<Option<ExitStatus>>,
    output: Output,
    stop_timeout: Duration,
}

/// How often readiness is re-checked while the health endpoint does not answer yet.
const HEALTH_RETRY: Duration = Duration::from_millis(100);
/// Attempts when a port picked here was taken by someone else before OpenCode bound it.
const PORT_ATTEMPTS: usize = 3;

impl OpenCodeServer {
    /// Starts `opencode serve` and waits until it is healthy.
    pub async fn start(config: ServerConfig) -> Result<Self, Error> {
        let binary = match &config.binary {
            Some(binary) if binary.is_file() => binary.clone(),
            Some(binary) => {
                return Err(Error::BinaryNotFound {
                    path: binary.clone(),
                });
            }
            None => opencode_binary()?,
        };
        let mut attempt = 1;
        loop {
            let port = match config.port {
                Some(port) => port,
                None => free_port()?,
            };
            let (server, listening) = Self::spawn(&config, &binary, port)?;
            match server.wait_ready(&config, listening).await {
                Ok(()) => return Ok(server),
                Err(Error::ExitedEarly { output, .. })
                    if config.port.is_none()
                        && attempt < PORT_ATTEMPTS
                        && output.contains("ServeError") =>
                {
                    tracing::debug!(port, "opencode could not listen; trying another port");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Where the server listens: `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn project_dir(&self) -> &Path {
        &self.project_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn auth(&self) -> Option<&BasicAuth> {
        self.auth.as_ref()
    }

    /// A client config for this server and its project dir (TCP, with auth); adjust timeouts
    /// or the transport before building the client.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::tcp(&self.base_url)
            .with_auth(self.auth.clone())
            .with_directory(&self.project_dir)
    }

    pub fn client(&self) -> Result<OpenCodeClient, Error> {
        OpenCodeClient::new(self.client_config())
    }

    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// The last lines the server printed (stdout and stderr), for error reports.
    pub fn recent_output(&self) -> String {
        self.output.tail()
    }

    /// SIGTERM to the process group, then SIGKILL after the stop timeout. Returns how the
    /// server exited.
    pub async fn stop(self) -> Result<ExitStatus, Error> {
        let mut exit = self.exit.clone();
        if !self.has_exited() {
            canopy_process::signal_group(self.pid, rustix::process::Signal::TERM);
        }
        let exited = tokio::time::timeout(self.stop_timeout, exit.wait_for(Option::is_some))
            .await
            .is_ok();
        if !exited {
            tracing::warn!(pid = self.pid, "opencode ignored SIGTERM; killing it");
            canopy_process::signal_group(self.pid, rustix::process::Signal::KILL);
        }
        let status = tokio::time::timeout(self.stop_timeout, exit.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|status| *status);
        status.ok_or(Error::StopTimeout { pid: self.pid })
    }

    fn spawn(
        config: &ServerConfig,
        binary: &Path,
        port: u16,
    ) -> Result<(Self, oneshot::Receiver<String>), Error> {
        let dirs = StateDirs::new(&config.state_dir);
        dirs.create()?;
        let mut command = if config.die_with_parent {
            canopy_process::death_signal("KILL", binary)
        } else {
            Command::new(binary)
        };
        command
            .args([
                "serve",
                "--hostname",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .current_dir(&config.project_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(level) = &config.log_level {
            command.args(["--print-logs", "--log-level", level]);
        }
        command.env_clear();
        for (key, value) in child_env(config, &dirs) {
            command.env(key, value);
        }

        let program = if config.die_with_parent {
            "setpriv (from util-linux) to start opencode".to_owned()
        } else {
            binary.display().to_string()
        };
        let mut child = if config.die_with_parent {
            canopy_process::spawn_tied(command)
        } else {
            command.spawn()
        }
        .map_err(|source| Error::Spawn { program, source })?;

        let pid = child.id();
        let output = Output::default();
        let (listening_tx, listening_rx) = oneshot::channel();
        if let Some(stdout) = child.stdout.take() {
            output.follow(stdout, "stdout", Some(listening_tx));
        }
        if let Some(stderr) = child.stderr.take() {
            output.follow(stderr, "stderr", None);
        }
        let (exit_tx, exit) = watch::channel(None);
        std::thread::Builder::new()
            .name(format!("opencode-{pid}-wait"))
            .spawn(move || {
                let status = wait(child);
                let _ = exit_tx.send(status);
            })
            .map_err(|source| Error::Spawn {
                program: "a thread to wait for opencode".to_owned(),
                source,
            })?;
        let server = Self {
            pid,
            base_url: format!("http://127.0.0.1:{port}"),
            auth: config.password.clone().map(BasicAuth::opencode),
            project_dir: config.project_dir.clone(),
            state_dir: config.state_dir.clone(),
            exit,
            output,
            stop_timeout: config.stop_timeout,
        };
        Ok((server, listening_rx))
    }

    async fn wait_ready(
        &self,
        config: &ServerConfig,
        listening: oneshot::Receiver<String>,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + config.startup_timeout;
        let mut exit = self.exit.clone();
        tokio::select! {
            url = listening => {
                if let Ok(url) = url && url != self.base_url {
                    tracing::warn!(%url, expected = %self.base_url, "opencode listens elsewhere than asked");
                }
            }
            _ = exit.wait_for(Option::is_some) => return Err(self.exited_early()),
            _ = tokio::time::sleep_until(deadline) => return Err(self.not_ready(config)),
        }
        let client = self.client()?;
        loop {
            match client.health_within(config.health_timeout).await {
                Ok(health) if health.healthy => return Ok(()),
                Ok(_) => tracing::debug!("opencode is up but not healthy yet"),
                Err(error) => tracing::debug!(%error, "opencode health check failed"),
            }
            if self.has_exited() {
                return Err(self.exited_early());
            }
            if Instant::now() + HEALTH_RETRY > deadline {
                return Err(self.not_ready(config));
            }
            tokio::time::sleep(HEALTH_RETRY).await;
        }
    }

    fn exited_early(&self) -> Error {
        let status = self
            .exit
            .borrow()
            .map(|status| status.to_string())
            .unwrap_or_else(|| "unknown status".to_owned());
        Error::ExitedEarly {
            status,
            output: self.output.tail(),
        }
    }

    fn not_ready(&self, config: &ServerConfig) -> Error {
        canopy_process::signal_group(self.pid, rustix::process::Signal::KILL);
        Error::StartupTimeout {
            after: config.startup_timeout,
            output: self.output.tail(),
        }
    }
}

impl Drop for OpenCodeServer {
    fn drop(&mut self) {
        if !self.has_exited() {
            canopy_process::signal_group(self.pid, rustix::process::Signal::KILL);
        }
    }
}

/// HOME and the XDG base dirs of one server.
struct StateDirs {
    home: PathBuf,
    config: PathBuf,
    data: PathBuf,
    cache: PathBuf,
    state: PathBuf,
    tmp: PathBuf,
}

impl StateDirs {
    fn new(root: &Path) -> Self {
        Self {
            home: root.join("home"),
            config: root.join("xdg/config"),
            data: root.join("xdg/data"),
            cache: root.join("xdg/cache"),
            state: root.join("xdg/state"),
            tmp: root.join("tmp"),
        }
    }

    fn create(&self) -> Result<(), Error> {
        for dir in [
            &self.home,
            &self.config,
            &self.data,
            &self.cache,
            &self.state,
            &self.tmp,
        ] {
            std::fs::create_dir_all(dir).map_err(|source| Error::Prepare {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// The whole environment of the child: nothing is inherited but what tools need to run.
fn child_env(config: &ServerConfig, dirs: &StateDirs) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ["PATH", "LANG", "LC_ALL", "TZ", "SHELL"]
        .into_iter()
        .filter_map(|key| std::env::var(key).ok().map(|value| (key.to_owned(), value)))
        .collect();
    if !env.iter().any(|(key, _)| key == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    let path = |dir: &Path| dir.to_string_lossy().into_owned();
    env.extend([
        ("HOME".to_owned(), path(&dirs.home)),
        ("XDG_CONFIG_HOME".to_owned(), path(&dirs.config)),
        ("XDG_DATA_HOME".to_owned(), path(&dirs.data)),
        ("XDG_CACHE_HOME".to_owned(), path(&dirs.cache)),
        ("XDG_STATE_HOME".to_owned(), path(&dirs.state)),
        ("TMPDIR".to_owned(), path(&dirs.tmp)),
        (
            "OPENCODE_CONFIG_CONTENT".to_owned(),
            config.config.to_string(),
        ),
        ("OPENCODE_DISABLE_MODELS_FETCH".to_owned(), "1".to_owned()),
        ("OPENCODE_DISABLE_AUTOUPDATE".to_owned(), "1".to_owned()),
        ("npm_config_offline".to_owned(), "true".to_owned()),
    ]);
    if let Some(password) = &config.password {
        env.push(("OPENCODE_SERVER_PASSWORD".to_owned(), password.clone()));
    }
    env.extend(config.env.iter().cloned());
    env
}

/// The last lines of the child's stdout and stderr.
#[derive(Debug, Clone, Default)]
struct Output {
    lines: Arc<Mutex<VecDeque<String>>>,
}

const OUTPUT_LINES: usize = 40;
/// What is kept of one output line.
const OUTPUT_LINE_BYTES: usize = 4096;
const LISTENING: &str = "opencode server listening on ";

impl Output {
    fn follow(
        &self,
        pipe: impl std::io::Read + Send + 'static,
        stream: &'static str,
        mut listening: Option<oneshot::Sender<String>>,
    ) {
        let lines = self.lines.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("opencode-{stream}"))
            .spawn(move || {
                let mut pipe = BufReader::new(pipe);
                while let Ok(Some(line)) =
                    canopy_process::read_line_capped(&mut pipe, OUTPUT_LINE_BYTES)
                {
                    tracing::debug!(target: "canopy_opencode::server::output", stream, "{line}");
                    if let Some(url) = line.trim().strip_prefix(LISTENING)
                        && let Some(tx) = listening.take()
                    {
                        let _ = tx.send(url.trim().to_owned());
                    }
                    let mut lines = lines.lock().unwrap_or_else(|p| p.into_inner());
                    if lines.len() == OUTPUT_LINES {
                        lines.pop_front();
                    }
                    lines.push_back(line);
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, stream, "cannot follow opencode output");
        }
    }

    fn tail(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.is_empty() {
            return "(none)".to_owned();
        }
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

fn wait(mut child: Child) -> Option<ExitStatus> {
    match child.wait() {
        Ok(status) => Some(status),
        Err(error) => {
            tracing::warn!(%error, "cannot wait for opencode");
            None
        }
    }
}

fn free_port() -> Result<u16, Error> {
    let prepare = |source| Error::Prepare {
        path: PathBuf::from("127.0.0.1:0"),
        source,
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(prepare)?;
    Ok(listener.local_addr().map_err(prepare)?.port())
}
