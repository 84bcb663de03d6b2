//! The relay's SQL: the gap-safe read, the checkpoint, the leader lock and the lag.
//!
//! Positions are taken at INSERT but become visible at COMMIT, so "everything after the last
//! position seen" would skip a slow transaction's events for good. The relay instead reads only
//! rows whose transaction is older than the oldest transaction still running
//! (`pg_snapshot_xmin(pg_current_snapshot())`, the horizon): no row can still appear below it. It
//! orders and checkpoints by `(transaction_id, position)`, and because an event insert is its
//! transaction's first write (a trigger enforces it), a later append to an aggregate always has
//! the larger transaction id, so that order keeps each aggregate's order.
//!
//! `xid8` has no binary mapping in sqlx; it crosses as text cast to `bigint` (transaction ids
//! are far below 2^63: epoch × 2^32 + xid).

use sqlx::{Executor, PgConnection, Postgres};

use crate::history::{self, xid_param};
use crate::{Cursor, StoredEvent};

/// Up to `limit` committed events after `after`, below the horizon, in relay order.
pub(crate) async fn read_batch(
    conn: &mut PgConnection,
    after: Cursor,
    limit: usize,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    history::events_after(conn, history::Scope::All, after, limit).await
}

/// The cursor just before the first event (in relay order) whose position is `>= from`: no
/// event with a smaller transaction id has such a position.
pub(crate) async fn cursor_before_position<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    from_position: i64,
) -> Result<Cursor, sqlx::Error> {
    let first: Option<i64> = sqlx::query_scalar(
        "SELECT min(transaction_id)::text::bigint FROM events WHERE position >= $1",
    )
    .bind(from_position)
    .fetch_one(executor)
    .await?;
    Ok(match first {
        // (xid, -1) sorts before every row of that transaction
        Some(xid) => Cursor {
            transaction_id: u64::try_from(xid).unwrap_or_default(),
            position: -1,
        },
        None => Cursor::START,
    })
}

/// Creates the relay's checkpoint row when missing and returns it.
pub(crate) async fn load_checkpoint(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Cursor, sqlx::Error> {
    sqlx::query("INSERT INTO relay_checkpoints (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    read_checkpoint(conn, name)
        .await
        .map(|cursor| cursor.unwrap_or(Cursor::START))
}

/// The stored checkpoint, if the relay has ever run under this name.
pub(crate) async fn read_checkpoint<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    name: &str,
) -> Result<Option<Cursor>, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM relay_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|(xid, position)| Cursor {
        transaction_id: u64::try_from(xid).unwrap_or_default(),
        position,
    }))
}

pub(crate) async fn save_checkpoint(
    conn: &mut PgConnection,
    name: &str,
    cursor: Cursor,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE relay_checkpoints \
            SET transaction_id = $2::bigint::text::xid8, position = $3, updated_at = now() \
          WHERE name = $1",
    )
    .bind(name)
    .bind(xid_param(cursor))
    .bind(cursor.position)
    .execute(conn)
    .await?;
    Ok(())
}

/// Tries the leader lock without waiting. Held until unlocked or the session ends.
pub(crate) async fn try_lock(conn: &mut PgConnection, key: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(conn)
        .await
}

pub(crate) async fn unlock(conn: &mut PgConnection, key: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .fetch_one(conn)
        .await
}

/// Lag counts stop here so that measuring a huge backlog stays cheap.
pub(crate) const LAG_COUNT_CAP: i64 = 1_000_000;

/// How far behind the store a cursor is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LagSample {
    /// Committed events after the cursor, beyond the horizon included (capped).
    pub(crate) events: u64,
    /// Age of the oldest of them (by `recorded_at`), zero when there are none.
    pub(crate) seconds: f64,
}

pub(crate) async fn lag_after<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    after: Cursor,
) -> Result<LagSample, sqlx::Error> {
    let (events, seconds): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(recorded_at))::float8 \
           FROM (SELECT recorded_at FROM events \
                  WHERE (transaction_id, position) > ($1::bigint::text::xid8, $2) \
                  ORDER BY transaction_id, position \
                  LIMIT $3) AS unpublished",
    )
    .bind(xid_param(after))
    .bind(after.position)
    .bind(LAG_COUNT_CAP)
    .fetch_one(executor)
    .await?;
    Ok(LagSample {
        events: u64::try_from(events).unwrap_or_default(),
        seconds: seconds.unwrap_or(0.0).max(0.0),
    })
}
