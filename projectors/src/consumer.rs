//! One durable JetStream pull consumer per projection, explicit ack, bounded in flight.
//!
//! Each message is applied in its own transaction with the projection's positions (see
//! [`crate::apply`]) and acknowledged after the commit. A crash before the commit loses nothing
//! (the message is redelivered); a crash after the commit and before the ack duplicates nothing
//! (the redelivery is recognised as applied). An event ahead of its aggregate's position
//! (after a crash the unacknowledged messages come back after later ones) is applied after the
//! missing events, read from the event store (see [`crate::apply`]); nothing waits for a
//! redelivery. A handler error is retried with backoff (nak with delay); past `max_deliveries`
//! the event that does not apply is parked in `read.parked_events` with its error, counted, and
//! acknowledged. The aggregate's later events wait behind it (they are acknowledged, not
//! applied) while every other aggregate goes on; [`crate::parked`] retries it with backoff and,
//! once it applies, brings the aggregate up to date from the store. A database failure is not
//! the event's: the worker hands its batch back and starts over, nothing is parked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use canopy_process::Backoff;
use canopy_relay::Envelope;
use futures::{FutureExt, StreamExt};
use sqlx::PgPool;

use crate::apply::{ApplyError, Fate, Positions, apply, apply_tracked, begin};
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
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
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
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
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
    let Some(stream) =
        canopy_relay::wait_for_stream(jetstream, &config.stream.stream_name, stop).await
    else {
        return Ok(());
    };
    let durable = format!("{}-{}", config.consumer_prefix, projection.name());
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            &durable,
            pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: format!(
                    "{}.{}.>",
                    config.stream.subject_prefix(),
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
    parked::report_gauge(pool, projection).await;
    let mut consumer = consumer;
    recover_in_flight(pool, &stream, &mut consumer, config, projection).await?;
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
            if let Err(error) = reply(message, ack).await {
                // the message is redelivered after ack_wait and recognised as applied
                tracing::warn!(%error, projection = projection.name(), "ack failed");
            }
        }
    }
}

/// Most stream messages read back at start-up (see [`recover_in_flight`]).
const RECOVERY_LIMIT: u64 = 4096;

/// Applies what was in flight when the previous worker stopped, before consuming.
///
/// JetStream redelivers a message that was delivered but not acknowledged only after the ack
/// wait. Later events of the same aggregates fill their gaps from the store without waiting
/// for it, but an aggregate that has no later event would stay behind until then. So a worker
/// starting on a consumer with unacknowledged messages reads the range between the consumer's
/// ack floor and its last delivery straight from the stream and applies those messages now;
/// their redeliveries are then duplicates.
async fn recover_in_flight(
    pool: &PgPool,
    stream: &jetstream::stream::Stream,
    consumer: &mut jetstream::consumer::Consumer<pull::Config>,
    config: &ProjectorsConfig,
    projection: Projection,
) -> Result<(), ProjectorError> {
    let info = consumer
        .info()
        .await
        .map_err(|e| ProjectorError::Nats(e.to_string()))?;
    if info.num_ack_pending == 0 {
        return Ok(());
    }
    let first = info.ack_floor.stream_sequence + 1;
    let last = info
        .delivered
        .stream_sequence
        .min(first.saturating_add(RECOVERY_LIMIT - 1));
    let filter = info.config.filter_subject.trim_end_matches('>').to_owned();
    let mut events = Vec::new();
    for sequence in first..=last {
        match stream.get_raw_message(sequence).await {
            Ok(message) if message.subject.starts_with(filter.as_str()) => {
                if let Ok(event) = serde_json::from_slice::<Envelope>(&message.payload) {
                    events.push(Some(event));
                }
            }
            Ok(_) => {}
            Err(error)
                if error.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
            Err(error) => return Err(ProjectorError::Nats(error.to_string())),
        }
    }
    let mut applied = 0;
    if let Some(done) = apply_all(pool, projection, &events).await? {
        applied = done.len();
    } else {
        // one does not apply: as if delivered for the first time (its own delivery comes back
        // and is retried or parked as usual)
        for event in events.iter().flatten() {
            if process_event(pool, config, projection, event, 0).await?.1 {
                applied += 1;
            }
        }
    }
    tracing::info!(
        projection = projection.name(),
        in_flight = info.num_ack_pending,
        read = events.len(),
        applied,
        "applied what was in flight before the restart"
    );
    Ok(())
}

