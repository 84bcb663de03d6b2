//! A command-api started in-process on port 0 over a fresh database, and helpers to drive it.

use std::sync::Arc;

use canopy_auth::Claims;
use canopy_command_api::Config;
use canopy_domain::Role;
use canopy_testkit::TestDb;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

pub(crate) const SECRET: &str = "command-api-test-secret-0123456789";
pub(crate) const WORKSPACE: &str = "w1";

/// One running command-api ("process") over a test database.
pub(crate) struct TestApp {
    pub(crate) base: String,
    pub(crate) db: Arc<TestDb>,
    client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// An HTTP answer.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: Value,
}

impl Answer {
    pub(crate) fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    #[track_caller]
    pub(crate) fn expect(self, status: u16) -> Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected answer: {:?}",
            self.body
        );
        self
    }

    #[track_caller]
    pub(crate) fn problem(self, status: u16, code: &str) -> Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected answer: {:?}",
            self.body
        );
        assert_eq!(self.code(), code, "unexpected problem: {:?}", self.body);
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "problems are problem+json"
        );
        self
    }

    pub(crate) fn id(&self) -> Uuid {
        self.body["id"].as_str().unwrap().parse().unwrap()
    }
}

impl TestApp {
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub(crate) async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        let db = Arc::new(canopy_testkit::database().await.unwrap());
        Self::on(db, configure).await
    }

    /// Another command-api process over the same database.
    pub(crate) async fn another_process(&self) -> Self {
        Self::on(self.db.clone(), |_| {}).await
    }

    async fn on(db: Arc<TestDb>, configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::for_database(db.url.clone());
        config.jwt_secret = SECRET.to_owned();
        config.rate_limit_per_second = 1000;
        config.rate_limit_burst = 1000;
        config.db_max_connections = 8;
        configure(&mut config);
        let app = canopy_command_api::build(config).await.unwrap();
        let base = format!("http://{}", app.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            base,
            db,
            client: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops serving and waits for in-flight requests to finish.
    pub(crate) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    pub(crate) fn pool(&self) -> &sqlx::PgPool {
        self.db.pool()
    }

    pub(crate) async fn post(&self, token: &str, path: &str, body: Value) -> Answer {
        self.send(token, path, Some(body), &[]).await
    }

    pub(crate) async fn send(
        &self,
        token: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        answer(request.send().await.unwrap()).await
    }

    pub(crate) async fn raw(&self, request: reqwest::RequestBuilder) -> Answer {
        answer(request.send().await.unwrap()).await
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base))
    }

    pub(crate) async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    pub(crate) async fn event_types(&self, aggregate_id: Uuid) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence",
        )
        .bind(aggregate_id.to_string())
        .fetch_all(self.pool())
        .await
        .unwrap()
    }

    // ---- scenario helpers (each asserts its own success) ----

    pub(crate) async fn start_session(&self, token: &str) -> Uuid {
        self.post(
            token,
            "/sessions",
            json!({"title": "Fix the login bug", "repository_url": "https://git.example.invalid/app.git", "base_branch": "main"}),
        )
        .await
        .expect(201)
        .id()
    }

    pub(crate) async fn submit_prompt(&self, token: &str, session: Uuid) -> Uuid {
        self.post(
            token,
            &format!("/sessions/{session}/prompts"),
            json!({"text": "add a test"}),
        )
        .await
        .expect(201)
        .id()
    }

    pub(crate) async fn runner(&self, path: &str, body: Value) -> Answer {
        let key = Uuid::new_v4().to_string();
        self.send(&runner(), path, Some(body), &[("idempotency-key", &key)])
            .await
    }

    /// A session whose prompt (by `author`) is running with a pending plan.
    pub(crate) async fn with_pending_plan(&self, author: &str) -> (Uuid, Uuid, Uuid) {
        let session = self.start_session(&token(Role::Owner, "owner")).await;
        let prompt = self.submit_prompt(author, session).await;
        self.runner(
            &format!("/runner/sessions/{session}/prompts/{prompt}/start"),
            json!({}),
        )
        .await
        .expect(202);
        let plan = self
            .runner(
                &format!("/runner/sessions/{session}/plans"),
                json!({"prompt_id": prompt, "summary": "edit login.rs", "steps": ["read", "edit"]}),
            )
            .await
            .expect(201)
            .id();
        (session, prompt, plan)
    }

    /// A session with a running prompt, an approved plan and an open tool approval request.
    pub(crate) async fn with_open_tool_request(&self) -> (Uuid, Uuid, Uuid) {
        let (session, prompt, plan) = self.with_pending_plan(&token(Role::Member, "m1")).await;
        self.post(
            &token(Role::Owner, "owner"),
            &format!("/sessions/{session}/plans/{plan}/approve"),
            json!({}),
        )
        .await
        .expect(202);
        let request = self
            .runner(
                &format!("/runner/sessions/{session}/tool-approvals"),
                json!({"prompt_id": prompt, "call_id": "call_1", "tool": "bash", "input_summary": "rm -rf target"}),
            )
            .await
            .expect(201)
            .id();
        (session, prompt, request)
    }

    /// A session with one checkpoint taken.
    pub(crate) async fn with_checkpoint(&self) -> (Uuid, Uuid) {
        let session = self.start_session(&token(Role::Owner, "owner")).await;
        let checkpoint = self
            .runner(
                &format!("/runner/sessions/{session}/checkpoints"),
                json!({"commit_sha": "0123456789abcdef", "files_changed": ["src/login.rs"], "trigger": "manual", "label": "before refactor"}),
            )
            .await
            .expect(201)
            .id();
        (session, checkpoint)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        headers,
        body,
    }
}

/// A token for a person of workspace `w1`.
pub(crate) fn token(role: Role, user: &str) -> String {
    token_in(role, user, WORKSPACE)
}

pub(crate) fn token_in(role: Role, user: &str, workspace: &str) -> String {
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
