//! `canopy up`: the whole stack on one machine with nothing configured.
//!
//! Uses the configured database when there is one; otherwise starts an embedded PostgreSQL (the
//! installed server binaries, data in the project's data folder, surviving restarts) that stops
//! when this process does. Applies the migrations and prints what a developer needs.

use std::time::Duration;

use anyhow::{Context, Result};
use canopy_event_store::DbConfig;

use crate::{RoleArg, TokenArgs, UpArgs, mint, say};

pub(crate) async fn run(args: UpArgs) -> Result<()> {
    let url = match args.database.url().ok() {
        Some(url) => url,
        None => {
            let dir = std::path::absolute(args.data_dir.join("postgres"))?;
            let server = canopy_local_servers::start_postgres(
                &dir,
                args.embedded_pg_port,
                canopy_local_servers::Durability::Durable,
            )
            .context("start the embedded PostgreSQL")?;
            tracing::info!(dir = %dir.display(), pid = server.pid, "embedded PostgreSQL started");
            server.url
        }
    };
    let pool =
        canopy_event_store::connect_when_ready(&DbConfig::new(&url), Duration::from_secs(30))
            .await
            .context("connect to the database")?;
    canopy_event_store::migrate(&pool)
        .await
        .context("apply migrations")?;
    if args.secret == canopy_auth::DEV_SECRET {
        tracing::warn!("CANOPY_JWT_SECRET is not set: tokens are signed with the dev secret");
    }

    say(&format!("database: {url}"))?;
    say("dev tokens (24 h):")?;
    for role in [
        RoleArg::Owner,
        RoleArg::Admin,
        RoleArg::Member,
        RoleArg::Viewer,
        RoleArg::Auditor,
        RoleArg::Runner,
    ] {
        let name = format!("{role:?}").to_lowercase();
        let token = mint(&TokenArgs {
            role,
            user: format!("dev-{name}"),
            name: format!("Dev {role:?}"),
            email: None,
            workspace: "dev-workspace".to_owned(),
            ttl_hours: 24,
            secret: args.secret.clone(),
        })?;
        say(&format!("  {name:<8} {token}"))?;
    }
    say("press Ctrl+C to stop")?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    pool.close().await;
    tracing::info!("stopped");
    Ok(())
}
