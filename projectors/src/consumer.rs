//! One durable JetStream pull consumer per projection, explicit ack, bounded in flight.
//!
//! Each message is applied in its own transaction with the projection's positions (see
//! [`crate::apply`]) and acknowledged after the commit. A crash before the commit loses nothing
//! (the message is redelivered); a crash after the commit and before the ack duplicates nothing
//! (the redelivery is recognised as applied). A handler error is retried with backoff (nak with
//! delay); past `max_deliveries` the event is parked in `read.parked_events` with its error,
//! counted, and acknowledged, and the aggregate's later events are parked behind it until it is
//! resolved, while every other aggregate goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use canopy_relay::Envelope;
use futures::{FutureExt, StreamExt};
use sqlx::PgPool;

use crate::apply::{Fate, Positions, apply, apply_tracked, lock_key, use_schema};
use crate::projections::Projection;
use crate::{ProjectorError, ProjectorsConfig, parked};

/// Where a worker stops as if its process died (tests of crash safety).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After receiving the n-th message, before writing anything.
    BeforeWrite,
    /// After committing the n-th message's rows, before acknowledging it.
    AfterWriteBeforeAck,
}

/// A crash to simulate: at `point` of the `after`-th message.
#[derive(Debug, Clone, Copy)]
pub struct Crash {
    pub point: CrashPoint,
    pub after: u64,
}

