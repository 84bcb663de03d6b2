//! Live memory benchmark: `cargo bench -p canopy-query-api --bench live_memory`.
//!
//! What one session's long history costs query-api when many clients stream it from the start.
//! Writes `LIVE_MEMORY_EVENTS` (default 5,000) prompts of `LIVE_MEMORY_EVENT_BYTES` (8,192)
//! bytes of text into one session through command-api (run in this process), then, for each
//! mode, starts query-api as its own process (the built `canopy-query-api` binary) and:
//!
//! 1. samples its resident set size idle (the baseline of that run);
//! 2. opens `LIVE_MEMORY_CLIENTS` (100) SSE streams of the session from sequence 0, one per
//!    person, from this process over loopback TCP; each reads every event in order, pausing
//!    `LIVE_MEMORY_CLIENT_DELAY_US` (1,000) microseconds after each (a slow reader);
//! 3. samples `VmRSS` every 20 ms until every client has the whole history, and reads `VmHWM`.
//!    A client the server tells to `reconnect` (e.g. its history read waited too long for a
//!    database connection) resumes from where it was, as a real one does; those are counted.
//!
//! The modes (`LIVE_MEMORY_MODES`, default `paged,unpaged`): `paged` is query-api's defaults
//! (history pages of 128 events / 1 MiB); `unpaged` sets a page larger than the history, which
//! is what query-api did before it paged (every stream read its whole history at once).
//!
//! The relay and the projectors do not run: the clients read history only, which is what is
//! measured.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use canopy_auth::Claims;
use canopy_domain::Role;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use tokio::time::Instant;

const SECRET: &str = "live-memory-bench-secret-0123456789";

struct Settings {
    events: usize,
    event_bytes: usize,
    clients: usize,
    delay: Duration,
    modes: Vec<String>,
}

fn main() -> Result<()> {
    let settings = Settings {
        events: env_number("LIVE_MEMORY_EVENTS", 5_000)? as usize,
        event_bytes: env_number("LIVE_MEMORY_EVENT_BYTES", 8_192)? as usize,
        clients: env_number("LIVE_MEMORY_CLIENTS", 100)? as usize,
        delay: Duration::from_micros(env_number("LIVE_MEMORY_CLIENT_DELAY_US", 1_000)?),
        modes: std::env::var("LIVE_MEMORY_MODES")
            .unwrap_or_else(|_| "paged,unpaged".to_owned())
            .split(',')
            .map(|m| m.trim().to_owned())
            .collect(),
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(settings))
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse())
        .transpose()
        .with_context(|| format!("{name} must be a number"))
        .map(|v| v.unwrap_or(default))
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn bench(settings: Settings) -> Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;

    let mut command = canopy_command_api::Config::for_database(db.url.clone());
    command.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
    command.rate_limit_per_second = 1_000_000;
    command.rate_limit_burst = 1_000_000;
    // prompts pile up in sessions faster than anything drains them
    command.max_queued_prompts = 1_000_000;
    let app = canopy_command_api::build(command).await?;
    let command_url = format!("http://{}", app.local_addr());
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = api_stopped.await;
    }));

    let client = reqwest::Client::new();
    let member = person(Role::Member, "writer")?;
    let started: serde_json::Value = client
        .post(format!("{command_url}/sessions"))
        .bearer_auth(&member)
        .json(&serde_json::json!({"title": "memory bench", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .send()
        .await?
        .json()
        .await?;
    let session = started["id"].as_str().context("no session id")?.to_owned();
    let text = "x".repeat(settings.event_bytes);
    let writing = Instant::now();
    let mut last = 0;
    for i in 0..settings.events {
        let answer: serde_json::Value = client
            .post(format!("{command_url}/sessions/{session}/prompts"))
            .bearer_auth(&member)
            .json(&serde_json::json!({"text": text}))
            .send()
            .await?
            .json()
            .await?;
        last = answer["version"]
            .as_i64()
            .with_context(|| format!("prompt {i} refused: {answer}"))?;
    }
    let (bytes,): (i64,) = sqlx::query_as(
        "SELECT sum(octet_length(payload::text))::bigint FROM events WHERE aggregate_id = $1",
    )
    .bind(&session)
    .fetch_one(db.pool())
    .await?;
    println!(
        "live memory bench: one session of {last} events ({:.1} MiB of payload, written in {:.1} s), \
         {} SSE clients from sequence 0, one per person, each pausing {} µs per event",
        bytes as f64 / 1024.0 / 1024.0,
        writing.elapsed().as_secs_f64(),
        settings.clients,
        settings.delay.as_micros(),
    );
    println!(
        "{:<10} {:>12} {:>16} {:>12} {:>11} {:>10} {:>8}",
        "mode", "idle RSS", "peak RSS (sampled)", "VmHWM", "peak/idle", "all read", "resumed"
    );

    for mode in &settings.modes {
        let page: &[(&str, &str)] = match mode.as_str() {
            "paged" => &[],
            "unpaged" => &[
                ("CANOPY_LIVE_HISTORY_PAGE", "100000000"),
                ("CANOPY_LIVE_HISTORY_PAGE_BYTES", "1000000000000"),
            ],
            other => anyhow::bail!("unknown mode {other}: paged or unpaged"),
        };
        let run = Run {
            db_url: &db.url,
            nats_url: &nats.url,
            prefix: &nats.prefix,
            session: &session,
            last,
            settings: &settings,
        };
        let figures = run.measure(page).await?;
        println!(
            "{:<10} {:>8.1} MiB {:>14.1} MiB {:>8.1} MiB {:>10.2}x {:>8.1} s {:>8}",
            mode,
            mib(figures.idle),
            mib(figures.peak),
            mib(figures.hwm),
            figures.peak as f64 / figures.idle as f64,
            figures.elapsed.as_secs_f64(),
            figures.resumed,
        );
    }
    let _ = stop_api.send(());
    Ok(())
}

fn person(role: Role, name: &str) -> Result<String> {
    Ok(canopy_auth::mint_hs256(
        SECRET,
        &Claims::user(name, name, "w1", role, chrono::Duration::hours(2)),
    )?)
}

struct Run<'a> {
    db_url: &'a str,
    nats_url: &'a str,
    prefix: &'a str,
    session: &'a str,
    last: i64,
    settings: &'a Settings,
}

struct Figures {
    idle: u64,
    peak: u64,
    hwm: u64,
    elapsed: Duration,
    /// Times a client was told to reconnect (the server could not serve it then) and resumed.
    resumed: u64,
}

impl Run<'_> {
    async fn measure(&self, env: &[(&str, &str)]) -> Result<Figures> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let query = std::process::Command::new(env!("CARGO_BIN_EXE_canopy-query-api"))
            .env_clear()
            .env("CANOPY_DATABASE_URL", self.db_url)
            .env("CANOPY_NATS_URL", self.nats_url)
            .env("CANOPY_SUBJECT_PREFIX", format!("{}.events", self.prefix))
            .env(
                "CANOPY_PRESENCE_PREFIX",
                format!("{}.presence", self.prefix),
            )
            .env("CANOPY_QUERY_API_ADDR", format!("127.0.0.1:{port}"))
            .env("CANOPY_JWT_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .spawn()
            .context("start canopy-query-api")?;
        let query = Stopping(query);
        let pid = query.0.id();
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.get(format!("{url}/healthz")).send().await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "query-api did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // idle, after one request of each kind the clients make (a refused stream, so that no
        // history is read)
        let _ = client
            .get(format!("{url}/sessions/{}/stream", self.session))
            .send()
            .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (idle, _) = memory_kib(pid)?;

        let peak = Arc::new(AtomicU64::new(idle));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (peak.clone(), done.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                while !done.load(Ordering::SeqCst) {
                    tick.tick().await;
                    if let Ok((rss, _)) = memory_kib(pid) {
                        peak.fetch_max(rss, Ordering::SeqCst);
                    }
                }
            })
        };

        let started = Instant::now();
        let readers: Vec<_> = (0..self.settings.clients)
            .map(|i| {
                let url = format!("{url}/sessions/{}/stream", self.session);
                let (last, delay) = (self.last, self.settings.delay);
                tokio::spawn(async move { read_history(url, i, last, delay).await })
            })
            .collect();
        let mut resumed = 0;
        for reader in readers {
            resumed += reader.await??;
        }
        let elapsed = started.elapsed();
        done.store(true, Ordering::SeqCst);
        sampler.await?;
        let (_, hwm) = memory_kib(pid)?;
        drop(query);
        Ok(Figures {
            idle,
            peak: peak.load(Ordering::SeqCst),
            hwm,
            elapsed,
            resumed,
        })
    }
}

