//! Query benchmark: `cargo bench -p canopy-query-api`.
//!
//! Seeds read models (`QUERY_BENCH_SESSIONS` sessions, default 2,000, with 10 prompts each),
//! starts query-api, and has `QUERY_BENCH_READERS` concurrent readers (default 16) send a mix of
//! list, get and analytics requests; prints p50/p99 per request kind and the request rate, beside
//! the same list query sent straight to Postgres by as many concurrent connections (the
//! baseline, measured in the same run).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::time::Duration;

use anyhow::{Context, Result};
use canopy_auth::Claims;
use canopy_domain::Role;
use tokio::time::Instant;

const SECRET: &str = "query-bench-secret-0123456789";
const REQUESTS_PER_READER: usize = 100;

fn main() -> Result<()> {
    let sessions = env_number("QUERY_BENCH_SESSIONS", 2_000)?;
    let readers = env_number("QUERY_BENCH_READERS", 16)? as usize;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(sessions, readers))
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse())
        .transpose()
        .with_context(|| format!("{name} must be a number"))
        .map(|v| v.unwrap_or(default))
}

async fn bench(sessions: u64, readers: usize) -> Result<()> {
    let db = canopy_testkit::database().await?;
    seed(db.pool(), sessions).await?;
    let mut config = canopy_query_api::Config::for_database(db.url.clone());
    config.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
    let app = canopy_query_api::build(config).await?;
    let base = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let token = canopy_auth::mint_hs256(
        SECRET,
        &Claims::user(
            "bench",
            "Bench",
            "w1",
            Role::Viewer,
            chrono::Duration::hours(1),
        ),
    )?;
    let some_session: uuid::Uuid =
        sqlx::query_scalar("SELECT session_id FROM read.sessions LIMIT 1")
            .fetch_one(db.pool())
            .await?;
    println!(
        "query bench: {sessions} sessions, {} prompts, {readers} concurrent readers",
        sessions * 10
    );

    let kinds = [
        ("list sessions", "/sessions?limit=50".to_owned()),
        (
            "list prompts (filtered)",
            "/prompts?status=completed&limit=50".to_owned(),
        ),
        ("get session", format!("/sessions/{some_session}")),
        ("analytics tools", "/analytics/tools".to_owned()),
    ];
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for reader in 0..readers {
        let client = client.clone();
        let token = token.clone();
        let base = base.clone();
        let kinds = kinds.clone();
        tasks.push(tokio::spawn(async move {
            let mut timings: Vec<Vec<Duration>> = vec![Vec::new(); kinds.len()];
            for i in 0..REQUESTS_PER_READER {
                let k = (reader + i) % kinds.len();
                let sent = Instant::now();
                let response = client
                    .get(format!("{base}{}", kinds[k].1))
                    .bearer_auth(&token)
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "{} answered {}",
                    kinds[k].1,
                    response.status()
                );
                response.bytes().await?;
                timings[k].push(sent.elapsed());
            }
            anyhow::Ok(timings)
        }));
    }
    let mut all: Vec<Vec<Duration>> = vec![Vec::new(); kinds.len()];
    for task in tasks {
        for (k, timings) in task.await??.into_iter().enumerate() {
            all[k].extend(timings);
        }
    }
    let elapsed = started.elapsed();
    let total: usize = all.iter().map(Vec::len).sum();
    for ((name, _), timings) in kinds.iter().zip(&mut all) {
        let (p50, p99) = percentiles(timings);
        println!("{name:<26} p50 {:>7.2} ms   p99 {:>7.2} ms", p50, p99);
    }
    println!(
        "query-api: {:.0} requests/s",
        total as f64 / elapsed.as_secs_f64()
    );

    // Baseline: the list query itself, straight to Postgres, as concurrently.
    let pool = db.new_pool(readers as u32).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..readers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut timings = Vec::new();
            for _ in 0..REQUESTS_PER_READER {
                let sent = Instant::now();
                let _rows: Vec<(uuid::Uuid,)> = sqlx::query_as(
                    "SELECT session_id FROM read.sessions WHERE workspace_id = 'w1'
                      ORDER BY created_xid DESC, created_position DESC LIMIT 51",
                )
                .fetch_all(&pool)
                .await?;
                timings.push(sent.elapsed());
            }
            anyhow::Ok(timings)
        }));
    }
    let mut baseline = Vec::new();
    for task in tasks {
        baseline.extend(task.await??);
    }
    let baseline_rate = baseline.len() as f64 / started.elapsed().as_secs_f64();
    let (p50, p99) = percentiles(&mut baseline);
    let (api_p50, _) = percentiles(&mut all[0]);
    println!(
        "baseline list in SQL       p50 {p50:>7.2} ms   p99 {p99:>7.2} ms   {baseline_rate:.0} queries/s"
    );
    println!(
        "list sessions p50 over the SQL baseline: {:.2}x",
        api_p50 / p50
    );

    let _ = stop.send(());
    server.await??;
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

async fn seed(pool: &sqlx::PgPool, sessions: u64) -> Result<()> {
    sqlx::query(
        "INSERT INTO read.sessions (session_id, workspace_id, title, repository_url, base_branch, session_branch,
             status, started_by, started_at, last_activity_at, version, created_xid, created_position)
         SELECT gen_random_uuid(), 'w1', 'session ' || i, 'https://g/r', 'main', 'c/' || i, 'active', 'u' || (i % 20),
                now() - i * interval '1 minute', now(), 10, i, i
           FROM generate_series(1, $1::bigint) AS i",
    )
    .bind(sessions as i64)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO read.prompts (prompt_id, session_id, workspace_id, author_id, author_name, text_preview, text_length,
             status, submitted_sequence, submitted_at, created_xid, created_position)
         SELECT gen_random_uuid(), s.session_id, 'w1', 'u' || (p % 20), 'U', 'prompt', 6,
                CASE WHEN p % 3 = 0 THEN 'queued' ELSE 'completed' END, p, now(), s.created_xid, s.created_position * 100 + p
           FROM read.sessions s, generate_series(1, 10) AS p",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO read.tool_executions (event_id, session_id, workspace_id, prompt_id, call_id, tool, phase, status,
             duration_ms, input_summary, output_summary, executed_at, sequence, created_xid, created_position)
         SELECT gen_random_uuid(), p.session_id, 'w1', p.prompt_id, 'c', (ARRAY['bash','read','edit'])[1 + p.submitted_sequence % 3],
                'build', CASE WHEN p.submitted_sequence % 7 = 0 THEN 'failed' ELSE 'completed' END, 10, '', '', now(), 1,
                p.created_xid, p.created_position
           FROM read.prompts p",
    )
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(())
}
