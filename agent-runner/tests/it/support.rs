//! The whole product for one test: command-api, the relay and query-api (live streams) in this
//! process on a fresh database and NATS prefix, a source repository with a bare remote, the
//! scripted model (the one fake: a hosted LLM), and agent runners driving the real OpenCode in
//! real bubblewrap sandboxes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use canopy_agent_runner::{Config, Connections};
use canopy_auth::Claims;
use canopy_domain::Role;
use canopy_relay::{Relay, RelayConfig};
use canopy_testkit::{ModelServer, Script, Step, TestDb, TestNats};
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

pub(crate) const SECRET: &str = "agent-runner-test-secret-0123456789";
pub(crate) const WORKSPACE: &str = "w-runner";

pub(crate) struct Stack {
    pub(crate) db: TestDb,
    pub(crate) nats: TestNats,
    pub(crate) command: String,
    pub(crate) query: String,
    pub(crate) http: reqwest::Client,
    pub(crate) model: ModelServer,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) remote: PathBuf,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The status endpoint of each runner started, in order.
    pub(crate) runner_addrs: Vec<std::net::SocketAddr>,
    runners: Vec<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<()>>,
    )>,
}

/// A person with a token.
#[derive(Debug, Clone)]
pub(crate) struct Person {
    pub(crate) token: String,
}

pub(crate) fn person(id: &str, name: &str, role: Role, email: Option<&str>) -> Person {
    let mut claims = Claims::user(id, name, WORKSPACE, role, chrono::Duration::hours(1));
    claims.email = email.map(str::to_owned);
    Person {
        token: canopy_auth::mint_hs256(SECRET, &claims).unwrap(),
    }
}

impl Stack {
    pub(crate) async fn start(script: Script) -> Result<Self> {
        let db = canopy_testkit::database().await?;
        let nats = canopy_testkit::nats().await?;
        let mut stops = Vec::new();

        let mut command = canopy_command_api::Config::for_database(db.url.clone());
        command.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
        command.db_max_connections = 6;
        let app = canopy_command_api::build(command).await?;
        let command = format!("http://{}", app.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        stops.push(stop);

        let mut query = canopy_query_api::Config::for_database(db.url.clone());
        query.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
        query.settings.db_max_connections = 4;
        query.nats = canopy_config::NatsArgs::new(&nats.url);
        query.subjects.subject_prefix = format!("{}.events", nats.prefix);
        query.settings.presence_prefix = format!("{}.presence", nats.prefix);
        let app = canopy_query_api::build(query).await?;
        let query = format!("http://{}", app.local_addr());
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

        let dir = tempfile::Builder::new()
            .prefix("canopy-runner-test-")
            .tempdir()?;
        // The sandbox uid clones the source: it must be able to read it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let remote = make_repository(dir.path())?;
        let model = ModelServer::start(script).await?;
        Ok(Self {
            db,
            nats,
            command,
            query,
            http: reqwest::Client::new(),
            model,
            dir,
            remote,
            stops,
            runner_addrs: Vec::new(),
            runners: Vec::new(),
        })
    }

    /// A runner configuration for this stack: short limits, `file://` repositories allowed.
    pub(crate) fn runner_config(&self) -> Config {
        let mut config = Config::defaults();
        config.status_listen = "127.0.0.1:0".parse().unwrap();
        config.consumer_name = format!("{}-runner", self.nats.prefix);
        config.model_base_url = Some(self.model.base_url());
        config.model_api_key = "sk-runner-test-key-0123456789".into();
        config.sandbox_root = Some(self.dir.path().join("sandboxes"));
        config.git_schemes = vec!["https".into(), "file".into()];
        config.inactivity_timeout = Duration::from_secs(20);
        config.agent_time = Duration::from_secs(120);
        config.lease = Duration::from_secs(6);
        config.sandbox_idle_timeout = Duration::from_secs(600);
        config.drain_timeout = Duration::from_secs(10);
        config
    }

    pub(crate) fn connections(&self) -> Connections {
        Connections {
            database_url: self.db.url.clone(),
            nats_url: self.nats.url.clone(),
            stream_name: self.nats.prefix.to_uppercase(),
            subject_prefix: format!("{}.events", self.nats.prefix),
            command_api_url: self.command.clone(),
            runner_token: canopy_agent_runner::mint_runner_token(SECRET).unwrap(),
        }
    }

    /// Starts an in-process runner.
    pub(crate) async fn start_runner(&mut self, config: Config) -> Result<String> {
        let app = canopy_agent_runner::build(config, self.connections()).await?;
        let id = app.runner_id().to_owned();
        self.runner_addrs.push(app.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        self.runners.push((stop, task));
        Ok(id)
    }

    /// Stops the in-process runners (draining them).
    pub(crate) async fn stop_runners(&mut self) {
        for (stop, task) in self.runners.drain(..) {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    pub(crate) fn workspace_of(&self, session: Uuid) -> PathBuf {
        self.dir
            .path()
            .join("sandboxes")
            .join(session.to_string())
            .join("data")
            .join("workspace")
    }

    pub(crate) async fn post(&self, who: &Person, path: &str, body: Value) -> Result<Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.command))
            .bearer_auth(&who.token)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST {path}: {status} {body}");
        }
        Ok(body)
    }

