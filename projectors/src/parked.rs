//! Parked events: what a projection could not apply (a handler error, never a gap), kept with
//! the error in `read.parked_events` and counted in metrics, never dropped silently. An
//! aggregate with an open parked event has its later events wait behind it, so its rows never
//! skip an event; other aggregates are not held up. [`retry`] brings such an aggregate up to
//! date from the event store: the projectors run it on their own with backoff
//! ([`retry_loop`]), and `canopy parked --retry` runs it at once after a fix.

use canopy_relay::Envelope;
use sqlx::{PgConnection, PgPool};

use crate::ProjectorError;
use std::time::Duration;

use crate::apply::{ApplyError, Positions, begin, catch_up, is_transient};
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
    report_gauge(pool, projection).await;
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
            SET error = EXCLUDED.error, deliveries = EXCLUDED.deliveries, resolved_at = NULL,
                next_attempt_at = now() + interval '1 second'",
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
    report_gauge(pool, projection).await;
    Ok(())
}

/// Whether `event`'s aggregate has an open parked event (its later events wait behind it).
pub(crate) async fn is_blocked(
    conn: &mut PgConnection,
    projection: Projection,
    event: &Envelope,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM read.parked_events
          WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3 AND resolved_at IS NULL)",
    )
    .bind(projection.name())
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
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
pub(crate) async fn report_gauge(pool: &PgPool, projection: Projection) {
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
    /// Parked events now applied.
    pub resolved: u64,
    /// Parked events that still do not apply (or wait behind one that does not).
    pub still_parked: u64,
    /// Events of the retried aggregates applied from the event store after their parked ones.
    pub caught_up: u64,
}

/// Which parked events a retry takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Every open one (an operator after fixing the cause: `canopy parked --retry`).
    All,
    /// Those whose backoff has run out (the projectors' own retries).
    Now,
}

/// Retries parked events per aggregate: from the aggregate's position, its events are applied
/// again from the event store, in order, up to the newest (the parked events and those that
/// waited behind them), each page in a transaction. An aggregate that still does not apply
/// keeps its parked event, with the new error, and backs off (1 s, doubling, up to
/// `max_backoff`).
pub async fn retry(
    pool: &PgPool,
    projection: Projection,
    due: Due,
    max_backoff: Duration,
) -> Result<RetryReport, ProjectorError> {
    let aggregates: Vec<(String, String)> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id FROM read.parked_events
          WHERE projection = $1 AND resolved_at IS NULL AND aggregate_id <> ''
          GROUP BY aggregate_type, aggregate_id
         HAVING $2 OR min(next_attempt_at) <= now()
          ORDER BY min(parked_at)
          LIMIT 1000",
    )
    .bind(projection.name())
    .bind(due == Due::All)
    .fetch_all(pool)
    .await?;
    let mut report = RetryReport::default();
    for (aggregate_type, aggregate_id) in aggregates {
        retry_aggregate(
            pool,
            projection,
            &aggregate_type,
            &aggregate_id,
            max_backoff,
            &mut report,
        )
        .await?;
    }
    if report != RetryReport::default() {
        tracing::info!(
            projection = projection.name(),
            resolved = report.resolved,
            still_parked = report.still_parked,
            caught_up = report.caught_up,
            "parked events retried"
        );
    }
    report_gauge(pool, projection).await;
    Ok(report)
}

/// What one transaction applies at most while an aggregate catches up.
const CATCH_UP_PAGE: canopy_relay::history::Page = canopy_relay::history::Page {
    events: 500,
    bytes: 16 * 1024 * 1024,
};

async fn retry_aggregate(
    pool: &PgPool,
    projection: Projection,
    aggregate_type: &str,
    aggregate_id: &str,
    max_backoff: Duration,
    report: &mut RetryReport,
) -> Result<(), ProjectorError> {
    let failure = loop {
        let mut tx = begin(pool, projection).await?;
        let mut positions = Positions::new(projection);
        match catch_up(
            &mut tx,
            &mut positions,
            aggregate_type,
            aggregate_id,
            CATCH_UP_PAGE,
        )
        .await
        {
            Ok(applied) => {
                positions.flush(&mut tx).await?;
                let resolved =
                    resolve_applied_of(&mut tx, projection, aggregate_type, aggregate_id).await?;
                tx.commit().await?;
                report.resolved += resolved;
                report.caught_up += applied as u64;
                if applied > 0 {
                    continue;
                }
                // caught up with the store: what is still open was never in it
                break "the event is not in the event store (it was published by something \
                       other than the relay)"
                    .to_owned();
            }
            Err(ApplyError::Database(error)) if is_transient(&error) => {
                return Err(error.into());
            }
            Err(error) => {
                tx.rollback().await?;
                break error.to_string();
            }
        }
    };
    let still: i64 = sqlx::query_scalar(
        "WITH failed AS (
            UPDATE read.parked_events
               SET error = $4, attempts = attempts + 1,
                   next_attempt_at = now() + least(
                       make_interval(secs => power(2, least(attempts, 20))),
                       make_interval(secs => $5))
             WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3
               AND resolved_at IS NULL
            RETURNING 1)
         SELECT count(*) FROM failed",
    )
    .bind(projection.name())
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(failure)
    .bind(max_backoff.as_secs_f64())
    .fetch_one(pool)
    .await?;
    if still > 0 {
        metrics::counter!("canopy_projection_parked_retries_failed_total", "projection" => projection.name())
            .increment(1);
        report.still_parked += u64::try_from(still).unwrap_or_default();
    }
    Ok(())
}

/// Resolves an aggregate's parked events at or below its position (applied by now).
async fn resolve_applied_of(
    conn: &mut PgConnection,
    projection: Projection,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<u64, sqlx::Error> {
    let resolved = sqlx::query(&format!(
        "UPDATE read.parked_events p SET resolved_at = now()
           FROM read.{positions} pos
          WHERE p.projection = $1 AND p.resolved_at IS NULL
            AND p.aggregate_type = $2 AND p.aggregate_id = $3
            AND pos.aggregate_type = p.aggregate_type AND pos.aggregate_id = p.aggregate_id
            AND p.sequence <= pos.version",
        positions = projection.positions_table()
    ))
    .bind(projection.name())
    .bind(aggregate_type)
    .bind(aggregate_id)
    .execute(&mut *conn)
    .await?;
    Ok(resolved.rows_affected())
}

/// The projectors' own retries of parked events, until `stop`.
pub(crate) async fn retry_loop(
    pool: PgPool,
    projection: Projection,
    max_backoff: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if let Err(error) = retry(&pool, projection, Due::Now, max_backoff).await {
            tracing::warn!(%error, projection = projection.name(), "retrying parked events failed; trying again");
        }
    }
}
