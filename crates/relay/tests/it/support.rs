//! What the relay tests share: a small aggregate, writers, a relay running in a task, a
//! consumer that reads a whole stream, and the checks every scenario ends with.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer};
use canopy_event_store::{ActorKind, AggregateStore, EventMetadata, StoreConfig};
use canopy_relay::{Cursor, Envelope, Relay, RelayConfig, RelayStatus, headers};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

/// A counter aggregate: each `Add` appends `times` events.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Tally {
    total: i64,
}

#[derive(Debug, Clone)]
pub(crate) struct Add {
    pub(crate) n: i64,
    pub(crate) times: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum TallyEvent {
    Added { n: i64 },
}

impl DomainEvent for TallyEvent {
    fn event_type(&self) -> String {
        "Added".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never refused")]
pub(crate) struct Never;

impl Aggregate for Tally {
    const TYPE: &'static str = "tally";
    type Command = Add;
    type Event = TallyEvent;
    type Error = Never;
    type Services = ();

    async fn handle(&mut self, add: Add, _: &(), sink: &EventSink<Self>) -> Result<(), Never> {
        for _ in 0..add.times {
            sink.write(TallyEvent::Added { n: add.n }, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, TallyEvent::Added { n }: TallyEvent) {
        self.total += n;
    }
}

pub(crate) fn meta() -> EventMetadata {
    EventMetadata::new("u1", "Ada", ActorKind::User)
}

/// A relay configuration on the test's own stream and subjects.
pub(crate) fn config(prefix: &str) -> RelayConfig {
    RelayConfig {
        ack_timeout: Duration::from_secs(2),
        ..RelayConfig::with_stream(prefix.to_uppercase(), format!("{prefix}.events"))
    }
}

/// Appends one event to `aggregate_id` with plain SQL, in its own transaction (the triggers
/// give it its id, position and transaction id), and notifies the relay in the same statement,
/// as a writer other than the store must (or wait for the relay's poll).
pub(crate) async fn insert_event(
    executor: impl sqlx::PgExecutor<'_>,
    aggregate_id: &str,
    sequence: i64,
) -> Result<(Uuid, Cursor)> {
    let (id, xid, position): (Uuid, i64, i64) = sqlx::query_as(
        "WITH e AS (INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('tally', $1, $2, 'Added', '1', '{\"Added\":{\"n\":1}}', \
         '{\"actor_id\":\"u\",\"actor_name\":\"U\",\"actor_kind\":\"user\",\"correlation_id\":\"c\",\"request_id\":\"r\"}') \
         RETURNING event_id, transaction_id::text::bigint, position) \
         SELECT e.* FROM e, pg_notify('canopy_events', '')",
    )
    .bind(aggregate_id)
    .bind(sequence)
    .fetch_one(executor)
    .await?;
    Ok((
        id,
        Cursor {
            transaction_id: u64::try_from(xid)?,
            position,
        },
    ))
}

/// Appends `count` events through the store, spread over a few aggregates, one to four events
/// per command.
pub(crate) async fn append_events(pool: &PgPool, count: usize) -> Result<()> {
    let store = AggregateStore::new(pool.clone(), StoreConfig::default());
    let aggregates: Vec<String> = (0..4).map(|_| Uuid::new_v4().to_string()).collect();
    let mut appended = 0;
    for i in 0.. {
        if appended == count {
            break;
        }
        let times = (1 + i % 4).min(count - appended);
        store
            .execute::<Tally>(
                &aggregates[i % aggregates.len()],
                Add { n: 1, times },
                &(),
                &meta(),
                None,
            )
            .await
            .map_err(|e| anyhow::anyhow!("append: {e}"))?;
        appended += times;
    }
    Ok(())
}

/// Writers appending through the store until stopped, each to its own aggregates, one to three
/// events per command.
#[derive(Debug)]
pub(crate) struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Result<u64>>>,
}

impl Writers {
    pub(crate) fn start(pool: &PgPool, writers: usize, pace: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..writers)
            .map(|w| {
                let store = AggregateStore::new(pool.clone(), StoreConfig::default());
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let aggregates: Vec<String> =
                        (0..3).map(|_| Uuid::new_v4().to_string()).collect();
                    let mut written = 0u64;
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let times = 1 + i % 3;
                        let aggregate = &aggregates[i % aggregates.len()];
                        match store
                            .execute::<Tally>(aggregate, Add { n: 1, times }, &(), &meta(), None)
                            .await
                        {
                            Ok(_) => written += times as u64,
                            Err(e) => anyhow::bail!("writer {w}: {e}"),
                        }
                        i += 1;
                        // pacing the load, not waiting for anything
                        tokio::time::sleep(pace).await;
                    }
                    Ok(written)
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the writers; returns how many events they appended.
    pub(crate) async fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for task in self.tasks {
            total += task.await??;
        }
        Ok(total)
    }
}

/// A relay running in a task, as a process would run it.
#[derive(Debug)]
pub(crate) struct RunningRelay {
    pub(crate) relay: Arc<Relay>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), canopy_relay::RelayError>>,
}

impl RunningRelay {
    pub(crate) fn start(config: RelayConfig, pool: PgPool, client: async_nats::Client) -> Self {
        let relay = Arc::new(Relay::new(config, pool, client));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let relay = Arc::clone(&relay);
            async move {
                relay
                    .run_until(async {
                        let _ = stopped.await;
                    })
                    .await
            }
        });
        Self {
            relay,
            stop: Some(stop),
            task,
        }
    }

