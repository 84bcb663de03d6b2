//! `canopy bench`: the write and read paths measured in one run, against the database's and
//! JetStream's own ceilings measured in the same run, printed as one table and written as JSON.
//!
//! It starts the stack as a child process (`canopy up --without-runner` with its own embedded
//! PostgreSQL and nats-server in a temporary directory, rate limit and queue bound raised for
//! the load) or uses one it is pointed at, and drives every row's load from a separate process
//! (`canopy bench-client`, [`client`]) over real sockets: a client inside the measured process
//! would measure itself. The ceilings and the same-shape SQL baseline write into a scratch
//! database on the same PostgreSQL server (migrated like the real one, dropped at the end), so
//! the stack's event store only ever holds what command-api appended.

mod client;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use canopy_auth::Claims;
use canopy_domain::Role;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

use client::{Bind, Job, Measured};

pub(crate) use client::run as run_client;

/// What to measure and where.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Half-second rows and short sessions: checks the command end to end, not for figures.
    #[arg(long)]
    pub quick: bool,
    /// Seconds per throughput row (default 5, 0.5 with --quick).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Where the JSON of the run is written.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// A running stack's command-api (with --query-api, --database-url and --nats-url; else
    /// the bench starts its own). Its rate limit and queue bound must allow the load.
    #[arg(long, requires_all = ["query_api", "database_url", "nats_url"])]
    pub command_api: Option<String>,
    /// The running stack's query-api.
    #[arg(long, requires = "command_api")]
    pub query_api: Option<String>,
    /// The running stack's PostgreSQL (the bench creates and drops a scratch database there).
    #[arg(long, requires = "command_api")]
    pub database_url: Option<String>,
    /// The running stack's NATS (the bench creates and deletes a scratch stream there).
    #[arg(long, requires = "command_api")]
    pub nats_url: Option<String>,
    /// HS256 secret shared with the APIs (the bench mints its own token).
    #[command(flatten)]
    pub secret: canopy_config::JwtSecretArgs,
}

/// Arguments of the hidden `canopy bench-client`.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The job as JSON.
    pub job: String,
}

const WORKSPACE: &str = "bench";
const SUBJECT_PREFIX: &str = "canopy.events";

/// One row of the table and the JSON.
#[derive(Debug, Clone, Serialize)]
struct Row {
    /// Stable key (the e2e test and comparisons between runs use it).
    id: String,
    label: String,
    /// The row's headline figure, in `unit`.
    value: f64,
    unit: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_ms: Option<f64>,
    /// Operations that failed during the row (not in its rate or latencies).
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<u64>,
    /// This row's value over each named row's value.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    ratios: serde_json::Map<String, Value>,
}

impl Row {
    fn rate(id: &str, label: impl Into<String>, measured: &Measured) -> Self {
        Self {
            id: id.to_owned(),
            label: label.into(),
            value: round(measured.per_second, 1),
            unit: "ops/s",
            p50_ms: Some(round(measured.p50_ms, 3)),
            p99_ms: Some(round(measured.p99_ms, 3)),
            errors: Some(measured.errors),
            ratios: serde_json::Map::new(),
        }
    }

    fn latency(id: &str, label: impl Into<String>, p50_ms: f64, p99_ms: f64) -> Self {
        Self {
            id: id.to_owned(),
            label: label.into(),
            value: round(p50_ms, 3),
            unit: "ms (p50)",
            p50_ms: Some(round(p50_ms, 3)),
            p99_ms: Some(round(p99_ms, 3)),
            errors: None,
            ratios: serde_json::Map::new(),
        }
    }

    fn figure(id: &str, label: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Self {
            id: id.to_owned(),
            label: label.into(),
            value,
            unit,
            p50_ms: None,
            p99_ms: None,
            errors: None,
            ratios: serde_json::Map::new(),
        }
    }

