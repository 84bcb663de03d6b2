//! `canopy up`: the whole stack on one machine with nothing configured.
//!
//! Uses the configured database when there is one; otherwise starts an embedded PostgreSQL (the
//! installed server binaries, data in the project's data folder, surviving restarts) that stops
//! when this process does. Then runs command-api (which applies the migrations) and prints what
//! a developer needs: the URLs and a dev token per role.

use anyhow::{Context, Result};

use crate::{RoleArg, TokenArgs, UpArgs, mint, say};

pub(crate) async fn run(args: UpArgs) -> Result<()> {
    let mut config = args.command_api;
    let configured = config
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .filter(|url| !url.is_empty());
    let url = match configured {
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
            // wait until it answers before command-api connects
            let pool = canopy_event_store::connect_when_ready(
                &canopy_event_store::DbConfig::new(&server.url),
                std::time::Duration::from_secs(30),
            )
            .await
            .context("the embedded PostgreSQL did not start")?;
            pool.close().await;
            server.url
        }
    };
    config.database_url = Some(url.clone());
    let secret = config.jwt_secret.clone();
    let app = canopy_command_api::build(config)
        .await
        .context("start command-api")?;
    let addr = app.local_addr();

    say(&format!("database:     {url}"))?;
    say(&format!("command-api:  http://{addr}"))?;
    say(&format!("  docs:       http://{addr}/docs/"))?;
    say(&format!("  openapi:    http://{addr}/openapi.json"))?;
    say("dev tokens (24 h), workspace dev-workspace:")?;
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
            secret: secret.clone(),
        })?;
        say(&format!("  {name:<8} {token}"))?;
    }
    say("press Ctrl+C to stop")?;

    app.run_until(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    })
    .await?;
    tracing::info!("stopped");
    Ok(())
}
