//! `canopy up`: the whole stack on one machine with nothing configured.
//!
//! Uses the configured database and NATS when there are; otherwise starts an embedded
//! PostgreSQL and nats-server (the installed binaries, data in the project's data folder,
//! surviving restarts) that stop when this process does. Then runs command-api (which applies
//! the migrations), the relay, the projectors, query-api (with live streams) and the agent runner
//! (with the built-in demo model unless a model is configured) in this one process, and prints
//! what a developer needs: the URLs and a dev token per role.

use std::time::Duration;

use anyhow::{Context, Result};
use canopy_event_store::DbConfig;
use futures::future::BoxFuture;

use crate::{RoleArg, TokenArgs, UpArgs, mint, say};

pub(crate) async fn run(args: UpArgs) -> Result<()> {
    let mut config = args.command_api;
    let database_url = match configured(config.database_url.clone(), "DATABASE_URL") {
        Some(url) => url,
        None => {
            let dir = std::path::absolute(args.data_dir.join("postgres"))?;
            let server = canopy_local_servers::start_postgres(
                &dir,
                args.embedded_pg_port,
                canopy_local_servers::Durability::Durable,
            )
            .context("start the embedded PostgreSQL")?;
            if server.dir != dir {
                say(&format!(
                    "postgres:     its user cannot reach {}: the data lives in {}",
                    dir.display(),
                    server.dir.display()
                ))?;
            }
            tracing::info!(dir = %server.dir.display(), pid = server.pid, "embedded PostgreSQL started");
            server.url
        }
    };
    let nats_url = match configured(args.nats_url.clone(), "NATS_URL") {
        Some(url) => url,
        None => {
            let dir = std::path::absolute(args.data_dir.join("nats"))?;
            let server = canopy_local_servers::start_nats(&dir, args.embedded_nats_port)
                .context("start the embedded nats-server")?;
            tracing::info!(dir = %dir.display(), pid = server.pid, "embedded nats-server started");
            server.url
        }
    };

    let mut db = DbConfig::new(&database_url);
    db.application_name = "canopy-up".to_owned();
    let pool = canopy_event_store::connect_when_ready(&db, Duration::from_secs(30))
        .await
        .context("connect to the database")?;
    canopy_event_store::migrate(&pool)
        .await
        .context("apply migrations")?;
    let nats = connect_nats(&nats_url).await?;

    config.database_url = Some(database_url.clone());
    let secret = config.jwt_secret.clone();
    let mut query_config = canopy_query_api::Config::for_database(&database_url);
    query_config.listen = args.query_listen;
    query_config.jwt_secret = secret.clone();
    query_config.jwt_rs256_public_key_file = config.jwt_rs256_public_key_file.clone();
    query_config.cors_origins = config.cors_origins.clone();
    // Live streams follow the same events the relay publishes.
    query_config.nats_url = Some(nats_url.clone());
    query_config.subject_prefix = args.projectors.subject_prefix.clone();
    let app = canopy_command_api::build(config)
        .await
        .context("start command-api")?;
    let addr = app.local_addr();
    let query = canopy_query_api::build(query_config)
        .await
        .context("start query-api")?;
    let query_addr = query.local_addr();
    let relay = canopy_relay::Relay::new(
        canopy_relay::RelayConfig::with_stream(
            &args.projectors.stream_name,
            &args.projectors.subject_prefix,
        ),
        pool.clone(),
        nats.clone(),
    );
    let connections = canopy_agent_runner::Connections {
        database_url: database_url.clone(),
        nats_url: nats_url.clone(),
        stream_name: args.projectors.stream_name.clone(),
        subject_prefix: args.projectors.subject_prefix.clone(),
        command_api_url: format!("http://{addr}"),
        runner_token: canopy_agent_runner::mint_runner_token(&secret)?,
    };
    let projectors = canopy_projectors::Projectors::new(args.projectors, pool.clone(), nats);
    let mut runner_config = args.runner;
    // A development stack clones local repositories too, unless told otherwise.
    let local_repositories = std::env::var_os("CANOPY_RUNNER_GIT_SCHEMES").is_none()
        && runner_config.git_schemes == ["https"];
    if local_repositories {
        runner_config.git_schemes.push("file".to_owned());
    }
    if runner_config.sandbox_root.is_none() {
        // Sandbox uids must reach their workspaces: not under a directory closed to others.
        let mut root = std::path::absolute(args.data_dir.join("sandboxes"))?;
        if !canopy_local_servers::reachable_by_others(&root) {
            let elsewhere = canopy_local_servers::reachable_home("sandboxes", &root);
            say(&format!(
                "sandboxes:    sandbox users cannot reach {}: they live in {}",
                root.display(),
                elsewhere.display()
            ))?;
            root = elsewhere;
        }
        runner_config.sandbox_root = Some(root);
    }
    // Sandboxes need root: a normal user gets the rest of the stack and a clear word why agents
    // do not run; for root a runner that cannot start stops everything.
    let runner = match canopy_agent_runner::build(runner_config, connections).await {
        Ok(runner) => Some(runner),
        Err(error) if !canopy_local_servers::is_root() => {
            tracing::warn!(error = format!("{error:#}"), "agent runner off");
            None
        }
        Err(error) => {
            return Err(error).context(
                "start the agent runner (its sandboxes need root, bwrap, socat and setpriv)",
            );
        }
    };

    say(&format!("database:     {database_url}"))?;
    say(&format!("nats:         {nats_url}"))?;
    say(&format!("command-api:  http://{addr}"))?;
    say(&format!("  docs:       http://{addr}/docs/"))?;
    say(&format!("  openapi:    http://{addr}/openapi.json"))?;
    say(&format!("query-api:    http://{query_addr}"))?;
    say(&format!("  docs:       http://{query_addr}/docs/"))?;
    match &runner {
        Some(runner) => {
            say(&format!(
                "agent runner: http://{}/health",
                runner.local_addr()
            ))?;
            if local_repositories {
                say(
                    "  repositories: https:// and file:// (CANOPY_RUNNER_GIT_SCHEMES=https refuses local ones)",
                )?;
            }
        }
        None => say(
            "agent runner: off (sandboxes need root: run canopy up as root for agents to work)",
        )?,
    }
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

    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let stopped = |stop: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = stop.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };
    // A part that ends on its own says so here, and the whole stack stops: never half a stack.
    let (ended, mut first_ended) = tokio::sync::mpsc::unbounded_channel::<(&'static str, String)>();
    let part = |name: &'static str, work: BoxFuture<'static, Result<()>>| {
        let ended = ended.clone();
        tokio::spawn(async move {
            let result = work.await;
            let why = match &result {
                Ok(()) => "it stopped".to_owned(),
                Err(error) => format!("{error:#}"),
            };
            let _ = ended.send((name, why));
            result.with_context(|| name.to_owned())
        })
    };
    let api = part("command-api", Box::pin(app.run_until(stopped(&stop))));
    let query_task = part("query-api", Box::pin(query.run_until(stopped(&stop))));
    let relay_stop = stopped(&stop);
    let relay_task = part(
        "relay",
        Box::pin(async move { Ok(relay.run_until(relay_stop).await?) }),
    );
    let projectors_stop = stopped(&stop);
    let projectors_task = part(
        "projectors",
        Box::pin(async move { Ok(projectors.run_until(projectors_stop).await?) }),
    );
    // The runner drains first: it still records through command-api while it hands back.
    let (stop_runner, runner_stopped) = tokio::sync::oneshot::channel::<()>();
    let runner_task = runner.map(|runner| {
        part(
            "agent runner",
            Box::pin(runner.run_until(async move {
                let _ = runner_stopped.await;
            })),
        )
    });
    let failed = tokio::select! {
        _ = shutdown_signal() => None,
        Some(ended) = first_ended.recv() => Some(ended),
    };
    if let Some((name, why)) = &failed {
        tracing::error!(part = name, %why, "a part of the stack ended; stopping everything");
    }
    let _ = stop_runner.send(());
    let mut results = Vec::new();
    if let Some(task) = runner_task {
        results.push(task.await?);
    }
    let _ = stop.send(());
    for task in [api, query_task, relay_task, projectors_task] {
        results.push(task.await?);
    }
    pool.close().await;
    if let Some((name, why)) = failed {
        anyhow::bail!("{name} ended ({why}), so the whole stack stopped");
    }
    for result in results {
        result?;
    }
    tracing::info!("stopped");
    Ok(())
}

fn configured(flag: Option<String>, fallback_env: &str) -> Option<String> {
    flag.or_else(|| std::env::var(fallback_env).ok())
        .filter(|url| !url.is_empty())
}

async fn connect_nats(url: &str) -> Result<async_nats::Client> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match async_nats::connect(url).await {
            Ok(client) => return Ok(client),
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(error).context("connect to NATS");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Resolves on SIGTERM or Ctrl+C.
pub(crate) async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(term) => { term.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}