    fn ratio(mut self, to: &Row) -> Self {
        self.ratios.insert(
            to.id.clone(),
            json!(significant(self.value / to.value.max(1e-9))),
        );
        self
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10_f64.powi(digits);
    (value * scale).round() / scale
}

/// `value` to three significant digits (a ratio far below 1 stays above zero).
fn significant(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return value;
    }
    #[allow(clippy::cast_possible_truncation, reason = "a small exponent")]
    let digits = 2 - value.log10().floor() as i32;
    round(value, digits.max(0))
}

/// The stack under measurement.
struct Stack {
    command_api: String,
    query_api: String,
    database_url: String,
    nats_url: String,
    /// The `canopy up` child and its directory, when the bench started it.
    child: Option<(tokio::process::Child, tempfile::TempDir)>,
}

impl Stack {
    fn given(args: &BenchArgs) -> Option<Self> {
        Some(Self {
            command_api: args.command_api.as_ref()?.trim_end_matches('/').to_owned(),
            query_api: args.query_api.as_ref()?.trim_end_matches('/').to_owned(),
            database_url: args.database_url.clone()?,
            nats_url: args.nats_url.clone()?,
            child: None,
        })
    }

    async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("canopy-bench-").tempdir()?;
        // as root the embedded PostgreSQL runs as another user, who must reach its data
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let free = || canopy_local_servers::free_port().map(|port| port.to_string());
        let (pg, nats, command, query) = (free()?, free()?, free()?, free()?);
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["up", "--without-runner"])
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .env_remove("CANOPY_DATABASE_URL")
            .env_remove("CANOPY_NATS_URL")
            .env("CANOPY_DATA_DIR", dir.path().join("data"))
            .env("CANOPY_EMBEDDED_PG_PORT", &pg)
            .env("CANOPY_EMBEDDED_NATS_PORT", &nats)
            .env("CANOPY_COMMAND_API_ADDR", format!("127.0.0.1:{command}"))
            .env("CANOPY_QUERY_API_ADDR", format!("127.0.0.1:{query}"))
            .env("CANOPY_RATE_LIMIT_PER_SECOND", "1000000")
            .env("CANOPY_RATE_LIMIT_BURST", "1000000")
            .env("CANOPY_MAX_QUEUED_PROMPTS", "1000000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("up.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("start `canopy up`")?;
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let (mut database_url, mut nats_url) = (None, None);
        let ready = tokio::time::timeout(Duration::from_secs(180), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("database:") {
                    database_url = Some(url.trim().to_owned());
                } else if let Some(url) = line.strip_prefix("nats:") {
                    nats_url = Some(url.trim().to_owned());
                } else if line.contains("press Ctrl+C") {
                    return anyhow::Ok(true);
                }
            }
            Ok(false)
        })
        .await
        .context("`canopy up` was not ready within 180 s")??;
        if !ready {
            let log = std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
            bail!("`canopy up` ended before it was ready:\n{log}");
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            command_api: format!("http://127.0.0.1:{command}"),
            query_api: format!("http://127.0.0.1:{query}"),
            database_url: database_url.context("`canopy up` printed no database URL")?,
            nats_url: nats_url.context("`canopy up` printed no NATS URL")?,
            child: Some((child, dir)),
        })
    }

    /// Peak resident memory (VmHWM, MiB) of the stack's process (every service but the
    /// runner, which is off) and of its nats-server; none for a given stack.
    fn peak_memory(&self) -> Vec<(&'static str, &'static str, f64)> {
        let Some(pid) = self.child.as_ref().and_then(|(child, _)| child.id()) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        if let Some(mib) = vm_hwm(pid) {
            found.push((
                "peak_rss_canopy_up",
                "peak RSS: canopy up (command-api, relay, projectors, query-api)",
                mib,
            ));
        }
        for (child, name) in children(pid) {
            if name == "nats-server"
                && let Some(mib) = vm_hwm(child)
            {
                found.push(("peak_rss_nats_server", "peak RSS: nats-server", mib));
            }
        }
        found
    }

    async fn stop(mut self) -> Result<()> {
        let Some((mut child, dir)) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            // Ctrl+C: `canopy up` drains and stops its servers
            std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()?;
        }
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .context("`canopy up` did not stop within 60 s")??;
        if !status.success() {
            let log = std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
            bail!("`canopy up` exited with {status}:\n{log}");
        }
        Ok(())
    }
}

