//! The canopy-projectors binary: parse config, start logging, project until SIGTERM or Ctrl+C.

use clap::Parser;

/// Canopy projectors.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Postgres URL.
    #[arg(long, env = "CANOPY_DATABASE_URL")]
    database_url: String,
    /// NATS URL.
    #[arg(long, env = "CANOPY_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
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
    let (pool, client) = canopy_projectors::connect(&cli.database_url, &cli.nats_url).await?;
    let projectors = canopy_projectors::Projectors::new(cli.config, pool, client);
    projectors
        .run_until(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install the SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    Ok(())
}
