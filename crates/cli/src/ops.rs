//! Operator subcommands over the relay and the projections.

use anyhow::{Context, Result};
use canopy_event_store::{DbConfig, PgPool};
use canopy_projectors::{Projection, RebuildOptions};
use canopy_relay::RelayConfig;

use crate::DatabaseArgs;

/// Where the event stream lives.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayStreamArgs {
    #[command(flatten)]
    pub nats: canopy_config::NatsArgs,
    #[command(flatten)]
    pub stream: canopy_config::StreamArgs,
    #[command(flatten)]
    pub replicas: canopy_config::StreamReplicasArgs,
}

impl RelayStreamArgs {
    pub(crate) fn relay_config(&self) -> RelayConfig {
        let mut config =
            RelayConfig::with_stream(&self.stream.stream_name, self.stream.subject_prefix());
        config.stream_replicas = self.replicas.stream_replicas;
        config
    }

    pub(crate) async fn connect(&self) -> Result<async_nats::Client> {
        Ok(self
            .nats
            .connect("canopy-relay", std::time::Duration::from_secs(30))
            .await?)
    }
}

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub stream: RelayStreamArgs,
    #[command(subcommand)]
    pub command: Option<RelayCommand>,
}

#[derive(Debug, clap::Subcommand)]
pub enum RelayCommand {
    /// Publish the events from a global position on again (to repair or rebuild the stream).
    Republish {
        /// First position to publish.
        #[arg(long)]
        from: i64,
    },
    /// How far the relay is behind the event store.
    Lag,
}

#[derive(Debug, clap::Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// sessions, timeline or features (or all).
    pub projection: String,
    /// Events per transaction.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: i64,
    /// Build the shadow tables and compare them with the live ones, without swapping.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, clap::Args)]
pub struct ParkedArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// sessions, timeline or features.
    pub projection: String,
    /// Apply the open parked events again now, in order, with the events waiting behind them
    /// (the projectors also retry them on their own, with backoff).
    #[arg(long)]
    pub retry: bool,
}

pub(crate) async fn pool(database: &DatabaseArgs) -> Result<PgPool> {
    let pool = canopy_event_store::connect(&DbConfig::new(database.url()?))
        .await
        .context("connect to the database")?;
    canopy_event_store::migrate(&pool)
        .await
        .context("apply migrations")?;
    Ok(pool)
}

fn projections(name: &str) -> Result<Vec<Projection>> {
    if name == "all" {
        return Ok(Projection::ALL.to_vec());
    }
    Projection::from_name(name)
        .map(|p| vec![p])
        .with_context(|| format!("no projection {name:?}: sessions, timeline, features or all"))
}

/// `canopy relay`: runs until SIGTERM or Ctrl+C.
pub(crate) async fn run_relay(args: RelayArgs) -> Result<()> {
    let pool = pool(&args.database).await?;
    let client = args.stream.connect().await?;
    canopy_relay::run(
        args.stream.relay_config(),
        pool,
        client,
        canopy_process::shutdown_signal(),
    )
    .await
    .context("run the relay")
}

pub(crate) async fn relay_command(args: RelayArgs) -> Result<String> {
    let pool = pool(&args.database).await?;
    let config = args.stream.relay_config();
    match args.command {
        Some(RelayCommand::Republish { from }) => {
            let client = args.stream.connect().await?;
            let report = canopy_relay::republish(&pool, &client, &config, from)
                .await
                .context("republish")?;
            Ok(serde_json::to_string_pretty(&report)?)
        }
        Some(RelayCommand::Lag) => {
            let lag = canopy_relay::measure_lag(&pool, &config.name)
                .await
                .context("measure lag")?;
            Ok(format!("{lag:?}"))
        }
        None => anyhow::bail!("`canopy relay` without a subcommand runs until stopped"),
    }
}

pub(crate) async fn rebuild(args: RebuildArgs) -> Result<String> {
    let pool = pool(&args.database).await?;
    let mut lines = Vec::new();
    for projection in projections(&args.projection)? {
        let options = RebuildOptions {
            batch_size: args.batch_size.max(1),
            swap: !args.check,
        };
        let report = canopy_projectors::rebuild(&pool, projection, &options).await?;
        let rate = report.events as f64 / report.elapsed.as_secs_f64().max(1e-9);
        lines.push(format!(
            "{}: {} events in {:.2} s ({rate:.0} events/s)",
            report.projection,
            report.events,
            report.elapsed.as_secs_f64()
        ));
        if args.check {
            let differences = canopy_projectors::compare_with_shadow(&pool, projection).await?;
            if differences.is_empty() {
                lines.push(format!(
                    "{}: live tables equal the rebuild",
                    projection.name()
                ));
            } else {
                for (table, live_only, rebuilt_only) in differences {
                    lines.push(format!(
                        "{}: {table} differs ({live_only} rows only live, {rebuilt_only} only rebuilt)",
                        projection.name()
                    ));
                }
            }
        }
    }
    Ok(lines.join("\n"))
}

pub(crate) async fn parked(args: ParkedArgs) -> Result<String> {
    let pool = pool(&args.database).await?;
    let projection = Projection::from_name(&args.projection)
        .with_context(|| format!("no projection {:?}", args.projection))?;
    if args.retry {
        let report = canopy_projectors::parked::retry(
            &pool,
            projection,
            canopy_projectors::parked::Due::All,
            std::time::Duration::from_secs(300),
        )
        .await?;
        return Ok(format!(
            "resolved {}, still parked {}, caught up {} later events",
            report.resolved, report.still_parked, report.caught_up
        ));
    }
    type Row = (
        uuid::Uuid,
        String,
        String,
        i64,
        String,
        String,
        i32,
        f64,
        i64,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT p.event_id, p.aggregate_type, p.aggregate_id, p.sequence, p.event_type, p.error,
                p.attempts, greatest(extract(epoch FROM p.next_attempt_at - now()), 0)::float8,
                (SELECT count(*) FROM public.events e
                  WHERE e.aggregate_type = p.aggregate_type AND e.aggregate_id = p.aggregate_id
                    AND e.sequence > p.sequence)
           FROM read.parked_events p
          WHERE p.projection = $1 AND p.resolved_at IS NULL ORDER BY p.parked_at",
    )
    .bind(projection.name())
    .fetch_all(&pool)
    .await?;
    if rows.is_empty() {
        return Ok(format!("{}: nothing parked", projection.name()));
    }
    Ok(rows
        .into_iter()
        .map(
            |(id, kind, aggregate, sequence, event_type, error, attempts, next, waiting)| {
                format!(
                    "{id} {kind}/{aggregate} #{sequence} {event_type}: {error} \
                     ({attempts} retries failed, next in {next:.0} s, {waiting} later events wait)"
                )
            },
        )
        .collect::<Vec<_>>()
        .join("\n"))
}
