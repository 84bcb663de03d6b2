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

    /// A command-api whose database connections go through a [`CommitCutter`].
    pub(crate) async fn start_through_commit_cutter(
        configure: impl FnOnce(&mut Config),
    ) -> (Self, CommitCutter) {
        let db = Arc::new(canopy_testkit::database().await.unwrap());
        let cutter = CommitCutter::start(&db.url).await;
        let url = cutter.url(&db.url);
        let app = Self::on(db, |config| {
            config.database = canopy_config::DatabaseArgs::new(url);
            configure(config);
        })
        .await;
        (app, cutter)
    }

    /// Another command-api process over the same database.
    pub(crate) async fn another_process(&self) -> Self {
        Self::on(self.db.clone(), |_| {}).await
    }

    /// Another command-api process over the same database, configured by `configure`.
    pub(crate) async fn another_process_with(&self, configure: impl FnOnce(&mut Config)) -> Self {
        Self::on(self.db.clone(), configure).await
    }

    async fn on(db: Arc<TestDb>, configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::for_database(db.url.clone());
        config.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
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

pub(crate) async fn answer(response: reqwest::Response) -> Answer {
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

/// A TCP proxy in front of Postgres that, once armed, cuts the connection carrying the next
/// transaction's `COMMIT` acknowledgement: the database has committed, the app never hears so
/// (as when the network or the server's process fails right after a commit).
pub(crate) struct CommitCutter {
    addr: std::net::SocketAddr,
    armed: Arc<std::sync::atomic::AtomicBool>,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl CommitCutter {
    /// The `CommandComplete` message of a `COMMIT` in the wire protocol.
    const COMMIT_COMPLETE: &[u8] = b"C\0\0\0\x0bCOMMIT\0";

    /// Proxies to the Postgres of `database_url` (a TCP address).
    pub(crate) async fn start(database_url: &str) -> Self {
        let url = reqwest::Url::parse(database_url).unwrap();
        let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cuts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accept = tokio::spawn({
            let (armed, cuts) = (armed.clone(), cuts.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    tokio::spawn(Self::pipe(client, server, armed.clone(), cuts.clone()));
                }
            }
        });
        Self {
            addr,
            armed,
            cuts,
            accept,
        }
    }

    /// `database_url` with the proxy in place of the server (and no TLS, so COMMIT is visible).
    pub(crate) fn url(&self, database_url: &str) -> String {
        let mut url = reqwest::Url::parse(database_url).unwrap();
        url.set_host(Some(&self.addr.ip().to_string())).unwrap();
        url.set_port(Some(self.addr.port())).unwrap();
        url.query_pairs_mut().append_pair("sslmode", "disable");
        url.to_string()
    }

    /// Cuts the connection of the next COMMIT acknowledgement, once.
    pub(crate) fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn cuts(&self) -> usize {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn pipe(
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        armed: Arc<std::sync::atomic::AtomicBool>,
        cuts: Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let upstream = tokio::io::copy(&mut client_read, &mut server_write);
        let downstream = async {
            let mut buffer = vec![0u8; 64 * 1024];
            // the end of the previous read, so a message split across reads is still seen
            let mut tail: Vec<u8> = Vec::new();
            loop {
                let read = match server_read.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => read,
                };
                let chunk = &buffer[..read];
                tail.extend_from_slice(chunk);
                let seen = tail
                    .windows(Self::COMMIT_COMPLETE.len())
                    .any(|w| w == Self::COMMIT_COMPLETE);
                if seen && armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return; // both sockets close: the acknowledgement is lost
                }
                let keep = tail.len().min(Self::COMMIT_COMPLETE.len() - 1);
                tail.drain(..tail.len() - keep);
                if client_write.write_all(chunk).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = upstream => {}
            () = downstream => {}
        }
    }
}

impl Drop for CommitCutter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