/// Consumes the projection's events until `stop` says so. A failure of the database or NATS
/// is logged and the worker starts over after a pause (its unacknowledged message comes back);
/// only a simulated crash ends it early.
pub(crate) async fn run(
    pool: PgPool,
    jetstream: jetstream::Context,
    config: Arc<ProjectorsConfig>,
    projection: Projection,
    mut stop: tokio::sync::watch::Receiver<bool>,
    processed: Arc<AtomicU64>,
) -> Result<(), ProjectorError> {
    let mut pause = Duration::from_millis(200);
    loop {
        match consume(
            &pool, &jetstream, &config, projection, &mut stop, &processed,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(ProjectorError::Crashed) => return Err(ProjectorError::Crashed),
            Err(error) => {
                metrics::counter!("canopy_projector_restarts_total", "projection" => projection.name())
                    .increment(1);
                tracing::error!(%error, projection = projection.name(), "projector worker failed; restarting");
                tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn consume(
    pool: &PgPool,
    jetstream: &jetstream::Context,
    config: &ProjectorsConfig,
    projection: Projection,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    processed: &AtomicU64,
) -> Result<(), ProjectorError> {
    // The relay creates the stream; a projector started first waits for it.
    let mut wait = Duration::from_millis(100);
    let stream = loop {
        match jetstream.get_stream(&config.stream_name).await {
            Ok(stream) => break stream,
            Err(error) => {
                tracing::info!(%error, stream = %config.stream_name, "waiting for the event stream");
                tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    };
    let durable = format!("{}-{}", config.consumer_prefix, projection.name());
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            &durable,
            pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: format!(
                    "{}.{}.>",
                    config.subject_prefix,
                    projection.aggregate_type()
                ),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_ack_pending: config.max_ack_pending,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ProjectorError::Nats(e.to_string()))?;
    parked::report(pool, projection).await;
    tracing::debug!(projection = projection.name(), consumer = %durable, "consuming");

    let mut messages = consumer
        .stream()
        .max_messages_per_batch(config.batch_size)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .map_err(|e| ProjectorError::Nats(e.to_string()))?;
    loop {
        let first = tokio::select! {
            _ = stop.changed() => return Ok(()),
            next = messages.next() => next,
        };
        let Some(first) = first else {
            return Err(ProjectorError::Nats(
                "the consumer's message stream ended".into(),
            ));
        };
        // Take whatever else is already here, up to a batch: one transaction applies them all.
        let mut batch = Vec::with_capacity(config.batch_size);
        for next in std::iter::once(Some(first))
            .chain(std::iter::from_fn(|| messages.next().now_or_never()))
        {
            match next {
                Some(Ok(message)) => batch.push(message),
                Some(Err(error)) => {
                    tracing::warn!(%error, projection = projection.name(), "consumer error; continuing");
                }
                None => break,
            }
            if batch.len() >= config.batch_size {
                break;
            }
        }
        if batch.is_empty() {
            continue;
        }
        let before = processed.fetch_add(batch.len() as u64, Ordering::SeqCst);
        let crash_in_batch = |point| {
            config.crash.is_some_and(|crash| {
                crash.point == point
                    && crash.after > before
                    && crash.after <= before + batch.len() as u64
            })
        };
        if crash_in_batch(CrashPoint::BeforeWrite) {
            return Err(ProjectorError::Crashed);
        }
        let acks = process_batch(pool, config, projection, &batch).await?;
        if crash_in_batch(CrashPoint::AfterWriteBeforeAck) {
            return Err(ProjectorError::Crashed);
        }
        for (message, ack) in batch.iter().zip(acks) {
            let acked = match ack {
                Ack::Ack => message.ack().await,
                Ack::Retry(delay) => message.ack_with(AckKind::Nak(Some(delay))).await,
            };
            if let Err(error) = acked {
                // the message is redelivered after ack_wait and recognised as applied
                tracing::warn!(%error, projection = projection.name(), "ack failed");
            }
        }
    }
}

/// Applies a batch in one transaction when every event applies (the usual case); otherwise
/// falls back to one transaction per event, where failures are retried and parked.
async fn process_batch(
    pool: &PgPool,
    config: &ProjectorsConfig,
    projection: Projection,
    batch: &[jetstream::Message],
) -> Result<Vec<Ack>, ProjectorError> {
    let mut events = Vec::with_capacity(batch.len());
    for message in batch {
        match serde_json::from_slice::<Envelope>(&message.payload) {
            Ok(event) => events.push(Some(event)),
            Err(_) => events.push(None),
        }
    }
    if events.iter().all(Option::is_some) {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(lock_key(projection))
            .execute(&mut *tx)
            .await?;
        use_schema(&mut tx, "read").await?;
        let blocked = parked::open_aggregates(&mut tx, projection).await?;
        let mut positions = Positions::new(projection);
        let mut acks = Vec::with_capacity(events.len());
        let mut applied = Vec::new();
        for event in events.iter().flatten() {
            if blocked.contains(&(event.aggregate_type.clone(), event.aggregate_id.clone())) {
                break;
            }
            match apply_tracked(&mut tx, &mut positions, event).await {
                Ok(Fate::Applied) => {
                    applied.push(event);
                    acks.push(Ack::Ack);
                }
                Ok(Fate::Duplicate) => acks.push(Ack::Ack),
                Ok(Fate::Gap { .. }) | Err(_) => break,
            }
        }
        if acks.len() == events.len() {
            positions.flush(&mut tx).await?;
            tx.commit().await?;
            for event in applied {
                record_applied(projection, event);
            }
            return Ok(acks);
        }
        tx.rollback().await?;
    }
    let mut acks = Vec::with_capacity(batch.len());
    for message in batch {
        let deliveries = message.info().map(|i| i.delivered).unwrap_or(1).max(1);
        acks.push(process(pool, config, projection, &message.payload, deliveries).await?);
    }
    Ok(acks)
}

fn record_applied(projection: Projection, event: &Envelope) {
    let lag = (chrono::Utc::now() - event.recorded_at)
        .to_std()
        .unwrap_or_default();
    metrics::histogram!("canopy_projection_lag_seconds", "projection" => projection.name())
        .record(lag.as_secs_f64());
    metrics::counter!("canopy_projection_events_total", "projection" => projection.name())
        .increment(1);
}

enum Ack {
    Ack,
    Retry(Duration),
}

/// One event in its own transaction: applied, retried later, or parked.
async fn process(
    pool: &PgPool,
    config: &ProjectorsConfig,
    projection: Projection,
    payload: &[u8],
    deliveries: i64,
) -> Result<Ack, ProjectorError> {
    let event: Envelope = match serde_json::from_slice(payload) {
        Ok(event) => event,
        Err(error) => {
            parked::park_unreadable(pool, projection, payload, &error.to_string()).await?;
            return Ok(Ack::Ack);
        }
    };
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(lock_key(projection))
        .execute(&mut *tx)
        .await?;
    use_schema(&mut tx, "read").await?;
    if let Some(blocking) = parked::blocking(&mut tx, projection, &event).await? {
        tx.rollback().await?;
        let reason = format!("blocked behind parked event #{blocking} of this aggregate");
        parked::park(pool, projection, &event, &reason, deliveries).await?;
        return Ok(Ack::Ack);
    }
    match apply(&mut tx, projection, &event).await {
        Ok(Fate::Applied) => {
            tx.commit().await?;
            let lag = (chrono::Utc::now() - event.recorded_at)
                .to_std()
                .unwrap_or_default();
            metrics::histogram!("canopy_projection_lag_seconds", "projection" => projection.name())
                .record(lag.as_secs_f64());
            metrics::counter!("canopy_projection_events_total", "projection" => projection.name())
                .increment(1);
            Ok(Ack::Ack)
        }
        Ok(Fate::Duplicate) => {
            tx.rollback().await?;
            Ok(Ack::Ack)
        }
        Ok(Fate::Gap { expected }) => {
            tx.rollback().await?;
            if deliveries >= config.max_gap_deliveries {
                let reason = format!("event #{expected} of this aggregate never arrived");
                parked::park(pool, projection, &event, &reason, deliveries).await?;
                return Ok(Ack::Ack);
            }
            Ok(Ack::Retry(Duration::from_millis(200)))
        }
        Err(error) => {
            tx.rollback().await?;
            tracing::warn!(%error, projection = projection.name(), event = %event.id, deliveries, "event does not apply");
            if deliveries >= config.max_deliveries {
                parked::park(pool, projection, &event, &error.to_string(), deliveries).await?;
                return Ok(Ack::Ack);
            }
            Ok(Ack::Retry(backoff(deliveries)))
        }
    }
}

/// 100 ms, 200 ms, 400 ms ... capped at 10 s, with jitter.
fn backoff(deliveries: i64) -> Duration {
    let exponent = u32::try_from(deliveries.clamp(1, 8) - 1).unwrap_or(0);
    let base = 100u64 * (1 << exponent);
    let jitter = rand::random::<u64>() % (base / 2 + 1);
    Duration::from_millis((base + jitter).min(10_000))
}