fn vm_hwm(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(round(kib / 1024.0, 1))
}

/// The direct children of `pid` with their command names.
fn children(pid: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (_, after) = stat.split_once(" (")?;
            let (name, rest) = after.rsplit_once(") ")?;
            let parent: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (parent == pid).then(|| (child, name.to_owned()))
        })
        .collect()
}

/// Runs one job in a `canopy bench-client` process and reads what it measured.
async fn measure(job: &Job) -> Result<Measured> {
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .arg("bench-client")
        .arg(serde_json::to_string(job)?)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .context("run `canopy bench-client`")?;
    let said = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "the bench client of {} failed ({}): {said}",
            job.kind(),
            output.status
        );
    }
    if !said.trim().is_empty() {
        tracing::warn!(job = job.kind(), "the bench client said: {said}");
    }
    serde_json::from_slice(&output.stdout).context("read the bench client's answer")
}

/// Sizes of a run.
struct Sizes {
    seconds: f64,
    long_session: usize,
    read_sessions: usize,
    lag_samples: usize,
    latency_pairs: usize,
}

/// Runs the bench; returns where it wrote the JSON (the table is printed before).
pub(crate) async fn run(args: BenchArgs) -> Result<String> {
    let sizes = if args.quick {
        Sizes {
            seconds: args.seconds.unwrap_or(0.5),
            long_session: 1_000,
            read_sessions: 60,
            lag_samples: 10,
            latency_pairs: 30,
        }
    } else {
        Sizes {
            seconds: args.seconds.unwrap_or(5.0),
            long_session: 10_000,
            read_sessions: 200,
            lag_samples: 200,
            latency_pairs: 300,
        }
    };
    let started_at = chrono::Utc::now();
    let clock = Instant::now();
    let stack = match Stack::given(&args) {
        Some(stack) => stack,
        None => {
            crate::say("starting `canopy up --without-runner` in a temporary directory")?;
            Stack::start().await?
        }
    };
    let outcome = bench(&stack, &sizes, &args).await;
    let memory = stack.peak_memory();
    let stopped = stack.stop().await;
    let mut rows = outcome?;
    stopped?;
    for (id, label, mib) in memory {
        rows.push(Row::figure(id, label, mib, "MiB"));
    }

    crate::say(&table(&rows))?;
    let load: Vec<f64> = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    let report = json!({
        "started_at": started_at.to_rfc3339(),
        "duration_seconds": round(clock.elapsed().as_secs_f64(), 1),
        "quick": args.quick,
        "stack": if args.command_api.is_some() {
            "given"
        } else {
            "canopy up --without-runner: one process (command-api, relay, projectors, query-api), embedded PostgreSQL (fsync on), embedded nats-server"
        },
        "machine": {
            "cores": std::thread::available_parallelism().map(usize::from).unwrap_or(1),
            "load_average_at_end": load,
        },
        "seconds_per_row": sizes.seconds,
        "rows": rows,
    });
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let name = format!(
        "{}{}.json",
        started_at.format("%Y-%m-%dT%H-%M-%SZ"),
        if args.quick { "-quick" } else { "" }
    );
    let path = args.out.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("write {}", path.display()))?;
    Ok(format!("written: {}", path.display()))
}

fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<64} {:>16} {:>9} {:>9}  ratios\n",
        "", "value", "p50 ms", "p99 ms"
    );
    let ms = |x: Option<f64>| x.map_or_else(String::new, |x| format!("{x:.2}"));
    for row in rows {
        let ratios: Vec<String> = row
            .ratios
            .iter()
            .map(|(to, ratio)| format!("{ratio}x {to}"))
            .collect();
        let value = format!("{:.1} {}", row.value, row.unit);
        out.push_str(&format!(
            "{:<64} {:>16} {:>9} {:>9}  {}\n",
            row.label,
            value,
            ms(row.p50_ms),
            ms(row.p99_ms),
            ratios.join(", ")
        ));
    }
    out
}

