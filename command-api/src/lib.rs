//! command-api: the only writer of events.
//!
//! An axum service that turns authenticated HTTP commands into events: people's session and
//! feature commands, and the agent runner's reports. Each request is checked in a fixed order
//! (token, rate limit, headers, body size, media type, JSON, fields), then runs through one path
//! ([`commands`]): an idempotency claim, the aggregate store (load, decide, append, with
//! per-aggregate serialization in the process and retried conflicts between processes), and an
//! answer that names the aggregate, its new version and the appended events. Nothing is written
//! for a request that is refused. Errors are problem+json with stable codes ([`error`]).
//!
//! `build(config)` binds (port 0 in tests) and `App::run_until(shutdown)` serves until shutdown,
//! draining in-flight requests.

mod auth;
mod budgets;
mod commands;
pub mod dto;
pub mod error;
mod extract;
mod idempotency;
mod rate_limit;
mod routes;
mod validate;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::{HeaderName, Method};
use canopy_auth::Verifier;
use canopy_domain::session::SessionPolicy;
use canopy_event_store::{AggregateStore, DbConfig, PgPool, RetryPolicy, StoreConfig};
use canopy_http::BearerAuth;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::cors::CorsLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::Caller;
use error::ApiError;
use rate_limit::RateLimiter;
use validate::Limits;

/// command-api's configuration (flags or `CANOPY_*` environment variables).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(
        long = "listen",
        env = "CANOPY_COMMAND_API_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub database: canopy_config::DatabaseArgs,
    #[command(flatten)]
    pub tokens: canopy_config::TokenArgs,
    /// Largest request body, in bytes.
    #[arg(long, env = "CANOPY_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest prompt text, in bytes.
    #[arg(long, env = "CANOPY_MAX_PROMPT_BYTES", default_value_t = 64 * 1024)]
    pub max_prompt_bytes: usize,
    /// Prompts a session may hold queued (the running one aside); one more is refused with 429
    /// `prompt_queue_full`.
    #[arg(long, env = "CANOPY_MAX_QUEUED_PROMPTS", default_value_t = SessionPolicy::DEFAULT_MAX_QUEUED_PROMPTS as u32,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queued_prompts: u32,
    /// Sustained commands per second per person.
    #[arg(long, env = "CANOPY_RATE_LIMIT_PER_SECOND", default_value_t = 10)]
    pub rate_limit_per_second: u32,
    /// Commands a person may send at once before the sustained rate applies.
    #[arg(long, env = "CANOPY_RATE_LIMIT_BURST", default_value_t = 60)]
    pub rate_limit_burst: u32,
    #[command(flatten)]
    pub cors: canopy_config::CorsArgs,
    /// How long idempotency keys are kept (at least 24h).
    #[arg(long, env = "CANOPY_IDEMPOTENCY_TTL", value_parser = canopy_config::parse_duration, default_value = "24h")]
    pub idempotency_ttl: Duration,
    /// How long a request holds its idempotency key before a retry of it may take the key over
    /// (a duplicate gets 409 until then). Never lets a command append twice.
    #[arg(long, env = "CANOPY_IDEMPOTENCY_LEASE", value_parser = canopy_config::parse_duration, default_value = "10s")]
    pub idempotency_lease: Duration,
    /// Attempts of a command that lost an append race to another process.
    #[arg(long, env = "CANOPY_COMMAND_ATTEMPTS", default_value_t = 5)]
    pub command_attempts: u32,
    /// Database connections.
    #[arg(long, env = "CANOPY_DB_MAX_CONNECTIONS", default_value_t = 20)]
    pub db_max_connections: u32,
    #[command(flatten)]
    pub webhook_targets: canopy_config::WebhookTargetArgs,
    /// The most of a cost budget an admitted prompt reserves until it finishes, in micro-USD
    /// (less when less is left): what two prompts at a budget's edge are held to.
    #[arg(
        long,
        env = "CANOPY_BUDGET_PROMPT_RESERVE_COST",
        default_value_t = 100_000
    )]
    pub budget_prompt_reserve_cost: u64,
    /// The most of a token budget an admitted prompt reserves until it finishes.
    #[arg(
        long,
        env = "CANOPY_BUDGET_PROMPT_RESERVE_TOKENS",
        default_value_t = 50_000
    )]
    pub budget_prompt_reserve_tokens: u64,
    /// The share of a budget, in percent, whose use is recorded once as `BudgetThresholdReached`.
    #[arg(long, env = "CANOPY_BUDGET_WARN_PERCENT", default_value_t = 80,
        value_parser = clap::value_parser!(u8).range(1..=100))]
    pub budget_warn_percent: u8,
}

