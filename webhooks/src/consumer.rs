//! The durable JetStream consumer that turns events into outbox rows.
//!
//! Messages are taken in batches and written in one transaction, acknowledged after its
//! commit. `max_ack_pending` equals the batch size, so nothing newer is delivered while a batch
//! is unacknowledged: after a crash the same messages come back first (after the ack wait), and
//! the outbox is filled in stream order. A redelivered message inserts nothing (primary key
//! (subscription, event)); a webhook event at or below its subscription's `version` is skipped,
//! and one ahead of it is applied after the missing ones, read from the event store
//! (`canopy_relay::history::of_aggregate`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use canopy_domain::webhook::WebhookEvent;
use canopy_process::Backoff;
use canopy_relay::{Envelope, history};
use futures::{FutureExt, StreamExt};
use sqlx::{PgConnection, PgPool};

use crate::DeliverySettings;

/// Events a batch holds at most (and the consumer's `max_ack_pending`).
const BATCH: usize = 256;

/// Why a batch did not apply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsumeError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("nats: {0}")]
    Nats(String),
    #[error("the event store lacks {0}")]
    Missing(String),
}

/// Consumes until `stop`; a failure is logged and the consumer starts over after a pause.
pub(crate) async fn run(
    pool: PgPool,
    jetstream: jetstream::Context,
    stream: canopy_config::StreamArgs,
    settings: Arc<DeliverySettings>,
    wake: Arc<tokio::sync::Notify>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match consume(&pool, &jetstream, &stream, &settings, &wake, &mut stop).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                metrics::counter!("canopy_webhooks_consumer_restarts_total").increment(1);
                tracing::error!(%error, "webhook consumer failed; restarting");
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
    stream_args: &canopy_config::StreamArgs,
    settings: &DeliverySettings,
    wake: &tokio::sync::Notify,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), ConsumeError> {
    // the relay creates the stream; wait for it
    let Some(stream) =
        canopy_relay::wait_for_stream(jetstream, &stream_args.stream_name, stop).await
    else {
        return Ok(());
    };
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            &settings.consumer,
            pull::Config {
                durable_name: Some(settings.consumer.clone()),
                filter_subject: format!("{}.>", stream_args.subject_prefix()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: settings.ack_wait,
                max_ack_pending: BATCH as i64,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ConsumeError::Nats(e.to_string()))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .map_err(|e| ConsumeError::Nats(e.to_string()))?;
    loop {
        let first = tokio::select! {
            _ = stop.changed() => return Ok(()),
            next = messages.next() => next,
        };
        let Some(first) = first else {
            return Err(ConsumeError::Nats(
                "the consumer's message stream ended".into(),
            ));
        };
        let mut batch = Vec::with_capacity(BATCH);
        for next in std::iter::once(Some(first))
            .chain(std::iter::from_fn(|| messages.next().now_or_never()))
        {
            match next {
                Some(Ok(message)) => batch.push(message),
                Some(Err(error)) => tracing::warn!(%error, "consumer error; continuing"),
                None => break,
            }
            if batch.len() >= BATCH {
                break;
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut events = Vec::with_capacity(batch.len());
        for message in &batch {
            match serde_json::from_slice::<Envelope>(&message.payload) {
                Ok(event) => events.push(event),
                // not ours to judge: the stream only carries the relay's envelopes
                Err(error) => {
                    tracing::error!(%error, subject = %message.subject, "undecodable message skipped")
                }
            }
        }
        let queued = apply_batch(pool, &events).await?;
        if queued > 0 {
            metrics::counter!("canopy_webhooks_queued_total").increment(queued);
            wake.notify_one();
        }
        for message in &batch {
            if let Err(error) = message.ack().await {
                // redelivered after the ack wait; recognised as applied
                tracing::warn!(%error, "ack failed");
            }
        }
    }
}

/// Applies a batch in one transaction; returns how many deliveries it queued.
pub(crate) async fn apply_batch(pool: &PgPool, events: &[Envelope]) -> Result<u64, ConsumeError> {
    let mut tx = pool.begin().await?;
    let mut queued = 0;
    for event in events {
        if event.aggregate_type == <canopy_domain::Webhook as cqrs_es::Aggregate>::TYPE {
            apply_webhook(&mut tx, event).await?;
        } else {
            queued += queue(&mut tx, event).await?;
        }
    }
    tx.commit().await?;
    Ok(queued)
}

/// One outbox row per live subscription of the event's workspace and type, subscribed before
/// the event in relay order. The workspace is read from the aggregate's first event in the store,
/// never from the message.
async fn queue(conn: &mut PgConnection, event: &Envelope) -> Result<u64, ConsumeError> {
    let inserted = sqlx::query(
        "INSERT INTO webhook_deliveries (webhook_id, event_id, message_id, workspace_id, event_type,
                                         aggregate_type, aggregate_id, sequence, transaction_id,
                                         position, recorded_at)
         SELECT s.webhook_id, $1, 'msg_' || md5(s.webhook_id::text || ':' || $1::text),
                s.workspace_id, $2, $3, $4, $5, $6, $7, $8
           FROM webhook_subscriptions s
          WHERE s.status <> 'deleted' AND $2 = ANY (s.event_types)
            AND (s.subscribed_transaction_id, s.subscribed_position) < ($6, $7)
            AND s.workspace_id = (SELECT e.payload -> e.event_type ->> 'workspace_id'
                                    FROM events e
                                   WHERE e.aggregate_type = $3 AND e.aggregate_id = $4
                                     AND e.sequence = 1)
         ON CONFLICT (webhook_id, event_id) DO NOTHING",
    )
    .bind(event.id)
    .bind(&event.event_type)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(event.sequence)
    .bind(i64::try_from(event.transaction_id).unwrap_or(i64::MAX))
    .bind(event.position)
    .bind(event.recorded_at)
    .execute(&mut *conn)
    .await?;
    Ok(inserted.rows_affected())
}

/// Applies a webhook event when it is its subscription's next one, after any missing ones.
async fn apply_webhook(conn: &mut PgConnection, event: &Envelope) -> Result<(), ConsumeError> {
    let version: i64 = sqlx::query_scalar(
        "SELECT version FROM webhook_subscriptions WHERE webhook_id = $1::text::uuid",
    )
    .bind(&event.aggregate_id)
    .fetch_optional(&mut *conn)
    .await?
    .unwrap_or(0);
    if event.sequence <= version {
        return Ok(());
    }
    let mut version = version;
    while version + 1 < event.sequence {
        let missing = history::of_aggregate(
            &mut *conn,
            &event.aggregate_type,
            &event.aggregate_id,
            version,
            Some(event.sequence),
            history::Page::events(64),
        )
        .await?;
        if missing.first().map(|e| e.sequence) != Some(version + 1) {
            return Err(ConsumeError::Missing(format!(
                "webhook {} event #{}",
                event.aggregate_id,
                version + 1
            )));
        }
        for stored in missing {
            let earlier = Envelope::from_stored(stored)
                .map_err(|e| ConsumeError::Missing(format!("a readable event: {e}")))?;
            apply_one(conn, &earlier).await?;
            version = earlier.sequence;
        }
    }
    apply_one(conn, event).await
}

async fn apply_one(conn: &mut PgConnection, event: &Envelope) -> Result<(), ConsumeError> {
    let tagged = serde_json::json!({ event.event_type.clone(): event.data.clone() });
    let decoded: WebhookEvent = match serde_json::from_value(canopy_domain::upcast::upcast_payload(
        &event.event_type,
        &event.version,
        tagged,
    )) {
        Ok(decoded) => decoded,
        Err(error) => {
            return Err(ConsumeError::Missing(format!(
                "a decodable {} ({error})",
                event.event_type
            )));
        }
    };
    let webhook_id = &event.aggregate_id;
    let at = event.recorded_at;
    let sequence = event.sequence;
    let query = match decoded {
        WebhookEvent::WebhookSubscribed(e) => sqlx::query(
            "INSERT INTO webhook_subscriptions (webhook_id, workspace_id, url, event_types,
                 description, status, secret_version, secret_fingerprint, created_by, created_at,
                 updated_at, version, subscribed_transaction_id, subscribed_position)
             VALUES ($1::text::uuid, $2, $3, $4, $5, 'active', $6, $7, $8, $9, $9, $10, $11, $12)
             ON CONFLICT (webhook_id) DO NOTHING",
        )
        .bind(webhook_id)
        .bind(e.workspace_id)
        .bind(e.url)
        .bind(e.event_types)
        .bind(e.description)
        .bind(e.secret_version)
        .bind(e.secret_fingerprint)
        .bind(e.created_by)
        .bind(at)
        .bind(sequence)
        .bind(i64::try_from(event.transaction_id).unwrap_or(i64::MAX))
        .bind(event.position),
        WebhookEvent::WebhookPaused(_) => sqlx::query(
            "UPDATE webhook_subscriptions SET status = 'paused', updated_at = $2, version = $3
              WHERE webhook_id = $1::text::uuid",
        )
        .bind(webhook_id)
        .bind(at)
        .bind(sequence),
        WebhookEvent::WebhookResumed(_) => sqlx::query(
            "UPDATE webhook_subscriptions
                SET status = 'active', suspended_at = NULL, suspended_reason = NULL,
                    dead_streak = 0, updated_at = $2, version = $3
              WHERE webhook_id = $1::text::uuid",
        )
        .bind(webhook_id)
        .bind(at)
        .bind(sequence),
        WebhookEvent::WebhookSecretRotated(e) => sqlx::query(
            "UPDATE webhook_subscriptions
                SET secret_version = $4, secret_fingerprint = $5, updated_at = $2, version = $3
              WHERE webhook_id = $1::text::uuid",
        )
        .bind(webhook_id)
        .bind(at)
        .bind(sequence)
        .bind(e.secret_version)
        .bind(e.secret_fingerprint),
        WebhookEvent::WebhookDeleted(_) => sqlx::query(
            "WITH gone AS (
                 UPDATE webhook_deliveries SET status = 'dead', last_error = 'subscription deleted'
                  WHERE webhook_id = $1::text::uuid AND status = 'pending')
             UPDATE webhook_subscriptions SET status = 'deleted', updated_at = $2, version = $3
              WHERE webhook_id = $1::text::uuid",
        )
        .bind(webhook_id)
        .bind(at)
        .bind(sequence),
        WebhookEvent::WebhookRedeliveryRequested(e) => sqlx::query(
            "WITH again AS (
                 UPDATE webhook_deliveries
                    SET status = 'pending', series = series + 1, attempts = 0,
                        next_attempt_at = now(), delivered_at = NULL
                  WHERE webhook_id = $1::text::uuid AND event_id = $4)
             UPDATE webhook_subscriptions SET updated_at = $2, version = $3
              WHERE webhook_id = $1::text::uuid",
        )
        .bind(webhook_id)
        .bind(at)
        .bind(sequence)
        .bind(e.event_id),
    };
    query.execute(&mut *conn).await?;
    Ok(())
}
