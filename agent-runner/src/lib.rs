//! Canopy agent-runner: workers that turn prompts into real work by OpenCode in a sandbox.
//!
//! - [`consumer`]: one durable JetStream pull consumer over every session's events (one
//!   wildcard filter, explicit ack). A message is only a wake-up: the session's driver reads the
//!   session from the event store before it acts, so a redelivered, stale or out-of-order message
//!   never repeats work and a gap is filled from the store, never waited for.
//! - [`lease`]: one driver per session across runners, by a lease row in Postgres (owner,
//!   expiry, renewed while working). When a runner dies another takes the session over once the
//!   lease has expired.
//! - [`supervisor`]: this runner's drivers (bounded by `max_sessions`), the expired-lease sweep,
//!   and the wake-ups between runners.
//! - [`driver`]: one session's loop: start the prompt heading the queue, plan with OpenCode's
//!   `plan` agent, wait for a person's decision, build with the `build` agent under the tool
//!   gate, commit a checkpoint authored as the prompting person, complete; and the people's
//!   checkpoint, restore and push requests.
//! - [`record`]: every fact goes to command-api with the runner token and an idempotency key
//!   derived from what it records, so retries and takeovers record nothing twice.
//! - [`redact`]: tool inputs and outputs lose secrets and are cut to a bounded size.
//!
//! `build(config)` connects and binds the status endpoint; [`App::run_until`] works until the
//! shutdown future resolves, then drains: drivers finish their current step and hand their
//! sessions back.

pub mod budget;
pub mod consumer;
pub mod driver;
pub mod lease;
pub mod plan_text;
pub mod record;
pub mod redact;
pub mod supervisor;
pub mod turn;
pub mod view;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use canopy_event_store::{DbConfig, PgPool};
use canopy_sandbox::{
    BubblewrapConfig, BubblewrapProvider, ModelUpstream, SandboxManager, SandboxMode,
    SandboxProvider,
};

pub use supervisor::Supervisor;

