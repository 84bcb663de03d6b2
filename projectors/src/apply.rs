//! Applying events to a projection inside a transaction, exactly once per
//! `(aggregate, sequence)`: the projection's positions table says what was applied last, and it
//! is updated in the same transaction as the rows, so a redelivered event changes nothing.
//!
//! An event ahead of its aggregate's position (after a crash, redeliveries come back after
//! later messages) is applied after the missing events, read from the event store in the same
//! transaction: a gap is never waited for and never parks anything.
//!
//! Positions are read once per aggregate and transaction (`FOR UPDATE`, which also serializes
//! two projector processes on one aggregate) and written back once at the end, so a batch of
//! events costs little more than the handlers' own statements.

use std::collections::HashMap;

use canopy_relay::{Envelope, history};
use sqlx::PgConnection;

use crate::projections::{Projection, ProjectionError};

/// What became of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Applied, after the events it was ahead of (`filled`, read from the event store).
    Applied { filled: u64 },
    /// Already applied (a redelivery or a republished copy).
    Duplicate,
}

/// Why an event did not apply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    /// The projection cannot apply `event` (its data, or a rule of the read model): retried
    /// with backoff, then parked. `event` may be an earlier one read from the store to fill a
    /// gap, not the one being applied.
    #[error("event #{} of {} {} does not apply: {error}", event.sequence, event.aggregate_type, event.aggregate_id)]
    Handler {
        event: Box<Envelope>,
        error: ProjectionError,
    },
    /// The database failed (a lost connection, a restart, a serialization failure): nothing is
    /// parked, the transaction is tried again as a whole.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl ApplyError {
    fn handler(event: &Envelope, error: ProjectionError) -> Self {
        match error {
            ProjectionError::Database(error) if is_transient(&error) => Self::Database(error),
            error => Self::Handler {
                event: Box::new(event.clone()),
                error,
            },
        }
    }
}

