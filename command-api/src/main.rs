//! The canopy-command-api binary: parse config, start logging, serve until SIGTERM or Ctrl+C.

use clap::Parser;

/// Canopy command-api.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: canopy_command_api::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let app = canopy_command_api::build(cli.config).await?;
    tracing::info!(addr = %app.local_addr(), "command-api listening");
    app.run_until(canopy_process::shutdown_signal()).await
}
