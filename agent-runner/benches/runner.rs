//! Agent-runner benchmark: `cargo bench -p canopy-agent-runner --bench runner`.
//!
//! The runner under test is the built `canopy-agent-runner` binary, a child process driving the
//! real OpenCode in real bubblewrap sandboxes. This process holds what is not measured: the
//! client (a person's HTTP requests), command-api and the relay on the test kit's servers, and
//! the scripted model (the fake hosted LLM), which answers every plan request at once with a
//! short plan and notes when each one arrived.
//!
//! 1. latency, one session at a time: PromptSubmitted (the submit's HTTP answer) → the plan
//!    turn's first model request, and → PlanProposed in the event store, for a cold sandbox (the
//!    session's first prompt: clone, sandbox start, OpenCode boot) and a warm one (the next
//!    prompt of the session, after cancelling the one whose plan was proposed);
//! 2. the baseline, in the same run: the same plan turn driven straight against OpenCode in a
//!    sandbox this process starts (`BubblewrapProvider`, `run_turn` with the plan agent): cold
//!    (start request → first model request / idle, with `SandboxInfo::startup`) and warm
//!    (`prompt_async` → first model request / idle). Printed as canopy/direct ratios;
//! 3. concurrency: for N = 1, 2, 4, 8 fresh sessions, a fresh runner process, one prompt
//!    submitted in each at once; the time until every session has its plan, p50/max latency,
//!    plans per minute, the runner's peak RSS (VmHWM) and the peak RSS summed over its
//!    descendants (the sandboxes: bwrap, OpenCode, socat; shared pages counted per process).
//!    It stops early when a step fails, takes longer than `RUNNER_BENCH_STEP_SECONDS` (default
//!    150) or memory is short.
//!
//! `RUNNER_BENCH_COLD` (default 3) sets the cold samples (sessions), `RUNNER_BENCH_WARM`
//! (default 2) the warm prompts after each, `RUNNER_BENCH_MAX_N` (default 8) the largest N.
//! Sandboxes need the `canopy-sandbox-shell` guard, which `cargo bench` does not build: build
//! it with `cargo build --release -p canopy-sandbox --bins` (a debug build is used when no
//! release one exists). The runner's log goes to a file whose path is printed on failure.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use canopy_agent_runner::MODEL_PROVIDER_ID;
use canopy_auth::Claims;
use canopy_domain::Role;
use canopy_opencode::{
    Agent, CreateSession, ModelRef, OpenCodeClient, PermissionReply, PermissionRequest, Prompt,
    PromptPart, TurnEnd, TurnPolicy, run_turn,
};
use canopy_relay::{Relay, RelayConfig};
use canopy_sandbox::{
    BubblewrapConfig, BubblewrapProvider, ModelUpstream, SandboxProvider, SandboxSpec,
};
use canopy_testkit::{ModelServer, SCRIPTED_MODEL_ID, Script, Step};
use serde_json::{Value, json};
use tokio::time::Instant;
use uuid::Uuid;

const SECRET: &str = "runner-bench-secret-0123456789";
const WORKSPACE: &str = "w-bench";
const API_KEY: &str = "sk-runner-bench-key-0123456789";
const PLAN: &str = "Plan: x\n1. y";
/// The longest wait for one plan (cold, one session).
const PLAN_WAIT: Duration = Duration::from_secs(90);
/// Memory one more sandbox may need (OpenCode uses about 450–650 MB), plus headroom.
const SANDBOX_MIB: u64 = 700;
const HEADROOM_MIB: u64 = 2048;

fn main() -> Result<()> {
    let cold = env_number("RUNNER_BENCH_COLD", 3)?.max(1) as usize;
    let warm = env_number("RUNNER_BENCH_WARM", 2)?.max(1) as usize;
    let max_n = env_number("RUNNER_BENCH_MAX_N", 8)?.max(1) as usize;
    let step_limit = Duration::from_secs(env_number("RUNNER_BENCH_STEP_SECONDS", 150)?);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(cold, warm, max_n, step_limit))
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse())
        .transpose()
        .with_context(|| format!("{name} must be a number"))
        .map(|v| v.unwrap_or(default))
}

