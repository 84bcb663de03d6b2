//! Live subscription benchmark: `cargo bench -p canopy-query-api --bench live`.
//!
//! Runs command-api and the relay in this process and query-api as its own process (the built
//! `canopy-query-api` binary), on the test kit's servers:
//!
//! 1. command → client latency: a client follows a session over SSE while `LIVE_BENCH_EVENTS`
//!    (default 300) prompts are submitted one after another; for each, the time from sending the
//!    command to the event arriving at the client, beside the command's own round trip (the
//!    baseline, measured in the same run);
//! 2. memory: query-api's resident set size before and after `LIVE_BENCH_IDLE` (default 1,000)
//!    idle SSE subscribers, reported per 1,000.
//!
//! `LIVE_BENCH_WRAPPER` runs query-api under a command, e.g.
//! `LIVE_BENCH_WRAPPER="valgrind --tool=massif --massif-out-file=massif.out"` to see where its
//! memory goes (it is how a 1 MiB per-connection copy of the OpenAPI document was found).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::time::Duration;

use anyhow::{Context, Result};
use canopy_auth::Claims;
use canopy_domain::Role;
use canopy_relay::{Relay, RelayConfig};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use tokio::time::Instant;

const SECRET: &str = "live-bench-secret-0123456789";

fn main() -> Result<()> {
    let events = env_number("LIVE_BENCH_EVENTS", 300)? as usize;
    let idle = env_number("LIVE_BENCH_IDLE", 1_000)? as usize;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(events, idle))
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse())
        .transpose()
        .with_context(|| format!("{name} must be a number"))
        .map(|v| v.unwrap_or(default))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

async fn bench(events: usize, idle: usize) -> Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let prefix = format!("{}.events", nats.prefix);

    let mut command = canopy_command_api::Config::for_database(db.url.clone());
    command.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
    command.rate_limit_per_second = 100_000;
    command.rate_limit_burst = 100_000;
    // prompts pile up in sessions faster than anything drains them
    command.max_queued_prompts = 1_000_000;
    let app = canopy_command_api::build(command).await?;
    let command_url = format!("http://{}", app.local_addr());
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = api_stopped.await;
    }));
    let relay = Relay::new(
        RelayConfig::with_stream(nats.prefix.to_uppercase(), &prefix),
        db.new_pool(3).await?,
        nats.client.clone(),
    );
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        relay
            .run_until(async {
                let _ = relay_stopped.await;
            })
            .await
    });

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut query = match std::env::var("LIVE_BENCH_WRAPPER") {
        Ok(wrapper) => {
            let mut words = wrapper.split_whitespace();
            let mut command = std::process::Command::new(words.next().context("empty wrapper")?);
            command
                .args(words)
                .arg(env!("CARGO_BIN_EXE_canopy-query-api"));
            command
        }
        Err(_) => std::process::Command::new(env!("CARGO_BIN_EXE_canopy-query-api")),
    };
    let mut query = query
        .env_clear()
        .env("CANOPY_DATABASE_URL", &db.url)
        .env("CANOPY_NATS_URL", &nats.url)
        .env("CANOPY_SUBJECT_PREFIX", &prefix)
        .env(
            "CANOPY_PRESENCE_PREFIX",
            format!("{}.presence", nats.prefix),
        )
        .env("CANOPY_QUERY_API_ADDR", format!("127.0.0.1:{port}"))
        .env("CANOPY_JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .spawn()
        .context("start canopy-query-api")?;
    let query_url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{query_url}/healthz"))
        .send()
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "query-api did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let member = canopy_auth::mint_hs256(
        SECRET,
        &Claims::user("m", "M", "w1", Role::Member, chrono::Duration::hours(1)),
    )?;
    let started: serde_json::Value = client
        .post(format!("{command_url}/sessions"))
        .bearer_auth(&member)
        .json(&serde_json::json!({"title": "bench", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .send()
        .await?
        .json()
        .await?;
    let session = started["id"].as_str().context("no session id")?.to_owned();
    let stream = client
        .get(format!("{query_url}/sessions/{session}/stream"))
        .bearer_auth(&member)
        .send()
        .await?;
    let mut stream = Box::pin(stream.bytes_stream().eventsource());
    // past the history: wait for the first presence message
    while let Some(event) = stream.next().await {
        if event?.event == "presence" {
            break;
        }
    }

    println!("live bench: {events} events to one SSE client, then {idle} idle subscribers");
    let mut delivery = Vec::with_capacity(events);
    let mut round_trip = Vec::with_capacity(events);
    for i in 0..events {
        let sent = Instant::now();
        let answer: serde_json::Value = client
            .post(format!("{command_url}/sessions/{session}/prompts"))
            .bearer_auth(&member)
            .json(&serde_json::json!({"text": format!("prompt {i}")}))
            .send()
            .await?
            .json()
            .await?;
        round_trip.push(sent.elapsed());
        let version = answer["version"].as_i64().context("no version")?;
        loop {
            let event = stream.next().await.context("the stream ended")??;
            if event.event == "message" && event.id == version.to_string() {
                delivery.push(sent.elapsed());
                break;
            }
        }
    }
    let (d50, d99) = percentiles(&mut delivery);
    let (r50, r99) = percentiles(&mut round_trip);
    println!("command -> client delivery  p50 {d50:>7.2} ms   p99 {d99:>7.2} ms");
    println!("command round trip (base)   p50 {r50:>7.2} ms   p99 {r99:>7.2} ms");
    println!("delivery over round trip:   p50 {:.2}x", d50 / r50);

    let before = rss_kib(query.id())?;
    let mut idle_streams = Vec::with_capacity(idle);
    for _ in 0..idle {
        let response = client
            .get(format!(
                "{query_url}/sessions/{session}/stream?after={}",
                events + 2
            ))
            .bearer_auth(&member)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "subscriber refused: {}",
            response.status()
        );
        idle_streams.push(response);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(query.id())?;
    println!(
        "query-api RSS: {before} KiB idle, {after} KiB with {idle} subscribers: {:.0} KiB per 1,000",
        (after.saturating_sub(before)) as f64 * 1000.0 / idle as f64
    );

    drop(idle_streams);
    // a graceful stop (SIGTERM), so that a profiler wrapping the process writes its report
    std::process::Command::new("kill")
        .arg(query.id().to_string())
        .status()
        .ok();
    query.wait().ok();
    let _ = stop_api.send(());
    let _ = stop_relay.send(());
    Ok(())
}

fn percentiles(timings: &mut [Duration]) -> (f64, f64) {
    timings.sort();
    let at = |q: f64| {
        let i = ((timings.len() as f64 * q).ceil() as usize).clamp(1, timings.len()) - 1;
        timings[i].as_secs_f64() * 1000.0
    };
    (at(0.5), at(0.99))
}