/// The scratch database of the ceilings and the SQL baseline, on the stack's server.
struct Scratch {
    admin: sqlx::PgPool,
    name: String,
    url: String,
}

impl Scratch {
    async fn create(database_url: &str) -> Result<Self> {
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(database_url)
            .await
            .context("connect to the stack's database")?;
        let name = format!("canopy_bench_{}", Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .context("create the scratch database")?;
        let mut url = reqwest::Url::parse(database_url).context("a database URL")?;
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await?;
        canopy_event_store::migrate(&pool)
            .await
            .context("migrate the scratch database")?;
        // the raw table: the events' columns and primary key, no triggers
        sqlx::query(
            "CREATE TABLE raw_events (aggregate_type text NOT NULL, aggregate_id text NOT NULL, \
             sequence bigint NOT NULL, event_type text NOT NULL, event_version text NOT NULL, \
             payload jsonb NOT NULL, metadata jsonb NOT NULL, \
             event_id uuid NOT NULL DEFAULT gen_random_uuid(), recorded_at timestamptz NOT NULL DEFAULT now(), \
             PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
        )
        .execute(&pool)
        .await
        .context("create the raw table")?;
        pool.close().await;
        Ok(Self { admin, name, url })
    }

    async fn drop(self) -> Result<()> {
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&self.admin)
        .await
        .context("drop the scratch database")?;
        self.admin.close().await;
        Ok(())
    }
}

async fn bench(stack: &Stack, sizes: &Sizes, args: &BenchArgs) -> Result<Vec<Row>> {
    let scratch = Scratch::create(&stack.database_url).await?;
    let rows = Bench::new(stack, sizes, args, &scratch.url).await;
    let rows = match rows {
        Ok(bench) => bench.rows().await,
        Err(error) => Err(error),
    };
    scratch.drop().await?;
    rows
}

/// One run's shared state.
struct Bench<'a> {
    stack: &'a Stack,
    sizes: &'a Sizes,
    scratch: &'a str,
    http: reqwest::Client,
    token: String,
    pool: sqlx::PgPool,
}

