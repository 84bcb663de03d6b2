//! A whole pipeline per test (store → relay → JetStream → projectors) and a mixed workload.

use std::sync::Arc;
use std::time::Duration;

use canopy_domain::session::SessionPolicy;
use canopy_domain::session::{CheckpointTrigger, ToolPhase, ToolStatus};
use canopy_domain::{Actor, Feature, FeatureCommand, Role, Session, SessionCommand};
use canopy_event_store::{ActorKind, AggregateStore, EventMetadata, StoreConfig};
use canopy_projectors::{Projectors, ProjectorsConfig};
use canopy_relay::{Relay, RelayConfig};
use canopy_testkit::{TestDb, TestNats};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub(crate) struct Pipeline {
    pub(crate) db: TestDb,
    pub(crate) nats: TestNats,
    pub(crate) store: AggregateStore,
    relay: Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>,
}

pub(crate) struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) task: JoinHandle<Result<(), canopy_projectors::ProjectorError>>,
}

impl Running {
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

impl Pipeline {
    /// Postgres, NATS and a relay publishing into this test's stream.
    pub(crate) async fn start() -> Self {
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
        let mut config = RelayConfig::with_stream(
            nats.prefix.to_uppercase(),
            format!("{}.events", nats.prefix),
        );
        config.poll_interval = Duration::from_millis(200);
        // each service has its own pool, as separate processes would
        let relay = Relay::new(config, db.new_pool(4).await.unwrap(), nats.client.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            relay
                .run_until(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            db,
            nats,
            store,
            relay: Some((stop, task)),
        }
    }

    pub(crate) fn pool(&self) -> &PgPool {
        self.db.pool()
    }

    pub(crate) fn projectors_config(&self) -> ProjectorsConfig {
        let mut config = ProjectorsConfig::new(
            self.nats.prefix.to_uppercase(),
            format!("{}.events", self.nats.prefix),
        );
        config.ack_wait = Duration::from_secs(1);
        config
    }

    pub(crate) async fn run_projectors(&self, config: ProjectorsConfig) -> Running {
        let pool = self.db.new_pool(8).await.unwrap();
        let projectors = Projectors::new(config, pool, self.nats.client.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            projectors
                .run_until(async {
                    let _ = stopped.await;
                })
                .await
        });
        Running {
            stop: Some(stop),
            task,
        }
    }

