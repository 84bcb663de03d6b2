//! canopy-webhooks: delivers a workspace's events to the endpoints subscribed to them.
//!
//! - [`consumer`]: one durable JetStream pull consumer over every event. A webhook event
//!   updates `webhook_subscriptions` (in each subscription's sequence order, filling a gap from
//!   the event store with `canopy_relay::history`); any other event gets one outbox row in
//!   `webhook_deliveries` per subscription of its workspace and type created before it in relay
//!   order (idempotent on (subscription, event): a redelivery inserts nothing). The batch's
//!   messages are acknowledged after its transaction commits. Postgres is the truth; the stream
//!   is the wake-up and the order.
//! - [`deliver`]: a scheduler starts one worker per endpoint whose oldest pending delivery is
//!   due, at most `concurrency` at once. A worker holds the endpoint (a transaction-scoped
//!   advisory lock, so two processes never deliver to one endpoint at once and a killed one
//!   lets go), POSTs the oldest pending delivery (per-endpoint order), records the attempt
//!   (status, latency, error) in `webhook_attempts`, and goes on, or schedules a retry
//!   (`retry_schedule`), dead-letters after the last attempt, and suspends an endpoint whose
//!   deliveries keep dying. A slow endpoint holds only its own worker.
//! - [`body`]: what is POSTed: the relay's JSON envelope, read back from the event store, plus
//!   `links` (the session in query-api; for plans and tool asks, the approve and reject
//!   commands), signed per Standard Webhooks (`canopy_webhook::sign`).
//!
//! A delivery never touches the write path: command-api only appends events (and a secret).

pub mod body;
mod consumer;
pub mod deliver;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use canopy_webhook::{Resolver, SystemResolver, TargetPolicy};
use sqlx::PgPool;

/// The delivery service's own settings (flags or `CANOPY_WEBHOOKS_*` variables).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Webhooks")]
pub struct DeliverySettings {
    /// Name of the durable JetStream consumer.
    #[arg(
        id = "webhooks_consumer",
        long = "webhooks-consumer",
        env = "CANOPY_WEBHOOKS_CONSUMER",
        default_value = "canopy-webhooks"
    )]
    pub consumer: String,
    /// Waits between attempts of one delivery (comma-separated durations); one attempt more
    /// than waits, then the delivery is dead-lettered.
    #[arg(id = "webhooks_retry_schedule", long = "webhooks-retry-schedule", env = "CANOPY_WEBHOOKS_RETRY_SCHEDULE",
        value_delimiter = ',', value_parser = canopy_config::parse_duration,
        default_value = "5s,5m,30m,2h,5h,10h,10h")]
    pub retry_schedule: Vec<Duration>,
    /// Time limit of one attempt (connect, send, answer and the bounded read of its body).
    #[arg(id = "webhooks_request_timeout", long = "webhooks-request-timeout", env = "CANOPY_WEBHOOKS_REQUEST_TIMEOUT",
        value_parser = canopy_config::parse_duration, default_value = "15s")]
    pub request_timeout: Duration,
    /// Endpoints delivered to at once (each endpoint gets one delivery at a time, in order).
    #[arg(id = "webhooks_concurrency", long = "webhooks-concurrency", env = "CANOPY_WEBHOOKS_CONCURRENCY", default_value_t = 32,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Dead-lettered deliveries in a row after which an endpoint is suspended until resumed.
    #[arg(id = "webhooks_suspend_after", long = "webhooks-suspend-after", env = "CANOPY_WEBHOOKS_SUSPEND_AFTER", default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub suspend_after: u32,
    /// How long a rotated-out secret still signs (a second signature).
    #[arg(id = "webhooks_secret_grace", long = "webhooks-secret-grace", env = "CANOPY_WEBHOOKS_SECRET_GRACE",
        value_parser = canopy_config::parse_duration, default_value = "24h")]
    pub secret_grace: Duration,
    /// How often due retries are looked for (new events wake the workers at once).
    #[arg(id = "webhooks_poll", long = "webhooks-poll", env = "CANOPY_WEBHOOKS_POLL",
        value_parser = canopy_config::parse_duration, default_value = "1s")]
    pub poll: Duration,
    /// How long JetStream waits for the consumer's acknowledgement before redelivering.
    #[arg(id = "webhooks_ack_wait", long = "webhooks-ack-wait", env = "CANOPY_WEBHOOKS_ACK_WAIT",
        value_parser = canopy_config::parse_duration, default_value = "30s")]
    pub ack_wait: Duration,
    /// query-api's public base URL, for the `links.session` of a delivery.
    #[arg(
        id = "webhooks_query_api_url",
        long = "webhooks-query-api-url",
        env = "CANOPY_WEBHOOKS_QUERY_API_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub query_api_url: String,
    /// command-api's public base URL, for the approve and reject links of a delivery.
    #[arg(
        id = "webhooks_command_api_url",
        long = "webhooks-command-api-url",
        env = "CANOPY_WEBHOOKS_COMMAND_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub command_api_url: String,
}