    pub(crate) fn status(&self) -> RelayStatus {
        self.relay.status()
    }

    /// A clean shutdown: drains, writes the checkpoint, releases the lock.
    pub(crate) async fn stop(mut self) -> Result<RelayStatus> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .context("relay did not stop")???;
        Ok(self.relay.status())
    }

    /// A crash: the task is dropped wherever it is, and with it the lock connection.
    pub(crate) async fn abort(self) -> RelayStatus {
        self.task.abort();
        let _ = self.task.await;
        self.relay.status()
    }

    /// Waits until the relay has acknowledged everything up to `cursor`.
    pub(crate) async fn wait_acked(&self, cursor: Cursor, within: Duration) -> Result<()> {
        let mut acked = self.relay.watch_acked();
        tokio::time::timeout(within, acked.wait_for(|a| a.is_some_and(|a| a >= cursor)))
            .await
            .with_context(|| {
                format!(
                    "relay did not acknowledge {cursor:?} within {within:?}: {:?}",
                    self.relay.status()
                )
            })??;
        Ok(())
    }

    /// Waits until the relay has acknowledged every event in the store and written its
    /// checkpoint there.
    pub(crate) async fn wait_caught_up(&self, pool: &PgPool, within: Duration) -> Result<()> {
        let last = last_cursor(pool).await?;
        self.wait_acked(last, within).await?;
        let name = self.relay.config().name.clone();
        eventually(within, || async {
            let checkpoint = canopy_relay::measure_lag(pool, &name).await?.checkpoint;
            Ok(checkpoint >= last)
        })
        .await
        .context("checkpoint did not reach the last event")
    }
}

/// Polls `condition` every 20 ms until it holds or `within` passes.
pub(crate) async fn eventually<F, Fut>(within: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await? {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The last event of the store in relay order.
pub(crate) async fn last_cursor(pool: &PgPool) -> Result<Cursor> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM events \
         ORDER BY transaction_id DESC, position DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    let (xid, position) = row.context("the store is empty")?;
    Ok(Cursor {
        transaction_id: u64::try_from(xid)?,
        position,
    })
}

/// One message as a consumer sees it.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) stream_sequence: u64,
    pub(crate) subject: String,
    pub(crate) headers: async_nats::HeaderMap,
    pub(crate) envelope: Envelope,
}