/// Applies a batch in one transaction when every event applies (the usual case); otherwise
/// falls back to one transaction per event, where failures are retried and parked. A database
/// failure ends the worker's round: the batch is handed back (nak) and tried again.
async fn process_batch(
    pool: &PgPool,
    config: &ProjectorsConfig,
    projection: Projection,
    batch: &[jetstream::Message],
) -> Result<Vec<Ack>, ProjectorError> {
    let events: Vec<Option<Envelope>> = batch
        .iter()
        .map(|message| serde_json::from_slice::<Envelope>(&message.payload).ok())
        .collect();
    if events.iter().all(Option::is_some) {
        match apply_all(pool, projection, &events).await {
            Ok(Some(applied)) => {
                for (event, filled) in applied {
                    record_applied(projection, event, filled);
                }
                return Ok(vec![Ack::Ack; batch.len()]);
            }
            Ok(None) => {}
            Err(error) => {
                hand_back(batch).await;
                return Err(error);
            }
        }
    }
    let mut acks = Vec::with_capacity(batch.len());
    for (index, message) in batch.iter().enumerate() {
        let deliveries = message.info().map(|i| i.delivered).unwrap_or(1).max(1);
        match process(pool, config, projection, &message.payload, deliveries).await {
            Ok(ack) => acks.push(ack),
            Err(error) => {
                for (message, ack) in batch.iter().zip(&acks) {
                    let _ = reply(message, *ack).await;
                }
                hand_back(&batch[index..]).await;
                return Err(error);
            }
        }
    }
    Ok(acks)
}

/// The whole batch in one transaction: `None` when an event does not apply (the caller goes
/// event by event), the applied events otherwise.
async fn apply_all<'a>(
    pool: &PgPool,
    projection: Projection,
    events: &'a [Option<Envelope>],
) -> Result<Option<Vec<(&'a Envelope, u64)>>, ProjectorError> {
    let mut tx = begin(pool, projection).await?;
    let blocked = parked::open_aggregates(&mut tx, projection).await?;
    let mut positions = Positions::new(projection);
    let mut applied = Vec::new();
    for event in events.iter().flatten() {
        if blocked.contains(&(event.aggregate_type.clone(), event.aggregate_id.clone())) {
            // waits behind its parked event; applied from the store once that is resolved
            continue;
        }
        match apply_tracked(&mut tx, &mut positions, event).await {
            Ok(Fate::Applied { filled }) => applied.push((event, filled)),
            Ok(Fate::Duplicate) => {}
            Err(ApplyError::Database(error)) => return Err(error.into()),
            Err(ApplyError::Handler { .. }) => {
                tx.rollback().await?;
                return Ok(None);
            }
        }
    }
    positions.flush(&mut tx).await?;
    tx.commit().await?;
    Ok(Some(applied))
}

/// Gives messages back for a prompt redelivery (the worker is starting over).
async fn hand_back(messages: &[jetstream::Message]) {
    for message in messages {
        let _ = reply(message, Ack::Retry(Duration::from_millis(500))).await;
    }
}

async fn reply(message: &jetstream::Message, ack: Ack) -> Result<(), async_nats::Error> {
    match ack {
        Ack::Ack => message.ack().await,
        Ack::Retry(delay) => message.ack_with(AckKind::Nak(Some(delay))).await,
    }
}

fn record_applied(projection: Projection, event: &Envelope, filled: u64) {
    let lag = (chrono::Utc::now() - event.recorded_at)
        .to_std()
        .unwrap_or_default();
    metrics::histogram!("canopy_projection_lag_seconds", "projection" => projection.name())
        .record(lag.as_secs_f64());
    metrics::counter!("canopy_projection_events_total", "projection" => projection.name())
        .increment(1 + filled);
}

#[derive(Debug, Clone, Copy)]
enum Ack {
    Ack,
    Retry(Duration),
}

/// One event in its own transaction: applied (after the events it was ahead of), retried
/// later, or, past `max_deliveries`, the event that does not apply is parked.
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
    Ok(process_event(pool, config, projection, &event, deliveries)
        .await?
        .0)
}

/// [`process`] for a decoded event; also says whether it was applied.
async fn process_event(
    pool: &PgPool,
    config: &ProjectorsConfig,
    projection: Projection,
    event: &Envelope,
    deliveries: i64,
) -> Result<(Ack, bool), ProjectorError> {
    let mut tx = begin(pool, projection).await?;
    if parked::is_blocked(&mut tx, projection, event).await? {
        // waits behind its parked event; applied from the store once that is resolved
        tx.rollback().await?;
        return Ok((Ack::Ack, false));
    }
    match apply(&mut tx, projection, event).await {
        Ok(Fate::Applied { filled }) => {
            tx.commit().await?;
            record_applied(projection, event, filled);
            Ok((Ack::Ack, true))
        }
        Ok(Fate::Duplicate) => {
            tx.rollback().await?;
            Ok((Ack::Ack, false))
        }
        Err(ApplyError::Database(error)) => Err(error.into()),
        Err(ApplyError::Handler {
            event: failed,
            error,
        }) => {
            tx.rollback().await?;
            tracing::warn!(%error, projection = projection.name(), event = %failed.id, sequence = failed.sequence, deliveries, "event does not apply");
            if deliveries >= config.max_deliveries {
                parked::park(pool, projection, &failed, &error.to_string(), deliveries).await?;
                return Ok((Ack::Ack, false));
            }
            Ok((Ack::Retry(backoff(deliveries)), false))
        }
    }
}

/// 100 ms, 200 ms, 400 ms ... capped at 10 s, with jitter.
fn backoff(deliveries: i64) -> Duration {
    let failures = u32::try_from(deliveries.saturating_sub(1)).unwrap_or(0);
    Backoff::after(
        Duration::from_millis(100),
        Duration::from_secs(10),
        failures,
    )
}
