//! The whole stack in one test: command-api, relay, projectors and query-api over one fresh
//! database and NATS prefix.

use std::time::Duration;

use canopy_auth::Claims;
use canopy_domain::Role;
use canopy_projectors::{Projectors, ProjectorsConfig};
use canopy_relay::{Relay, RelayConfig};
use canopy_testkit::{TestDb, TestNats};
use serde_json::{Value, json};
use uuid::Uuid;

pub(crate) const SECRET: &str = "query-api-test-secret-0123456789";
/// Events a live client may have buffered (the production default).
pub(crate) const LIVE_BUFFER: usize = 256;

pub(crate) struct Stack {
    pub(crate) db: TestDb,
    pub(crate) nats: TestNats,
    pub(crate) command: String,
    pub(crate) query: String,
    client: reqwest::Client,
    pub(crate) stops: Vec<tokio::sync::oneshot::Sender<()>>,
    projectors: Option<tokio::sync::oneshot::Sender<()>>,
}

pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: Value,
}

impl Answer {
    #[track_caller]
    pub(crate) fn ok(self) -> Value {
        assert_eq!(self.status, 200, "{:?}", self.body);
        self.body
    }

    #[track_caller]
    pub(crate) fn problem(self, status: u16, code: &str) -> Self {
        assert_eq!(self.status, status, "{:?}", self.body);
        assert_eq!(self.body["code"], code, "{:?}", self.body);
        self
    }
}

impl Stack {
    pub(crate) async fn start() -> Self {
        Self::start_with(true, 2000).await
    }

    /// `projectors`: whether they run from the start; `consistency_ms`: the read-your-writes wait.
    pub(crate) async fn start_with(projectors: bool, consistency_ms: u64) -> Self {
        Self::start_full(projectors, consistency_ms, LIVE_BUFFER).await
    }

    /// A stack whose live clients may buffer only `live_buffer` events.
    pub(crate) async fn start_full(
        projectors: bool,
        consistency_ms: u64,
        live_buffer: usize,
    ) -> Self {
        Self::start_configured(projectors, consistency_ms, |query| {
            query.settings.live_buffer = live_buffer;
        })
        .await
    }

