//! query-api: what frontends list and show, and what analysts query.
//!
//! Serves the read models the projectors maintain in schema `read`: get by id, lists with
//! filters and keyset pagination that returns every row once while rows are added ([`query`]),
//! analytics, and read-your-writes (`consistent_with=<aggregate_id>:<version>` waits a bounded
//! time for the projection, else 409). Same JWT and role table as command-api: every role that
//! reads may read; another workspace's rows are 404. Errors are problem+json with stable codes.
//!
//! Live subscriptions ([`live`]) stream a session's events over SSE and WebSocket, resumable,
//! with presence, fanned out from one NATS subscription per process.
//!
//! It never changes the schema: it waits at start-up until the database has every migration it
//! knows (applied by `canopy migrate` or command-api), so it can run as `canopy_reader`.
//!
//! `build(config)` binds (port 0 in tests) and `App::run_until(shutdown)` serves until shutdown.

mod auth;
pub mod error;
mod live;
mod query;
mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::Method;
use canopy_auth::Verifier;
use canopy_event_store::{DbConfig, PgPool};
use canopy_http::BearerAuth;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::cors::CorsLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use error::ApiError;

/// query-api's configuration (flags or `CANOPY_*` environment variables): where the database,
/// the tokens' keys and NATS are, which it shares with the other services, and its own
/// [`Settings`].
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub database: canopy_config::DatabaseArgs,
    #[command(flatten)]
    pub tokens: canopy_config::TokenArgs,
    #[command(flatten)]
    pub cors: canopy_config::CorsArgs,
    /// NATS for live subscriptions (without it, the stream endpoints answer 503).
    #[command(flatten)]
    pub nats: canopy_config::NatsArgs,
    /// The relay's subjects, which live subscriptions follow.
    #[command(flatten)]
    pub subjects: canopy_config::SubjectArgs,
    #[command(flatten)]
    pub settings: Settings,
}

/// query-api's own settings, apart from what it shares with the other services, so that
/// `canopy up` can take them beside command-api's (argument ids and flags are unique across both).
#[derive(Debug, Clone, clap::Args)]
#[group(id = "query_api")]
#[command(next_help_heading = "Query API")]
pub struct Settings {
    /// Address to listen on.
    #[arg(
        id = "query_listen",
        long = "query-listen",
        value_name = "ADDR",
        env = "CANOPY_QUERY_API_ADDR",
        default_value = "127.0.0.1:8081"
    )]
    pub listen: SocketAddr,
    /// Database connections.
    #[arg(
        id = "query_db_max_connections",
        long = "query-db-max-connections",
        value_name = "N",
        env = "CANOPY_QUERY_DB_MAX_CONNECTIONS",
        default_value_t = 20
    )]
    pub db_max_connections: u32,
    /// How long a read waits for `consistent_with` before answering 409.
    #[arg(long, env = "CANOPY_CONSISTENCY_TIMEOUT", value_parser = canopy_config::parse_duration, default_value = "2s")]
    pub consistency_timeout: Duration,
    /// Reads one person may have waiting for `consistent_with` at once in this process; more
    /// are refused with 429 `too_many_waits`.
    #[arg(long, env = "CANOPY_CONSISTENCY_WAITS_PER_PERSON", default_value_t = 8)]
    pub consistency_waits_per_person: usize,
    /// How long query-api waits at start-up for the database's migrations, which it never
    /// applies itself (it needs no DDL rights): `canopy migrate` or command-api applies them.
    #[arg(long, env = "CANOPY_QUERY_MIGRATIONS_WAIT", value_parser = canopy_config::parse_duration, default_value = "60s")]
    pub migrations_wait: Duration,
    /// Subject prefix of presence heartbeats.
    #[arg(
        long,
        env = "CANOPY_PRESENCE_PREFIX",
        default_value = "canopy.presence"
    )]
    pub presence_prefix: String,
    /// Events a live client may have buffered before it is closed (with a resumable position).
    #[arg(long, env = "CANOPY_LIVE_BUFFER", default_value_t = 256)]
    pub live_buffer: usize,
    /// Presence heartbeat interval (absent after three missed beats; at least 10ms).
    #[arg(long, env = "CANOPY_PRESENCE_HEARTBEAT", value_parser = canopy_config::parse_duration, default_value = "5s")]
    pub presence_heartbeat: Duration,
    /// Keep-alive interval of streams (at least 10ms).
    #[arg(long, env = "CANOPY_STREAM_KEEPALIVE", value_parser = canopy_config::parse_duration, default_value = "15s")]
    pub keep_alive: Duration,
    /// Events a live stream reads from the event store at once (its history and any gap are
    /// read a page at a time).
    #[arg(long, env = "CANOPY_LIVE_HISTORY_PAGE", default_value_t = 128)]
    pub live_history_page: usize,
    /// Payload bytes a page of a live stream's history holds at most (past its first event).
    #[arg(long, env = "CANOPY_LIVE_HISTORY_PAGE_BYTES", default_value_t = 1024 * 1024)]
    pub live_history_page_bytes: usize,
    /// Live streams (SSE, WebSocket, workspace) one person may have open in this process; more
    /// are refused with 429 `too_many_streams`.
    #[arg(long, env = "CANOPY_LIVE_MAX_STREAMS_PER_PERSON", default_value_t = 16)]
    pub live_max_streams_per_person: usize,
    /// Live streams this process keeps open in all; more are refused with 503
    /// `streams_at_capacity`.
    #[arg(long, env = "CANOPY_LIVE_MAX_STREAMS", default_value_t = 10_000)]
    pub live_max_streams: usize,
}

