//! The `canopy` operator CLI: one home for operator subcommands.
//!
//! Built so far: `migrate`, `token` (a dev JWT for any role), `up` (the whole stack), `relay`
//! (run the relay, or republish), `rebuild` (a projection from the event store), `parked`
//! (list or retry events a projection parked), `demo` (a whole session against the running
//! stack, printed live), `audit` (export, offline verify, erase) and `bench` (the write and read
//! paths against their ceilings, one table and a JSON under `bench/results/`).

pub mod audit;
mod bench;
mod demo;
mod ops;
mod up;

use std::io::Write;

use anyhow::{Context, Result};
use canopy_auth::Claims;
use canopy_domain::Role;
use clap::{Parser, Subcommand, ValueEnum};

/// Canopy operator commands.
#[derive(Debug, Parser)]
#[command(name = "canopy", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply every pending database migration (idempotent).
    Migrate(DatabaseArgs),
    /// Mint a signed JWT for development and tests.
    Token(TokenArgs),
    /// Start the stack: the database (embedded unless configured), migrations, dev tokens.
    Up(Box<UpArgs>),
    /// Run the relay from the event store to JetStream, or republish events.
    Relay(ops::RelayArgs),
    /// Rebuild a projection's read models from the event store and swap them in.
    Rebuild(ops::RebuildArgs),
    /// Events a projection could not apply: list them, or apply them again.
    Parked(ops::ParkedArgs),
    /// Drive a whole session against the running stack (`canopy up`), printing it live.
    Demo(demo::DemoArgs),
    /// Auditors: export events with their hash chain, verify an export offline, erase a
    /// person's data.
    Audit(audit::AuditArgs),
    /// Measure the write and read paths against the database's and JetStream's ceilings in
    /// one run; print a table and write JSON under bench/results/.
    Bench(Box<bench::BenchArgs>),
    /// One bench row's load, run by `canopy bench` in its own process.
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the embedded PostgreSQL keeps its data (used when no database URL is configured).
    #[arg(long, env = "CANOPY_DATA_DIR", default_value = ".canopy")]
    pub data_dir: std::path::PathBuf,
    /// Port of the embedded PostgreSQL.
    #[arg(long, env = "CANOPY_EMBEDDED_PG_PORT", default_value_t = 54329)]
    pub embedded_pg_port: u16,
    /// NATS with JetStream (embedded when neither CANOPY_NATS_URL nor NATS_URL is set).
    #[command(flatten)]
    pub nats: canopy_config::NatsArgs,
    /// Port of the embedded nats-server.
    #[arg(long, env = "CANOPY_EMBEDDED_NATS_PORT", default_value_t = 42229)]
    pub embedded_nats_port: u16,
    /// Run the stack without the agent runner (prompts queue up; load tests, or a machine
    /// without sandboxes).
    #[arg(long, env = "CANOPY_UP_WITHOUT_RUNNER")]
    pub without_runner: bool,
    #[command(flatten)]
    pub command_api: canopy_command_api::Config,
    #[command(flatten)]
    pub projectors: canopy_projectors::ProjectorsConfig,
    /// The relay's stream (its name and subjects are the projectors').
    #[command(flatten)]
    pub replicas: canopy_config::StreamReplicasArgs,
    // the groups with their own help heading come last: a heading holds for what follows
    #[command(flatten)]
    pub query_api: canopy_query_api::Settings,
    #[command(flatten)]
    pub webhooks: canopy_webhooks::DeliverySettings,
    #[command(flatten)]
    pub runner: canopy_agent_runner::Config,
}

pub use canopy_config::DatabaseArgs;

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[arg(long, value_enum)]
    pub role: RoleArg,
    /// Subject: the user id (or the service name for the runner).
    #[arg(long, default_value = "dev-user")]
    pub user: String,
    /// Display name.
    #[arg(long, default_value = "Dev User")]
    pub name: String,
    #[arg(long)]
    pub email: Option<String>,
    /// Workspace (ignored for the runner).
    #[arg(long, default_value = "dev-workspace")]
    pub workspace: String,
    /// Lifetime (250ms, 30s, 5m, 2h, 1d; a bare number is seconds).
    #[arg(long, value_parser = canopy_config::parse_duration, default_value = "24h")]
    pub ttl: std::time::Duration,
    /// HS256 secret shared with the APIs.
    #[command(flatten)]
    pub secret: canopy_config::JwtSecretArgs,
}

/// Roles as the command line spells them.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Owner,
    Admin,
    Member,
    Viewer,
    Auditor,
    Runner,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Owner => Role::Owner,
            RoleArg::Admin => Role::Admin,
            RoleArg::Member => Role::Member,
            RoleArg::Viewer => Role::Viewer,
            RoleArg::Auditor => Role::Auditor,
            RoleArg::Runner => Role::Runner,
        }
    }
}

/// Parses the command line and runs the subcommand.
pub fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    match cli.command {
        Command::Up(args) => runtime.block_on(up::run(*args)),
        Command::Relay(args) if args.command.is_none() => runtime.block_on(ops::run_relay(args)),
        command => {
            let output = runtime.block_on(execute(command))?;
            say(&output)
        }
    }
}

/// Writes a line of the CLI's own output (its product, unlike logs) to stdout.
pub(crate) fn say(line: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    Ok(())
}

/// Runs one subcommand and returns what it prints.
pub async fn execute(command: Command) -> Result<String> {
    match command {
        Command::Migrate(args) => {
            let pool = canopy_event_store::connect(&canopy_event_store::DbConfig::new(args.url()?))
                .await
                .context("connect to the database")?;
            canopy_event_store::migrate(&pool)
                .await
                .context("apply migrations")?;
            let applied = canopy_event_store::applied_migrations(&pool)
                .await
                .context("count applied migrations")?;
            Ok(format!("migrations applied: {applied}"))
        }
        Command::Token(args) => mint(&args),
        Command::Up(_) => anyhow::bail!("`canopy up` runs until stopped; call up::run"),
        Command::Relay(args) => ops::relay_command(args).await,
        Command::Rebuild(args) => ops::rebuild(args).await,
        Command::Parked(args) => ops::parked(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Audit(args) => audit::run(args).await,
        Command::Bench(args) => bench::run(*args).await,
        Command::BenchClient(args) => bench::run_client(&args.job).await,
    }
}

pub(crate) fn mint(args: &TokenArgs) -> Result<String> {
    let ttl = chrono::Duration::from_std(args.ttl).context("a token lifetime that long")?;
    let role = Role::from(args.role);
    let mut claims = match role {
        Role::Runner => Claims::runner(&args.user, ttl),
        _ => Claims::user(&args.user, &args.name, &args.workspace, role, ttl),
    };
    claims.email.clone_from(&args.email);
    let secret = match role {
        Role::Runner => args.secret.runner_secret(),
        _ => &args.secret.jwt_secret,
    };
    canopy_auth::mint_hs256(secret, &claims).context("mint the token")
}
