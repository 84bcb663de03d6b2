//! Parked events: what a projection could not apply, kept with the error in
//! `read.parked_events` and counted in metrics, never dropped silently. An aggregate with an open
//! parked event has its later events parked behind it, so its rows never skip an event; other
//! aggregates are not held up. [`retry`] applies an aggregate's parked events again, in order,
//! once the cause is fixed.

use canopy_relay::Envelope;
use sqlx::{PgConnection, PgPool};

use crate::ProjectorError;
use crate::apply::{Fate, apply, lock_key, use_schema};
use crate::projections::Projection;

/// Parks `event` with `error`.
pub(crate) async fn park(
    pool: &PgPool,
    projection: Projection,
    event: &Envelope,
    error: &str,
    deliveries: i64,
) -> Result<(), ProjectorError> {
    let mut conn = pool.acquire().await?;
    park_with(&mut conn, projection, event, error, deliveries).await?;
    drop(conn);
    report(pool, projection).await;
    Ok(())
}

/// Parks `event` within the caller's transaction (a rebuild's batch).
pub(crate) async fn park_with(
    conn: &mut PgConnection,
    projection: Projection,
    event: &Envelope,
    error: &str,
    deliveries: i64,
) -> Result<(), ProjectorError> {
    let envelope =
        serde_json::to_value(event).map_err(|e| ProjectorError::Rebuild(e.to_string()))?;
    sqlx::query(
        "INSERT INTO read.parked_events (projection, event_id, aggregate_type, aggregate_id, sequence,
             event_type, error, deliveries, envelope)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (projection, event_id) DO UPDATE
            SET error = EXCLUDED.error, deliveries = EXCLUDED.deliveries, resolved_at = NULL",
    )
    .bind(projection.name())
    .bind(event.id)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(event.sequence)
    .bind(&event.event_type)
    .bind(error)
    .bind(i32::try_from(deliveries).unwrap_or(i32::MAX))
    .bind(envelope)
    .execute(&mut *conn)
    .await?;
    tracing::error!(projection = projection.name(), event = %event.id, aggregate = %event.aggregate_id, sequence = event.sequence, error, "event parked");
    metrics::counter!("canopy_projection_parked_total", "projection" => projection.name())
        .increment(1);
    Ok(())
}

/// After a rebuild is swapped in, parked events it managed to apply are resolved.
pub(crate) async fn resolve_applied(
    conn: &mut PgConnection,
    projection: Projection,
) -> Result<u64, sqlx::Error> {
    let resolved = sqlx::query(&format!(
        "UPDATE read.parked_events p SET resolved_at = now()
           FROM read.{positions} pos
          WHERE p.projection = $1 AND p.resolved_at IS NULL
            AND pos.aggregate_type = p.aggregate_type AND pos.aggregate_id = p.aggregate_id
            AND p.sequence <= pos.version",
        positions = projection.positions_table()
    ))
    .bind(projection.name())
    .execute(&mut *conn)
    .await?;
    Ok(resolved.rows_affected())
}

/// Parks a message whose body is not an envelope at all (it names no aggregate).
pub(crate) async fn park_unreadable(
    pool: &PgPool,
    projection: Projection,
    payload: &[u8],
    error: &str,
) -> Result<(), ProjectorError> {
    let body = String::from_utf8_lossy(payload).into_owned();
    sqlx::query(
        "INSERT INTO read.parked_events (projection, event_id, aggregate_type, aggregate_id, sequence,
             event_type, error, deliveries, envelope)
         VALUES ($1, gen_random_uuid(), '', '', 0, '', $2, 1, jsonb_build_object('unreadable', $3::text))",
    )
    .bind(projection.name())
    .bind(format!("not an event envelope: {error}"))
    .bind(body)
    .execute(pool)
    .await?;
    tracing::error!(
        projection = projection.name(),
        error,
        "unreadable message parked"
    );
    metrics::counter!("canopy_projection_parked_total", "projection" => projection.name())
        .increment(1);
    report(pool, projection).await;
    Ok(())
}