/// The agent runner's own settings (flags or `CANOPY_RUNNER_*` / `CANOPY_MODEL_*` variables).
/// Where to find the database, NATS and command-api is given separately ([`Connections`]), so
/// `canopy up` can share them with the other services.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "agent_runner")]
#[command(next_help_heading = "Agent runner")]
pub struct Config {
    /// This runner's name in leases (defaults to `<hostname>-<pid>`); unique per process.
    #[arg(long, env = "CANOPY_RUNNER_ID")]
    pub runner_id: Option<String>,
    /// Address of the runner's status endpoint (`/health`).
    #[arg(
        long = "runner-listen",
        env = "CANOPY_RUNNER_ADDR",
        default_value = "127.0.0.1:8082"
    )]
    pub status_listen: SocketAddr,
    /// Sessions one runner drives at once.
    #[arg(long, env = "CANOPY_RUNNER_MAX_SESSIONS", default_value_t = 8)]
    pub max_sessions: usize,
    /// How long a lease lasts without renewal; another runner takes a session over after it (at
    /// least 2s).
    #[arg(long = "runner-lease", env = "CANOPY_RUNNER_LEASE", value_parser = canopy_config::parse_duration, default_value = "30s")]
    pub lease: Duration,
    /// The durable consumer's name (shared by every runner).
    #[arg(
        long,
        env = "CANOPY_RUNNER_CONSUMER",
        default_value = "canopy-agent-runner"
    )]
    pub consumer_name: String,
    /// OpenAI-compatible base URL of the model, up to `/v1`. Unset: a built-in scripted demo
    /// model.
    #[arg(long, env = "CANOPY_MODEL_BASE_URL")]
    pub model_base_url: Option<String>,
    /// The model id to ask for.
    #[arg(long, env = "CANOPY_MODEL_ID", default_value = "scripted")]
    pub model_id: String,
    /// The provider's API key; it stays in the host-side model proxy.
    #[arg(
        long,
        env = "CANOPY_MODEL_API_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub model_api_key: String,
    /// Where sandboxes live; as root, it and its parents must be root's (default
    /// `/var/lib/canopy/sandboxes`, or `sandboxes` in `canopy up`'s data folder).
    #[arg(long, env = "CANOPY_SANDBOX_ROOT")]
    pub sandbox_root: Option<PathBuf>,
    /// Run sandboxes rootless even as root: all as this process's uid, each in bwrap's own user
    /// namespace, no uid per sandbox (a normal user always runs them so; docs/security.md).
    #[arg(long, env = "CANOPY_SANDBOX_ROOTLESS")]
    pub sandbox_rootless: bool,
    /// Sandboxes starting at once (an OpenCode boot is CPU-bound; too many at once on few
    /// cores miss the start-up deadline). Default: the number of cores.
    #[arg(long, env = "CANOPY_RUNNER_SANDBOX_STARTS")]
    pub sandbox_starts: Option<usize>,
    /// Tokens (as the model provider reports them) one sandbox may use over its life in this
    /// runner; past it, its model calls get 429 from the model proxy. Unset: no limit.
    #[arg(long, env = "CANOPY_SANDBOX_MODEL_TOKEN_BUDGET")]
    pub sandbox_model_token_budget: Option<u64>,
    /// What one sandbox may keep on disk (its workspace, home and run directory together), in
    /// bytes (`4GiB`, `512MiB`). As root a filesystem image of its own enforces it; rootless
    /// a periodic check stops a sandbox over it.
    #[arg(long, env = "CANOPY_SANDBOX_DISK", value_parser = canopy_config::parse_bytes, default_value = "4GiB")]
    pub sandbox_disk: u64,
    /// Files and directories one sandbox may keep (its disk image's inode count as root).
    #[arg(long, env = "CANOPY_SANDBOX_DISK_INODES", default_value_t = 262_144)]
    pub sandbox_disk_inodes: u64,
    /// Rootless: how often each running sandbox's disk usage is measured.
    #[arg(long, env = "CANOPY_SANDBOX_DISK_CHECK_INTERVAL", value_parser = canopy_config::parse_duration, default_value = "10s")]
    pub sandbox_disk_check_interval: Duration,
    /// How long a sandbox stays up with nothing to do (at least 1s).
    #[arg(long, env = "CANOPY_SANDBOX_IDLE_TIMEOUT", value_parser = canopy_config::parse_duration, default_value = "5m")]
    pub sandbox_idle_timeout: Duration,
    /// Workspaces whose agents run bash without asking a person (all others ask).
    #[arg(
        long,
        env = "CANOPY_RUNNER_BASH_ALLOW_WORKSPACES",
        value_delimiter = ','
    )]
    pub bash_allow_workspaces: Vec<String>,
    /// Plans a prompt may have rejected before it ends.
    #[arg(long, env = "CANOPY_RUNNER_MAX_PLAN_ROUNDS", default_value_t = 3)]
    pub max_plan_rounds: usize,
    /// Model calls in one turn.
    #[arg(long, env = "CANOPY_RUNNER_MAX_STEPS", default_value_t = 50)]
    pub max_steps: usize,
    /// Agent work per turn, not counting time waiting for people (at least 1s).
    #[arg(long, env = "CANOPY_RUNNER_AGENT_TIME", value_parser = canopy_config::parse_duration, default_value = "15m")]
    pub agent_time: Duration,
    /// How long the agent may show no sign of life before its turn is stopped (at least 1s).
    #[arg(long, env = "CANOPY_RUNNER_INACTIVITY_TIMEOUT", value_parser = canopy_config::parse_duration, default_value = "2m")]
    pub inactivity_timeout: Duration,
    /// How long a plan or tool approval may wait for a person before the prompt fails.
    #[arg(long, env = "CANOPY_RUNNER_APPROVAL_TIMEOUT", value_parser = canopy_config::parse_duration, default_value = "1d")]
    pub approval_timeout: Duration,
    /// Repository URL schemes sandboxes may clone and push (`file` only for development).
    #[arg(
        long,
        env = "CANOPY_RUNNER_GIT_SCHEMES",
        value_delimiter = ',',
        default_value = "https"
    )]
    pub git_schemes: Vec<String>,
    /// User name for pushes (with CANOPY_GIT_PASSWORD); never given to a sandbox.
    #[arg(long, env = "CANOPY_GIT_USERNAME")]
    pub git_username: Option<String>,
    /// Password or token for pushes (with CANOPY_GIT_USERNAME); never given to a sandbox.
    #[arg(long, env = "CANOPY_GIT_PASSWORD", hide_env_values = true)]
    pub git_password: Option<String>,
    /// Largest recorded tool input or output, in bytes (the full size is noted).
    #[arg(long, env = "CANOPY_RUNNER_TOOL_OUTPUT_BYTES", default_value_t = 8 * 1024)]
    pub tool_output_bytes: usize,
    /// How long in-flight work may go on after a stop signal before sessions are handed back.
    #[arg(long, env = "CANOPY_RUNNER_DRAIN_TIMEOUT", value_parser = canopy_config::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
}

