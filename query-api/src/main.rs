//! The canopy-query-api binary: parse config, start logging, serve until SIGTERM or Ctrl+C.

use clap::Parser;

/// Canopy query-api.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: canopy_query_api::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let app = canopy_query_api::build(Cli::parse().config).await?;
    tracing::info!(addr = %app.local_addr(), "query-api listening");
    app.run_until(canopy_process::shutdown_signal()).await
}