async fn bench(cold: usize, warm: usize, max_n: usize, step_limit: Duration) -> Result<()> {
    let began = Instant::now();
    let env = Env::start().await?;
    println!(
        "runner bench: {} cores, OpenCode {}, runner {}, guard {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        canopy_opencode::OPENCODE_VERSION,
        env.runner_bin.display(),
        env.shell_bin.display(),
    );
    println!(
        "              {cold} cold samples x {warm} warm prompts each; concurrency up to N = {max_n}"
    );
    println!(
        "              load average before the run {} (other work on the machine inflates every \
         number)",
        load_average()
    );

    // Reads the OpenCode binary and the sandbox's files into the page cache once, so that
    // neither side's first cold start pays for it.
    let provider = env.direct_provider()?;
    direct_session(&env, &provider, "warmup", 0).await?;

    let direct = direct_samples(&env, &provider, cold, warm).await?;
    let canopy = canopy_samples(&env, cold, warm).await?;

    println!();
    println!("1-2. one session at a time (p50 / max over the samples, ms)");
    println!(
        "{:<44} {:>9} {:>9}   {:>9} {:>9}   {:>7}",
        "", "canopy", "", "direct", "", "ratio"
    );
    println!(
        "{:<44} {:>9} {:>9}   {:>9} {:>9}   {:>7}",
        "", "p50", "max", "p50", "max", "p50"
    );
    row(
        "cold: submitted -> first model request",
        &canopy.cold_first,
        &direct.cold_first,
    );
    row(
        "cold: submitted -> PlanProposed / idle",
        &canopy.cold_plan,
        &direct.cold_plan,
    );
    row(
        "warm: submitted -> first model request",
        &canopy.warm_first,
        &direct.warm_first,
    );
    row(
        "warm: submitted -> PlanProposed / idle",
        &canopy.warm_plan,
        &direct.warm_plan,
    );
    let startup = stats(&direct.startup);
    println!(
        "{:<44} {:>9} {:>9}   {:>9.0} {:>9.0}",
        "cold sandbox start (SandboxInfo::startup)", "", "", startup.p50, startup.max
    );
    println!(
        "  direct: cold = start request -> first request / idle (start + OpenCode session + turn);"
    );
    println!(
        "          warm = prompt_async -> first request / idle in a running sandbox (run_turn)"
    );

    println!();
    println!("3. N sessions at once, one runner process (one prompt each, submitted together)");
    println!(
        "{:>3} {:>10} {:>9} {:>9} {:>11} {:>13} {:>16}",
        "N", "total ms", "p50 ms", "max ms", "plans/min", "runner VmHWM", "sandboxes RSS"
    );
    let mut steps: Vec<(usize, Stats)> = Vec::new();
    let mut n = 1;
    while n <= max_n {
        let available = mem_available_mib();
        let needed = n as u64 * SANDBOX_MIB + HEADROOM_MIB;
        if available < needed {
            println!("    stopped before N = {n}: {available} MiB available, {needed} MiB wanted");
            break;
        }
        match concurrent_step(&env, n, step_limit).await {
            Ok(step) => {
                let latency = stats(&step.latencies);
                println!(
                    "{n:>3} {:>10.0} {:>9.0} {:>9.0} {:>11.1} {:>9} MiB {:>12} MiB",
                    ms(step.total),
                    latency.p50,
                    latency.max,
                    n as f64 / step.total.as_secs_f64() * 60.0,
                    step.runner_hwm_kib / 1024,
                    step.descendants_peak_kib / 1024,
                );
                steps.push((n, latency));
                if step.total > step_limit {
                    println!("    stopped: N = {n} took longer than {step_limit:?}");
                    break;
                }
            }
            Err(error) => {
                println!(
                    "    stopped at N = {n}: {}",
                    clip(&format!("{error:#}"), 600)
                );
                break;
            }
        }
        n *= 2;
    }
    if let Some((_, base)) = steps.first() {
        let within: Vec<usize> = steps
            .iter()
            .filter(|(_, s)| s.p50 <= 3.0 * base.p50)
            .map(|(n, _)| *n)
            .collect();
        let largest = within.iter().copied().max().unwrap_or(1);
        println!(
            "sessions one runner drives at once on this machine: {largest} (largest N whose p50 stays within 3x the N = 1 p50 of {:.0} ms)",
            base.p50
        );
    }
    println!("bench took {:.0} s", began.elapsed().as_secs_f64());
    env.stop().await;
    Ok(())
}

