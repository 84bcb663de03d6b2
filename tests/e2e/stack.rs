//! What the end-to-end fault tests share: a stack's own PostgreSQL and nats-server that a test
//! may stop and start, service processes, a load of commands that are retried with their
//! idempotency keys until answered, and the checks that the store, the stream and the read
//! models healed.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy_auth::Claims;
use canopy_domain::Role;
use canopy_local_servers::{Durability, LocalServer};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::canopy;

/// Within this time after the last restart, the read models must have caught up.
pub(crate) const HEAL_WITHIN: Duration = Duration::from_secs(60);
const CLIENTS: usize = 16;
const SESSIONS: usize = 32;
const WORKSPACE: &str = "faults";

/// This test's own PostgreSQL and nats-server, which it may stop and start.
pub(crate) struct Servers {
    /// Removed at the end, unless the test failed (its logs are there).
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    pg: LocalServer,
    pg_port: u16,
    nats: Option<LocalServer>,
    nats_port: u16,
    /// The URL of this test's nats-server (with the credentials it generated at its first start).
    nats_url: String,
}

impl Servers {
    pub(crate) fn start() -> Self {
        let mut servers = Self::postgres_only();
        servers.start_nats();
        servers
    }

    /// PostgreSQL only (the test brings its own NATS).
    pub(crate) fn postgres_only() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("canopy-faults-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let pg_port = canopy_local_servers::free_port().unwrap();
        let nats_port = canopy_local_servers::free_port().unwrap();
        let pg = canopy_local_servers::start_postgres(
            &dir.path().join("postgres"),
            pg_port,
            Durability::Throwaway,
        )
        .unwrap();
        Self {
            path: dir.path().to_owned(),
            dir: Some(dir),
            pg,
            pg_port,
            nats: None,
            nats_url: format!("nats://127.0.0.1:{nats_port}"),
            nats_port,
        }
    }

    pub(crate) fn wiring(&self) -> Wiring {
        Wiring {
            database_url: self.pg.url.clone(),
            nats_url: self.nats_url.clone(),
            logs: self.path.to_owned(),
        }
    }

    pub(crate) async fn stop_nats(&mut self) {
        let nats = self.nats.take().unwrap();
        nats.signal("KILL").unwrap();
        wait_exited(&nats).await;
    }

    pub(crate) fn start_nats(&mut self) {
        let nats =
            canopy_local_servers::start_nats(&self.path.join("nats"), self.nats_port).unwrap();
        self.nats_url.clone_from(&nats.url);
        self.nats = Some(nats);
    }

    /// A fast shutdown (SIGINT), then the same server on the same data and port.
    pub(crate) async fn restart_postgres(&mut self) {
        self.pg.signal("INT").unwrap();
        wait_exited(&self.pg).await;
        self.pg = canopy_local_servers::start_postgres(
            &self.path.join("postgres"),
            self.pg_port,
            Durability::Throwaway,
        )
        .unwrap();
    }
}

impl Drop for Servers {
    #[allow(clippy::print_stderr, reason = "a failed test says where its logs are")]
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!("logs and data kept in {}", kept.display());
        }
        if let Some(nats) = &self.nats {
            let _ = nats.signal("KILL");
        }
        let _ = self.pg.signal("KILL");
    }
}

