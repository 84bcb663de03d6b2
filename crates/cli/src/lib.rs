//! The `canopy` operator CLI: one home for operator subcommands.
//!
//! Built so far: `migrate`, `token` (a dev JWT for any role), `up` (the whole stack), `relay`
//! (run the relay, or republish), `rebuild` (a projection from the event store), `parked`
//! (list or retry events a projection parked) and `demo` (a whole session against the running
//! stack, printed live). Later items add `audit` and `bench`.

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
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the embedded PostgreSQL keeps its data (used when no database URL is configured).
    #[arg(long, env = "CANOPY_DATA_DIR", default_value = ".canopy")]
    pub data_dir: std::path::PathBuf,
    /// Port of the embedded PostgreSQL.
    #[arg(long, env = "CANOPY_EMBEDDED_PG_PORT", default_value_t = 54329)]
    pub embedded_pg_port: u16,
    /// NATS server with JetStream (falls back to NATS_URL; embedded when neither is set).
    #[arg(long, env = "CANOPY_NATS_URL")]
    pub nats_url: Option<String>,
    /// Port of the embedded nats-server.
    #[arg(long, env = "CANOPY_EMBEDDED_NATS_PORT", default_value_t = 42229)]
    pub embedded_nats_port: u16,
    /// Address query-api listens on.
    #[arg(long, env = "CANOPY_QUERY_API_ADDR", default_value = "127.0.0.1:8081")]
    pub query_listen: std::net::SocketAddr,
    #[command(flatten)]
    pub command_api: canopy_command_api::Config,
    #[command(flatten)]
    pub projectors: canopy_projectors::ProjectorsConfig,
    #[command(flatten)]
    pub runner: canopy_agent_runner::Config,
}

#[derive(Debug, clap::Args)]
pub struct DatabaseArgs {
    /// Postgres URL; falls back to DATABASE_URL.
    #[arg(long, env = "CANOPY_DATABASE_URL")]
    pub database_url: Option<String>,
}

impl DatabaseArgs {
    pub(crate) fn url(&self) -> Result<String> {
        self.database_url
            .clone()
            .or_else(|| std::env::var("DATABASE_URL").ok())
            .filter(|url| !url.is_empty())
            .context(
                "no database: set CANOPY_DATABASE_URL (or DATABASE_URL) or pass --database-url",
            )
    }
}

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
    /// Lifetime in hours.
    #[arg(long, default_value_t = 24)]
    pub ttl_hours: i64,
    /// HS256 secret shared with the APIs.
    #[arg(long, env = "CANOPY_JWT_SECRET", default_value = canopy_auth::DEV_SECRET, hide_env_values = true)]
    pub secret: String,
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
    }
}

pub(crate) fn mint(args: &TokenArgs) -> Result<String> {
    let ttl = chrono::Duration::hours(args.ttl_hours);
    let role = Role::from(args.role);
    let mut claims = match role {
        Role::Runner => Claims::runner(&args.user, ttl),
        _ => Claims::user(&args.user, &args.name, &args.workspace, role, ttl),
    };
    claims.email.clone_from(&args.email);
    canopy_auth::mint_hs256(&args.secret, &claims).context("mint the token")
}