fn row(label: &str, canopy: &[Duration], direct: &[Duration]) {
    let (c, d) = (stats(canopy), stats(direct));
    println!(
        "{label:<44} {:>9.0} {:>9.0}   {:>9.0} {:>9.0}   {:>6.2}x",
        c.p50,
        c.max,
        d.p50,
        d.max,
        c.p50 / d.p50
    );
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    p50: f64,
    max: f64,
}

fn stats(samples: &[Duration]) -> Stats {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return Stats {
            p50: f64::NAN,
            max: f64::NAN,
        };
    }
    Stats {
        p50: ms[(ms.len() - 1) / 2],
        max: ms[ms.len() - 1],
    }
}

/// `text` cut to at most `max` characters.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// The 1-minute load average: other work on the machine skews every number here.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|load| load.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// When the model saw each plan request, by what the person asked in it.
type Arrivals = Arc<Mutex<Vec<(Instant, String)>>>;

/// Everything but the runner: command-api, the relay, the model, a repository.
struct Env {
    db: canopy_testkit::TestDb,
    nats: canopy_testkit::TestNats,
    command: String,
    http: reqwest::Client,
    member: String,
    model: ModelServer,
    arrivals: Arrivals,
    dir: tempfile::TempDir,
    repository_url: String,
    runner_bin: PathBuf,
    shell_bin: PathBuf,
    opencode_bin: PathBuf,
    runners: AtomicU64,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Env {
    async fn start() -> Result<Self> {
        let runner_bin = PathBuf::from(env!("CARGO_BIN_EXE_canopy-agent-runner"));
        let shell_bin = find_shell(&runner_bin)?;
        let opencode_bin =
            canopy_opencode::opencode_binary().context("the OpenCode binary (scripts/setup.sh)")?;
        let db = canopy_testkit::database().await?;
        let nats = canopy_testkit::nats().await?;
        let mut stops = Vec::new();

        let mut command = canopy_command_api::Config::for_database(db.url.clone());
        command.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
        command.rate_limit_per_second = 100_000;
        command.rate_limit_burst = 100_000;
        // prompts pile up in sessions faster than anything drains them
        command.max_queued_prompts = 1_000_000;
        let app = canopy_command_api::build(command).await?;
        let command = format!("http://{}", app.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        stops.push(stop);

        let relay = Relay::new(
            RelayConfig::with_stream(
                nats.prefix.to_uppercase(),
                format!("{}.events", nats.prefix),
            ),
            db.new_pool(3).await?,
            nats.client.clone(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            relay
                .run_until(async {
                    let _ = stopped.await;
                })
                .await
        });
        stops.push(stop);

        // Plan requests are answered at once with a short plan; the rule notes when each came.
        let arrivals: Arrivals = Arc::default();
        let noted = arrivals.clone();
        let script = Script::new()
            .on_with(
                "plan",
                canopy_testkit::RecordedRequest::is_plan_request,
                move |request| {
                    noted
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), request.last_user_request()));
                    Step::text(PLAN)
                },
            )
            .then_always(Step::text(PLAN));
        let model = ModelServer::start(script).await?;