impl Received {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    pub(crate) fn cursor(&self) -> Cursor {
        Cursor {
            transaction_id: self.envelope.transaction_id,
            position: self.envelope.position,
        }
    }
}

/// Reads the whole stream from the start through an ephemeral pull consumer, in stream order.
pub(crate) async fn read_stream(
    js: &jetstream::Context,
    stream_name: &str,
) -> Result<Vec<Received>> {
    let mut stream = js.get_stream(stream_name).await?;
    let expected = stream.info().await?.state.messages;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            deliver_policy: consumer::DeliverPolicy::All,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await?;
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (received.len() as u64) < expected {
        anyhow::ensure!(
            Instant::now() < deadline,
            "read {} of {expected} messages",
            received.len()
        );
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("fetch: {e}"))?;
            let info = message.info().map_err(|e| anyhow::anyhow!("info: {e}"))?;
            let stream_sequence = info.stream_sequence;
            let headers = message.headers.clone().unwrap_or_default();
            received.push(Received {
                stream_sequence,
                subject: message.subject.to_string(),
                envelope: serde_json::from_slice(&message.payload)
                    .with_context(|| format!("envelope of message {stream_sequence}"))?,
                headers,
            });
        }
    }
    Ok(received)
}

/// Every event of the store, by id, with its aggregate and sequence.
pub(crate) async fn stored_events(pool: &PgPool) -> Result<BTreeMap<Uuid, (String, i64)>> {
    let rows: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT event_id, aggregate_id, sequence FROM events")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, aggregate, sequence)| (id, (aggregate, sequence)))
        .collect())
}

/// The end state every scenario must reach: each stored event exactly once in the stream, the
/// stream in relay order, and each aggregate's sequences 1..n with no gap.
pub(crate) async fn assert_stream_is_the_store(
    pool: &PgPool,
    js: &jetstream::Context,
    stream_name: &str,
) -> Result<Vec<Received>> {
    let stored = stored_events(pool).await?;
    let received = read_stream(js, stream_name).await?;

    let ids: Vec<Uuid> = received.iter().map(|r| r.envelope.id).collect();
    let unique: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "the stream holds a duplicate event"
    );
    let stored_ids: HashSet<Uuid> = stored.keys().copied().collect();
    let missing: Vec<_> = stored_ids.difference(&unique).collect();
    assert!(
        missing.is_empty(),
        "{} events never reached the stream",
        missing.len()
    );
    assert_eq!(
        unique, stored_ids,
        "the stream holds events the store does not"
    );
    assert_eq!(received.len(), stored.len());

    for pair in received.windows(2) {
        assert!(
            pair[0].cursor() < pair[1].cursor(),
            "stream order breaks relay order at stream sequence {}",
            pair[1].stream_sequence
        );
    }

    // what a consumer deduplicating by (aggregate, sequence) applies
    let mut applied: BTreeMap<(String, String), i64> = BTreeMap::new();
    for message in &received {
        let e = &message.envelope;
        let last = applied
            .entry((e.aggregate_type.clone(), e.aggregate_id.clone()))
            .or_insert(0);
        if e.sequence <= *last {
            continue;
        }
        assert_eq!(
            e.sequence,
            *last + 1,
            "aggregate {} jumps from {} to {}",
            e.aggregate_id,
            last,
            e.sequence
        );
        *last = e.sequence;
        assert_eq!(
            message.header(headers::MSG_ID),
            Some(e.id.to_string().as_str())
        );
    }
    let mut per_aggregate: BTreeMap<&str, i64> = BTreeMap::new();
    for (aggregate, sequence) in stored.values() {
        let max = per_aggregate.entry(aggregate).or_insert(0);
        *max = (*max).max(*sequence);
    }
    for (aggregate, max) in per_aggregate {
        assert_eq!(
            applied.get(&("tally".to_owned(), aggregate.to_owned())),
            Some(&max),
            "aggregate {aggregate} did not reach its last sequence"
        );
    }
    Ok(received)
}
