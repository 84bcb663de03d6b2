//! Canopy's event store: Postgres is the source of truth for every event.
//!
//! postgres-es 0.5 is the event repository (its `events` and `snapshots` tables, its inserts and
//! selects). What must be atomic with an append lives in the database itself, in the triggers of
//! `migrations/`: the event id, the global position, the committing transaction id, `recorded_at`,
//! the hash chain and the `pg_notify` that wakes the relay. So the invariants hold for every
//! writer, whichever code path or SQL client appended.
//!
//! On top of the repository, [`AggregateStore`] runs commands: it loads an aggregate (from its
//! snapshot when there is one), lets the aggregate decide, appends what it decided with the
//! caller's [`EventMetadata`], and answers with the new version and the ids and positions of the
//! events written. It does not use cqrs-es's `CqrsFramework`/`PersistedEventStore` for this: in
//! 0.5 their snapshot path applies each new event twice (once in `EventSink::write`, once more
//! when building the snapshot) and neither reports what was written.

mod chain;
mod metadata;
mod store;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub use sqlx::PgPool;

pub use chain::{ChainProblem, ChainReport, ProblemKind, verify_chain};
pub use metadata::{ActorKind, EventMetadata};
pub use store::{
    AggregateStore, Committed, CommittedEvent, ExecuteError, Loaded, RetryPolicy, StoreConfig,
};

/// The migrations under `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A failure to reach or use the database (as opposed to a domain refusal).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored event or snapshot could not be decoded: {0}")]
    Decode(String),
    #[error("event repository error: {0}")]
    Repository(String),
}

/// How the services connect to Postgres.
#[derive(Debug, Clone)]
pub struct DbConfig {
    pub url: String,
    pub max_connections: u32,
    pub application_name: String,
    /// Bounds every transaction's idle time. The relay's horizon is cluster-wide: a forgotten open
    /// transaction anywhere would pause it.
    pub idle_in_transaction_timeout: Duration,
}

impl DbConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 10,
            application_name: "canopy".to_owned(),
            idle_in_transaction_timeout: Duration::from_secs(30),
        }
    }
}

/// Opens a connection pool with Canopy's session settings.
pub async fn connect(config: &DbConfig) -> Result<PgPool, StoreError> {
    let timeout_ms = config.idle_in_transaction_timeout.as_millis().to_string();
    let options: PgConnectOptions = config
        .url
        .parse::<PgConnectOptions>()?
        .application_name(&config.application_name)
        .options([("idle_in_transaction_session_timeout", timeout_ms.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Connects once the server accepts connections, retrying for up to `wait` (a server that was
/// just started takes a moment).
pub async fn connect_when_ready(config: &DbConfig, wait: Duration) -> Result<PgPool, StoreError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match connect(config).await {
            Ok(pool) => return Ok(pool),
            Err(error) if tokio::time::Instant::now() >= deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Applies every pending migration (idempotent; safe to run from several processes at once, as
/// sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// How many migrations the database has applied successfully.
pub async fn applied_migrations(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?,
    )
}