impl Config {
    /// Defaults, for tests and embedding.
    pub fn defaults() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            config: Config,
        }
        Defaults::parse_from(["agent-runner"]).config
    }

    /// The lease's lifetime: as configured, but at least 2 s (drivers renew every third of it).
    pub fn lease_ttl(&self) -> Duration {
        self.lease.max(Duration::from_secs(2))
    }

    /// Agent work per turn, at least 1 s.
    pub fn agent_time(&self) -> Duration {
        self.agent_time.max(Duration::from_secs(1))
    }

    /// Silence from the agent before its turn stops, at least 1 s.
    pub fn inactivity_timeout(&self) -> Duration {
        self.inactivity_timeout.max(Duration::from_secs(1))
    }

    /// A sandbox's idle time before it stops, at least 1 s.
    pub fn sandbox_idle_timeout(&self) -> Duration {
        self.sandbox_idle_timeout.max(Duration::from_secs(1))
    }
}

/// Where the runner finds the rest of the system.
#[derive(Debug, Clone)]
pub struct Connections {
    pub database_url: String,
    /// One NATS URL or several, comma-separated (a cluster's nodes).
    pub nats_url: String,
    /// The relay's stream and subject prefix.
    pub stream_name: String,
    pub subject_prefix: String,
    /// command-api's base URL, e.g. `http://127.0.0.1:8080`.
    pub command_api_url: String,
    /// A `runner` token for command-api. All runners must use the same subject, so that their
    /// idempotency keys share one scope.
    pub runner_token: String,
}

/// What the drivers share.
#[derive(Debug)]
pub struct Ctx {
    pub config: Config,
    pub runner_id: String,
    pub pool: PgPool,
    pub nats: async_nats::Client,
    pub connections: Connections,
    pub recorder: record::Recorder,
    pub sandboxes: Arc<SandboxManager>,
    /// The OpenCode provider and model prompts name.
    pub model: canopy_opencode::ModelRef,
    /// The subject runners wake each other on (`<prefix>-wake.<session>`).
    pub wake_prefix: String,
    /// Cleans tool text of secrets (the runner's own among them) before it is recorded.
    pub redactor: redact::Redactor,
    /// Bounds how many sandboxes start at once.
    pub sandbox_starts: tokio::sync::Semaphore,
    /// Sessions whose sandbox this runner started and has not seen stop.
    started_sandboxes: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// How the sandboxes are isolated, as the status endpoint shows it.
    pub sandbox_isolation: SandboxIsolation,
}

/// How this runner's sandboxes are isolated, decided once at start-up.
#[derive(Debug, Clone, Copy)]
pub struct SandboxIsolation {
    /// Root (a uid per sandbox) or rootless (the runner's uid, bwrap's user namespace).
    pub mode: SandboxMode,
    /// Whether each sandbox gets a memory and pids cgroup.
    pub cgroups: bool,
    /// Whether each sandbox's disk quota is a filesystem of its own (root) rather than a
    /// periodic check that stops it once over (rootless).
    pub disk_quota_hard: bool,
}

