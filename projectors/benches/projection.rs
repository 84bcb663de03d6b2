//! Projection benchmark: `cargo bench -p canopy-projectors`.
//!
//! On the test kit's servers (or `DATABASE_URL` / `NATS_URL`), with the relay and the projectors
//! running in this process:
//!
//! 1. projection lag at a steady rate: writers append session events at
//!    `PROJECTION_BENCH_RATE` events/s (default 2,000) for `PROJECTION_BENCH_SECONDS` (default
//!    10); the projectors record, per applied event, the time from its `recorded_at` to their
//!    commit (`canopy_projection_lag_seconds`), reported as p50/p99 per projection;
//! 2. rebuild throughput: each projection rebuilt from the event store into shadow tables,
//!    beside the baseline of reading the same events without applying them, measured in the
//!    same run.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::time::Duration;

use anyhow::{Context, Result};
use canopy_projectors::{Projection, Projectors, ProjectorsConfig, RebuildOptions};
use canopy_relay::{Relay, RelayConfig};
use metrics_exporter_prometheus::PrometheusBuilder;
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

const SESSIONS: usize = 200;

fn main() -> Result<()> {
    let rate: u64 = env_number("PROJECTION_BENCH_RATE", 2_000)?;
    let seconds: u64 = env_number("PROJECTION_BENCH_SECONDS", 10)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(rate, seconds))
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse())
        .transpose()
        .with_context(|| format!("{name} must be a number"))
        .map(|v| v.unwrap_or(default))
}

async fn bench(rate: u64, seconds: u64) -> Result<()> {
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let stream = nats.prefix.to_uppercase();
    let prefix = format!("{}.events", nats.prefix);
    let pool = db.pool().clone();

    let relay = Relay::new(
        RelayConfig::with_stream(&stream, &prefix),
        db.new_pool(4).await?,
        nats.client.clone(),
    );
    let projectors = Projectors::new(
        ProjectorsConfig::new(&stream, &prefix),
        db.new_pool(8).await?,
        nats.client.clone(),
    );
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let relay_stop = stop.subscribe();
    let relay_task = tokio::spawn(async move {
        let mut stop = relay_stop;
        relay
            .run_until(async move {
                let _ = stop.recv().await;
            })
            .await
    });
    let projectors_stop = stop.subscribe();
    let projectors_task = tokio::spawn(async move {
        let mut stop = projectors_stop;
        projectors
            .run_until(async move {
                let _ = stop.recv().await;
            })
            .await
    });

    // Sessions to append to: each starts with SessionStarted, then gets agent messages.
    let sessions: Vec<Uuid> = (0..SESSIONS).map(|_| Uuid::new_v4()).collect();
    let mut sequences = vec![0i64; SESSIONS];
    for (i, id) in sessions.iter().enumerate() {
        sequences[i] += 1;
        insert(&pool, &[(*id, sequences[i], started(*id))]).await?;
    }

    println!("projection bench: {rate} events/s for {seconds} s over {SESSIONS} sessions");
    let tick = Duration::from_millis(10);
    let per_tick = (rate as f64 * tick.as_secs_f64()).round().max(1.0) as usize;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started_at = Instant::now();
    let mut written = 0u64;
    let mut next = 0usize;
    while started_at.elapsed() < Duration::from_secs(seconds) {
        interval.tick().await;
        let mut batch = Vec::with_capacity(per_tick);
        for _ in 0..per_tick {
            let i = next % SESSIONS;
            next += 1;
            sequences[i] += 1;
            batch.push((sessions[i], sequences[i], message(sequences[i])));
        }
        // one transaction per event, as command-api appends: spread over a few connections
        let mut tasks = Vec::new();
        for chunk in batch.chunks(per_tick.div_ceil(4)) {
            let pool = pool.clone();
            let chunk = chunk.to_vec();
            tasks.push(tokio::spawn(async move {
                for event in chunk {
                    insert(&pool, &[event]).await?;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        written += per_tick as u64;
    }
    let achieved = written as f64 / started_at.elapsed().as_secs_f64();
    wait_projected(&pool).await?;
    println!("appended:                 {written} events at {achieved:.0} events/s");
    let exposition = metrics.render();
    // the bench appends session events only
    for projection in [Projection::Sessions, Projection::Timeline] {
        let p50 = quantile(&exposition, projection.name(), "0.5");
        let p99 = quantile(&exposition, projection.name(), "0.99");
        println!(
            "lag {:<9}             p50 {:>7.1} ms   p99 {:>7.1} ms",
            projection.name(),
            p50 * 1000.0,
            p99 * 1000.0
        );
    }

    let _ = stop.send(());
    relay_task.await??;
    projectors_task.await??;

    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;
    let read_started = Instant::now();
    let scanned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT payload, metadata FROM events ORDER BY transaction_id, position) e",
    )
    .fetch_one(&pool)
    .await?;
    let read_rate = scanned as f64 / read_started.elapsed().as_secs_f64();
    println!("baseline: read {scanned} events in order   {read_rate:>9.0} events/s");
    for projection in [Projection::Sessions, Projection::Timeline] {
        let report = canopy_projectors::rebuild(
            &pool,
            projection,
            &RebuildOptions {
                batch_size: 1000,
                swap: false,
            },
        )
        .await?;
        let rebuild_rate = report.events as f64 / report.elapsed.as_secs_f64();
        println!(
            "rebuild {:<9} {:>6} events {:>9.0} events/s  ({:.3} of the read baseline)",
            projection.name(),
            report.events,
            rebuild_rate,
            rebuild_rate / read_rate
        );
    }
    println!("events in the store: {total}");
    Ok(())
}

fn started(id: Uuid) -> (String, serde_json::Value) {
    (
        "SessionStarted".into(),
        serde_json::json!({"SessionStarted": {"session_id": id, "workspace_id": "bench", "feature_id": null,
            "title": "bench", "repository_url": "https://g.example.invalid/r", "base_branch": "main",
            "session_branch": "canopy/bench", "started_by": "bench"}}),
    )
}

fn message(sequence: i64) -> (String, serde_json::Value) {
    (
        "AgentMessageRecorded".into(),
        serde_json::json!({"AgentMessageRecorded": {"prompt_id": Uuid::nil(), "message_id": format!("msg_{sequence}"), "text": "working on it"}}),
    )
}

async fn insert(pool: &PgPool, events: &[(Uuid, i64, (String, serde_json::Value))]) -> Result<()> {
    let metadata = serde_json::json!({"actor_id": "bench", "actor_name": "bench", "actor_kind": "service", "correlation_id": "c", "request_id": "r"});
    for (id, sequence, (event_type, payload)) in events {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('session', $1, $2, $3, '1', $4, $5)",
        )
        .bind(id.to_string())
        .bind(sequence)
        .bind(event_type)
        .bind(payload)
        .bind(&metadata)
        .execute(pool)
        .await?;
    }
    Ok(())
}

async fn wait_projected(pool: &PgPool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (events, sessions, timeline): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM events),
                    (SELECT COALESCE(sum(version), 0)::bigint FROM read.sessions_positions),
                    (SELECT COALESCE(sum(version), 0)::bigint FROM read.timeline_positions)",
        )
        .fetch_one(pool)
        .await?;
        if sessions == events && timeline == events {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "not projected within 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads one quantile of the lag summary from the Prometheus exposition.
fn quantile(exposition: &str, projection: &str, q: &str) -> f64 {
    let needle =
        format!("canopy_projection_lag_seconds{{projection=\"{projection}\",quantile=\"{q}\"}}");
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(&needle))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(f64::NAN)
}
