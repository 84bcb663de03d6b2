//! Re-publishing stored events on demand, to repair or rebuild the stream, and measuring lag
//! from outside a running relay (for the CLI and health checks).

use serde::Serialize;
use sqlx::PgPool;
use tracing::{info, warn};

use crate::envelope::encode;
use crate::publish::{Pipeline, is_fence_refusal};
use crate::stream::{context, ensure, last_sequence};
use crate::{Cursor, RelayConfig, RelayError, db};
use canopy_process::Backoff;

/// What [`republish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RepublishReport {
    /// Events acknowledged by JetStream (stored plus duplicates).
    pub events: u64,
    /// Events JetStream stored anew.
    pub stored: u64,
    /// Events JetStream recognised by `Nats-Msg-Id` as already stored inside its window.
    pub duplicates: u64,
    /// Failed rounds that were retried from the first unacknowledged event.
    pub retries: u64,
    /// The last event published, in relay order.
    pub last: Option<Cursor>,
}

/// Consecutive failures without progress after which [`republish`] gives up.
const MAX_FAILURES_IN_A_ROW: u32 = 8;

/// Publishes again every committed event whose position is `>= from_position`, in relay order
/// `(transaction_id, position)`, with the same subjects, headers and bodies as the relay.
///
/// Inside the duplicate window JetStream drops the copies (they count as `duplicates`); past it
/// they are stored again, which consumers absorb by deduplicating on `(aggregate_type,
/// aggregate_id, sequence)`. Events still beyond the horizon when it finishes are left to the
/// relay. It does not touch the checkpoint and does not take the relay lock; it fences its own
/// publishes like the relay does, so a relay leading at the same time and this call each see
/// the other's messages as a moved stream and retry: both finish, more slowly. For a strictly
/// ordered rebuild, run it with the relays stopped.
pub async fn republish(
    pool: &PgPool,
    client: &async_nats::Client,
    config: &RelayConfig,
    from_position: i64,
) -> Result<RepublishReport, RelayError> {
    config.validate()?;
    let js = context(client.clone(), config);
    ensure(&js, config).await?;
    let mut acked = db::cursor_before_position(pool, from_position).await?;
    let mut report = RepublishReport::default();
    let mut backoff = Backoff::new(config.backoff_base, config.backoff_max);
    let mut failures = 0;
    let mut stream_last = None;
    loop {
        let last = match stream_last {
            Some(last) => last,
            None => last_sequence(&js, &config.stream_name).await?,
        };
        let mut pipeline = Pipeline::new(js.clone(), config.max_in_flight, last);
        let result = feed(pool, config, &mut pipeline, acked, from_position).await;
        let (stored, duplicates) = pipeline.take_counts();
        report.stored += stored;
        report.duplicates += duplicates;
        report.events += stored + duplicates;
        let progressed = pipeline.acked().is_some();
        if let Some(cursor) = pipeline.acked() {
            acked = cursor;
            report.last = Some(cursor);
        }
        match result {
            Ok(true) => {
                info!(from_position, ?report, "republish finished");
                return Ok(report);
            }
            Ok(false) => stream_last = Some(pipeline.stream_last()),
            Err(error) if pipeline.is_broken() && is_fence_refusal(&error) => {
                stream_last = Some(pipeline.stream_last());
            }
            Err(error @ (RelayError::Database(_) | RelayError::DatabaseTimeout(_))) => {
                return Err(error);
            }
            Err(error) => {
                report.retries += 1;
                if progressed {
                    failures = 0;
                    backoff.reset();
                }
                failures += 1;
                if failures >= MAX_FAILURES_IN_A_ROW {
                    return Err(error);
                }
                warn!(%error, "republish failed; retrying from the first unacknowledged event");
                stream_last = None;
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Publishes from `after` until caught up (`true`) or the pipeline breaks on a duplicate
/// (`false`: go again from its acked cursor).
async fn feed(
    pool: &PgPool,
    config: &RelayConfig,
    pipeline: &mut Pipeline,
    after: Cursor,
    from_position: i64,
) -> Result<bool, RelayError> {
    let mut read_from = after;
    loop {
        let rows = crate::history::events_after(
            pool,
            crate::history::Scope::FromPosition(from_position),
            read_from,
            config.batch_size,
        )
        .await?;
        for row in &rows {
            pipeline
                .push(row.cursor(), encode(row, &config.subject_prefix))
                .await?;
            if pipeline.is_broken() {
                break;
            }
        }
        if let Some(last) = rows.last() {
            read_from = last.cursor();
        }
        if rows.len() < config.batch_size || pipeline.is_broken() {
            pipeline.drain().await?;
            return Ok(!pipeline.is_broken());
        }
    }
}

/// A relay's lag as seen from the database alone.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Lag {
    /// The relay's checkpoint (start when it never ran).
    pub checkpoint: Cursor,
    /// Committed events after the checkpoint, beyond the horizon included (capped at 1,000,000).
    pub events: u64,
    /// Age in seconds of the oldest of them, 0 when none.
    pub seconds: f64,
}

/// Measures the lag of the relay named `name` without running it.
pub async fn measure_lag(pool: &PgPool, name: &str) -> Result<Lag, RelayError> {
    let checkpoint = db::read_checkpoint(pool, name)
        .await?
        .unwrap_or(Cursor::START);
    let sample = db::lag_after(pool, checkpoint).await?;
    Ok(Lag {
        checkpoint,
        events: sample.events,
        seconds: sample.seconds,
    })
}