        let dir = tempfile::Builder::new()
            .prefix("canopy-runner-bench-")
            .tempdir()?;
        // The sandbox uid clones the repository: it must be able to read it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let remote = make_repository(dir.path())?;
        let member = canopy_auth::mint_hs256(
            SECRET,
            &Claims::user(
                "mia",
                "Mia Member",
                WORKSPACE,
                Role::Member,
                chrono::Duration::hours(2),
            ),
        )?;
        Ok(Self {
            db,
            nats,
            command,
            http: reqwest::Client::new(),
            member,
            model,
            arrivals,
            repository_url: format!("file://{}", remote.display()),
            dir,
            runner_bin,
            shell_bin,
            opencode_bin,
            runners: AtomicU64::new(0),
            stops,
        })
    }

    async fn stop(mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        self.model.shutdown().await;
    }

    fn direct_provider(&self) -> Result<BubblewrapProvider> {
        let mut config = BubblewrapConfig::new(
            self.dir.path().join("direct"),
            ModelUpstream {
                base_url: self.model.base_url(),
                api_key: API_KEY.into(),
            },
        );
        config.shell_binary = Some(self.shell_bin.clone());
        config.opencode_binary = Some(self.opencode_bin.clone());
        config.clone.allowed_schemes = vec!["https".into(), "file".into()];
        tokio::task::block_in_place(|| BubblewrapProvider::new(config))
            .context("prepare the sandboxes (they need root, bwrap, socat and setpriv)")
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.command))
            .bearer_auth(&self.member)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        ensure!(status.is_success(), "POST {path}: {status} {body}");
        Ok(body)
    }

    async fn start_session(&self) -> Result<Uuid> {
        let body = self
            .post(
                "/sessions",
                json!({
                    "title": "Runner bench",
                    "repository_url": self.repository_url,
                    "base_branch": "main",
                }),
            )
            .await?;
        Ok(body["aggregate_id"]
            .as_str()
            .context("session id")?
            .parse()?)
    }

    /// Submits a prompt; returns its id and when the submit was answered.
    async fn prompt(&self, session: Uuid, text: &str) -> Result<(Uuid, Instant)> {
        let body = self
            .post(
                &format!("/sessions/{session}/prompts"),
                json!({ "text": text }),
            )
            .await?;
        let submitted = Instant::now();
        Ok((
            body["id"].as_str().context("prompt id")?.parse()?,
            submitted,
        ))
    }

    async fn cancel(&self, session: Uuid, prompt: Uuid) -> Result<()> {
        self.post(
            &format!("/sessions/{session}/prompts/{prompt}/cancel"),
            json!({}),
        )
        .await
        .map(drop)
    }

    /// When the model first saw a plan request asking `marker`.
    fn first_request(&self, marker: &str) -> Option<Instant> {
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, asked)| asked.contains(marker))
            .map(|(at, _)| *at)
    }

    /// Polls the event store until every prompt has its PlanProposed; returns when each was
    /// seen. A PromptFailed of one of them ends the wait.
    async fn wait_plans(
        &self,
        sessions: &[Uuid],
        prompts: &[Uuid],
        within: Duration,
    ) -> Result<HashMap<Uuid, Instant>> {
        let deadline = Instant::now() + within;
        let sessions: Vec<String> = sessions.iter().map(Uuid::to_string).collect();
        let mut seen = HashMap::new();
        loop {
            let rows: Vec<(String, Value)> = sqlx::query_as(
                "SELECT event_type, payload FROM events
                  WHERE aggregate_type = 'session' AND aggregate_id = ANY($1)
                    AND event_type IN ('PlanProposed', 'PromptFailed')",
            )
            .bind(&sessions)
            .fetch_all(self.db.pool())
            .await?;
            let now = Instant::now();
            for (event_type, payload) in rows {
                let data = &payload[&event_type];
                let Some(prompt) = data["prompt_id"].as_str().and_then(|p| p.parse().ok()) else {
                    continue;
                };
                if !prompts.contains(&prompt) {
                    continue;
                }
                if event_type == "PromptFailed" {
                    let reason = data["reason"].as_str().unwrap_or_default();
                    let first_line = reason.lines().next().unwrap_or_default();
                    bail!("prompt {prompt} failed: {}", clip(first_line, 300));
                }
                seen.entry(prompt).or_insert(now);
            }
            if seen.len() == prompts.len() {
                return Ok(seen);
            }
            if now >= deadline {
                bail!(
                    "{} of {} plans within {within:?}",
                    seen.len(),
                    prompts.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts a runner process able to drive `max_sessions` sessions; returns once it serves
    /// its status endpoint.
    async fn runner(&self, max_sessions: usize) -> Result<RunnerProcess> {
        let number = self.runners.fetch_add(1, Ordering::Relaxed);
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = self.dir.path().join(format!("runner-{number}.log"));
        let log_file = std::fs::File::create(&log)?;
        let connections_token = canopy_agent_runner::mint_runner_token(SECRET)?;
        let child = tokio::process::Command::new(&self.runner_bin)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("CANOPY_RUNNER_ID", format!("bench-runner-{number}"))
            .env("CANOPY_RUNNER_ADDR", format!("127.0.0.1:{port}"))
            .env("CANOPY_RUNNER_MAX_SESSIONS", max_sessions.to_string())
            .env("CANOPY_DATABASE_URL", &self.db.url)
            .env("CANOPY_NATS_URL", &self.nats.url)
            .env("CANOPY_STREAM_NAME", self.nats.prefix.to_uppercase())
            .env(
                "CANOPY_SUBJECT_PREFIX",
                format!("{}.events", self.nats.prefix),
            )
            .env("CANOPY_COMMAND_API_URL", &self.command)
            .env("CANOPY_RUNNER_TOKEN", connections_token)
            .env(
                "CANOPY_RUNNER_CONSUMER",
                format!("{}-runner", self.nats.prefix),
            )
            .env("CANOPY_MODEL_BASE_URL", self.model.base_url())
            .env("CANOPY_MODEL_ID", SCRIPTED_MODEL_ID)
            .env("CANOPY_MODEL_API_KEY", API_KEY)
            .env("CANOPY_SANDBOX_ROOT", self.dir.path().join("sandboxes"))
            .env("CANOPY_SANDBOX_IDLE_TIMEOUT", "10m")
            .env("CANOPY_SANDBOX_SHELL_BIN", &self.shell_bin)
            .env("CANOPY_OPENCODE_BIN", &self.opencode_bin)
            .env("CANOPY_RUNNER_GIT_SCHEMES", "https,file")
            .env("CANOPY_RUNNER_INACTIVITY_TIMEOUT", "1m")
            .env("CANOPY_RUNNER_DRAIN_TIMEOUT", "10s")
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .context("start canopy-agent-runner")?;
        let mut runner = RunnerProcess {
            pid: child.id().context("the runner's pid")?,
            child,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = runner.child.try_wait()? {
                bail!("the runner exited with {status}; {}", runner.log_tail());
            }
            let health = self
                .http
                .get(format!("http://127.0.0.1:{port}/health"))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(runner);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the runner did not start within 30 s; {}",
                    runner.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The runner under test, a child process.
struct RunnerProcess {
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

impl RunnerProcess {
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail: Vec<String> = lines[lines.len().saturating_sub(5)..]
            .iter()
            .map(|line| clip(line, 300))
            .collect();
        let tail = tail.join("\n");
        format!(
            "the runner's log ({}) ends with:\n{tail}",
            self.log.display()
        )
    }

    /// Its peak resident set size so far, in KiB.
    fn hwm_kib(&self) -> u64 {
        status_kib(self.pid, "VmHWM:").unwrap_or(0)
    }

    /// SIGTERM, then waits for it to drain and stop its sandboxes.
    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                ensure!(
                    status.success(),
                    "the runner exited with {status}; {}",
                    self.log_tail()
                );
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!(
                    "the runner did not stop within 60 s of SIGTERM; {}",
                    self.log_tail()
                )
            }
        }
    }
}

/// Cold prompts (one per session or sandbox), warm ones, and sandbox start times.
#[derive(Default)]
struct Samples {
    cold_first: Vec<Duration>,
    cold_plan: Vec<Duration>,
    warm_first: Vec<Duration>,
    warm_plan: Vec<Duration>,
    startup: Vec<Duration>,
}

async fn canopy_samples(env: &Env, cold: usize, warm: usize) -> Result<Samples> {
    let runner = env.runner(8).await?;
    let result = async {
        let mut samples = Samples::default();
        for i in 0..cold {
            let session = env.start_session().await?;
            for k in 0..=warm {
                let marker = format!("canopy bench prompt {i}.{k} {}", Uuid::new_v4());
                let (prompt, submitted) = env.prompt(session, &marker).await?;
                let plans = env
                    .wait_plans(&[session], &[prompt], PLAN_WAIT)
                    .await
                    .with_context(|| runner.log_tail())?;
                let first = env
                    .first_request(&marker)
                    .context("no model request for the prompt")?;
                let (first, plan) = (first - submitted, plans[&prompt] - submitted);
                if k == 0 {
                    samples.cold_first.push(first);
                    samples.cold_plan.push(plan);
                } else {
                    samples.warm_first.push(first);
                    samples.warm_plan.push(plan);
                }
                // The plan awaits a decision; cancelling it ends the prompt, so the next one
                // is a new prompt in the same, warm sandbox.
                env.cancel(session, prompt).await?;
            }
        }
        anyhow::Ok(samples)
    }
    .await;
    let stopped = runner.stop().await;
    let samples = result?;
    stopped?;
    Ok(samples)
}

async fn direct_samples(
    env: &Env,
    provider: &BubblewrapProvider,
    cold: usize,
    warm: usize,
) -> Result<Samples> {
    let mut samples = Samples::default();
    for i in 0..cold {
        let one = direct_session(env, provider, &format!("direct-{i}"), warm).await?;
        samples.cold_first.extend(one.cold_first);
        samples.cold_plan.extend(one.cold_plan);
        samples.warm_first.extend(one.warm_first);
        samples.warm_plan.extend(one.warm_plan);
        samples.startup.extend(one.startup);
    }
    Ok(samples)
}

/// One sandbox started by this process: the cold turn, then `warm` more in the same OpenCode
/// session; the sandbox is stopped and removed afterwards.
async fn direct_session(
    env: &Env,
    provider: &BubblewrapProvider,
    id: &str,
    warm: usize,
) -> Result<Samples> {
    let spec = SandboxSpec {
        id: id.to_owned(),
        repository: env.repository_url.clone(),
        branch: format!("canopy/{id}"),
        provider_id: MODEL_PROVIDER_ID.to_owned(),
        model_id: SCRIPTED_MODEL_ID.to_owned(),
    };
    let requested = Instant::now();
    let info = provider.start(spec).await.context("start a sandbox")?;
    let result = async {
        let mut samples = Samples::default();
        samples.startup.push(info.startup);
        let client = OpenCodeClient::new(info.client_config())?;
        let session = client
            .create_session(&CreateSession {
                title: Some("Runner bench".to_owned()),
                ..CreateSession::default()
            })
            .await?
            .id;
        let policy = TurnPolicy {
            inactivity_timeout: Duration::from_secs(60),
            turn_timeout: Duration::from_secs(120),
            ..TurnPolicy::default()
        };
        let mut refuse = |_: &PermissionRequest| PermissionReply::Reject { message: None };
        for k in 0..=warm {
            let marker = format!("direct bench prompt {id}.{k} {}", Uuid::new_v4());
            let prompt = Prompt {
                parts: vec![PromptPart::text(marker.as_str())],
                agent: Agent::Plan,
                model: ModelRef::new(MODEL_PROVIDER_ID, SCRIPTED_MODEL_ID),
                system: None,
            };
            let sent = Instant::now();
            let outcome = run_turn(&client, &session, &prompt, &mut refuse, &policy).await?;
            let idle = Instant::now();
            ensure!(
                matches!(outcome.end, TurnEnd::Completed),
                "the direct turn ended with {:?}",
                outcome.end
            );
            let first = env
                .first_request(&marker)
                .context("no model request for the direct prompt")?;
            if k == 0 {
                samples.cold_first.push(first - requested);
                samples.cold_plan.push(idle - requested);
            } else {
                samples.warm_first.push(first - sent);
                samples.warm_plan.push(idle - sent);
            }
        }
        anyhow::Ok(samples)
    }
    .await;
    let stopped = provider.stop(id).await;
    let _ = provider.remove(id).await;
    let samples = result?;
    stopped.context("stop the sandbox")?;
    Ok(samples)
}

struct Step3 {
    total: Duration,
    latencies: Vec<Duration>,
    runner_hwm_kib: u64,
    descendants_peak_kib: u64,
}

/// N fresh sessions, a fresh runner, one prompt each submitted at once.
async fn concurrent_step(env: &Env, n: usize, limit: Duration) -> Result<Step3> {
    let mut sessions = Vec::with_capacity(n);
    for _ in 0..n {
        sessions.push(env.start_session().await?);
    }
    let runner = env.runner(n.max(8) * 2).await?;
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let pid = runner.pid;
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(descendants_rss_kib(pid));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        })
    };
    let result = async {
        let texts: Vec<String> = (0..n)
            .map(|i| format!("concurrent bench prompt {n}.{i} {}", Uuid::new_v4()))
            .collect();
        let began = Instant::now();
        let submitted = futures::future::try_join_all(
            sessions
                .iter()
                .zip(&texts)
                .map(|(session, text)| env.prompt(*session, text)),
        )
        .await?;
        let prompts: Vec<Uuid> = submitted.iter().map(|(p, _)| *p).collect();
        let plans = env.wait_plans(&sessions, &prompts, limit).await?;
        let total = plans
            .values()
            .max()
            .map_or(Duration::ZERO, |last| *last - began);
        let latencies = submitted
            .iter()
            .map(|(prompt, at)| plans[prompt] - *at)
            .collect();
        for (session, prompt) in sessions.iter().zip(&prompts) {
            env.cancel(*session, *prompt).await?;
        }
        anyhow::Ok((total, latencies))
    }
    .await;
    sampling.store(false, Ordering::Relaxed);
    let descendants_peak_kib = sampler.await.unwrap_or(0);
    let runner_hwm_kib = runner.hwm_kib();
    let stopped = runner.stop().await;
    let (total, latencies) = result?;
    stopped?;
    Ok(Step3 {
        total,
        latencies,
        runner_hwm_kib,
        descendants_peak_kib,
    })
}

