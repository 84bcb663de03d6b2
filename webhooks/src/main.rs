//! The canopy-webhooks binary: parse config, start logging, deliver until SIGTERM or Ctrl+C.

use clap::Parser;

/// Canopy webhook delivery.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: canopy_webhooks::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let webhooks = canopy_webhooks::build(Cli::parse().config).await?;
    tracing::info!("webhooks delivering");
    webhooks.run_until(canopy_process::shutdown_signal()).await
}