impl Ctx {
    /// How this runner's sandbox of `session` is named in `SandboxStarted`/`SandboxStopped`:
    /// unique per runner, so a takeover can tell a dead runner's sandbox from its own.
    pub fn sandbox_name(&self, session: uuid::Uuid) -> String {
        format!("{session}@{}", self.runner_id)
    }

    pub(crate) fn remember_sandbox(&self, session: uuid::Uuid) {
        self.started_sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session);
    }

    pub(crate) fn forget_sandbox(&self, session: uuid::Uuid) -> bool {
        self.started_sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&session)
    }

    /// Records that this runner's sandbox of `session` stopped, if the session says it runs.
    pub(crate) async fn record_sandbox_stopped(&self, session: uuid::Uuid, reason: &str) {
        self.forget_sandbox(session);
        let mut view = view::SessionView::new(session);
        if let Err(error) = view.refresh(&self.pool).await {
            tracing::warn!(%error, %session, "cannot read the session to record its sandbox stop");
            return;
        }
        let mine = self.sandbox_name(session);
        if view.session.sandbox_id() != Some(mine.as_str()) {
            return;
        }
        let key = format!(
            "sandbox-stopped:{session}:{}",
            view.sandbox_started_at.unwrap_or_default()
        );
        let body = serde_json::json!({ "sandbox_id": mine, "reason": reason });
        if let Err(error) = self
            .recorder
            .post(session, "sandbox/stopped", &key, &body)
            .await
        {
            tracing::warn!(%error, %session, "cannot record the sandbox stop");
        }
    }

    /// Stops every sandbox this runner started and records it (at shutdown).
    pub(crate) async fn stop_sandboxes(&self) {
        let sessions: Vec<uuid::Uuid> = self
            .started_sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        for session in sessions {
            if let Err(error) = self.sandboxes.provider().stop(&session.to_string()).await {
                tracing::warn!(%error, %session, "cannot stop the sandbox");
            }
            self.record_sandbox_stopped(session, "the runner stopped")
                .await;
        }
    }
}

/// A built runner: connected, listening for status requests, not yet working.
#[derive(Debug)]
pub struct App {
    listener: tokio::net::TcpListener,
    ctx: Arc<Ctx>,
    /// The built-in scripted model, when no model is configured.
    _demo_model: Option<canopy_scripted_model::ModelServer>,
}

/// The provider id sandboxes know the model by.
pub const MODEL_PROVIDER_ID: &str = "canopy";

