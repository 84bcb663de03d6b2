//! The canopy-agent-runner binary: parse config, start logging, work until SIGTERM or Ctrl+C,
//! then drain (finish current steps, hand sessions back).

use anyhow::Context;
use clap::Parser;

/// Canopy agent runner.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: canopy_agent_runner::Config,
    /// Postgres URL (falls back to DATABASE_URL).
    #[arg(long, env = "CANOPY_DATABASE_URL")]
    database_url: Option<String>,
    /// NATS with JetStream (falls back to NATS_URL).
    #[arg(long, env = "CANOPY_NATS_URL")]
    nats_url: Option<String>,
    /// command-api's base URL.
    #[arg(
        long,
        env = "CANOPY_COMMAND_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    command_api_url: String,
    /// A runner token for command-api; minted from CANOPY_JWT_SECRET when unset.
    #[arg(long, env = "CANOPY_RUNNER_TOKEN", hide_env_values = true)]
    runner_token: Option<String>,
    #[arg(long, env = "CANOPY_JWT_SECRET", default_value = canopy_auth::DEV_SECRET, hide_env_values = true)]
    jwt_secret: String,
    #[arg(long, env = "CANOPY_STREAM_NAME", default_value = "CANOPY_EVENTS")]
    stream_name: String,
    #[arg(long, env = "CANOPY_SUBJECT_PREFIX", default_value = "canopy.events")]
    subject_prefix: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let runner_token = match cli.runner_token {
        Some(token) => token,
        None => canopy_agent_runner::mint_runner_token(&cli.jwt_secret)?,
    };
    let connections = canopy_agent_runner::Connections {
        database_url: cli
            .database_url
            .or_else(|| env("DATABASE_URL"))
            .context("no database: set CANOPY_DATABASE_URL (or DATABASE_URL)")?,
        nats_url: cli
            .nats_url
            .or_else(|| env("NATS_URL"))
            .context("no NATS: set CANOPY_NATS_URL (or NATS_URL)")?,
        stream_name: cli.stream_name,
        subject_prefix: cli.subject_prefix,
        command_api_url: cli.command_api_url,
        runner_token,
    };
    let app = canopy_agent_runner::build(cli.config, connections).await?;
    tracing::info!(addr = %app.local_addr(), runner = %app.runner_id(), "agent runner status endpoint listening");
    app.run_until(shutdown_signal()).await
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