impl Config {
    /// Defaults for tests and embedding: the given database, port 0.
    pub fn for_database(database_url: impl Into<String>) -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            config: Config,
        }
        let mut config = Defaults::parse_from(["query-api"]).config;
        config.settings.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.database = canopy_config::DatabaseArgs::new(database_url);
        config
    }
}

/// The shortest presence heartbeat and stream keep-alive, whatever is configured.
const MIN_LIVE_INTERVAL: Duration = Duration::from_millis(10);

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) consistency_timeout: Duration,
    pub(crate) waits: Arc<query::Waits>,
    pub(crate) metrics: PrometheusHandle,
    pub(crate) live: Option<Arc<live::Live>>,
    pub(crate) ticket_secret: String,
    pub(crate) shutdown: tokio::sync::watch::Receiver<bool>,
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

/// A bound, ready-to-serve query-api.
#[derive(Debug)]
pub struct App {
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio::sync::watch::Sender<bool>,
}

/// Connects to the database (applying migrations) and binds the listener.
pub async fn build(config: Config) -> anyhow::Result<App> {
    // before anything else: the public dev secret must not face other hosts
    config.tokens.check_listen(config.settings.listen)?;
    let mut db = DbConfig::new(config.database.url()?);
    db.max_connections = config.settings.db_max_connections;
    db.application_name = "canopy-query-api".to_owned();
    let pool = canopy_event_store::connect(&db)
        .await
        .context("connect to the database")?;
    // the read service holds no DDL rights: `canopy migrate` or command-api applies them
    canopy_event_store::wait_migrated(&pool, config.settings.migrations_wait)
        .await
        .context("wait for the database's migrations")?;
    let verifier = config
        .tokens
        .verifier()
        .context("configure token verification")?;
    let live = match config.nats.url_if_set() {
        Some(url) => {
            let client =
                canopy_config::connect_nats(&url, "canopy-query-api", Duration::from_secs(30))
                    .await?;
            let live_config = live::LiveConfig {
                subject_prefix: config.subjects.subject_prefix.clone(),
                presence_prefix: config.settings.presence_prefix.clone(),
                buffer: config.settings.live_buffer,
                heartbeat: config.settings.presence_heartbeat.max(MIN_LIVE_INTERVAL),
                keep_alive: config.settings.keep_alive.max(MIN_LIVE_INTERVAL),
                page: live::history::PageLimits {
                    events: config.settings.live_history_page.max(1),
                    bytes: config.settings.live_history_page_bytes,
                },
                max_streams_per_person: config.settings.live_max_streams_per_person,
                max_streams: config.settings.live_max_streams,
            };
            Some(
                live::Live::start(client, pool.clone(), live_config)
                    .await
                    .context("start live subscriptions")?,
            )
        }
        None => {
            tracing::warn!("no NATS configured: live subscriptions are off");
            None
        }
    };
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    let state = AppState {
        pool,
        verifier: Arc::new(verifier),
        consistency_timeout: config.settings.consistency_timeout,
        waits: Arc::new(query::Waits::new(
            config.settings.consistency_waits_per_person,
        )),
        metrics: canopy_http::metrics_handle(),
        live,
        ticket_secret: config.tokens.secret.jwt_secret.clone(),
        shutdown: shutdown_rx,
    };
    let router = router(state, &config.cors.cors_origins)?;
    let listener = tokio::net::TcpListener::bind(config.settings.listen)
        .await
        .with_context(|| format!("listen on {}", config.settings.listen))?;
    Ok(App {
        listener,
        router,
        shutdown,
    })
}