    /// Posts and returns the problem's status and code (for expected refusals).
    pub(crate) async fn refused(&self, who: &Person, path: &str, body: Value) -> (u16, String) {
        let response = self
            .http
            .post(format!("{}{path}", self.command))
            .bearer_auth(&who.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        (status, body["code"].as_str().unwrap_or_default().to_owned())
    }

    pub(crate) async fn start_session(&self, who: &Person, feature: Option<Uuid>) -> Result<Uuid> {
        let body = self
            .post(
                who,
                "/sessions",
                json!({
                    "title": "Runner test",
                    "repository_url": format!("file://{}", self.remote.display()),
                    "base_branch": "main",
                    "feature_id": feature,
                }),
            )
            .await?;
        Ok(body["aggregate_id"]
            .as_str()
            .context("session id")?
            .parse()?)
    }

    pub(crate) async fn prompt(&self, who: &Person, session: Uuid, text: &str) -> Result<Uuid> {
        let body = self
            .post(
                who,
                &format!("/sessions/{session}/prompts"),
                json!({ "text": text }),
            )
            .await?;
        Ok(body["id"].as_str().context("prompt id")?.parse()?)
    }

    /// The session's events from the store, as `(type, data)`.
    pub(crate) async fn events(&self, session: Uuid) -> Result<Vec<(String, Value, Value)>> {
        let rows: Vec<(String, Value, Value)> = sqlx::query_as(
            "SELECT event_type, payload, metadata FROM events
              WHERE aggregate_type = 'session' AND aggregate_id = $1 ORDER BY sequence",
        )
        .bind(session.to_string())
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(t, payload, metadata)| {
                let data = payload[&t].clone();
                (t, data, metadata)
            })
            .collect())
    }

    pub(crate) async fn types(&self, session: Uuid) -> Vec<String> {
        self.events(session)
            .await
            .unwrap()
            .into_iter()
            .map(|(t, _, _)| t)
            .collect()
    }

    /// Waits until the session has an event of `event_type` (the `nth`, 1-based) and returns
    /// its data; fails the test, naming what the session has, when none comes `within`.
    pub(crate) async fn wait_for(
        &self,
        session: Uuid,
        event_type: &str,
        nth: usize,
        within: Duration,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let events = self.events(session).await.unwrap();
            if let Some((_, data, _)) = events
                .iter()
                .filter(|(t, _, _)| t == event_type)
                .nth(nth - 1)
            {
                return data.clone();
            }
            let types: Vec<&str> = events.iter().map(|(t, _, _)| t.as_str()).collect();
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {event_type} #{nth} within {within:?}; the session has {types:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the session's `nth` plan and approves it as `admin`; returns the plan.
    pub(crate) async fn approve_plan(&self, admin: &Person, session: Uuid, nth: usize) -> Value {
        let plan = self
            .wait_for(session, "PlanProposed", nth, Duration::from_secs(90))
            .await;
        let id = plan["plan_id"].as_str().unwrap();
        self.post(
            admin,
            &format!("/sessions/{session}/plans/{id}/approve"),
            json!({}),
        )
        .await
        .unwrap();
        plan
    }

    /// Follows the session's SSE stream, collecting event types until `until` is seen.
    pub(crate) fn watch(
        &self,
        who: &Person,
        session: Uuid,
        until: &'static str,
    ) -> tokio::task::JoinHandle<Result<Vec<String>>> {
        let url = format!("{}/sessions/{session}/stream", self.query);
        let token = who.token.clone();
        let http = self.http.clone();
        tokio::spawn(async move {
            let response = http.get(url).bearer_auth(token).send().await?;
            anyhow::ensure!(
                response.status().is_success(),
                "stream: {}",
                response.status()
            );
            let mut stream = eventsource_stream::Eventsource::eventsource(response.bytes_stream());
            let mut seen = Vec::new();
            while let Some(event) = stream.next().await {
                let event = event?;
                let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
                    continue;
                };
                if let Some(t) = data["type"].as_str() {
                    seen.push(t.to_owned());
                    if t == until {
                        return Ok(seen);
                    }
                }
            }
            bail!("the stream ended after {seen:?}")
        })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for (stop, _) in self.runners.drain(..) {
            let _ = stop.send(());
        }
        // A runner stopped mid-test (or not at all) may leave sandbox disks mounted (root
        // mode): detach them before the temp dir goes, or it would be deleted through them.
        let prefix = format!("{}/", self.dir.path().display());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for point in mounts
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| point.starts_with(&prefix))
        {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(point)
                .status();
        }
    }
}

/// The model writes a file.
pub(crate) fn write(path: &str, content: &str) -> Step {
    Step::tool("write", json!({ "filePath": path, "content": content }))
}

/// The model runs a command.
pub(crate) fn bash(command: &str) -> Step {
    Step::tool(
        "bash",
        json!({ "command": command, "description": "run it" }),
    )
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let output = std::process::Command::new("git")
        .args([
            "-c",
            "safe.directory=*",
            "-c",
            "core.fsmonitor=false",
            "-c",
            "core.hooksPath=/dev/null",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .context("run git")?;
    anyhow::ensure!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// A bare remote with one commit on `main`.
fn make_repository(dir: &Path) -> Result<PathBuf> {
    let source = dir.join("source");
    std::fs::create_dir_all(&source)?;
    std::fs::write(source.join("README.md"), "the session's repository\n")?;
    git(&source, &["init", "-q", "-b", "main"])?;
    git(&source, &["add", "README.md"])?;
    git(
        &source,
        &[
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@localhost",
            "commit",
            "-q",
            "-m",
            "initial",
        ],
    )?;
    let remote = dir.join("remote.git");
    git(
        dir,
        &[
            "clone",
            "-q",
            "--bare",
            source.to_str().unwrap(),
            remote.to_str().unwrap(),
        ],
    )?;
    // The sandbox uid clones it; pushes come from the host.
    let status = std::process::Command::new("chmod")
        .args(["-R", "a+rX", remote.to_str().unwrap()])
        .status()?;
    anyhow::ensure!(status.success());
    Ok(remote)
}