pub(crate) async fn wait_exited(server: &LocalServer) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server.has_exited() {
        assert!(
            Instant::now() < deadline,
            "server {} did not stop",
            server.pid
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the parts of a stack find each other, and where they write their logs.
#[derive(Debug, Clone)]
pub(crate) struct Wiring {
    pub(crate) database_url: String,
    /// One URL, or a comma-separated list (a cluster).
    pub(crate) nats_url: String,
    pub(crate) logs: PathBuf,
}

/// A service process of the stack, with the settings every part shares.
pub(crate) struct Service {
    child: Child,
    name: &'static str,
}

impl Service {
    pub(crate) async fn start(
        name: &'static str,
        program: PathBuf,
        args: &[&str],
        wiring: &Wiring,
        env: &[(&str, String)],
        ready: Option<&str>,
    ) -> Self {
        let log_path = wiring.logs.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut command = Command::new(program);
        command
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .env("CANOPY_DATABASE_URL", &wiring.database_url)
            .env("CANOPY_NATS_URL", &wiring.nats_url)
            .env("CANOPY_RATE_LIMIT_PER_SECOND", "100000")
            .env("CANOPY_RATE_LIMIT_BURST", "100000")
            // the load piles prompts up in sessions no runner drains
            .env("CANOPY_MAX_QUEUED_PROMPTS", "100000")
            .env("RUST_LOG", "warn")
            .stderr(log)
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        if let Some(ready) = ready {
            let found = tokio::time::timeout(Duration::from_secs(120), async {
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains(ready) {
                        return true;
                    }
                }
                false
            })
            .await
            .unwrap_or(false);
            assert!(found, "{name} did not get ready (see {name}.log)");
        }
        // the services log to stdout: into the log too, for a failed test's reader
        tokio::spawn(async move {
            use std::io::Write as _;
            let mut log = std::fs::OpenOptions::new().append(true).open(log_path).ok();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(log) = log.as_mut() {
                    let _ = writeln!(log, "{line}");
                }
            }
        });
        Self { child, name }
    }

    pub(crate) async fn kill(mut self) {
        let pid = self.child.id().unwrap();
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success(), "kill {} failed", self.name);
        self.child.wait().await.unwrap();
    }

    pub(crate) async fn stop(mut self) {
        let pid = self.child.id().unwrap();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// `canopy up` on the given servers, without agents (prompts queue up).
pub(crate) async fn canopy_up(wiring: &Wiring, command_port: u16, query_port: u16) -> Service {
    Service::start(
        "canopy-up",
        canopy(),
        &["up", "--without-runner"],
        wiring,
        &[
            (
                "CANOPY_DATA_DIR",
                wiring.logs.join("data").display().to_string(),
            ),
            (
                "CANOPY_COMMAND_API_ADDR",
                format!("127.0.0.1:{command_port}"),
            ),
            ("CANOPY_QUERY_API_ADDR", format!("127.0.0.1:{query_port}")),
            ("CANOPY_RUNNER_ADDR", "127.0.0.1:0".to_owned()),
        ],
        Some("press Ctrl+C"),
    )
    .await
}

pub(crate) fn token(user: &str, role: Role) -> String {
    let mut claims = Claims::user(user, user, WORKSPACE, role, chrono::Duration::hours(2));
    claims.email = None;
    canopy_auth::mint_hs256(canopy_auth::DEV_SECRET, &claims).unwrap()
}

/// One command, sent again with the same idempotency key until it is answered: the status and
/// body the client finally got.
pub(crate) async fn until_answered(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
    give_up: Instant,
) -> Option<(u16, Value)> {
    let (base, path) = url.split_at(url.find("/sessions").unwrap_or(url.len()));
    until_answered_by(http, &[base.to_owned()], path, token, body, give_up).await
}

/// [`until_answered`] over several command-apis: a retry goes to the next one.
pub(crate) async fn until_answered_by(
    http: &reqwest::Client,
    bases: &[String],
    path: &str,
    token: &str,
    body: &Value,
    give_up: Instant,
) -> Option<(u16, Value)> {
    let key = uuid::Uuid::new_v4().to_string();
    let mut attempt = 0usize;
    loop {
        let base = &bases[attempt % bases.len()];
        attempt += 1;
        let sent = http
            .post(format!("{base}{path}"))
            .bearer_auth(token)
            .header("Idempotency-Key", &key)
            .json(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(response) = sent {
            let status = response.status().as_u16();
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            // anything a retry could change is retried with the same key
            if status < 500 && status != 409 && status != 429 {
                return Some((status, answer));
            }
        }
        if Instant::now() > give_up {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clients submitting prompts over sessions until stopped (each command to the next
/// command-api in turn when there are several); what they were told.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<String>>>,
    answered: Arc<Mutex<u64>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub(crate) async fn start(command_api: &str) -> Self {
        Self::over(&[command_api.to_owned()], CLIENTS, SESSIONS, Kind::Prompts).await
    }

    pub(crate) async fn over(
        command_apis: &[String],
        clients: usize,
        sessions: usize,
        kind: Kind,
    ) -> Self {
        let command_api = command_apis[0].as_str();
        let http = reqwest::Client::new();
        let owner = token("load-owner", Role::Owner);
        let members: Vec<String> = (0..clients)
            .map(|i| token(&format!("load-member-{i}"), Role::Member))
            .collect();
        let targets = match kind {
            Kind::Prompts => prompt_targets(&http, command_api, &owner, &members, sessions).await,
            Kind::Learnings => learning_targets(&http, command_api, &owner, sessions).await,
        };
        Self::run(command_apis, members, targets, kind, http)
    }

    fn run(
        command_apis: &[String],
        members: Vec<String>,
        targets: Vec<String>,
        kind: Kind,
        http: reqwest::Client,
    ) -> Self {
        let clients = members.len();
        let session_ids = targets;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(Mutex::new(0));
        let mut tasks = Vec::new();
        for (client, member) in members.into_iter().enumerate() {
            let (http, stop, accepted, answered) = (
                http.clone(),
                stop.clone(),
                accepted.clone(),
                answered.clone(),
            );
            let sessions = session_ids.clone();
            let bases = command_apis.to_vec();
            tasks.push(tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let session = &sessions[(client + n * clients) % sessions.len()];
                    let first = (client + n) % bases.len();
                    let bases: Vec<String> = bases[first..]
                        .iter()
                        .chain(&bases[..first])
                        .cloned()
                        .collect();
                    n += 1;
                    let (path, body) = match kind {
                        Kind::Prompts => (
                            format!("/sessions/{session}/prompts"),
                            json!({"text": format!("prompt {n} of client {client}")}),
                        ),
                        Kind::Learnings => (
                            format!("/features/{session}/learnings"),
                            json!({"text": format!("learning {n} of client {client}")}),
                        ),
                    };
                    let answer = until_answered_by(
                        &http,
                        &bases,
                        &path,
                        &member,
                        &body,
                        Instant::now() + Duration::from_secs(180),
                    )
                    .await
                    .expect("a command was never answered");
                    assert!(answer.0 < 300, "answered {} {}", answer.0, answer.1);
                    let ids = answer.1["event_ids"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    accepted
                        .lock()
                        .unwrap()
                        .extend(ids.iter().filter_map(|id| id.as_str().map(str::to_owned)));
                    *answered.lock().unwrap() += 1;
                }
            }));
        }
        Self {
            stop,
            accepted,
            answered,
            tasks,
        }
    }
}

/// What the load sends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// Prompts to sessions (they queue up: no runner takes them).
    Prompts,
    /// Learnings shared on features (no agent work, for stacks that run runners).
    Learnings,
}

async fn prompt_targets(
    http: &reqwest::Client,
    command_api: &str,
    owner: &str,
    members: &[String],
    sessions: usize,
) -> Vec<String> {
    let mut session_ids = Vec::new();
    for i in 0..sessions {
        let (status, answer) = until_answered(
                http,
                &format!("{command_api}/sessions"),
                owner,
                &json!({"title": format!("load {i}"), "repository_url": "https://example.com/r.git", "base_branch": "main"}),
                Instant::now() + Duration::from_secs(60),
            )
            .await
            .expect("start a session");
        assert!(status < 300, "start a session: {status} {answer}");
        session_ids.push(answer["aggregate_id"].as_str().unwrap().to_owned());
    }
    for member in members {
        for session in &session_ids {
            let joined = until_answered(
                http,
                &format!("{command_api}/sessions/{session}/join"),
                member,
                &json!({}),
                Instant::now() + Duration::from_secs(60),
            )
            .await
            .expect("join");
            assert!(joined.0 < 300, "join answered {} {}", joined.0, joined.1);
        }
    }
    session_ids
}

async fn learning_targets(
    http: &reqwest::Client,
    command_api: &str,
    owner: &str,
    features: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..features {
        let (status, answer) = until_answered(
            http,
            &format!("{command_api}/features"),
            owner,
            &json!({"title": format!("load {i}")}),
            Instant::now() + Duration::from_secs(60),
        )
        .await
        .expect("create a feature");
        assert!(status < 300, "create a feature: {status} {answer}");
        ids.push(answer["aggregate_id"].as_str().unwrap().to_owned());
    }
    ids
}

impl Load {
    pub(crate) fn answered(&self) -> u64 {
        *self.answered.lock().unwrap()
    }

    /// Lets every client finish its command; the event ids of every accepted command.
    pub(crate) async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        std::mem::take(&mut *self.accepted.lock().unwrap())
    }
}

pub(crate) async fn wait_for_answers(load: &Load, more_than: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while load.answered() <= more_than {
        assert!(Instant::now() < deadline, "the load made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the checks found.
pub(crate) struct Healed {
    events: i64,
    /// From the last restart until the read models had every event.
    after_restart: Duration,
    /// From the last command's answer until the read models had every event.
    after_load: Duration,
}

/// The checks, with no operator step: every accepted event stored, the stream holding each
/// event once, nothing parked, every read model equal to its rebuild.
pub(crate) async fn assert_healed(
    wiring: &Wiring,
    accepted: &[String],
    restarted: Instant,
) -> Healed {
    let load_ended = Instant::now();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&wiring.database_url)
        .await
        .unwrap();
    // every read model's positions reach the store's events
    let deadline = restarted + HEAL_WITHIN;
    let events = loop {
        let (events, sessions, timeline, feature_events, features): (i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT (SELECT count(*) FROM events WHERE aggregate_type = 'session'),
                    (SELECT COALESCE(sum(version), 0)::bigint FROM read.sessions_positions),
                    (SELECT COALESCE(sum(version), 0)::bigint FROM read.timeline_positions),
                    (SELECT count(*) FROM events WHERE aggregate_type = 'feature'),
                    (SELECT COALESCE(sum(version), 0)::bigint FROM read.features_positions)",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
        if events == sessions && events == timeline && feature_events == features {
            break events + feature_events;
        }
        assert!(
            Instant::now() < deadline,
            "read models not caught up {HEAL_WITHIN:?} after the restart: {events} session events, sessions at {sessions}, timeline at {timeline}; {feature_events} feature events, features at {features}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let after_restart = restarted.elapsed();
    let after_load = load_ended.elapsed();

    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id::text = ANY($1)")
            .bind(accepted)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        accepted.len() as i64,
        "an accepted command's events are missing"
    );
    let distinct: HashSet<&String> = accepted.iter().collect();
    assert_eq!(
        distinct.len(),
        accepted.len(),
        "an event was answered twice"
    );

    let parked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM read.parked_events WHERE resolved_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(parked, 0, "events were parked");

    // the stream: each event id once, all of them
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let ids = stream_ids(&wiring.nats_url, all).await;
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "the stream holds an event twice");
    assert_eq!(ids.len() as i64, all, "the stream misses events");

    let check = std::process::Command::new(canopy())
        .args(["rebuild", "all", "--check"])
        .env("CANOPY_DATABASE_URL", &wiring.database_url)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "canopy rebuild: {printed}");
    for projection in ["sessions", "timeline", "features"] {
        assert!(
            printed.contains(&format!("{projection}: live tables equal the rebuild")),
            "{printed}"
        );
    }
    pool.close().await;
    Healed {
        events,
        after_restart,
        after_load,
    }
}

/// Every message id in the stream, once the relay has published `expected` of them.
async fn stream_ids(nats_url: &str, expected: i64) -> Vec<String> {
    let servers: Vec<async_nats::ServerAddr> = nats_url
        .split(',')
        .map(|url| url.trim().parse().unwrap())
        .collect();
    let client = canopy_config::nats_options(nats_url)
        .unwrap()
        .connect(servers)
        .await
        .unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let deadline = Instant::now() + HEAL_WITHIN;
    let mut stream = loop {
        let mut stream = jetstream.get_stream("CANOPY_EVENTS").await.unwrap();
        let messages = stream.info().await.unwrap().state.messages;
        if messages as i64 >= expected || Instant::now() > deadline {
            break stream;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let state = stream.info().await.unwrap().state.clone();
    // message by message (a direct read each, retried while a cluster settles): a consumer's
    // heartbeats can lapse while a node is missing, a plain read cannot
    let mut ids = Vec::new();
    for sequence in state.first_sequence..=state.last_sequence {
        let mut attempts = 0;
        let message = loop {
            match stream.get_raw_message(sequence).await {
                Ok(message) => break Some(message),
                Err(error)
                    if error.kind()
                        == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                {
                    break None;
                }
                Err(error) => {
                    attempts += 1;
                    assert!(attempts < 50, "reading message {sequence}: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let Some(message) = message else { continue };
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        ids.push(id);
    }
    ids
}

/// The figures, printed with `--no-capture` (the closing notes quote them).
#[allow(clippy::print_stderr)]
pub(crate) fn report(what: &str, healed: &Healed, accepted: usize) {
    eprintln!(
        "{what}: {accepted} accepted events, {} events projected; read models caught up {:.1} s after the last restart, {:.1} s after the last answer",
        healed.events,
        healed.after_restart.as_secs_f64(),
        healed.after_load.as_secs_f64()
    );
}

pub(crate) async fn wait_healthy(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = reqwest::get(format!("{base}/readyz")).await
            && response.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{base} never got healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
