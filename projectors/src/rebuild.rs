//! Rebuilding a projection from the Postgres event store (not from NATS), without downtime.
//!
//! 1. The projection's tables are recreated empty in a shadow schema
//!    (`CREATE TABLE ... (LIKE read.t INCLUDING ALL)`).
//! 2. Events are replayed into them in batched transactions, in `(transaction_id, position)`
//!    order and only below the snapshot horizon, like the relay reads: one huge transaction
//!    would hold the relay's horizon back for its whole length.
//!    An event that does not apply is parked (as the live consumers do) and the aggregate's later
//!    events are parked behind it, so one poisoned event does not stop a rebuild.
//! 3. The swap runs in one short transaction holding the projection's advisory lock exclusively
//!    (live writers take it shared per transaction): it applies the events committed since, up
//!    to the horizon (every event the relay can have published, hence the live projector can
//!    have applied, is below it), then replaces the live tables by the shadow ones. Readers see
//!    the old tables until the commit, then the new.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use canopy_relay::{Cursor, Envelope, history};
use sqlx::{Acquire, PgConnection, PgPool};

use crate::apply::{ApplyError, Positions, apply_tracked, lock_key, use_schema};
use crate::projections::Projection;
use crate::{ProjectorError, parked};

/// How a rebuild runs.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Events per transaction.
    pub batch_size: i64,
    /// Swap the rebuilt tables in; without it they stay in the shadow schema (to compare).
    pub swap: bool,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            swap: true,
        }
    }
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub projection: &'static str,
    pub events: u64,
    pub elapsed: Duration,
    /// Where the rebuilt tables are when they were not swapped in.
    pub shadow_schema: String,
}

/// The shadow schema of a projection's rebuild.
pub fn shadow_schema(projection: Projection) -> String {
    format!("read_rebuild_{}", projection.name())
}

/// Rebuilds `projection` from the event store.
pub async fn rebuild(
    pool: &PgPool,
    projection: Projection,
    options: &RebuildOptions,
) -> Result<RebuildReport, ProjectorError> {
    let started = Instant::now();
    let shadow = shadow_schema(projection);
    create_shadow(pool, projection, &shadow).await?;

    let mut cursor = Cursor::default();
    let mut events = 0u64;
    let mut blocked = HashSet::new();
    loop {
        let mut tx = pool.begin().await?;
        use_schema(&mut tx, &shadow).await?;
        let batch = read_events(&mut tx, projection, &cursor, Some(options.batch_size)).await?;
        if batch.is_empty() {
            tx.rollback().await?;
            break;
        }
        let tx = replay_batch(tx, projection, &batch, &mut blocked, &shadow, pool).await?;
        tx.commit().await?;
        events += batch.len() as u64;
        cursor = batch.last().map(|(next, _)| *next).unwrap_or(cursor);
    }

    if options.swap {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock_key(projection))
            .execute(&mut *tx)
            .await?;
        use_schema(&mut tx, &shadow).await?;
        // The rest, below the horizon as everywhere: every event the relay can have published
        // (hence the live projector applied) had a transaction id below the relay's horizon at
        // the time, which is at most this one; later ones reach the live projector after the
        // swap. Reading past the horizon would skip a transaction still running below a
        // committed one.
        loop {
            let batch = read_events(&mut tx, projection, &cursor, Some(options.batch_size)).await?;
            if batch.is_empty() {
                break;
            }
            let mut savepoint = tx.begin().await?;
            let mut positions = Positions::new(projection);
            for (_, event) in &batch {
                replay_one(&mut savepoint, &mut positions, event, &mut blocked).await?;
            }
            positions.flush(&mut savepoint).await?;
            savepoint.commit().await?;
            events += batch.len() as u64;
            cursor = batch.last().map(|(next, _)| *next).unwrap_or(cursor);
        }
        for table in projection.tables() {
            sqlx::query(&format!("DROP TABLE read.{table}"))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!("ALTER TABLE {shadow}.{table} SET SCHEMA read"))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(&format!("DROP SCHEMA {shadow}"))
            .execute(&mut *tx)
            .await?;
        parked::resolve_applied(&mut tx, projection).await?;
        grant_analysts(&mut tx).await?;
        sqlx::query(
            "INSERT INTO read.projection_state (projection, definition_version, built_at) VALUES ($1, $2, now())
             ON CONFLICT (projection) DO UPDATE SET definition_version = EXCLUDED.definition_version, built_at = now()",
        )
        .bind(projection.name())
        .bind(projection.definition_version())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    let report = RebuildReport {
        projection: projection.name(),
        events,
        elapsed: started.elapsed(),
        shadow_schema: shadow,
    };
    tracing::info!(
        projection = report.projection,
        events,
        elapsed_ms = report.elapsed.as_millis() as u64,
        swapped = options.swap,
        "projection rebuilt"
    );
    Ok(report)
}

