//! Webhook delivery bench: Postgres, NATS, the relay and the delivery service in process, the
//! receiver (`scripts/bench/webhook_receiver.py`) in its own process over real sockets.
//!
//! `ENDPOINTS` subscriptions of one workspace to `SessionStarted`; sessions are started at a
//! steady rate (one event each, one command each, `WRITERS` writers) for a while, then the bench
//! waits for every delivery. Prints deliveries per second (first to last receipt) and commit →
//! delivery latency p50/p99/max (the event's `recorded_at`, when its transaction started, to the
//! receiver's clock on the same host).

use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy_domain::session::SessionPolicy;
use canopy_domain::{Actor, Role, Session, SessionCommand};
use canopy_event_store::{ActorKind, AggregateStore, EventMetadata, StoreConfig};
use canopy_relay::{Relay, RelayConfig};
use canopy_webhook::TargetPolicy;
use canopy_webhooks::{DeliverySettings, Webhooks};
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

const ENDPOINTS: usize = 4;
/// (sessions started per second, seconds): a steady load well below what the stack delivers
/// (commit -> delivery latency), then one above it (deliveries per second).
const PHASES: [(u64, u64); 2] = [(25, 10), (150, 10)];
const WRITERS: usize = 8;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let stream = canopy_config::StreamArgs::new(
        nats.prefix.to_uppercase(),
        format!("{}.events", nats.prefix),
    );
    let mut relay_config = RelayConfig::with_stream(
        stream.stream_name.clone(),
        stream.subject_prefix().to_owned(),
    );
    relay_config.poll_interval = Duration::from_millis(200);
    let relay = Relay::new(relay_config, db.new_pool(4).await?, nats.client.clone());
    tokio::spawn(async move { relay.run_until(std::future::pending()).await });

    // the receiver, its own process
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/bench/webhook_receiver.py"
    );
    let mut receiver = tokio::process::Command::new("python3")
        .arg(script)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(receiver.stdout.take().expect("piped")).lines();
    let port: u16 = lines
        .next_line()
        .await?
        .expect("the receiver's port")
        .parse()?;

    // subscriptions, as the consumer would record them from command-api's events
    let store = AggregateStore::new(db.pool().clone(), StoreConfig::default());
    let owner = Actor::person("olive", "Olive", Role::Owner, "w1");
    let meta = EventMetadata::new("olive", "Olive", ActorKind::User);
    for n in 0..ENDPOINTS {
        let id = Uuid::new_v4();
        store
            .execute::<canopy_domain::Webhook>(
                &id.to_string(),
                canopy_domain::WebhookCommand::Subscribe {
                    actor: owner.clone(),
                    webhook_id: id,
                    workspace_id: "w1".into(),
                    url: format!("http://127.0.0.1:{port}/hook/{n}"),
                    event_types: vec!["SessionStarted".into()],
                    description: String::new(),
                    secret_fingerprint: "bench".into(),
                },
                &(),
                &meta,
                None,
            )
            .await?;
        sqlx::query("INSERT INTO webhook_secrets (webhook_id, version, secret) VALUES ($1, 1, $2)")
            .bind(id)
            .bind(canopy_webhook::generate_secret())
            .execute(db.pool())
            .await?;
    }
    let mut settings = DeliverySettings::defaults();
    settings.poll = Duration::from_millis(100);
    let webhooks = Webhooks::new(
        db.new_pool(16).await?,
        nats.client.clone(),
        stream,
        settings,
        TargetPolicy {
            allow_insecure: true,
        },
        Arc::new(canopy_webhook::SystemResolver),
    );
    tokio::spawn(webhooks.run_until(std::future::pending()));

    // warm-up: one event through every endpoint (consumer created, connections open)
    let id = Uuid::new_v4();
    store
        .execute::<Session>(
            &id.to_string(),
            SessionCommand::StartSession {
                actor: Actor::person("mia", "Mia", Role::Member, "w1"),
                session_id: id,
                workspace_id: "w1".into(),
                feature_id: None,
                title: "warm-up".into(),
                repository_url: "https://git.example.invalid/app.git".into(),
                base_branch: "main".into(),
                session_branch: "canopy/bench".into(),
            },
            &SessionPolicy::default(),
            &EventMetadata::new("mia", "Mia", ActorKind::User),
            None,
        )
        .await?;
    for _ in 0..ENDPOINTS {
        lines.next_line().await?.expect("the warm-up's deliveries");
    }

    for (rate, seconds) in PHASES {
        let total = (rate * seconds) as usize;
        let started = Instant::now();
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let member = Actor::person("mia", "Mia", Role::Member, "w1");
                let meta = EventMetadata::new("mia", "Mia", ActorKind::User);
                let mut tick =
                    tokio::time::interval(Duration::from_micros(1_000_000 * WRITERS as u64 / rate));
                for _ in (w..total).step_by(WRITERS) {
                    tick.tick().await;
                    let id = Uuid::new_v4();
                    store
                        .execute::<Session>(
                            &id.to_string(),
                            SessionCommand::StartSession {
                                actor: member.clone(),
                                session_id: id,
                                workspace_id: "w1".into(),
                                feature_id: None,
                                title: "bench".into(),
                                repository_url: "https://git.example.invalid/app.git".into(),
                                base_branch: "main".into(),
                                session_branch: "canopy/bench".into(),
                            },
                            &SessionPolicy::default(),
                            &meta,
                            None,
                        )
                        .await
                        .expect("start a session");
                }
            }));
        }

        let expected = total * ENDPOINTS;
        let mut latencies = Vec::with_capacity(expected);
        let mut first = None;
        let mut last = 0.0;
        let deadline = Instant::now() + Duration::from_secs(seconds * 10 + 60);
        while latencies.len() < expected {
            let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
                .await
                .map_err(|_| anyhow::anyhow!("only {} of {expected} delivered", latencies.len()))??
                .expect("the receiver is running");
            let mut parts = line.split(' ');
            let _id = parts.next();
            let received: f64 = parts.next().expect("received").parse()?;
            let recorded: f64 = parts.next().expect("recorded").parse()?;
            first.get_or_insert(received);
            last = received;
            latencies.push(received - recorded);
        }
        for writer in writers {
            writer.await?;
        }
        let wrote = started.elapsed();
        latencies.sort_by(f64::total_cmp);
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        let span = (last - first.unwrap_or(last)) / 1000.0;
        let per_second = expected as f64 / span.max(0.001);
        let line = format!(
            "webhooks: {expected} deliveries ({total} events x {ENDPOINTS} endpoints, offered {rate} events/s for {seconds} s, written in {:.1} s): \
         {per_second:.0} deliveries/s ({:.0} events/s per endpoint); commit -> delivery p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            wrote.as_secs_f64(),
            per_second / ENDPOINTS as f64,
            at(0.5),
            at(0.99),
            at(1.0),
        );
        std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes())?;
    }
    receiver.kill().await?;
    Ok(())
}
