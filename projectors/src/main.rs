//! The canopy-projectors binary: parse config, start logging, project until SIGTERM or Ctrl+C.

use clap::Parser;

/// Canopy projectors.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    database: canopy_config::DatabaseArgs,
    #[command(flatten)]
    nats: canopy_config::NatsArgs,
    #[command(flatten)]
    config: canopy_projectors::ProjectorsConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let (pool, client) = canopy_projectors::connect(&cli.database, &cli.nats).await?;
    let projectors = canopy_projectors::Projectors::new(cli.config, pool, client);
    projectors
        .run_until(canopy_process::shutdown_signal())
        .await?;
    Ok(())
}