impl DeliverySettings {
    /// The defaults (what the binary runs with when nothing is set).
    pub fn defaults() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            settings: DeliverySettings,
        }
        Defaults::parse_from(["canopy-webhooks"]).settings
    }
}

/// Everything the service reads.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub database: canopy_config::DatabaseArgs,
    #[command(flatten)]
    pub nats: canopy_config::NatsArgs,
    #[command(flatten)]
    pub stream: canopy_config::StreamArgs,
    #[command(flatten)]
    pub targets: canopy_config::WebhookTargetArgs,
    #[command(flatten)]
    pub settings: DeliverySettings,
}

/// A built delivery service, ready to run.
#[derive(Debug)]
pub struct Webhooks {
    pool: PgPool,
    jetstream: async_nats::jetstream::Context,
    stream: canopy_config::StreamArgs,
    settings: Arc<DeliverySettings>,
    policy: TargetPolicy,
    resolver: Arc<dyn Resolver>,
}

/// Connects to the database (waiting for the migrations) and NATS.
pub async fn build(config: Config) -> anyhow::Result<Webhooks> {
    build_with_resolver(config, Arc::new(SystemResolver)).await
}

/// [`build`] with the resolver targets are checked through before each delivery.
pub async fn build_with_resolver(
    config: Config,
    resolver: Arc<dyn Resolver>,
) -> anyhow::Result<Webhooks> {
    let mut db = canopy_event_store::DbConfig::new(config.database.url()?);
    db.application_name = "canopy-webhooks".to_owned();
    db.max_connections = config.settings.concurrency + 4;
    let pool = canopy_event_store::connect_when_ready(&db, Duration::from_secs(30))
        .await
        .context("connect to the database")?;
    canopy_event_store::migrate_if_pending(&pool)
        .await
        .context("apply migrations")?;
    let nats = canopy_config::connect_nats(
        &config.nats.url()?,
        "canopy-webhooks",
        Duration::from_secs(30),
    )
    .await?;
    Ok(Webhooks::new(
        pool,
        nats,
        config.stream,
        config.settings,
        TargetPolicy {
            allow_insecure: config.targets.webhooks_allow_insecure,
        },
        resolver,
    ))
}

impl Webhooks {
    /// From connections already made (`canopy up`, tests).
    pub fn new(
        pool: PgPool,
        nats: async_nats::Client,
        stream: canopy_config::StreamArgs,
        settings: DeliverySettings,
        policy: TargetPolicy,
        resolver: Arc<dyn Resolver>,
    ) -> Self {
        Self {
            pool,
            jetstream: async_nats::jetstream::new(nats),
            stream,
            settings: Arc::new(settings),
            policy,
            resolver,
        }
    }

    /// Consumes and delivers until `shutdown` resolves; in-flight attempts are abandoned (not
    /// recorded: they are made again, with the same `webhook-id`).
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let wake = Arc::new(tokio::sync::Notify::new());
        let consumer = tokio::spawn(consumer::run(
            self.pool.clone(),
            self.jetstream.clone(),
            self.stream.clone(),
            self.settings.clone(),
            wake.clone(),
            stopped.clone(),
        ));
        let delivery = tokio::spawn(deliver::run(
            deliver::Deliverer::new(
                self.pool.clone(),
                self.settings.clone(),
                self.policy,
                self.resolver.clone(),
            ),
            wake,
            stopped,
        ));
        shutdown.await;
        tracing::info!("webhooks shutting down");
        let _ = stop.send(true);
        let consumed = consumer.await.context("the consumer task panicked")?;
        delivery.await.context("the delivery task panicked")?;
        consumed
    }
}
