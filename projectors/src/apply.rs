//! Applying events to a projection inside a transaction, exactly once per
//! `(aggregate, sequence)`: the projection's positions table says what was applied last, and it
//! is updated in the same transaction as the rows, so a redelivered event changes nothing.
//!
//! Positions are read once per aggregate and transaction (`FOR UPDATE`, which also serializes
//! two projector processes on one aggregate) and written back once at the end, so a batch of
//! events costs little more than the handlers' own statements.

use std::collections::HashMap;

use canopy_relay::Envelope;
use sqlx::PgConnection;

use crate::projections::{Projection, ProjectionError};

/// What became of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    Applied,
    /// Already applied (a redelivery or a republished copy).
    Duplicate,
    /// An earlier event of the aggregate has not been applied yet.
    Gap {
        expected: i64,
    },
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
        event: &Envelope,
    ) -> Result<i64, sqlx::Error> {
        let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
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

/// Applies `event` if it is its aggregate's next one, tracking the position in `positions`
/// (flushed by the caller before commit). Runs inside the caller's transaction, after
/// [`use_schema`].
pub(crate) async fn apply_tracked(
    conn: &mut PgConnection,
    positions: &mut Positions,
    event: &Envelope,
) -> Result<Fate, ProjectionError> {
    let version = positions.version(conn, event).await?;
    if event.sequence <= version {
        return Ok(Fate::Duplicate);
    }
    if event.sequence > version + 1 {
        return Ok(Fate::Gap {
            expected: version + 1,
        });
    }
    positions.projection.handle(conn, event).await?;
    positions.advance(event);
    Ok(Fate::Applied)
}

/// Applies one event and writes its position: [`apply_tracked`] for a single event.
pub(crate) async fn apply(
    conn: &mut PgConnection,
    projection: Projection,
    event: &Envelope,
) -> Result<Fate, ProjectionError> {
    let mut positions = Positions::new(projection);
    let applied = apply_tracked(conn, &mut positions, event).await?;
    positions.flush(conn).await?;
    Ok(applied)
}

/// The advisory-lock key a projection's writers share and its rebuild swap takes exclusively.
pub(crate) fn lock_key(projection: Projection) -> i64 {
    // "canopyp" followed by the projection's index: stable and distinct from other locks
    0x0063_616e_6f70_7000 + projection as i64
}