/// Connects to the database and NATS, prepares the sandbox provider (and the demo model when no
/// model is configured) and binds the status endpoint.
pub async fn build(config: Config, connections: Connections) -> anyhow::Result<App> {
    let mut db = DbConfig::new(&connections.database_url);
    db.max_connections = (config.max_sessions as u32).clamp(4, 64) + 4;
    db.application_name = "canopy-agent-runner".to_owned();
    let pool = canopy_event_store::connect(&db)
        .await
        .context("connect to the database")?;
    let nats = canopy_config::connect_nats(
        &connections.nats_url,
        "canopy-agent-runner",
        Duration::from_secs(30),
    )
    .await?;
    let (upstream, demo_model) = match &config.model_base_url {
        Some(url) => (
            ModelUpstream {
                base_url: url.trim_end_matches('/').to_owned(),
                api_key: config.model_api_key.clone(),
            },
            None,
        ),
        None => {
            let server =
                canopy_scripted_model::ModelServer::start(canopy_scripted_model::demo_script())
                    .await
                    .context("start the built-in demo model")?;
            tracing::warn!(
                url = %server.base_url(),
                "no model configured (CANOPY_MODEL_BASE_URL): agents use the built-in scripted demo model"
            );
            (
                ModelUpstream {
                    base_url: server.base_url(),
                    api_key: String::new(),
                },
                Some(server),
            )
        }
    };
    let sandbox_root = std::path::absolute(
        config
            .sandbox_root
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/canopy/sandboxes")),
    )
    .context("sandbox root")?;
    let mut sandbox_config = BubblewrapConfig::new(sandbox_root, upstream);
    sandbox_config.clone.allowed_schemes = config.git_schemes.clone();
    sandbox_config.model_limits.token_budget = config.sandbox_model_token_budget;
    sandbox_config.force_rootless = config.sandbox_rootless;
    sandbox_config.limits.disk = canopy_sandbox::DiskQuota {
        bytes: config.sandbox_disk,
        inodes: config.sandbox_disk_inodes,
        check_interval: config
            .sandbox_disk_check_interval
            .max(Duration::from_millis(100)),
    };
    let provider = tokio::task::block_in_place(|| BubblewrapProvider::new(sandbox_config))
        .context("prepare the sandboxes (they need bwrap, prlimit, socat, and as root setpriv)")?;
    let sandbox_isolation = SandboxIsolation {
        mode: provider.mode(),
        cgroups: provider.cgroups().is_available(),
        disk_quota_hard: provider.disk_quota_hard(),
    };
    tracing::info!(
        mode = sandbox_isolation.mode.as_str(),
        cgroups = sandbox_isolation.cgroups,
        disk_quota_hard = sandbox_isolation.disk_quota_hard,
        "sandboxes ready"
    );
    let provider: Arc<dyn SandboxProvider> = Arc::new(provider);
    let sandboxes = SandboxManager::new(provider, config.sandbox_idle_timeout());
    let runner_id = config.runner_id.clone().unwrap_or_else(default_runner_id);
    let recorder = record::Recorder::new(&connections.command_api_url, &connections.runner_token)?;
    let listener = tokio::net::TcpListener::bind(config.status_listen)
        .await
        .with_context(|| format!("bind {}", config.status_listen))?;
    let wake_prefix = format!("{}-wake", connections.subject_prefix);
    let starts = config.sandbox_starts.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(2)
    });
    // Literal secrets no recorded text may contain.
    let redactor = redact::Redactor::new(
        [
            config.model_api_key.clone(),
            connections.runner_token.clone(),
        ]
        .into_iter()
        .chain(config.git_password.clone()),
    );
    let ctx = Arc::new(Ctx {
        redactor,
        sandbox_starts: tokio::sync::Semaphore::new(starts.max(1)),
        model: canopy_opencode::ModelRef::new(MODEL_PROVIDER_ID, &config.model_id),
        config,
        runner_id,
        pool,
        nats,
        connections,
        recorder,
        sandboxes,
        wake_prefix,
        started_sandboxes: std::sync::Mutex::default(),
        sandbox_isolation,
    });
    Ok(App {
        listener,
        ctx,
        _demo_model: demo_model,
    })
}

impl App {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn runner_id(&self) -> &str {
        &self.ctx.runner_id
    }

    /// Works until `shutdown` resolves, then drains: stops taking sessions, lets every driver
    /// finish its current step (for at most the drain time) and hands the sessions back.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let supervisor = Supervisor::new(self.ctx.clone());
        let status = {
            let supervisor = supervisor.clone();
            let router = axum::Router::new().route(
                "/health",
                axum::routing::get(move || {
                    let supervisor = supervisor.clone();
                    async move { axum::Json(supervisor.status().await) }
                }),
            );
            let (stop_status, stopped) = tokio::sync::oneshot::channel::<()>();
            let serve = canopy_http::serve::serve(self.listener, router, async move {
                let _ = stopped.await;
            });
            (tokio::spawn(serve), stop_status)
        };
        let result = supervisor.run_until(shutdown).await;
        let _ = status.1.send(());
        let _ = status.0.await;
        result
    }
}

fn default_runner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "runner".to_owned());
    format!("{host}-{}", std::process::id())
}

/// The service name every runner's token carries: one idempotency scope for all runners.
pub const RUNNER_SUBJECT: &str = "agent-runner";

/// A runner token signed with the HS256 `secret`, valid for a year.
pub fn mint_runner_token(secret: &str) -> anyhow::Result<String> {
    let claims = canopy_auth::Claims::runner(RUNNER_SUBJECT, chrono::Duration::days(365));
    canopy_auth::mint_hs256(secret, &claims).context("mint the runner token")
}
