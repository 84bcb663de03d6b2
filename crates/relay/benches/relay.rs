//! Relay benchmark: `cargo bench -p canopy-relay`.
//!
//! Against the test kit's servers (throwaway Postgres with fsync off, nats-server with a file
//! store; or `DATABASE_URL` / `NATS_URL`), in one run and on one server:
//!
//! 1. raw JetStream: messages shaped like the relay's (same headers, an envelope body) published
//!    with 256 in flight and `Nats-Msg-Id`, the ceiling the relay works under;
//! 2. relay throughput: a backlog of events already committed, drained by a relay;
//! 3. commit → PubAck lag: writers commit events one per transaction while a caught-up relay
//!    runs; for each event, the time from its commit returning to the relay's acknowledged
//!    cursor covering it.
//!
//! `RELAY_BENCH_EVENTS` sets the size (default 20,000, sized for 2 cores) and
//! `RELAY_BENCH_WRITERS` the number of writers of step 3 (default 8).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use bytes::Bytes;
use canopy_relay::{Cursor, Envelope, EnvelopeMetadata, Relay, RelayConfig, headers};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

const IN_FLIGHT: usize = 256;

fn main() -> Result<()> {
    let events: usize = std::env::var("RELAY_BENCH_EVENTS")
        .ok()
        .map(|v| v.parse())
        .transpose()
        .context("RELAY_BENCH_EVENTS must be a number")?
        .unwrap_or(20_000);
    let writers: usize = std::env::var("RELAY_BENCH_WRITERS")
        .ok()
        .map(|v| v.parse())
        .transpose()
        .context("RELAY_BENCH_WRITERS must be a number")?
        .unwrap_or(8);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(events, writers))
}

async fn bench(events: usize, writers: usize) -> Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    println!("relay bench: {events} events, {IN_FLIGHT} in flight");

    let raw = raw_publish_rate(&nats, events).await?;
    println!("raw JetStream publish:    {raw:>9.0} msgs/s (pipelined, {IN_FLIGHT} in flight)");

    let config = RelayConfig::with_stream(
        format!("{}_RELAY", nats.prefix.to_uppercase()),
        format!("{}.events", nats.prefix),
    );
    insert_backlog(&db.pool, events).await?;
    let relay = Arc::new(Relay::new(config, db.pool.clone(), nats.client.clone()));
    let last = last_cursor(&db.pool).await?;
    let started = Instant::now();
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
    let mut acked = relay.watch_acked();
    tokio::time::timeout(
        Duration::from_secs(300),
        acked.wait_for(|a| a.is_some_and(|a| a >= last)),
    )
    .await
    .context("the relay did not drain the backlog")??;
    let drained = started.elapsed();
    let throughput = events as f64 / drained.as_secs_f64();
    println!(
        "relay throughput:         {throughput:>9.0} events/s (backlog of {events} drained in {:.2} s)",
        drained.as_secs_f64()
    );
    println!("relay / raw:              {:>9.2}", throughput / raw);

    // Lag: the relay is caught up; writers commit one event per transaction.
    let timeline = tokio::spawn(record_acks(relay.watch_acked()));
    let commits = write_events(&db.pool, events, writers).await?;
    let write_rate = events as f64 / commits.elapsed.as_secs_f64();
    let last = commits
        .events
        .iter()
        .map(|(c, _)| *c)
        .max()
        .context("no events")?;
    tokio::time::timeout(
        Duration::from_secs(120),
        acked.wait_for(|a| a.is_some_and(|a| a >= last)),
    )
    .await
    .context("the relay did not catch up with the writers")??;
    // stopping the relay and dropping it closes the acknowledgment channel: the recorder ends
    let _ = stop.send(());
    task.await??;
    drop(relay);
    let timeline = timeline.await?;

    let mut lags: Vec<Duration> = commits
        .events
        .iter()
        .map(|(cursor, committed)| {
            let first = timeline.partition_point(|(_, acked)| acked < cursor);
            timeline.get(first).map_or(Duration::MAX, |(at, _)| {
                at.saturating_duration_since(*committed)
            })
        })
        .collect();
    lags.sort_unstable();
    let pct = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize];
    println!(
        "commit -> PubAck lag:     p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({writers} writers, {write_rate:.0} commits/s)",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3,
    );
    Ok(())
}