/// The guard binary the sandboxes need: next to the runner (a release build), else a debug
/// build of the same target directory.
fn find_shell(runner: &Path) -> Result<PathBuf> {
    const NAME: &str = "canopy-sandbox-shell";
    let release = runner.with_file_name(NAME);
    if release.is_file() {
        return Ok(release);
    }
    let debug = runner
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("debug").join(NAME));
    if let Some(debug) = debug.filter(|path| path.is_file()) {
        println!(
            "note: no release {NAME} next to the runner; using the debug build {} \
             (cargo build --release -p canopy-sandbox --bins builds the release one)",
            debug.display()
        );
        return Ok(debug);
    }
    bail!(
        "{NAME} not found at {}: cargo bench does not build it; run \
         `cargo build --release -p canopy-sandbox --bins` (with the same CARGO_TARGET_DIR) first",
        release.display()
    )
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The summed VmRSS of every descendant of `root` (not `root` itself).
fn descendants_rss_kib(root: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for pid in entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
    {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut total = 0;
    let mut stack = children.get(&root).cloned().unwrap_or_default();
    while let Some(pid) = stack.pop() {
        total += status_kib(pid, "VmRSS:").unwrap_or(0);
        stack.extend(children.get(&pid).into_iter().flatten().copied());
    }
    total
}

fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemAvailable:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib / 1024)
}

fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let output = std::process::Command::new("git")
        .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
        .args(args)
        .current_dir(dir)
        .output()
        .context("run git")?;
    ensure!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A bare remote with one commit on `main`, readable by the sandbox uids.
fn make_repository(dir: &Path) -> Result<PathBuf> {
    let source = dir.join("source");
    std::fs::create_dir_all(&source)?;
    std::fs::write(source.join("README.md"), "the session's repository\n")?;
    git(&source, &["init", "-q", "-b", "main"])?;
    git(&source, &["add", "README.md"])?;
    git(&source, &["commit", "-q", "-m", "initial"])?;
    let remote = dir.join("remote.git");
    let (source, target) = (
        source.to_str().context("a UTF-8 path")?,
        remote.to_str().context("a UTF-8 path")?,
    );
    git(dir, &["clone", "-q", "--bare", source, target])?;
    let status = std::process::Command::new("chmod")
        .args(["-R", "a+rX", target])
        .status()?;
    ensure!(status.success(), "chmod the remote");
    Ok(remote)
}