/// Rows that differ between the live tables and a rebuild left in the shadow schema, per table
/// (`(table, live rows not rebuilt, rebuilt rows not live)`); empty when they are equal.
pub async fn compare_with_shadow(
    pool: &PgPool,
    projection: Projection,
) -> Result<Vec<(String, i64, i64)>, ProjectorError> {
    let shadow = shadow_schema(projection);
    let mut differences = Vec::new();
    for table in projection.tables() {
        let (live_only, shadow_only): (i64, i64) = sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM (SELECT * FROM read.{table} EXCEPT ALL SELECT * FROM {shadow}.{table}) a),
                    (SELECT count(*) FROM (SELECT * FROM {shadow}.{table} EXCEPT ALL SELECT * FROM read.{table}) b)"
        ))
        .fetch_one(pool)
        .await?;
        if live_only != 0 || shadow_only != 0 {
            differences.push(((*table).to_owned(), live_only, shadow_only));
        }
    }
    Ok(differences)
}

async fn create_shadow(
    pool: &PgPool,
    projection: Projection,
    shadow: &str,
) -> Result<(), ProjectorError> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {shadow} CASCADE"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {shadow}"))
        .execute(&mut *tx)
        .await?;
    for table in projection.tables() {
        sqlx::query(&format!(
            "CREATE TABLE {shadow}.{table} (LIKE read.{table} INCLUDING ALL)"
        ))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Replays a batch in `tx`: all at once while every event applies; when one does not, the batch
/// is replayed again event by event in savepoints, parking the ones that fail.
async fn replay_batch<'c>(
    mut tx: sqlx::Transaction<'c, sqlx::Postgres>,
    projection: Projection,
    batch: &[(Cursor, Envelope)],
    blocked: &mut HashSet<(String, String)>,
    shadow: &str,
    pool: &PgPool,
) -> Result<sqlx::Transaction<'c, sqlx::Postgres>, ProjectorError> {
    let mut positions = Positions::new(projection);
    let mut all_applied = true;
    for (_, event) in batch {
        if blocked.contains(&(event.aggregate_type.clone(), event.aggregate_id.clone())) {
            all_applied = false;
            break;
        }
        match apply_tracked(&mut tx, &mut positions, event).await {
            Ok(_) => {}
            Err(ApplyError::Database(error)) => return Err(error.into()),
            Err(ApplyError::Handler { .. }) => {
                all_applied = false;
                break;
            }
        }
    }
    if all_applied {
        positions.flush(&mut tx).await?;
        return Ok(tx);
    }
    tx.rollback().await?;
    let mut tx = pool.begin().await?;
    use_schema(&mut tx, shadow).await?;
    let mut positions = Positions::new(projection);
    for (_, event) in batch {
        replay_one(&mut tx, &mut positions, event, blocked).await?;
    }
    positions.flush(&mut tx).await?;
    Ok(tx)
}

/// Applies one event in a savepoint; an event that does not apply is parked, and the later
/// events of its aggregate wait behind it (the projectors' retries bring them in once it
/// applies).
async fn replay_one(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    positions: &mut Positions,
    event: &Envelope,
    blocked: &mut HashSet<(String, String)>,
) -> Result<(), ProjectorError> {
    let projection = positions.projection();
    let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
    if blocked.contains(&key) {
        return Ok(());
    }
    // the positions written so far must survive a rollback to the savepoint
    positions.flush(tx).await?;
    let mut savepoint = tx.begin().await?;
    match apply_tracked(&mut savepoint, positions, event).await {
        Ok(_) => {
            positions.flush(&mut savepoint).await?;
            savepoint.commit().await?;
            Ok(())
        }
        Err(ApplyError::Database(error)) => Err(error.into()),
        Err(ApplyError::Handler {
            event: failed,
            error,
        }) => {
            savepoint.rollback().await?;
            positions.forget(event);
            blocked.insert(key);
            parked::park_with(tx, projection, &failed, &error.to_string(), 0).await
        }
    }
}

/// Gives the roles that read the read models (the analysts', query-api's) SELECT, and the
/// writers' role its rows, on the swapped-in tables (each role when it exists).
async fn grant_analysts(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let roles: Vec<String> = sqlx::query_scalar(
        "SELECT rolname::text FROM pg_roles
          WHERE rolname IN ('canopy_analyst', 'canopy_reader', 'canopy_writer')",
    )
    .fetch_all(&mut *conn)
    .await?;
    for role in roles {
        let grant = match role.as_str() {
            "canopy_analyst" => "GRANT SELECT ON ALL TABLES IN SCHEMA read TO canopy_analyst",
            "canopy_reader" => "GRANT SELECT ON ALL TABLES IN SCHEMA read TO canopy_reader",
            _ => {
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA read TO canopy_writer"
            }
        };
        sqlx::query(grant).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Up to `limit` events of the projection's aggregate type after `cursor`, in relay order and
/// below the horizon (the relay's own read).
async fn read_events(
    conn: &mut PgConnection,
    projection: Projection,
    cursor: &Cursor,
    limit: Option<i64>,
) -> Result<Vec<(Cursor, Envelope)>, ProjectorError> {
    let limit = limit
        .and_then(|l| usize::try_from(l).ok())
        .unwrap_or(usize::MAX);
    let rows = history::events_after(
        &mut *conn,
        history::Scope::AggregateType(projection.aggregate_type()),
        *cursor,
        limit,
    )
    .await?;
    rows.into_iter()
        .map(|row| {
            let id = row.event_id;
            let cursor = row.cursor();
            let envelope = Envelope::from_stored(row).map_err(|e| {
                ProjectorError::Rebuild(format!("event {id} has unreadable metadata: {e}"))
            })?;
            Ok((cursor, envelope))
        })
        .collect()
}
