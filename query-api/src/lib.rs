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
use canopy_auth::{AuthConfig, Verifier};
use canopy_event_store::{DbConfig, PgPool};
use canopy_http::BearerAuth;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::cors::CorsLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use error::ApiError;

/// query-api's configuration (flags or `CANOPY_*` environment variables).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(
        long = "listen",
        env = "CANOPY_QUERY_API_ADDR",
        default_value = "127.0.0.1:8081"
    )]
    pub listen: SocketAddr,
    /// Postgres URL (falls back to DATABASE_URL).
    #[arg(long, env = "CANOPY_DATABASE_URL")]
    pub database_url: Option<String>,
    /// HS256 secret for bearer tokens.
    #[arg(long, env = "CANOPY_JWT_SECRET", default_value = canopy_auth::DEV_SECRET, hide_env_values = true)]
    pub jwt_secret: String,
    /// PEM file with an RS256 public key; RS256 tokens are accepted when set.
    #[arg(long, env = "CANOPY_JWT_RS256_PUBLIC_KEY_FILE")]
    pub jwt_rs256_public_key_file: Option<std::path::PathBuf>,
    /// How long a read waits for `consistent_with` before answering 409, in milliseconds.
    #[arg(long, env = "CANOPY_CONSISTENCY_TIMEOUT_MS", default_value_t = 2000)]
    pub consistency_timeout_ms: u64,
    /// Origins allowed by CORS (comma-separated; none by default).
    #[arg(long, env = "CANOPY_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Database connections.
    #[arg(long, env = "CANOPY_QUERY_DB_MAX_CONNECTIONS", default_value_t = 20)]
    pub db_max_connections: u32,
    /// NATS server for live subscriptions (falls back to NATS_URL; without either, the stream
    /// endpoints answer 503).
    #[arg(long, env = "CANOPY_NATS_URL")]
    pub nats_url: Option<String>,
    /// The events' subject prefix (the relay's).
    #[arg(long, env = "CANOPY_SUBJECT_PREFIX", default_value = "canopy.events")]
    pub subject_prefix: String,
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
    /// Presence heartbeat interval in milliseconds (absent after three missed beats).
    #[arg(long, env = "CANOPY_PRESENCE_HEARTBEAT_MS", default_value_t = 5000)]
    pub presence_heartbeat_ms: u64,
    /// Keep-alive interval of streams, in milliseconds.
    #[arg(long, env = "CANOPY_STREAM_KEEPALIVE_MS", default_value_t = 15000)]
    pub keep_alive_ms: u64,
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
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.database_url = Some(database_url.into());
        config
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) consistency_timeout: Duration,
    pub(crate) metrics: PrometheusHandle,
    pub(crate) live: Option<Arc<live::Live>>,
    pub(crate) ticket_secret: String,
    pub(crate) shutdown: tokio::sync::watch::Receiver<bool>,
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
    let url = config
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .filter(|url| !url.is_empty())
        .context("no database: set CANOPY_DATABASE_URL (or DATABASE_URL)")?;
    let mut db = DbConfig::new(url);
    db.max_connections = config.db_max_connections;
    db.application_name = "canopy-query-api".to_owned();
    let pool = canopy_event_store::connect(&db)
        .await
        .context("connect to the database")?;
    canopy_event_store::migrate(&pool)
        .await
        .context("apply migrations")?;
    let rs256_public_key_pem = match &config.jwt_rs256_public_key_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("read the RS256 public key {}", path.display()))?,
        ),
        None => None,
    };
    let verifier = Verifier::new(&AuthConfig {
        hs256_secret: config.jwt_secret.clone(),
        rs256_public_key_pem,
        leeway_secs: 30,
    })
    .context("configure token verification")?;
    let nats_url = config
        .nats_url
        .clone()
        .or_else(|| std::env::var("NATS_URL").ok())
        .filter(|url| !url.is_empty());
    let live = match nats_url {
        Some(url) => {
            let client = async_nats::connect(&url).await.context("connect to NATS")?;
            let live_config = live::LiveConfig {
                subject_prefix: config.subject_prefix.clone(),
                presence_prefix: config.presence_prefix.clone(),
                buffer: config.live_buffer,
                heartbeat: Duration::from_millis(config.presence_heartbeat_ms.max(10)),
                keep_alive: Duration::from_millis(config.keep_alive_ms.max(10)),
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
        consistency_timeout: Duration::from_millis(config.consistency_timeout_ms),
        metrics: canopy_http::metrics_handle(),
        live,
        ticket_secret: config.jwt_secret.clone(),
        shutdown: shutdown_rx,
    };
    let router = router(state, &config.cors_origins)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
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
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move {
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
        (name = "live", description = "Live subscriptions: SSE and WebSocket, resumable, with presence"),
        (name = "ops", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

fn api_router() -> OpenApiRouter<AppState> {
    use routes::{analytics, ops, read};
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
        .routes(routes!(live::session_sse))
        .routes(routes!(live::session_ws))
        .routes(routes!(live::session_presence))
        .routes(routes!(live::workspace_sse))
        .routes(routes!(live::stream_ticket))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
}

/// The OpenAPI document as the code defines it (checked in as `openapi/query-api.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().split_for_parts().1
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
