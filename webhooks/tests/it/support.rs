//! A stack per test (Postgres, NATS, the relay and command-api in process), a receiver that
//! answers as scripted and records what it got, and helpers to make session events.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use canopy_auth::Claims;
use canopy_domain::session::SessionPolicy;
use canopy_domain::{Actor, Role, Session, SessionCommand};
use canopy_event_store::{ActorKind, AggregateStore, EventMetadata, StoreConfig};
use canopy_relay::{Relay, RelayConfig};
use canopy_testkit::{TestDb, TestNats};
use canopy_webhook::{Resolver, TargetPolicy};
use canopy_webhooks::{DeliverySettings, Webhooks};
use serde_json::{Value, json};
use uuid::Uuid;

pub(crate) const SECRET: &str = "webhooks-test-secret-0123456789abcdef";
pub(crate) const WORKSPACE: &str = "w1";

/// A resolver whose answers a test sets and changes.
#[derive(Debug, Default)]
pub(crate) struct TestResolver {
    answers: Mutex<HashMap<String, Vec<IpAddr>>>,
}

impl TestResolver {
    pub(crate) fn answer(&self, host: &str, ip: &str) {
        self.answers
            .lock()
            .unwrap()
            .insert(host.to_owned(), vec![ip.parse().unwrap()]);
    }
}

impl Resolver for TestResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        _: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        let answer = self.answers.lock().unwrap().get(host).cloned();
        Box::pin(async move {
            answer.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))
        })
    }
}