    /// A stack whose query-api config `configure` adjusts last.
    pub(crate) async fn start_configured(
        projectors: bool,
        consistency_ms: u64,
        configure: impl FnOnce(&mut canopy_query_api::Config),
    ) -> Self {
        let db = canopy_testkit::database().await.unwrap();
        let nats = canopy_testkit::nats().await.unwrap();
        let mut stops = Vec::new();

        let mut command = canopy_command_api::Config::for_database(db.url.clone());
        command.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
        command.rate_limit_burst = 10_000;
        command.rate_limit_per_second = 10_000;
        // prompts pile up in sessions faster than anything drains them
        command.max_queued_prompts = 1_000_000;
        command.db_max_connections = 6;
        let app = canopy_command_api::build(command).await.unwrap();
        let command = format!("http://{}", app.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        stops.push(stop);

        let mut query = canopy_query_api::Config::for_database(db.url.clone());
        query.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
        query.settings.consistency_timeout = Duration::from_millis(consistency_ms);
        query.settings.db_max_connections = 8;
        query.nats = canopy_config::NatsArgs::new(&nats.url);
        query.subjects.subject_prefix = format!("{}.events", nats.prefix);
        query.settings.presence_prefix = format!("{}.presence", nats.prefix);
        query.settings.presence_heartbeat = Duration::from_millis(200);
        query.settings.keep_alive = Duration::from_secs(1);
        query.settings.live_buffer = LIVE_BUFFER;
        configure(&mut query);
        let app = canopy_query_api::build(query).await.unwrap();
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
            db.new_pool(3).await.unwrap(),
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

        let mut stack = Self {
            db,
            nats,
            command,
            query,
            client: reqwest::Client::new(),
            stops,
            projectors: None,
        };
        if projectors {
            stack.start_projectors().await;
        }
        stack
    }

    pub(crate) async fn start_projectors(&mut self) {
        let config = ProjectorsConfig::new(
            self.nats.prefix.to_uppercase(),
            format!("{}.events", self.nats.prefix),
        );
        let projectors = Projectors::new(
            config,
            self.db.new_pool(6).await.unwrap(),
            self.nats.client.clone(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            projectors
                .run_until(async {
                    let _ = stopped.await;
                })
                .await
        });
        self.projectors = Some(stop);
    }

    pub(crate) async fn command(&self, token: &str, path: &str, body: Value) -> Value {
        let response = self
            .client
            .post(format!("{}{path}", self.command))
            .bearer_auth(token)
            .header("idempotency-key", Uuid::new_v4().to_string())
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {body:?}");
        body
    }

    pub(crate) async fn get(&self, token: &str, path: &str) -> Answer {
        let response = self
            .client
            .get(format!("{}{path}", self.query))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        Answer {
            status,
            headers,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }

    /// A session with two prompts: one run to completion through a plan, a tool approval, two
    /// tools, usage and a checkpoint; one left queued. Returns (session, feature, last token).
    pub(crate) async fn scenario(&self, title: &str) -> (Uuid, Uuid, String) {
        let owner = token(Role::Owner, "owner", "w1");
        let member = token(Role::Member, "m1", "w1");
        let runner = runner();
        let feature = self
            .command(&owner, "/features", json!({"title": "Login"}))
            .await["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let session: Uuid = self
            .command(&member, "/sessions", json!({"title": title, "repository_url": "https://g.example.invalid/r", "base_branch": "main", "feature_id": feature}))
            .await["id"].as_str().unwrap().parse().unwrap();
        self.command(
            &member,
            &format!("/features/{feature}/sessions"),
            json!({"session_id": session}),
        )
        .await;
        let prompt = self
            .command(
                &member,
                &format!("/sessions/{session}/prompts"),
                json!({"text": "fix the login bug"}),
            )
            .await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        self.command(
            &owner,
            &format!("/sessions/{session}/prompts"),
            json!({"text": "then add tests"}),
        )
        .await;
        let base = format!("/runner/sessions/{session}");
        self.command(
            &runner,
            &format!("{base}/prompts/{prompt}/start"),
            json!({}),
        )
        .await;
        let plan = self
            .command(
                &runner,
                &format!("{base}/plans"),
                json!({"prompt_id": prompt, "summary": "edit login.rs", "steps": ["read", "edit"]}),
            )
            .await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        self.command(
            &owner,
            &format!("/sessions/{session}/plans/{plan}/approve"),
            json!({}),
        )
        .await;
        let request = self.command(&runner, &format!("{base}/tool-approvals"), json!({"prompt_id": prompt, "call_id": "call_2", "tool": "bash", "input_summary": "cargo test"})).await["id"].as_str().unwrap().to_owned();
        self.command(
            &owner,
            &format!("/sessions/{session}/tool-approvals/{request}/grant"),
            json!({}),
        )
        .await;
        self.command(&runner, &format!("{base}/tool-executions"), json!({"prompt_id": prompt, "call_id": "call_1", "tool": "read", "phase": "build", "input_summary": "login.rs", "output_summary": "ok", "status": "completed", "duration_ms": 5})).await;
        self.command(&runner, &format!("{base}/tool-executions"), json!({"prompt_id": prompt, "call_id": "call_2", "tool": "bash", "phase": "build", "input_summary": "cargo test", "output_summary": "1 failed", "status": "failed", "duration_ms": 900})).await;
        self.command(&runner, &format!("{base}/usage"), json!({"prompt_id": prompt, "tokens_in": 1000, "tokens_out": 100, "cost_micro_usd": 2500})).await;
        self.command(&runner, &format!("{base}/checkpoints"), json!({"prompt_id": prompt, "commit_sha": "abcdef12", "files_changed": ["login.rs"], "trigger": "auto"})).await;
        let last = self
            .command(
                &runner,
                &format!("{base}/prompts/{prompt}/complete"),
                json!({"summary": "fixed"}),
            )
            .await;
        let token = format!(
            "{}:{}",
            last["aggregate_id"].as_str().unwrap(),
            last["version"]
        );
        (session, feature, token)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        if let Some(stop) = self.projectors.take() {
            let _ = stop.send(());
        }
    }
}

pub(crate) fn token(role: Role, user: &str, workspace: &str) -> String {
    let claims = Claims::user(
        user,
        format!("User {user}"),
        workspace,
        role,
        chrono::Duration::hours(1),
    );
    canopy_auth::mint_hs256(SECRET, &claims).unwrap()
}

pub(crate) fn runner() -> String {
    canopy_auth::mint_hs256(
        SECRET,
        &Claims::runner("agent-runner", chrono::Duration::hours(1)),
    )
    .unwrap()
}

/// Waits until every event is projected (for tests that do not use read-your-writes tokens).
pub(crate) async fn wait_projected(stack: &Stack) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (events, projected): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM events WHERE aggregate_type = 'session'),
                    (SELECT COALESCE(sum(version), 0)::bigint FROM read.sessions_positions)",
        )
        .fetch_one(stack.db.pool())
        .await
        .unwrap();
        if events == projected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not projected: {projected}/{events}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
