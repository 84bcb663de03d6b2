//! `canopy up`: the whole stack on one machine with nothing configured.
//!
//! Uses the configured database and NATS when there are; otherwise starts an embedded
//! PostgreSQL and nats-server (the installed binaries, data in the project's data folder,
//! surviving restarts) that stop when this process does. Then runs command-api (which applies
//! the migrations), the relay, the projectors, query-api (with live streams), the webhook
//! delivery and the agent runner (with the built-in demo model unless a model is configured) in
//! this one process, and prints
//! what a developer needs: the URLs and a dev token per role.

use std::time::Duration;

use anyhow::{Context, Result};
use canopy_event_store::DbConfig;
use futures::future::BoxFuture;

use crate::{RoleArg, TokenArgs, UpArgs, mint, say};

pub(crate) async fn run(args: UpArgs) -> Result<()> {
    let mut config = args.command_api;
    let database_url = match config.database.url_if_set() {
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
    let nats_url = match args.nats.url_if_set() {
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
    let nats = canopy_config::connect_nats(&nats_url, "canopy-up", Duration::from_secs(30)).await?;

    config.database = canopy_config::DatabaseArgs::new(&database_url);
    // A development stack on loopback delivers webhooks to local receivers too, unless told
    // otherwise (private and link-local targets stay refused).
    let local_webhooks = std::env::var_os("CANOPY_WEBHOOKS_ALLOW_INSECURE").is_none()
        && config.listen.ip().is_loopback();
    if local_webhooks {
        config.webhook_targets.webhooks_allow_insecure = true;
    }
    let webhook_policy = canopy_webhook::TargetPolicy {
        allow_insecure: config.webhook_targets.webhooks_allow_insecure,
    };
    let secret = config.tokens.secret.clone();
    // query-api shares the database, the tokens' keys and the CORS origins with command-api, and
    // its live streams follow the events the relay publishes.
    let query_config = canopy_query_api::Config {
        database: config.database.clone(),
        tokens: config.tokens.clone(),
        cors: config.cors.clone(),
        nats: canopy_config::NatsArgs::new(&nats_url),
        subjects: args.projectors.stream.subjects.clone(),
        settings: args.query_api,
    };
    let app = canopy_command_api::build(config)
        .await
        .context("start command-api")?;
    let addr = app.local_addr();
    let query = canopy_query_api::build(query_config)
        .await
        .context("start query-api")?;
    let query_addr = query.local_addr();
    let mut relay_config = canopy_relay::RelayConfig::with_stream(
        &args.projectors.stream.stream_name,
        args.projectors.stream.subject_prefix(),
    );
    relay_config.stream_replicas = args.replicas.stream_replicas;
    let relay = canopy_relay::Relay::new(relay_config, pool.clone(), nats.clone());
    let connections = canopy_agent_runner::Connections {
        database_url: database_url.clone(),
        nats_url: nats_url.clone(),
        stream_name: args.projectors.stream.stream_name.clone(),
        subject_prefix: args.projectors.stream.subject_prefix().to_owned(),
        command_api_url: format!("http://{addr}"),
        runner_token: canopy_agent_runner::mint_runner_token(secret.runner_secret())?,
    };
    // links in deliveries point at this stack's own APIs unless configured
    let mut webhook_settings = args.webhooks;
    if std::env::var_os("CANOPY_WEBHOOKS_QUERY_API_URL").is_none() {
        webhook_settings.query_api_url = format!("http://{query_addr}");
    }
    if std::env::var_os("CANOPY_WEBHOOKS_COMMAND_API_URL").is_none() {
        webhook_settings.command_api_url = format!("http://{addr}");
    }
    let webhooks = canopy_webhooks::Webhooks::new(
        pool.clone(),
        nats.clone(),
        args.projectors.stream.clone(),
        webhook_settings,
        webhook_policy,
        std::sync::Arc::new(canopy_webhook::SystemResolver),
    );
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
    // A runner that cannot start stops everything: as root its sandboxes get a uid each, as a
    // normal user they run rootless (crates/sandbox/src/mode.rs); either way it says why.
    let runner = if args.without_runner {
        None
    } else {
        Some(
            canopy_agent_runner::build(runner_config, connections)
                .await
                .context(
                    "start the agent runner (its sandboxes need bwrap, socat, util-linux's \
                     setpriv and prlimit, and user namespaces; `canopy up --without-runner` \
                     starts the rest of the stack)",
                )?,
        )
    };

    say(&format!("database:     {database_url}"))?;
    say(&format!("nats:         {nats_url}"))?;
    say(&format!("command-api:  http://{addr}"))?;
    say(&format!("  docs:       http://{addr}/docs/"))?;
    say(&format!("  openapi:    http://{addr}/openapi.json"))?;
    say(&format!("query-api:    http://{query_addr}"))?;
    say(&format!("  docs:       http://{query_addr}/docs/"))?;
    if local_webhooks {
        say(
            "webhooks:     https and loopback http targets (CANOPY_WEBHOOKS_ALLOW_INSECURE=false refuses loopback)",
        )?;
    }
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
        None => say("agent runner: off (--without-runner)")?,
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
            ttl: Duration::from_secs(24 * 3600),
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
    let webhooks_task = part("webhooks", Box::pin(webhooks.run_until(stopped(&stop))));
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
        _ = canopy_process::shutdown_signal() => None,
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
    for task in [api, query_task, relay_task, projectors_task, webhooks_task] {
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