impl<'a> Bench<'a> {
    async fn new(
        stack: &'a Stack,
        sizes: &'a Sizes,
        args: &BenchArgs,
        scratch: &'a str,
    ) -> Result<Self> {
        let token = canopy_auth::mint_hs256(
            &args.secret.jwt_secret,
            &Claims::user(
                "bench",
                "Bench",
                WORKSPACE,
                Role::Owner,
                chrono::Duration::hours(6),
            ),
        )?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&stack.database_url)
            .await
            .context("connect to the stack's database")?;
        Ok(Self {
            stack,
            sizes,
            scratch,
            http: reqwest::Client::new(),
            token,
            pool,
        })
    }

    /// Every row, in the table's order.
    async fn rows(self) -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        let (raw_32, baseline) = self.ceilings(&mut rows).await?;
        self.submit(&mut rows, &raw_32, &baseline).await?;
        self.latency_by_length(&mut rows).await?;
        self.reads(&mut rows).await?;
        self.lags(&mut rows).await?;
        progress("projection rebuild")?;
        rows.push(rebuild(&self.stack.database_url).await?);
        self.pool.close().await;
        Ok(rows)
    }

    /// The database's and JetStream's own rates, and the same-shape SQL baseline; returns the
    /// raw INSERT at 32 connections and the baseline.
    async fn ceilings(&self, rows: &mut Vec<Row>) -> Result<(Row, Row)> {
        progress("database and JetStream ceilings")?;
        let seconds = self.sizes.seconds;
        let insert = |table: &str, connections| Job::Insert {
            database_url: self.scratch.to_owned(),
            table: table.to_owned(),
            connections,
            seconds,
        };
        let raw_1 = Row::rate(
            "raw_insert_1",
            "raw INSERT of the event (no triggers), 1 connection",
            &measure(&insert("raw_events", 1)).await?,
        );
        let raw_32 = Row::rate(
            "raw_insert_32",
            "raw INSERT of the event (no triggers), 32 connections",
            &measure(&insert("raw_events", 32)).await?,
        );
        let events_1 = Row::rate(
            "events_insert_1",
            "INSERT into events (its triggers), 1 connection",
            &measure(&insert("events", 1)).await?,
        )
        .ratio(&raw_1);
        let events_32 = Row::rate(
            "events_insert_32",
            "INSERT into events (its triggers), 32 connections",
            &measure(&insert("events", 32)).await?,
        )
        .ratio(&raw_32);
        let publish = |in_flight| Job::Publish {
            nats_url: self.stack.nats_url.clone(),
            in_flight,
            seconds,
        };
        let js_1 = Row::rate(
            "jetstream_publish_sequential",
            "JetStream acked publish, sequential",
            &measure(&publish(1)).await?,
        );
        let js_256 = Row::rate(
            "jetstream_publish_pipelined",
            "JetStream acked publish, 256 in flight",
            &measure(&publish(256)).await?,
        );
        progress("same-shape SQL baseline")?;
        let baseline = Row::rate(
            "command_sql_32",
            "same-shape SQL (claim, load, append+key), 32 conns/sessions",
            &measure(&Job::CommandSql {
                database_url: self.scratch.to_owned(),
                connections: 32,
                seconds,
            })
            .await?,
        )
        .ratio(&raw_32);
        rows.extend([
            raw_1,
            raw_32.clone(),
            events_1,
            events_32,
            js_1,
            js_256,
            baseline.clone(),
        ]);
        Ok((raw_32, baseline))
    }

    async fn submit(&self, rows: &mut Vec<Row>, raw_32: &Row, baseline: &Row) -> Result<()> {
        progress("submit-prompt through command-api")?;
        let mut sessions = Vec::new();
        for _ in 0..33 {
            sessions.push(self.start_session().await?);
        }
        let one = sessions.pop().context("a session")?;
        let submit = |sessions: Vec<String>, clients| Job::Submit {
            command_api: self.stack.command_api.clone(),
            token: self.token.clone(),
            sessions,
            clients,
            seconds: self.sizes.seconds,
        };
        for clients in [1, 8, 32] {
            rows.push(
                Row::rate(
                    &format!("submit_prompt_{clients}_over_32"),
                    format!(
                        "submit-prompt, {clients} client{} over 32 sessions",
                        if clients == 1 { "" } else { "s" }
                    ),
                    &measure(&submit(sessions.clone(), clients)).await?,
                )
                .ratio(raw_32)
                .ratio(baseline),
            );
        }
        rows.push(
            Row::rate(
                "submit_prompt_32_on_1",
                "submit-prompt, 32 clients on one session",
                &measure(&submit(vec![one], 32)).await?,
            )
            .ratio(raw_32)
            .ratio(baseline),
        );
        Ok(())
    }

    /// One client's submit-prompt latency on a session of 10 events and on a long one.
    async fn latency_by_length(&self, rows: &mut Vec<Row>) -> Result<()> {
        progress("submit-prompt latency by session length")?;
        let pairs = |session: &str, pairs, clients| Job::Pairs {
            command_api: self.stack.command_api.clone(),
            token: self.token.clone(),
            session: session.to_owned(),
            pairs,
            clients,
        };
        let mut short: Option<Row> = None;
        for (id, length) in [("short", 10), ("long", self.sizes.long_session)] {
            let session = self.start_session().await?;
            let have = self.session_length(&session).await?;
            let fill = length.saturating_sub(have) / 2;
            if fill > 0 {
                measure(&pairs(&session, fill, 8)).await?;
            }
            let length = self.session_length(&session).await?;
            let measured = measure(&pairs(&session, self.sizes.latency_pairs, 1)).await?;
            let row = Row::latency(
                &format!("submit_prompt_latency_{id}"),
                format!("submit-prompt latency, 1 client, session of {length} events"),
                measured.p50_ms,
                measured.p99_ms,
            );
            let row = match &short {
                Some(short) => row.ratio(short),
                None => {
                    short = Some(row.clone());
                    row
                }
            };
            rows.push(row);
        }
        Ok(())
    }

    /// Each read endpoint over 16 connections against its SELECT issued directly.
    async fn reads(&self, rows: &mut Vec<Row>) -> Result<()> {
        progress("reads against their SQL")?;
        let have: i64 =
            sqlx::query_scalar("SELECT count(*) FROM read.sessions WHERE workspace_id = $1")
                .bind(WORKSPACE)
                .fetch_one(&self.pool)
                .await?;
        let mut last = None;
        for _ in usize::try_from(have).unwrap_or(0)..self.sizes.read_sessions {
            last = Some(self.start_session().await?);
        }
        let last = match last {
            Some(last) => last,
            None => self.start_session().await?,
        };
        // the projectors catch up with the write rows first (their own figure)
        let waited = self.wait_projected(&last).await?;
        rows.push(Row::figure(
            "projection_catch_up",
            "projectors catching up after the write rows",
            waited.as_secs_f64() * 1000.0,
            "ms",
        ));
        let session_id: Uuid = last.parse()?;
        let workspace = || Bind::Text(WORKSPACE.to_owned());
        let page = |columns: &str, table: &str| {
            format!(
                "SELECT {columns}, created_xid, created_position FROM read.{table} WHERE workspace_id = $1 \
                 ORDER BY created_xid ASC, created_position ASC LIMIT 51"
            )
        };
        let reads = [
            (
                "read_session",
                "GET /sessions/{id}",
                format!("/sessions/{session_id}"),
                format!(
                    "SELECT {SESSION_COLUMNS}, created_xid, created_position FROM read.sessions \
                     WHERE session_id = $1 AND workspace_id = $2"
                ),
                vec![Bind::Uuid(session_id), workspace()],
            ),
            (
                "read_sessions_page",
                "GET /sessions?limit=50",
                "/sessions?limit=50".to_owned(),
                page(SESSION_COLUMNS, "sessions"),
                vec![workspace()],
            ),
            (
                "read_prompts_page",
                "GET /prompts?limit=50",
                "/prompts?limit=50".to_owned(),
                page(PROMPT_COLUMNS, "prompts"),
                vec![workspace()],
            ),
            (
                "read_analytics_tools",
                "GET /analytics/tools",
                "/analytics/tools".to_owned(),
                TOOLS_SQL.to_owned(),
                vec![workspace()],
            ),
        ];
        for (id, label, path, sql, binds) in reads {
            let direct = Row::rate(
                &format!("{id}_sql"),
                "  its SELECT issued directly, 16 connections",
                &measure(&Job::Select {
                    database_url: self.stack.database_url.clone(),
                    sql,
                    binds,
                    connections: 16,
                    seconds: self.sizes.seconds,
                })
                .await?,
            );
            let api = Row::rate(
                id,
                format!("{label}, 16 connections"),
                &measure(&Job::Get {
                    url: format!("{}{path}", self.stack.query_api),
                    token: self.token.clone(),
                    connections: 16,
                    seconds: self.sizes.seconds,
                })
                .await?,
            )
            .ratio(&direct);
            rows.push(api);
            rows.push(direct);
        }
        Ok(())
    }

    /// From a command sent to its event published, projected and delivered live.
    async fn lags(&self, rows: &mut Vec<Row>) -> Result<()> {
        progress("relay, projection and live-stream lag")?;
        let session = self.start_session().await?;
        let lag = measure(&Job::Lag {
            command_api: self.stack.command_api.clone(),
            query_api: self.stack.query_api.clone(),
            nats_url: self.stack.nats_url.clone(),
            subject_prefix: SUBJECT_PREFIX.to_owned(),
            token: self.token.clone(),
            session,
            count: self.sizes.lag_samples,
        })
        .await?;
        rows.push(Row::latency(
            "lag_command",
            "one client's submit-prompt answered (during the lag rows)",
            lag.p50_ms,
            lag.p99_ms,
        ));
        for (stage, label) in [
            ("publish", "submit-prompt sent -> published on JetStream"),
            (
                "projection",
                "submit-prompt sent -> readable from query-api",
            ),
            (
                "sse",
                "submit-prompt sent -> delivered on the session's SSE",
            ),
        ] {
            let figure = |what: &str| {
                lag.extra
                    .get(&format!("{stage}_{what}_ms"))
                    .copied()
                    .unwrap_or_default()
            };
            rows.push(Row::latency(
                &format!("lag_{stage}"),
                label,
                figure("p50"),
                figure("p99"),
            ));
        }
        Ok(())
    }

    async fn start_session(&self) -> Result<String> {
        let response = self
            .http
            .post(format!("{}/sessions", self.stack.command_api))
            .bearer_auth(&self.token)
            .json(&json!({
                "title": "bench",
                "repository_url": "https://git.example.invalid/app.git",
                "base_branch": "main",
            }))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("start a session: {status} {body}");
        }
        body["id"]
            .as_str()
            .map(str::to_owned)
            .context("a session id in the answer")
    }

    async fn session_length(&self, session: &str) -> Result<usize> {
        let length: Option<i64> = sqlx::query_scalar(
            "SELECT max(sequence) FROM events WHERE aggregate_type = 'session' AND aggregate_id = $1",
        )
        .bind(session)
        .fetch_one(&self.pool)
        .await?;
        Ok(usize::try_from(length.unwrap_or(0)).unwrap_or(0))
    }

    /// Waits until the session's read model exists (the reads then see every session);
    /// returns how long that took.
    async fn wait_projected(&self, session: &str) -> Result<Duration> {
        let id: Uuid = session.parse()?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(900);
        loop {
            let found: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM read.sessions WHERE session_id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
            if found.is_some() {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("session {session} was not projected within 15 minutes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn progress(what: &str) -> Result<()> {
    crate::say(&format!("measuring: {what}"))
}

/// `canopy rebuild sessions --check` in its own process: the sessions projection replayed into
/// shadow tables (the live ones stay), its own rate.
async fn rebuild(database_url: &str) -> Result<Row> {
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "rebuild",
            "sessions",
            "--check",
            "--database-url",
            database_url,
        ])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("run `canopy rebuild`")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("`canopy rebuild sessions --check` failed: {text}");
    }
    // "sessions: N events in S s (R events/s)"
    let line = text
        .lines()
        .find(|line| line.ends_with(" events/s)"))
        .with_context(|| format!("no rate in `canopy rebuild`'s output: {text}"))?;
    let rate: f64 = line
        .rsplit_once(" (")
        .and_then(|(_, rate)| rate.strip_suffix(" events/s)")?.parse().ok())
        .with_context(|| format!("no rate in {line:?}"))?;
    let events = line.split_whitespace().nth(1).unwrap_or("?");
    Ok(Row::figure(
        "rebuild_sessions",
        format!("rebuild of the sessions projection ({events} events)"),
        rate,
        "events/s",
    ))
}