impl Config {
    /// A configuration for tests and embedding: defaults, the given database, port 0.
    pub fn for_database(database_url: impl Into<String>) -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            config: Config,
        }
        let mut config = Defaults::parse_from(["command-api"]).config;
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.database = canopy_config::DatabaseArgs::new(database_url);
        config
    }
}

/// Idempotency keys are kept at least this long, whatever is configured.
const MIN_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub(crate) store: AggregateStore,
    pub(crate) pool: PgPool,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) limits: Arc<Limits>,
    pub(crate) session_policy: SessionPolicy,
    pub(crate) rate_limiter: Arc<RateLimiter>,
    pub(crate) idempotency_ttl: Duration,
    pub(crate) idempotency_lease: Duration,
    pub(crate) metrics: PrometheusHandle,
    pub(crate) webhook_targets: canopy_webhook::TargetPolicy,
    pub(crate) resolver: Arc<dyn canopy_webhook::Resolver>,
    pub(crate) budgets: budgets::BudgetSettings,
}

impl axum::extract::FromRef<AppState> for canopy_http::ops::Ops {
    fn from_ref(state: &AppState) -> Self {
        Self {
            pool: state.pool.clone(),
            metrics: state.metrics.clone(),
        }
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// A bound, ready-to-serve command-api.
#[derive(Debug)]
pub struct App {
    listener: tokio::net::TcpListener,
    router: Router,
    state: AppState,
}

/// Connects to the database, applies migrations and binds the listener.
pub async fn build(config: Config) -> anyhow::Result<App> {
    build_with_resolver(config, Arc::new(canopy_webhook::SystemResolver)).await
}

/// [`build`] with the resolver that webhook targets are checked through (tests answer what
/// they need).
pub async fn build_with_resolver(
    config: Config,
    resolver: Arc<dyn canopy_webhook::Resolver>,
) -> anyhow::Result<App> {
    // before anything else: the public dev secret must not face other hosts
    config.tokens.check_listen(config.listen)?;
    config.tokens.check_runner_secret(config.listen)?;
    let mut db = DbConfig::new(config.database.url()?);
    db.max_connections = config.db_max_connections;
    db.application_name = "canopy-command-api".to_owned();
    let pool = canopy_event_store::connect(&db)
        .await
        .context("connect to the database")?;
    canopy_event_store::migrate_if_pending(&pool)
        .await
        .context("apply migrations")?;

    let verifier = config
        .tokens
        .verifier()
        .context("configure token verification")?;

    let store = AggregateStore::new(
        pool.clone(),
        StoreConfig {
            retry: RetryPolicy {
                max_attempts: config.command_attempts.max(1),
                ..RetryPolicy::default()
            },
            upcast: canopy_domain::upcast::upcast_payload,
            ..StoreConfig::default()
        },
    );
    let state = AppState {
        store,
        pool,
        verifier: Arc::new(verifier),
        limits: Arc::new(Limits {
            max_body_bytes: config.max_body_bytes,
            max_prompt_bytes: config.max_prompt_bytes,
        }),
        session_policy: SessionPolicy {
            max_queued_prompts: config.max_queued_prompts as usize,
        },
        rate_limiter: Arc::new(RateLimiter::new(
            config.rate_limit_per_second,
            config.rate_limit_burst,
        )),
        idempotency_ttl: config.idempotency_ttl.max(MIN_IDEMPOTENCY_TTL),
        idempotency_lease: config.idempotency_lease,
        metrics: canopy_http::metrics_handle(),
        webhook_targets: canopy_webhook::TargetPolicy {
            allow_insecure: config.webhook_targets.webhooks_allow_insecure,
        },
        resolver,
        budgets: budgets::BudgetSettings {
            reserve_cost_micro_usd: config.budget_prompt_reserve_cost,
            reserve_tokens: config.budget_prompt_reserve_tokens,
            warn_percent: config.budget_warn_percent,
        },
    };
    let router = router(state.clone(), &config.cors.cors_origins)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    Ok(App {
        listener,
        router,
        state,
    })
}

impl App {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops accepting and drains in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let housekeeping = tokio::spawn(housekeeping(self.state.clone(), stop.subscribe()));
        let served = canopy_http::serve::serve(self.listener, self.router, async move {
            shutdown.await;
            tracing::info!("command-api shutting down; draining in-flight requests");
        })
        .await;
        let _ = stop.send(true);
        let _ = stopped.changed().await;
        housekeeping.await.ok();
        served.context("serve HTTP")
    }
}

/// Purges expired idempotency keys and idle rate-limit buckets every few minutes.
async fn housekeeping(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(300));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        match idempotency::purge_expired(&state.pool).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "expired idempotency keys purged"),
            Err(error) => tracing::warn!(%error, "could not purge idempotency keys"),
        }
        state.rate_limiter.forget_idle();
    }
}