/// A database error that says nothing about the event: the same statement may succeed later
/// (connection and server failures, serialization failures, deadlocks, a statement timeout).
/// Data and constraint errors are the event's (or the projection's) and are not transient.
pub(crate) fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08 connection, 40 transaction rollback, 53 resources, 57 operator intervention,
            // 58 system error
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// Sets the transaction's `search_path` to the schema holding the projection's tables.
pub(crate) async fn use_schema(conn: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('search_path', $1, true)")
        .bind(format!("{schema}, public"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

type Key = (String, String);

/// The positions of the aggregates one transaction touches.
#[derive(Debug)]
pub(crate) struct Positions {
    projection: Projection,
    versions: HashMap<Key, i64>,
    dirty: Vec<Key>,
}

impl Positions {
    pub(crate) fn new(projection: Projection) -> Self {
        Self {
            projection,
            versions: HashMap::new(),
            dirty: Vec::new(),
        }
    }

    async fn version(
        &mut self,
        conn: &mut PgConnection,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<i64, sqlx::Error> {
        let key = (aggregate_type.to_owned(), aggregate_id.to_owned());
        if let Some(version) = self.versions.get(&key) {
            return Ok(*version);
        }
        let version: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT version FROM {} WHERE aggregate_type = $1 AND aggregate_id = $2 FOR UPDATE",
            self.projection.positions_table()
        ))
        .bind(&key.0)
        .bind(&key.1)
        .fetch_optional(&mut *conn)
        .await?;
        let version = version.unwrap_or(0);
        self.versions.insert(key, version);
        Ok(version)
    }

    pub(crate) fn projection(&self) -> Projection {
        self.projection
    }

    /// Drops a cached position (its savepoint was rolled back): it is read again when needed.
    pub(crate) fn forget(&mut self, event: &Envelope) {
        let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
        self.versions.remove(&key);
        self.dirty.retain(|k| *k != key);
    }

    fn advance(&mut self, event: &Envelope) {
        let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
        if !self.dirty.contains(&key) {
            self.dirty.push(key.clone());
        }
        self.versions.insert(key, event.sequence);
    }

    /// Writes the advanced positions back (one statement).
    pub(crate) async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let (types, ids): (Vec<String>, Vec<String>) = self.dirty.drain(..).unzip();
        let versions: Vec<i64> = types
            .iter()
            .zip(&ids)
            .map(|(t, i)| self.versions[&(t.clone(), i.clone())])
            .collect();
        sqlx::query(&format!(
            "INSERT INTO {} (aggregate_type, aggregate_id, version)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = EXCLUDED.version",
            self.projection.positions_table()
        ))
        .bind(types)
        .bind(ids)
        .bind(versions)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// What one read from the store holds at most while filling a gap or catching up.
const FILL_PAGE: history::Page = history::Page {
    events: 500,
    bytes: 16 * 1024 * 1024,
};

/// Applies `event` if it is its aggregate's next one, tracking the position in `positions`
/// (flushed by the caller before commit). Runs inside the caller's transaction, after
/// [`use_schema`].
///
/// An event ahead of the aggregate's position is not waited for: the events in between are
/// read from the event store (the source of truth; the stream only says that something
/// happened) and applied first, in order, in the same transaction.
pub(crate) async fn apply_tracked(
    conn: &mut PgConnection,
    positions: &mut Positions,
    event: &Envelope,
) -> Result<Fate, ApplyError> {
    let version = positions
        .version(conn, &event.aggregate_type, &event.aggregate_id)
        .await?;
    if event.sequence <= version {
        return Ok(Fate::Duplicate);
    }
    let filled = if event.sequence > version + 1 {
        fill(conn, positions, event, version).await?
    } else {
        0
    };
    handle(conn, positions, event).await?;
    Ok(Fate::Applied { filled })
}

/// Applies the store's events of `event`'s aggregate between `version` and `event`.
async fn fill(
    conn: &mut PgConnection,
    positions: &mut Positions,
    event: &Envelope,
    mut version: i64,
) -> Result<u64, ApplyError> {
    let mut filled = 0;
    while version + 1 < event.sequence {
        let rows = history::of_aggregate(
            &mut *conn,
            &event.aggregate_type,
            &event.aggregate_id,
            version,
            Some(event.sequence),
            FILL_PAGE,
        )
        .await?;
        let Some(first) = rows.first() else {
            return Err(missing(event, version + 1));
        };
        if first.sequence != version + 1 {
            return Err(missing(event, version + 1));
        }
        for row in rows {
            if row.sequence != version + 1 {
                return Err(missing(event, version + 1));
            }
            let sequence = row.sequence;
            let earlier = Envelope::from_stored(row).map_err(|error| ApplyError::Handler {
                event: Box::new(event.clone()),
                error: ProjectionError::Inconsistent(format!(
                    "event #{sequence} of this aggregate is unreadable in the event store: {error}"
                )),
            })?;
            handle(conn, positions, &earlier).await?;
            version = sequence;
            filled += 1;
        }
    }
    if filled > 0 {
        metrics::counter!("canopy_projection_gap_filled_total", "projection" => positions.projection.name())
            .increment(filled);
    }
    Ok(filled)
}

async fn handle(
    conn: &mut PgConnection,
    positions: &mut Positions,
    event: &Envelope,
) -> Result<(), ApplyError> {
    positions
        .projection
        .handle(conn, event)
        .await
        .map_err(|error| ApplyError::handler(event, error))?;
    positions.advance(event);
    Ok(())
}

/// Applies one page of the store's events of an aggregate after its position; returns how many
/// it applied (none: the aggregate is caught up).
pub(crate) async fn catch_up(
    conn: &mut PgConnection,
    positions: &mut Positions,
    aggregate_type: &str,
    aggregate_id: &str,
    page: history::Page,
) -> Result<usize, ApplyError> {
    let mut version = positions
        .version(conn, aggregate_type, aggregate_id)
        .await?;
    let rows = history::of_aggregate(
        &mut *conn,
        aggregate_type,
        aggregate_id,
        version,
        None,
        page,
    )
    .await?;
    let count = rows.len();
    for row in rows {
        let sequence = row.sequence;
        let event = Envelope::from_stored(row).map_err(|error| {
            ApplyError::Database(sqlx::Error::Decode(
                format!(
                    "event #{sequence} of {aggregate_type} {aggregate_id} is unreadable: {error}"
                )
                .into(),
            ))
        })?;
        if sequence != version + 1 {
            return Err(missing(&event, version + 1));
        }
        handle(conn, positions, &event).await?;
        version = sequence;
    }
    Ok(count)
}

/// The store lacks an event below one that was published: the store itself has a gap.
fn missing(event: &Envelope, expected: i64) -> ApplyError {
    ApplyError::Handler {
        event: Box::new(event.clone()),
        error: ProjectionError::Inconsistent(format!(
            "the event store has no event #{expected} of this aggregate"
        )),
    }
}

/// Applies one event and writes its position: [`apply_tracked`] for a single event.
pub(crate) async fn apply(
    conn: &mut PgConnection,
    projection: Projection,
    event: &Envelope,
) -> Result<Fate, ApplyError> {
    let mut positions = Positions::new(projection);
    let applied = apply_tracked(conn, &mut positions, event).await?;
    positions.flush(conn).await?;
    Ok(applied)
}

/// A live writer's transaction on `projection`: the projection's lock taken shared (a rebuild's
/// swap takes it exclusively) and the live tables on the search path.
pub(crate) async fn begin(
    pool: &sqlx::PgPool,
    projection: Projection,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(lock_key(projection))
        .execute(&mut *tx)
        .await?;
    use_schema(&mut tx, "read").await?;
    Ok(tx)
}

/// The advisory-lock key a projection's writers share and its rebuild swap takes exclusively.
pub(crate) fn lock_key(projection: Projection) -> i64 {
    // "canopyp" followed by the projection's index: stable and distinct from other locks
    0x0063_616e_6f70_7000 + projection as i64
}