// What query-api selects (query-api/src/routes/read.rs, routes/analytics.rs): each read's
// baseline is the same statement.
const SESSION_COLUMNS: &str = "session_id, workspace_id, feature_id, title, repository_url, base_branch, \
    session_branch, status, started_by, started_at, finished_at, archived_at, failure_reason, participants, \
    participant_count, queue_length, running_prompt_id, prompt_count, tool_execution_count, checkpoint_count, \
    sandbox_id, opencode_session_id, last_activity_at, version";
const PROMPT_COLUMNS: &str = "prompt_id, session_id, workspace_id, author_id, author_name, text_preview, \
    text_length, status, queue_position, submitted_at, started_at, finished_at, summary, failure_reason, cancelled_by";
const TOOLS_SQL: &str = "SELECT tool, count(*) AS executions, \
    count(*) FILTER (WHERE status = 'failed') AS failures, \
    (count(*) FILTER (WHERE status = 'failed'))::float8 / count(*) AS failure_rate, \
    avg(duration_ms)::float8 AS avg_duration_ms \
    FROM read.tool_executions \
    WHERE workspace_id = $1 AND (NULL::uuid IS NULL) \
    AND (NULL::timestamptz IS NULL) AND (NULL::timestamptz IS NULL) \
    GROUP BY tool ORDER BY executions DESC, tool";