/// Publishes `count` relay-shaped messages to a stream of their own, `IN_FLIGHT` at a time.
async fn raw_publish_rate(nats: &canopy_testkit::TestNats, count: usize) -> Result<f64> {
    let name = format!("{}_RAW", nats.prefix.to_uppercase());
    nats.jetstream
        .create_or_update_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{}.raw.>", nats.prefix)],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    let messages: Vec<(String, HeaderMap, Bytes)> = (0..count)
        .map(|i| sample_message(&format!("{}.raw", nats.prefix), i))
        .collect::<Result<_>>()?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(nats.client.clone());
    let started = Instant::now();
    let mut in_flight: VecDeque<PublishAckFuture> = VecDeque::with_capacity(IN_FLIGHT);
    for (subject, headers, payload) in messages {
        if in_flight.len() >= IN_FLIGHT
            && let Some(ack) = in_flight.pop_front()
        {
            ack.await?;
        }
        in_flight.push_back(
            js.send_publish(
                subject,
                PublishMessage::build().headers(headers).payload(payload),
            )
            .await?,
        );
    }
    for ack in in_flight {
        ack.await?;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// A message with the relay's headers and an envelope body of the benchmark's events' size.
fn sample_message(prefix: &str, i: usize) -> Result<(String, HeaderMap, Bytes)> {
    let id = Uuid::new_v4();
    let aggregate_id = Uuid::new_v4().to_string();
    let envelope = Envelope {
        id,
        event_type: "Added".into(),
        version: "1".into(),
        aggregate_type: "tally".into(),
        aggregate_id: aggregate_id.clone(),
        sequence: 1,
        position: i as i64 + 1,
        transaction_id: 1000 + i as u64,
        recorded_at: chrono::Utc::now(),
        metadata: EnvelopeMetadata {
            actor_id: "u1".into(),
            actor_name: "Ada".into(),
            actor_kind: "user".into(),
            correlation_id: Uuid::new_v4().to_string(),
            request_id: Uuid::new_v4().to_string(),
            causation_id: None,
            idempotency_key: None,
            other: Default::default(),
        },
        data: serde_json::json!({"n": 1}),
    };
    let mut map = HeaderMap::new();
    let id = id.to_string();
    for (name, value) in [
        (headers::MSG_ID, id.as_str()),
        (headers::CE_SPECVERSION, "1.0"),
        (headers::CE_ID, id.as_str()),
        (headers::CE_SOURCE, "canopy"),
        (headers::CE_TYPE, "Added"),
        (headers::CE_TIME, "2026-11-23T10:00:00.000000Z"),
        (headers::CONTENT_TYPE, "application/json"),
        (headers::SEQUENCE, "1"),
        (headers::EVENT_VERSION, "1"),
    ] {
        map.insert(name, value);
    }
    map.insert(headers::CE_SUBJECT, format!("tally/{aggregate_id}"));
    map.insert(headers::POSITION, (i + 1).to_string());
    map.insert(headers::TRANSACTION_ID, (1000 + i).to_string());
    Ok((
        format!("{prefix}.tally.{aggregate_id}.Added"),
        map,
        Bytes::from(serde_json::to_vec(&envelope)?),
    ))
}

const METADATA: &str = r#"{"actor_id":"u1","actor_name":"Ada","actor_kind":"user","correlation_id":"c","request_id":"r"}"#;

/// Commits `count` events in transactions of 100 (one aggregate each), through the triggers.
async fn insert_backlog(pool: &PgPool, count: usize) -> Result<()> {
    let mut left = count;
    while left > 0 {
        let n = left.min(100);
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata) \
             SELECT 'tally', $1, s, 'Added', '1', '{\"Added\":{\"n\":1}}', $2::jsonb \
               FROM generate_series(1, $3::bigint) AS s",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(METADATA)
        .bind(n as i64)
        .execute(pool)
        .await?;
        left -= n;
    }
    Ok(())
}

struct Commits {
    /// Each event's cursor and when its commit returned.
    events: Vec<(Cursor, Instant)>,
    elapsed: Duration,
}

/// `writers` tasks commit `count` events in all, one event per transaction.
async fn write_events(pool: &PgPool, count: usize, writers: usize) -> Result<Commits> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let pool = pool.clone();
            let share = count / writers + usize::from(w < count % writers);
            tokio::spawn(async move {
                let aggregate = Uuid::new_v4().to_string();
                let mut out = Vec::with_capacity(share);
                for sequence in 1..=share as i64 {
                    let mut tx = pool.begin().await?;
                    let (xid, position): (i64, i64) = sqlx::query_as(
                        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                         event_version, payload, metadata) \
                         VALUES ('tally', $1, $2, 'Added', '1', '{\"Added\":{\"n\":1}}', $3::jsonb) \
                         RETURNING transaction_id::text::bigint, position",
                    )
                    .bind(&aggregate)
                    .bind(sequence)
                    .bind(METADATA)
                    .fetch_one(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    let cursor = Cursor {
                        transaction_id: u64::try_from(xid)?,
                        position,
                    };
                    out.push((cursor, Instant::now()));
                }
                anyhow::Ok(out)
            })
        })
        .collect();
    let mut events = Vec::with_capacity(count);
    for task in tasks {
        events.extend(task.await??);
    }
    Ok(Commits {
        events,
        elapsed: started.elapsed(),
    })
}

/// Records when the relay's acknowledged cursor moved, until the relay stops.
async fn record_acks(
    mut acked: tokio::sync::watch::Receiver<Option<Cursor>>,
) -> Vec<(Instant, Cursor)> {
    let mut timeline = Vec::new();
    while acked.changed().await.is_ok() {
        if let Some(cursor) = *acked.borrow_and_update() {
            timeline.push((Instant::now(), cursor));
        }
    }
    timeline
}

async fn last_cursor(pool: &PgPool) -> Result<Cursor> {
    let (xid, position): (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM events \
         ORDER BY transaction_id DESC, position DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await?;
    Ok(Cursor {
        transaction_id: u64::try_from(xid)?,
        position,
    })
}