/// A child process, stopped (SIGTERM, then waited for) when dropped, also when a run fails.
struct Stopping(std::process::Child);

impl Drop for Stopping {
    fn drop(&mut self) {
        std::process::Command::new("kill")
            .arg(self.0.id().to_string())
            .status()
            .ok();
        self.0.wait().ok();
    }
}

/// Reads a session's stream from sequence 0 up to `last` as person `i`, checking that every
/// event comes once and in order, and resuming where the server says when it ends a stream
/// early (`reconnect`, `overflow`) as a client does; answers how many times it resumed.
async fn read_history(url: String, i: usize, last: i64, delay: Duration) -> Result<u64> {
    let bearer = person(Role::Viewer, &format!("reader-{i}"))?;
    let client = reqwest::Client::new();
    let mut expected = 1;
    let mut resumed = 0;
    'connect: while expected <= last {
        let response = client
            .get(&url)
            .bearer_auth(&bearer)
            .header("last-event-id", (expected - 1).to_string())
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "client {i} refused: {}",
            response.status()
        );
        let mut events = Box::pin(response.bytes_stream().eventsource());
        while expected <= last {
            let event = events
                .next()
                .await
                .with_context(|| format!("client {i}: the stream ended at {expected}"))??;
            match event.event.as_str() {
                "message" => {
                    anyhow::ensure!(
                        event.id == expected.to_string(),
                        "client {i}: got {} for {expected}",
                        event.id
                    );
                    expected += 1;
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
                "presence" => {}
                "reconnect" | "overflow" => {
                    let body: serde_json::Value = serde_json::from_str(&event.data)?;
                    anyhow::ensure!(
                        body["resume_after"].as_i64() == Some(expected - 1),
                        "client {i}: told to resume after {body} at {expected}"
                    );
                    resumed += 1;
                    continue 'connect;
                }
                other => anyhow::bail!("client {i}: {other} {}", event.data),
            }
        }
    }
    Ok(resumed)
}