/// Postgres, NATS, a relay and command-api.
pub(crate) struct Stack {
    pub(crate) db: TestDb,
    pub(crate) nats: TestNats,
    pub(crate) store: AggregateStore,
    pub(crate) command_api: String,
    pub(crate) resolver: Arc<TestResolver>,
    client: reqwest::Client,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Stack {
    /// A stack whose command-api accepts loopback http targets (`allow_insecure`) or not.
    pub(crate) async fn start(allow_insecure: bool) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let db = canopy_testkit::database().await.unwrap();
        let nats = canopy_testkit::nats().await.unwrap();
        let store = AggregateStore::new(db.pool().clone(), StoreConfig::default());
        let mut stops = Vec::new();

        let mut relay_config = RelayConfig::with_stream(
            nats.prefix.to_uppercase(),
            format!("{}.events", nats.prefix),
        );
        relay_config.poll_interval = Duration::from_millis(200);
        let relay = Relay::new(
            relay_config,
            db.new_pool(4).await.unwrap(),
            nats.client.clone(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tokio::spawn(async move {
            relay
                .run_until(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });

        let resolver = Arc::new(TestResolver::default());
        let mut config = canopy_command_api::Config::for_database(db.url.clone());
        config.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
        config.rate_limit_per_second = 1000;
        config.rate_limit_burst = 1000;
        config.db_max_connections = 4;
        config.webhook_targets.webhooks_allow_insecure = allow_insecure;
        let app = canopy_command_api::build_with_resolver(config, resolver.clone())
            .await
            .unwrap();
        let command_api = format!("http://{}", app.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            db,
            nats,
            store,
            command_api,
            resolver,
            client: reqwest::Client::new(),
            stops,
        }
    }

    pub(crate) fn stream(&self) -> canopy_config::StreamArgs {
        canopy_config::StreamArgs::new(
            self.nats.prefix.to_uppercase(),
            format!("{}.events", self.nats.prefix),
        )
    }

    /// The delivery service in process, with quick test settings changed by `configure`.
    pub(crate) async fn start_webhooks(
        &mut self,
        allow_insecure: bool,
        configure: impl FnOnce(&mut DeliverySettings),
    ) {
        let mut settings = test_settings();
        configure(&mut settings);
        let webhooks = Webhooks::new(
            self.db.new_pool(8).await.unwrap(),
            self.nats.client.clone(),
            self.stream(),
            settings,
            TargetPolicy { allow_insecure },
            self.resolver.clone(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.stops.push(stop);
        tokio::spawn(webhooks.run_until(async {
            let _ = stopped.await;
        }));
    }

    /// query-api in process; returns its base URL.
    pub(crate) async fn start_query_api(&mut self) -> String {
        let mut query = canopy_query_api::Config::for_database(self.db.url.clone());
        query.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
        query.settings.db_max_connections = 4;
        query.nats = canopy_config::NatsArgs::new(&self.nats.url);
        query.subjects.subject_prefix = format!("{}.events", self.nats.prefix);
        query.settings.presence_prefix = format!("{}.presence", self.nats.prefix);
        let app = canopy_query_api::build(query).await.unwrap();
        let base = format!("http://{}", app.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.stops.push(stop);
        tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        base
    }

    pub(crate) async fn get(&self, base: &str, token: &str, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(format!("{base}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn post(&self, token: &str, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.command_api))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Subscribes `url` to `types` as the workspace's owner; returns the id and the secret.
    pub(crate) async fn subscribe(&self, url: &str, types: &[&str]) -> (Uuid, String) {
        let (status, body) = self
            .post(
                &token(Role::Owner, "olive"),
                "/webhooks",
                json!({"url": url, "event_types": types}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["id"].as_str().unwrap().parse().unwrap(),
            body["secret"].as_str().unwrap().to_owned(),
        )
    }

    pub(crate) async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(self.db.pool())
            .await
            .unwrap()
    }

    /// Waits (polling) until `query` returns true.
    pub(crate) async fn until(&self, what: &str, query: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let done: bool = sqlx::query_scalar(query)
                .fetch_one(self.db.pool())
                .await
                .unwrap();
            if done {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A session with a running prompt, and a plan proposed for it: returns (session, plan).
    pub(crate) async fn propose_plan(&self) -> (Uuid, Uuid) {
        let session = Uuid::new_v4();
        let person = Actor::person("mia", "Mia Member", Role::Member, WORKSPACE);
        let runner = Actor::runner("agent-runner", "agent-runner");
        self.session(
            session,
            SessionCommand::StartSession {
                actor: person.clone(),
                session_id: session,
                workspace_id: WORKSPACE.into(),
                feature_id: None,
                title: "Fix the login bug".into(),
                repository_url: "https://git.example.invalid/app.git".into(),
                base_branch: "main".into(),
                session_branch: "canopy/fix".into(),
            },
        )
        .await;
        let prompt = Uuid::new_v4();
        self.session(
            session,
            SessionCommand::SubmitPrompt {
                actor: person,
                prompt_id: prompt,
                text: "please fix it".into(),
            },
        )
        .await;
        self.session(
            session,
            SessionCommand::StartPrompt {
                actor: runner.clone(),
                prompt_id: prompt,
            },
        )
        .await;
        let plan = Uuid::new_v4();
        self.session(
            session,
            SessionCommand::ProposePlan {
                actor: runner,
                plan_id: plan,
                prompt_id: prompt,
                summary: "Edit the parser".into(),
                steps: vec!["read".into(), "edit".into()],
            },
        )
        .await;
        (session, plan)
    }

    async fn session(&self, id: Uuid, command: SessionCommand) {
        let actor = command.actor().clone();
        let kind = if actor.is_runner() {
            ActorKind::Service
        } else {
            ActorKind::User
        };
        self.store
            .execute::<Session>(
                &id.to_string(),
                command,
                &SessionPolicy::default(),
                &EventMetadata::new(&actor.id, &actor.name, kind),
                None,
            )
            .await
            .unwrap();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

/// Quick settings: retries every 50 ms (three of them), polls every 20 ms.
pub(crate) fn test_settings() -> DeliverySettings {
    let mut settings = DeliverySettings::defaults();
    settings.consumer = "webhooks-test".into();
    settings.retry_schedule = vec![Duration::from_millis(50); 3];
    settings.poll = Duration::from_millis(20);
    settings.request_timeout = Duration::from_secs(5);
    settings.ack_wait = Duration::from_secs(1);
    settings.query_api_url = "https://query.example".into();
    settings.command_api_url = "https://command.example".into();
    settings
}

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

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    /// 302 to this URL.
    Redirect(String),
    Status(u16),
    /// Never answers.
    Hang,
    /// Answers 200 after a while.
    Slowly(Duration),
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) at: std::time::Instant,
}

impl Received {
    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers[name].to_str().unwrap()
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Debug, Default)]
struct ReceiverState {
    script: VecDeque<Answer>,
    received: Vec<Received>,
}

/// A local HTTP receiver on loopback: answers as scripted (then 200) and records every request.
#[derive(Debug, Clone)]
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    got: Arc<tokio::sync::Notify>,
}

impl Receiver {
    pub(crate) async fn start(script: &[Answer]) -> Self {
        let state = Arc::new(Mutex::new(ReceiverState {
            script: script.iter().cloned().collect(),
            received: Vec::new(),
        }));
        let got = Arc::new(tokio::sync::Notify::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = {
            let state = state.clone();
            let got = got.clone();
            axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                let got = got.clone();
                async move {
                    let answer = {
                        let mut state = state.lock().unwrap();
                        state.received.push(Received {
                            headers,
                            body,
                            at: std::time::Instant::now(),
                        });
                        state.script.pop_front().unwrap_or(Answer::Status(200))
                    };
                    got.notify_waiters();
                    match answer {
                        Answer::Redirect(to) => {
                            (StatusCode::FOUND, [(axum::http::header::LOCATION, to)])
                                .into_response()
                        }
                        Answer::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
                        Answer::Hang => {
                            std::future::pending::<()>().await;
                            StatusCode::OK.into_response()
                        }
                        Answer::Slowly(wait) => {
                            tokio::time::sleep(wait).await;
                            StatusCode::OK.into_response()
                        }
                    }
                }
            })
        };
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, state, got }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// Waits until at least `n` requests arrived.
    pub(crate) async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let notified = self.got.notified();
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "the receiver got {} requests, not {n}",
                received.len()
            );
        }
    }
}
