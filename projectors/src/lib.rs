//! Projectors: the read models in Postgres, fed from JetStream, always equal to a replay of the
//! event store.
//!
//! One worker per [`Projection`] consumes the projection's aggregate type from the relay's
//! stream through a durable pull consumer ([`consumer`]), applying each event exactly once per
//! `(aggregate, sequence)` ([`apply`]). A projection that was never built, or whose definition
//! changed, is first rebuilt from the event store ([`rebuild`]), so a projection added after
//! events exist backfills from the start. An event ahead of its aggregate's position is applied
//! after the missing ones, read from the event store: nothing waits for a redelivery. Events
//! that cannot be applied are parked and retried with backoff ([`parked`]).

mod apply;
pub mod consumer;
pub mod parked;
pub mod projections;
pub mod rebuild;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;

pub use consumer::{Crash, CrashPoint};
pub use projections::{Projection, ProjectionError};
pub use rebuild::{RebuildOptions, RebuildReport, compare_with_shadow, rebuild};

/// Failures of the projector itself (as opposed to one event not applying).
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("nats error: {0}")]
    Nats(String),
    #[error("rebuild failed: {0}")]
    Rebuild(String),
    #[error("simulated crash")]
    Crashed,
}

/// The projectors' configuration (flags or `CANOPY_*` environment variables).
#[derive(Debug, Clone, clap::Args)]
pub struct ProjectorsConfig {
    /// The relay's stream.
    #[command(flatten)]
    pub stream: canopy_config::StreamArgs,
    /// Durable consumers are named `<prefix>-<projection>`.
    #[arg(
        long,
        env = "CANOPY_PROJECTOR_CONSUMER_PREFIX",
        default_value = "canopy-projector"
    )]
    pub consumer_prefix: String,
    /// Messages a consumer may have unacknowledged.
    #[arg(long, env = "CANOPY_PROJECTOR_MAX_ACK_PENDING", default_value_t = 512)]
    pub max_ack_pending: i64,
    /// Messages fetched per pull.
    #[arg(long, env = "CANOPY_PROJECTOR_BATCH", default_value_t = 256)]
    pub batch_size: usize,
    /// How long JetStream waits for an ack before redelivering.
    #[arg(long, env = "CANOPY_PROJECTOR_ACK_WAIT", value_parser = canopy_config::parse_duration, default_value = "30s")]
    pub ack_wait: Duration,
    /// Attempts at an event that fails before it is parked.
    #[arg(long, env = "CANOPY_PROJECTOR_MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: i64,
    /// Longest wait between two automatic retries of a parked event (the waits start at one
    /// second and double).
    #[arg(long, env = "CANOPY_PROJECTOR_PARKED_RETRY_MAX", value_parser = canopy_config::parse_duration, default_value = "5m")]
    pub parked_retry_max: Duration,
    /// Test only: stop a worker as if its process died.
    #[arg(skip)]
    pub crash: Option<Crash>,
}

impl ProjectorsConfig {
    /// Defaults, for a stream and subject prefix (tests use their own).
    pub fn new(stream_name: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        Self {
            stream: canopy_config::StreamArgs::new(stream_name, subject_prefix),
            consumer_prefix: "canopy-projector".to_owned(),
            max_ack_pending: 512,
            batch_size: 256,
            ack_wait: Duration::from_secs(30),
            max_deliveries: 5,
            parked_retry_max: Duration::from_secs(300),
            crash: None,
        }
    }
}

/// The running projectors of one process.
#[derive(Debug)]
pub struct Projectors {
    pool: PgPool,
    jetstream: async_nats::jetstream::Context,
    config: Arc<ProjectorsConfig>,
    processed: Arc<AtomicU64>,
}

impl Projectors {
    pub fn new(config: ProjectorsConfig, pool: PgPool, client: async_nats::Client) -> Self {
        Self {
            pool,
            jetstream: async_nats::jetstream::new(client),
            config: Arc::new(config),
            processed: Arc::default(),
        }
    }

    /// Builds every projection that needs it, then consumes until `shutdown`; each worker
    /// finishes the event it is on. Returns the first worker failure.
    pub async fn run_until(
        &self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProjectorError> {
        for projection in Projection::ALL {
            ensure_built(&self.pool, projection).await?;
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut workers = tokio::task::JoinSet::new();
        for projection in Projection::ALL {
            workers.spawn(consumer::run(
                self.pool.clone(),
                self.jetstream.clone(),
                self.config.clone(),
                projection,
                stopped.clone(),
                self.processed.clone(),
            ));
            workers.spawn({
                let retries = parked::retry_loop(
                    self.pool.clone(),
                    projection,
                    self.config.parked_retry_max,
                    stopped.clone(),
                );
                async move {
                    retries.await;
                    Ok(())
                }
            });
        }
        let failure = tokio::select! {
            _ = shutdown => None,
            Some(done) = workers.join_next() => Some(done),
        };
        let _ = stop.send(true);
        let mut result = match failure {
            Some(Ok(Err(error))) => Err(error),
            Some(Err(panic)) => Err(ProjectorError::Nats(format!("worker panicked: {panic}"))),
            _ => Ok(()),
        };
        while let Some(done) = workers.join_next().await {
            if let (Ok(()), Ok(Err(error))) = (&result, done) {
                result = Err(error);
            }
        }
        result
    }
}

/// Rebuilds `projection` from the event store when it was never built at its current definition
/// version. Several processes may start at once: an advisory lock lets one build.
pub async fn ensure_built(pool: &PgPool, projection: Projection) -> Result<(), ProjectorError> {
    let mut conn = pool.acquire().await?;
    let key = 0x0063_616e_6f70_6200_i64 + projection as i64;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    let built: Option<i32> = sqlx::query_scalar(
        "SELECT definition_version FROM read.projection_state WHERE projection = $1",
    )
    .bind(projection.name())
    .fetch_optional(&mut *conn)
    .await?;
    let result = if built == Some(projection.definition_version()) {
        Ok(())
    } else {
        tracing::info!(
            projection = projection.name(),
            "building the projection from the event store"
        );
        rebuild(pool, projection, &RebuildOptions::default())
            .await
            .map(|_| ())
    };
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    result
}

/// Connects to Postgres and NATS for a standalone projectors process.
pub async fn connect(
    database: &canopy_config::DatabaseArgs,
    nats: &canopy_config::NatsArgs,
) -> anyhow::Result<(PgPool, async_nats::Client)> {
    let mut db = canopy_event_store::DbConfig::new(database.url()?);
    db.application_name = "canopy-projectors".to_owned();
    let pool = canopy_event_store::connect(&db)
        .await
        .context("connect to the database")?;
    canopy_event_store::migrate(&pool)
        .await
        .context("apply migrations")?;
    let client = nats
        .connect("canopy-projectors", Duration::from_secs(30))
        .await?;
    Ok((pool, client))
}
