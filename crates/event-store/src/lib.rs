//! Canopy's event store: Postgres is the source of truth for every event.
//!
//! The tables are postgres-es 0.5's (`events`, `snapshots`), and postgres-es reads them. What
//! must be atomic with an append lives in the database itself, in the triggers of `migrations/`:
//! the event id, the global position, the committing transaction id, `recorded_at` and the hash
//! chain. So the invariants hold for every writer, whichever code path or SQL client appended.
//! The relay's wake-up is not among them: a `NOTIFY` in every appending transaction serialized
//! all appends' commits, so [`AggregateStore`] notifies after its commits instead, coalesced
//! (`wake`), and the relay's poll covers any other writer.
//!
//! [`AggregateStore`] runs commands: it loads an aggregate (from its snapshot when there is one),
//! lets the aggregate decide, appends what it decided with the caller's [`EventMetadata`], and
//! answers with the new version and the ids and positions of the events written. It does not use
//! cqrs-es's `CqrsFramework`/`PersistedEventStore` for this: in 0.5 their snapshot path applies
//! each new event twice (once in `EventSink::write`, once more when building the snapshot) and
//! neither reports what was written. Nor does it append through postgres-es's `persist`, whose
//! transaction is closed to the caller: the append is its own transaction (postgres-es's inserts,
//! with `RETURNING`), into which a caller's [`Fence`] can write what must commit with the events
//! (command-api: the idempotency key's answer).

pub mod audit;
pub mod chain;
pub mod export;
mod metadata;
mod store;
mod wake;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub use sqlx::{PgConnection, PgPool};

pub use audit::verify_chain;
pub use chain::{ChainProblem, ChainRecord, ChainReport, ErasureRecord, Head, ProblemKind};
pub use metadata::{ActorKind, EventMetadata};
pub use store::{
    AggregateStore, Committed, CommittedEvent, ExecuteError, Fence, Loaded, RetryPolicy,
    StoreConfig, Upcast,
};
pub use wake::{NOTIFY_CHANNEL, wake_relay};

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
    #[error(
        "the database lacks {pending} migration(s) this build needs: run `canopy migrate` (with \
         the role that owns the schema)"
    )]
    NotMigrated { pending: usize },
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

/// Applies the pending migrations, if any: a service whose role may not change the schema
/// (`canopy_writer`) starts against a database `canopy migrate` brought up to date.
pub async fn migrate_if_pending(pool: &PgPool) -> Result<(), StoreError> {
    if pending_migrations(pool).await? > 0 {
        migrate(pool).await?;
    }
    Ok(())
}

/// How many of the migrations this build knows the database has not applied.
pub async fn pending_migrations(pool: &PgPool) -> Result<usize, StoreError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(MIGRATOR.migrations.len());
    }
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?;
    Ok(MIGRATOR
        .migrations
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .count())
}

/// Waits up to `wait` for another process (`canopy migrate`, command-api) to apply every
/// migration this build knows, without applying any: for a service that may only read.
pub async fn wait_migrated(pool: &PgPool, wait: std::time::Duration) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let pending = pending_migrations(pool).await?;
        if pending == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::NotMigrated { pending });
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// How many migrations the database has applied successfully.
pub async fn applied_migrations(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?,
    )
}
