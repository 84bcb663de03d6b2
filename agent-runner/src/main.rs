//! The canopy-agent-runner binary: parse config, start logging, work until SIGTERM or Ctrl+C,
//! then drain (finish current steps, hand sessions back).

use clap::Parser;

/// Canopy agent runner.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: canopy_agent_runner::Config,
    #[command(flatten)]
    database: canopy_config::DatabaseArgs,
    #[command(flatten)]
    nats: canopy_config::NatsArgs,
    #[command(flatten)]
    stream: canopy_config::StreamArgs,
    /// command-api's base URL, or several separated by commas (a report that fails is sent to
    /// the next).
    #[arg(
        long,
        env = "CANOPY_COMMAND_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    command_api_url: String,
    /// A runner token for command-api; minted from CANOPY_RUNNER_JWT_SECRET (else
    /// CANOPY_JWT_SECRET) when unset.
    #[arg(long, env = "CANOPY_RUNNER_TOKEN", hide_env_values = true)]
    runner_token: Option<String>,
    #[command(flatten)]
    secret: canopy_config::JwtSecretArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let runner_token = match cli.runner_token {
        Some(token) => token,
        None => canopy_agent_runner::mint_runner_token(cli.secret.runner_secret())?,
    };
    let connections = canopy_agent_runner::Connections {
        database_url: cli.database.url()?,
        nats_url: cli.nats.url()?,
        stream_name: cli.stream.stream_name,
        subject_prefix: cli.stream.subjects.subject_prefix,
        command_api_url: cli.command_api_url,
        runner_token,
    };
    let app = canopy_agent_runner::build(cli.config, connections).await?;
    tracing::info!(addr = %app.local_addr(), runner = %app.runner_id(), "agent runner status endpoint listening");
    app.run_until(canopy_process::shutdown_signal()).await
}