/// The sequence of the earliest open parked event of `event`'s aggregate, if any.
pub(crate) async fn blocking(
    conn: &mut PgConnection,
    projection: Projection,
    event: &Envelope,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT min(sequence) FROM read.parked_events
          WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3 AND resolved_at IS NULL
            AND sequence < $4",
    )
    .bind(projection.name())
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(event.sequence)
    .fetch_one(&mut *conn)
    .await
}

/// The aggregates with an open parked event (their later events wait behind it).
pub(crate) async fn open_aggregates(
    conn: &mut PgConnection,
    projection: Projection,
) -> Result<std::collections::HashSet<(String, String)>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT aggregate_type, aggregate_id FROM read.parked_events
          WHERE projection = $1 AND resolved_at IS NULL",
    )
    .bind(projection.name())
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Open parked events of `projection`.
pub async fn open_count(pool: &PgPool, projection: Projection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM read.parked_events WHERE projection = $1 AND resolved_at IS NULL",
    )
    .bind(projection.name())
    .fetch_one(pool)
    .await
}

/// Publishes the number of open parked events as a gauge.
pub(crate) async fn report(pool: &PgPool, projection: Projection) {
    match open_count(pool, projection).await {
        Ok(open) => {
            metrics::gauge!("canopy_projection_parked_events", "projection" => projection.name())
                .set(open as f64);
        }
        Err(error) => tracing::warn!(%error, "could not count parked events"),
    }
}

/// What [`retry`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryReport {
    pub resolved: u64,
    pub still_parked: u64,
}

/// Applies the open parked events of `projection` again, per aggregate in sequence order,
/// stopping at an aggregate's first event that still fails.
pub async fn retry(pool: &PgPool, projection: Projection) -> Result<RetryReport, ProjectorError> {
    let rows: Vec<(uuid::Uuid, String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT event_id, aggregate_type, aggregate_id, envelope FROM read.parked_events
          WHERE projection = $1 AND resolved_at IS NULL AND aggregate_id <> ''
          ORDER BY aggregate_type, aggregate_id, sequence",
    )
    .bind(projection.name())
    .fetch_all(pool)
    .await?;
    let mut outcome_report = RetryReport::default();
    let mut failed_aggregate: Option<(String, String)> = None;
    for (event_id, aggregate_type, aggregate_id, envelope) in rows {
        if failed_aggregate.as_ref() == Some(&(aggregate_type.clone(), aggregate_id.clone())) {
            outcome_report.still_parked += 1;
            continue;
        }
        let event: Envelope = serde_json::from_value(envelope).map_err(|e| {
            ProjectorError::Rebuild(format!("parked event {event_id} unreadable: {e}"))
        })?;
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(lock_key(projection))
            .execute(&mut *tx)
            .await?;
        use_schema(&mut tx, "read").await?;
        let outcome = apply(&mut tx, projection, &event).await;
        match outcome {
            Ok(Fate::Applied | Fate::Duplicate) => {
                sqlx::query(
                    "UPDATE read.parked_events SET resolved_at = now() WHERE projection = $1 AND event_id = $2",
                )
                .bind(projection.name())
                .bind(event_id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                outcome_report.resolved += 1;
            }
            Ok(Fate::Gap { .. }) | Err(_) => {
                tx.rollback().await?;
                if let Err(error) = outcome {
                    sqlx::query("UPDATE read.parked_events SET error = $3 WHERE projection = $1 AND event_id = $2")
                        .bind(projection.name())
                        .bind(event_id)
                        .bind(error.to_string())
                        .execute(pool)
                        .await?;
                }
                failed_aggregate = Some((aggregate_type, aggregate_id));
                outcome_report.still_parked += 1;
            }
        }
    }
    report(pool, projection).await;
    Ok(outcome_report)
}