/// The OpenAPI document of command-api.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Canopy command-api", description = "The only writer of events: people's session and feature commands and the agent runner's reports. Errors are RFC 9457 problem+json with a stable `code`."),
    components(schemas(dto::CommandAccepted, error::Problem, error::FieldError)),
    modifiers(&BearerAuth),
    tags(
        (name = "sessions", description = "People's session commands"),
        (name = "runner", description = "The agent runner's reports (service role; Idempotency-Key required)"),
        (name = "features", description = "Features: shared context of several sessions"),
        (name = "webhooks", description = "Webhook subscriptions of a workspace (owners and admins)"),
        (name = "budgets", description = "What the workspace's agents may spend (owners and admins)"),
        (name = "ops", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

fn api_router() -> OpenApiRouter<AppState> {
    use routes::{budgets, features, runner, sessions, webhooks};
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(sessions::start_session))
        .routes(routes!(sessions::join_session))
        .routes(routes!(sessions::leave_session))
        .routes(routes!(sessions::submit_prompt))
        .routes(routes!(sessions::cancel_prompt))
        .routes(routes!(sessions::approve_plan))
        .routes(routes!(sessions::reject_plan))
        .routes(routes!(sessions::grant_tool_approval))
        .routes(routes!(sessions::deny_tool_approval))
        .routes(routes!(sessions::request_checkpoint))
        .routes(routes!(sessions::request_restore))
        .routes(routes!(sessions::request_push))
        .routes(routes!(sessions::complete_session))
        .routes(routes!(sessions::archive_session))
        .routes(routes!(runner::prompt_started))
        .routes(routes!(runner::prompt_completed))
        .routes(routes!(runner::prompt_failed))
        .routes(routes!(runner::plan_proposed))
        .routes(routes!(runner::tool_approval_requested))
        .routes(routes!(runner::tool_executed))
        .routes(routes!(runner::agent_message))
        .routes(routes!(runner::usage))
        .routes(routes!(runner::checkpoint_taken))
        .routes(routes!(runner::checkpoint_restored))
        .routes(routes!(runner::branch_pushed))
        .routes(routes!(runner::sandbox_started))
        .routes(routes!(runner::sandbox_stopped))
        .routes(routes!(runner::session_failed))
        .routes(routes!(budgets::set_budget))
        .routes(routes!(budgets::clear_budget))
        .routes(routes!(features::create_feature))
        .routes(routes!(features::attach_session))
        .routes(routes!(features::share_learning))
        .routes(routes!(features::record_decision))
        .routes(routes!(features::complete_feature))
        .routes(routes!(webhooks::create_webhook))
        .routes(routes!(webhooks::pause_webhook))
        .routes(routes!(webhooks::resume_webhook))
        .routes(routes!(webhooks::rotate_webhook_secret))
        .routes(routes!(webhooks::delete_webhook))
        .routes(routes!(webhooks::redeliver))
        .merge(canopy_http::ops::routes())
}

/// The OpenAPI document as the code defines it (checked in as `openapi/command-api.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().split_for_parts().1
}

fn router(state: AppState, cors_origins: &[String]) -> anyhow::Result<Router> {
    let (api, openapi) = api_router().split_for_parts();
    let cors = CorsLayer::new()
        .allow_origin(canopy_http::cors_origins(cors_origins)?)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
            axum::http::header::IF_MATCH,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("x-correlation-id"),
            HeaderName::from_static("x-causation-id"),
        ])
        .expose_headers([
            axum::http::header::RETRY_AFTER,
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("idempotent-replayed"),
        ]);
    let api = api
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state);
    canopy_http::finish_router(api, &openapi, cors)
}