    /// Waits until every committed event is reflected in every projection's positions.
    pub(crate) async fn wait_projected(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let (events, sessions, timeline, features): (i64, i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM events),
                        (SELECT COALESCE(sum(version), 0)::bigint FROM read.sessions_positions),
                        (SELECT COALESCE(sum(version), 0)::bigint FROM read.timeline_positions),
                        (SELECT COALESCE(sum(version), 0)::bigint FROM read.features_positions)",
            )
            .fetch_one(self.pool())
            .await
            .unwrap();
            let session_events: i64 =
                sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'session'")
                    .fetch_one(self.pool())
                    .await
                    .unwrap();
            if sessions == session_events
                && timeline == session_events
                && sessions + features == events
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not projected in time: {events} events, sessions {sessions}, timeline {timeline}, features {features}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Pipeline {
    /// Rebuilds every projection into its shadow tables and asserts they equal the live ones.
    pub(crate) async fn assert_every_read_model_equals_its_rebuild(&self, context: &str) {
        for projection in canopy_projectors::Projection::ALL {
            canopy_projectors::rebuild(
                self.pool(),
                projection,
                &canopy_projectors::RebuildOptions {
                    batch_size: 500,
                    swap: false,
                },
            )
            .await
            .unwrap();
            let differences = canopy_projectors::compare_with_shadow(self.pool(), projection)
                .await
                .unwrap();
            assert!(
                differences.is_empty(),
                "{context} {}: {differences:?}",
                projection.name()
            );
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if let Some((stop, _)) = self.relay.take() {
            let _ = stop.send(());
        }
    }
}

fn meta(actor: &Actor) -> EventMetadata {
    let kind = if actor.role == Role::Runner {
        ActorKind::Service
    } else {
        ActorKind::User
    };
    EventMetadata::new(&actor.id, &actor.name, kind)
}

pub(crate) fn owner() -> Actor {
    Actor::person("owner", "Olive Owner", Role::Owner, "w1")
}

pub(crate) fn member(i: usize) -> Actor {
    Actor::person(
        format!("member-{i}"),
        format!("Member {i}"),
        Role::Member,
        "w1",
    )
}

pub(crate) fn runner() -> Actor {
    Actor::runner("agent-runner", "agent-runner")
}

pub(crate) async fn session(store: &AggregateStore, id: Uuid, command: SessionCommand) {
    let actor = command.actor().clone();
    store
        .execute::<Session>(
            &id.to_string(),
            command,
            &SessionPolicy::default(),
            &meta(&actor),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("session command refused: {e}"));
}

pub(crate) async fn feature(store: &AggregateStore, id: Uuid, command: FeatureCommand) {
    let actor = command.actor().clone();
    store
        .execute::<Feature>(&id.to_string(), command, &(), &meta(&actor), None)
        .await
        .unwrap_or_else(|e| panic!("feature command refused: {e}"));
}

/// A realistic session: started under a feature, prompts that run through plan review, tool
/// approval, tools, usage and checkpoints; some rejected plans, cancelled and failed prompts, a
/// restore. About `events` events.
pub(crate) async fn busy_session(
    store: &AggregateStore,
    feature_id: Uuid,
    seed: usize,
    events: usize,
) -> Uuid {
    let id = Uuid::new_v4();
    let author = member(seed % 5);
    session(
        store,
        id,
        SessionCommand::StartSession {
            actor: author.clone(),
            session_id: id,
            workspace_id: "w1".into(),
            feature_id: Some(feature_id),
            title: format!("Session {seed}"),
            repository_url: "https://git.example.invalid/app.git".into(),
            base_branch: "main".into(),
            session_branch: format!("canopy/s{seed}"),
        },
    )
    .await;
    feature(
        store,
        feature_id,
        FeatureCommand::AttachSession {
            actor: author.clone(),
            session_id: id,
        },
    )
    .await;
    let mut written = 2;
    let mut round = 0;
    let mut checkpoint = None;
    while written < events {
        round += 1;
        let prompt = Uuid::new_v4();
        session(
            store,
            id,
            SessionCommand::SubmitPrompt {
                actor: member(round % 5),
                prompt_id: prompt,
                text: format!("Prompt {round} of session {seed}: please do the thing"),
            },
        )
        .await;
        written += if round == 1 { 1 } else { 2 }; // later authors may join first
        if round % 7 == 3 {
            session(
                store,
                id,
                SessionCommand::CancelPrompt {
                    actor: owner(),
                    prompt_id: prompt,
                },
            )
            .await;
            written += 1;
            continue;
        }
        session(
            store,
            id,
            SessionCommand::StartPrompt {
                actor: runner(),
                prompt_id: prompt,
            },
        )
        .await;
        if round % 5 == 4 {
            session(
                store,
                id,
                SessionCommand::FailPrompt {
                    actor: runner(),
                    prompt_id: prompt,
                    reason: "model unreachable".into(),
                },
            )
            .await;
            written += 2;
            continue;
        }
        let plan = Uuid::new_v4();
        session(
            store,
            id,
            SessionCommand::ProposePlan {
                actor: runner(),
                plan_id: plan,
                prompt_id: prompt,
                summary: "Edit the parser".into(),
                steps: vec!["read".into(), "edit".into()],
            },
        )
        .await;
        if round % 4 == 2 {
            session(
                store,
                id,
                SessionCommand::RejectPlan {
                    actor: owner(),
                    plan_id: plan,
                    comment: "smaller please".into(),
                },
            )
            .await;
            let second = Uuid::new_v4();
            session(
                store,
                id,
                SessionCommand::ProposePlan {
                    actor: runner(),
                    plan_id: second,
                    prompt_id: prompt,
                    summary: "Smaller edit".into(),
                    steps: vec!["edit".into()],
                },
            )
            .await;
            session(
                store,
                id,
                SessionCommand::ApprovePlan {
                    actor: owner(),
                    plan_id: second,
                },
            )
            .await;
            written += 3;
        } else {
            session(
                store,
                id,
                SessionCommand::ApprovePlan {
                    actor: owner(),
                    plan_id: plan,
                },
            )
            .await;
            written += 1;
        }
        session(
            store,
            id,
            SessionCommand::RecordToolExecution {
                actor: runner(),
                prompt_id: prompt,
                call_id: format!("call_{round}_r"),
                tool: "read".into(),
                phase: ToolPhase::Build,
                input_summary: "src/lib.rs".into(),
                output_summary: "120 lines".into(),
                status: ToolStatus::Completed,
                duration_ms: 12,
            },
        )
        .await;
        let request = Uuid::new_v4();
        let call = format!("call_{round}_b");
        session(
            store,
            id,
            SessionCommand::RequestToolApproval {
                actor: runner(),
                request_id: request,
                prompt_id: prompt,
                call_id: call.clone(),
                tool: "bash".into(),
                input_summary: "cargo test".into(),
            },
        )
        .await;
        let denied = round % 6 == 5;
        if denied {
            session(
                store,
                id,
                SessionCommand::DenyToolApproval {
                    actor: owner(),
                    request_id: request,
                    comment: Some("not now".into()),
                },
            )
            .await;
        } else {
            session(
                store,
                id,
                SessionCommand::GrantToolApproval {
                    actor: owner(),
                    request_id: request,
                },
            )
            .await;
        }
        session(
            store,
            id,
            SessionCommand::RecordToolExecution {
                actor: runner(),
                prompt_id: prompt,
                call_id: call,
                tool: "bash".into(),
                phase: ToolPhase::Build,
                input_summary: "cargo test".into(),
                output_summary: if denied { "".into() } else { "ok".into() },
                status: if denied {
                    ToolStatus::Denied
                } else if round % 3 == 0 {
                    ToolStatus::Failed
                } else {
                    ToolStatus::Completed
                },
                duration_ms: 1500 + round as u64,
            },
        )
        .await;
        session(
            store,
            id,
            SessionCommand::RecordAgentMessage {
                actor: runner(),
                prompt_id: prompt,
                message_id: format!("msg_{round}"),
                text: "Done.".into(),
            },
        )
        .await;
        session(
            store,
            id,
            SessionCommand::RecordUsage {
                actor: runner(),
                prompt_id: prompt,
                tokens_in: 1000 + round as u64,
                tokens_out: 200,
                cost_micro_usd: 3000,
            },
        )
        .await;
        let cp = Uuid::new_v4();
        session(
            store,
            id,
            SessionCommand::RecordCheckpoint {
                actor: runner(),
                checkpoint_id: cp,
                prompt_id: Some(prompt),
                label: Some(format!("after {round}")),
                commit_sha: format!("{:040x}", round),
                files_changed: vec!["src/lib.rs".into()],
                trigger: CheckpointTrigger::Auto,
            },
        )
        .await;
        session(
            store,
            id,
            SessionCommand::CompletePrompt {
                actor: runner(),
                prompt_id: prompt,
                summary: Some("done".into()),
            },
        )
        .await;
        written += 10;
        if round % 8 == 6
            && let Some(earlier) = checkpoint
        {
            session(
                store,
                id,
                SessionCommand::RequestRestore {
                    actor: owner(),
                    checkpoint_id: earlier,
                },
            )
            .await;
            session(
                store,
                id,
                SessionCommand::RecordRestore {
                    actor: runner(),
                    checkpoint_id: earlier,
                },
            )
            .await;
            written += 2;
        }
        checkpoint = Some(cp);
    }
    id
}

/// Runs `sessions` busy sessions of about `events_each` events, a few at a time.
pub(crate) async fn workload(
    store: &AggregateStore,
    sessions: usize,
    events_each: usize,
) -> (Uuid, Vec<Uuid>) {
    let feature_id = Uuid::new_v4();
    feature(
        store,
        feature_id,
        FeatureCommand::CreateFeature {
            actor: owner(),
            feature_id,
            workspace_id: "w1".into(),
            title: "Parser".into(),
            description: "".into(),
        },
    )
    .await;
    let store = Arc::new(store.clone());
    let mut ids = Vec::new();
    for chunk in (0..sessions).collect::<Vec<_>>().chunks(8) {
        let mut tasks = Vec::new();
        for &seed in chunk {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                busy_session(&store, feature_id, seed, events_each).await
            }));
        }
        for task in tasks {
            ids.push(task.await.unwrap());
        }
    }
    (feature_id, ids)
}