impl App {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests.
    /// Stream clients are told to reconnect (with their positions) first.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let streams = self.shutdown;
        canopy_http::serve::serve(self.listener, self.router, async move {
            shutdown.await;
            let _ = streams.send(true);
        })
        .await
        .context("serve HTTP")
    }
}

/// The OpenAPI document of query-api.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Canopy query-api", description = "Read models, analytics and read-your-writes. Errors are RFC 9457 problem+json with a stable `code`."),
    components(schemas(error::Problem, error::FieldError)),
    modifiers(&BearerAuth),
    tags(
        (name = "sessions", description = "Sessions and what happened in them"),
        (name = "features", description = "Features and their shared context"),
        (name = "analytics", description = "Aggregates over the read models"),
        (name = "budgets", description = "What the workspace's agents may spend, with spent and remaining"),
        (name = "live", description = "Live subscriptions: SSE and WebSocket, resumable, with presence"),
        (name = "webhooks", description = "Webhook subscriptions and their delivery log (owner, admin)"),
        (name = "audit", description = "Auditors (owner, admin, auditor): event logs with their hash chain, state at any sequence, chain verification"),
        (name = "ops", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

fn api_router() -> OpenApiRouter<AppState> {
    use routes::{analytics, audit, budgets, read, webhooks};
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(read::list_sessions))
        .routes(routes!(read::get_session))
        .routes(routes!(read::session_timeline))
        .routes(routes!(read::list_prompts))
        .routes(routes!(read::get_prompt))
        .routes(routes!(read::list_plans))
        .routes(routes!(read::get_plan))
        .routes(routes!(read::list_tool_executions))
        .routes(routes!(read::list_tool_approvals))
        .routes(routes!(read::list_checkpoints))
        .routes(routes!(read::list_features))
        .routes(routes!(read::get_feature))
        .routes(routes!(analytics::tools))
        .routes(routes!(analytics::plan_latency))
        .routes(routes!(analytics::prompts_per_user_per_day))
        .routes(routes!(analytics::agent_time))
        .routes(routes!(budgets::spend))
        .routes(routes!(budgets::budgets))
        .routes(routes!(live::session_sse))
        .routes(routes!(live::session_ws))
        .routes(routes!(live::session_presence))
        .routes(routes!(live::workspace_sse))
        .routes(routes!(live::stream_ticket))
        .routes(routes!(audit::session_events))
        .routes(routes!(audit::verify_session))
        .routes(routes!(audit::session_state))
        .routes(routes!(audit::workspace_events))
        .routes(routes!(webhooks::list_webhooks))
        .routes(routes!(webhooks::list_deliveries))
        .merge(canopy_http::ops::routes())
}

/// The OpenAPI document as the code defines it (checked in as `openapi/query-api.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().split_for_parts().1
}

/// The live streams' AsyncAPI document as the code defines it (checked in as
/// `openapi/live.asyncapi.json`).
pub fn asyncapi() -> serde_json::Value {
    live::asyncapi::document()
}

fn router(state: AppState, cors_origins: &[String]) -> anyhow::Result<Router> {
    let (api, openapi) = api_router().split_for_parts();
    let cors = CorsLayer::new()
        .allow_origin(canopy_http::cors_origins(cors_origins)?)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([axum::http::header::AUTHORIZATION]);
    let api = api
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state);
    canopy_http::finish_router(api, &openapi, cors)
}
