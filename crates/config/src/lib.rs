//! The settings every Canopy binary shares, declared once so that each binary reads them the
//! same way: the same variable names, the same fallbacks (`DATABASE_URL`, `NATS_URL`), the same
//! duration syntax ([`parse_duration`]). Each binary flattens the groups it needs into its own
//! clap configuration; `canopy up` flattens several binaries' configurations into one command,
//! so a group is flattened at most once per command (clap refuses a group or argument declared
//! twice).

use std::path::PathBuf;
use std::time::Duration;

/// What is wrong with a setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "CANOPY_JWT_SECRET is the public development secret, and {listen} is reachable from \
         other hosts: anyone could mint any token; set CANOPY_JWT_SECRET (it also signs stream \
         tickets) or listen on loopback"
    )]
    DevSecretExposed { listen: std::net::SocketAddr },
    #[error(
        "CANOPY_RUNNER_JWT_SECRET is not set (or is CANOPY_JWT_SECRET), and {listen} is \
         reachable from other hosts: runner tokens need a secret of their own, apart from \
         people's; set CANOPY_RUNNER_JWT_SECRET or listen on loopback"
    )]
    RunnerSecretShared { listen: std::net::SocketAddr },
    #[error("no database: set CANOPY_DATABASE_URL (or DATABASE_URL) or pass --database-url")]
    NoDatabase,
    #[error("no NATS: set CANOPY_NATS_URL (or NATS_URL) or pass --nats-url")]
    NoNats,
    #[error("NATS URL {url:?} is not valid: {reason}")]
    BadNatsUrl { url: String, reason: String },
    #[error("could not connect to NATS at {urls}: {reason}")]
    NatsUnreachable { urls: String, reason: String },
    #[error("cannot read the RS256 public key {path}: {source}")]
    UnreadableKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot verify tokens with this configuration: {0}")]
    BadTokenKey(#[from] canopy_auth::AuthError),
}

/// The PostgreSQL database holding the event store and the read models.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DatabaseArgs {
    /// Postgres URL (falls back to DATABASE_URL).
    #[arg(long = "database-url", env = "CANOPY_DATABASE_URL")]
    pub database_url: Option<String>,
}

impl DatabaseArgs {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            database_url: Some(url.into()),
        }
    }

    /// The configured URL, else `DATABASE_URL`.
    pub fn url(&self) -> Result<String, ConfigError> {
        self.url_if_set().ok_or(ConfigError::NoDatabase)
    }

    /// The configured URL, else `DATABASE_URL`, if either is set (`canopy up` starts its own
    /// server otherwise).
    pub fn url_if_set(&self) -> Option<String> {
        configured(self.database_url.as_deref(), "DATABASE_URL")
    }
}

/// The NATS server (or cluster) with JetStream.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsArgs {
    /// NATS URL, or several separated by commas (the nodes of a cluster); falls back to
    /// NATS_URL.
    #[arg(long = "nats-url", env = "CANOPY_NATS_URL")]
    pub nats_url: Option<String>,
}

impl NatsArgs {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            nats_url: Some(url.into()),
        }
    }

    /// The configured URL list, else `NATS_URL`.
    pub fn url(&self) -> Result<String, ConfigError> {
        self.url_if_set().ok_or(ConfigError::NoNats)
    }

    /// The configured URL list, else `NATS_URL`, if either is set.
    pub fn url_if_set(&self) -> Option<String> {
        configured(self.nats_url.as_deref(), "NATS_URL")
    }

    /// Connects to the configured servers; see [`connect_nats`].
    pub async fn connect(
        &self,
        name: &str,
        wait: Duration,
    ) -> Result<async_nats::Client, ConfigError> {
        connect_nats(&self.url()?, name, wait).await
    }
}

/// Connects to `urls` (one or several, comma-separated), retrying for up to `wait` while no
/// server answers. The client then reconnects by itself, to any node of a cluster (those listed
/// and those the cluster announces), for as long as the process runs.
pub async fn connect_nats(
    urls: &str,
    name: &str,
    wait: Duration,
) -> Result<async_nats::Client, ConfigError> {
    let servers = nats_servers(urls)?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let attempt = with_credentials(async_nats::ConnectOptions::new(), &servers)
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(servers.clone());
        // retry_on_initial_connect returns at once and connects in the background; wait for it
        match attempt.await {
            Ok(client) => {
                if wait_connected(&client, deadline).await {
                    return Ok(client);
                }
                return Err(ConfigError::NatsUnreachable {
                    urls: urls.to_owned(),
                    reason: format!("no server answered within {wait:?}"),
                });
            }
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(ConfigError::NatsUnreachable {
                    urls: urls.to_owned(),
                    reason: error.to_string(),
                });
            }
            Err(error) => {
                tracing::debug!(%error, "NATS not reachable yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Connect options with the credentials `urls` carry (`nats://user:password@host:port`):
/// async-nats reads none from a URL. For clients that connect without [`connect_nats`].
pub fn nats_options(urls: &str) -> Result<async_nats::ConnectOptions, ConfigError> {
    Ok(with_credentials(
        async_nats::ConnectOptions::new(),
        &nats_servers(urls)?,
    ))
}

fn with_credentials(
    options: async_nats::ConnectOptions,
    servers: &[async_nats::ServerAddr],
) -> async_nats::ConnectOptions {
    let credentials = servers
        .iter()
        .find_map(|server| Some((server.username()?, server.password()?)));
    match credentials {
        Some((user, password)) => options.user_and_password(user.to_owned(), password.to_owned()),
        None => options,
    }
}

async fn wait_connected(client: &async_nats::Client, deadline: tokio::time::Instant) -> bool {
    loop {
        if client.connection_state() == async_nats::connection::State::Connected {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The server addresses of a comma-separated URL list.
pub fn nats_servers(urls: &str) -> Result<Vec<async_nats::ServerAddr>, ConfigError> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|error| ConfigError::BadNatsUrl {
                    url: url.to_owned(),
                    reason: error.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|servers| {
            if servers.is_empty() {
                Err(ConfigError::NoNats)
            } else {
                Ok(servers)
            }
        })
}

/// The subjects the relay publishes events on (`<prefix>.<aggregate_type>.<id>.<event_type>`).
#[derive(Debug, Clone, clap::Args)]
pub struct SubjectArgs {
    /// The events' subject prefix.
    #[arg(long, env = "CANOPY_SUBJECT_PREFIX", default_value = "canopy.events")]
    pub subject_prefix: String,
}

impl Default for SubjectArgs {
    fn default() -> Self {
        Self {
            subject_prefix: "canopy.events".to_owned(),
        }
    }
}

/// The relay's JetStream stream, which every consumer reads.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// The events stream.
    #[arg(long, env = "CANOPY_STREAM_NAME", default_value = "CANOPY_EVENTS")]
    pub stream_name: String,
    #[command(flatten)]
    pub subjects: SubjectArgs,
}

impl StreamArgs {
    pub fn new(stream_name: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        Self {
            stream_name: stream_name.into(),
            subjects: SubjectArgs {
                subject_prefix: subject_prefix.into(),
            },
        }
    }

    pub fn subject_prefix(&self) -> &str {
        &self.subjects.subject_prefix
    }
}

impl Default for StreamArgs {
    fn default() -> Self {
        Self::new("CANOPY_EVENTS", "canopy.events")
    }
}

/// How the relay creates the stream (only the relay creates it; consumers wait for it).
#[derive(Debug, Clone, clap::Args)]
pub struct StreamReplicasArgs {
    /// Copies of the stream a cluster keeps (1 for one server; 3 on a 3-node cluster).
    #[arg(long, env = "CANOPY_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
}

impl Default for StreamReplicasArgs {
    fn default() -> Self {
        Self { stream_replicas: 1 }
    }
}

/// The HS256 secret bearer tokens are signed with: the APIs verify with it, the CLI and the
/// runner mint with it.
#[derive(Clone, clap::Args)]
pub struct JwtSecretArgs {
    /// HS256 secret of bearer tokens (at least 16 bytes; a dev secret when unset).
    #[arg(
        long = "jwt-secret",
        env = "CANOPY_JWT_SECRET",
        default_value = canopy_auth::DEV_SECRET,
        hide_env_values = true
    )]
    pub jwt_secret: String,
    /// HS256 secret of the agent runner's tokens (at least 16 bytes), apart from people's:
    /// command-api verifies runner tokens with it, the runner mints its own with it. Unset:
    /// CANOPY_JWT_SECRET's (loopback only for command-api).
    #[arg(
        long = "runner-jwt-secret",
        env = "CANOPY_RUNNER_JWT_SECRET",
        hide_env_values = true
    )]
    pub runner_jwt_secret: Option<String>,
}

impl JwtSecretArgs {
    pub fn new(secret: impl Into<String>) -> Self {
        Self {
            jwt_secret: secret.into(),
            runner_jwt_secret: None,
        }
    }

    /// The secret runner tokens are minted and verified with.
    pub fn runner_secret(&self) -> &str {
        self.runner_jwt_secret
            .as_deref()
            .unwrap_or(&self.jwt_secret)
    }

    /// Whether runner tokens have a secret of their own.
    pub fn runner_secret_is_separate(&self) -> bool {
        self.runner_jwt_secret
            .as_deref()
            .is_some_and(|runner| runner != self.jwt_secret)
    }

    /// Whether this is the well-known development secret.
    pub fn is_dev(&self) -> bool {
        self.jwt_secret == canopy_auth::DEV_SECRET
    }
}

impl Default for JwtSecretArgs {
    fn default() -> Self {
        Self::new(canopy_auth::DEV_SECRET)
    }
}

impl std::fmt::Debug for JwtSecretArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSecretArgs")
            .field("dev", &self.is_dev())
            .finish_non_exhaustive()
    }
}

/// How the APIs verify bearer tokens: the HS256 secret, and RS256 when a public key is given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub secret: JwtSecretArgs,
    /// PEM file with an RS256 public key; RS256 tokens are accepted too when set.
    #[arg(
        long = "jwt-rs256-public-key-file",
        env = "CANOPY_JWT_RS256_PUBLIC_KEY_FILE"
    )]
    pub rs256_public_key_file: Option<PathBuf>,
    /// With an RS256 key: also accept people's tokens signed with the HS256 secret (off by
    /// default, so that the shared secret cannot mint a person's token).
    #[arg(long = "jwt-allow-hs256", env = "CANOPY_JWT_ALLOW_HS256")]
    pub allow_hs256: bool,
}

impl TokenArgs {
    /// Refuses the public development secret on an address other hosts can reach: anyone could
    /// mint any token with it. On loopback (`canopy up`, tests) it is the dev default.
    pub fn check_listen(&self, listen: std::net::SocketAddr) -> Result<(), ConfigError> {
        if self.secret.is_dev() && !listen.ip().is_loopback() {
            return Err(ConfigError::DevSecretExposed { listen });
        }
        Ok(())
    }

    /// Refuses, on an address other hosts can reach, runner tokens without a secret of their
    /// own (the service that accepts them, command-api, calls it).
    pub fn check_runner_secret(&self, listen: std::net::SocketAddr) -> Result<(), ConfigError> {
        if !self.secret.runner_secret_is_separate() && !listen.ip().is_loopback() {
            return Err(ConfigError::RunnerSecretShared { listen });
        }
        Ok(())
    }

    /// Clock skew tolerated on a token's expiry.
    const LEEWAY_SECS: u64 = 30;

    /// The verifier of these settings (reads the RS256 key file, if any).
    pub fn verifier(&self) -> Result<canopy_auth::Verifier, ConfigError> {
        if self.secret.is_dev() {
            tracing::warn!(
                "CANOPY_JWT_SECRET is not set: accepting tokens signed with the dev secret (loopback only)"
            );
        }
        let rs256_public_key_pem = match &self.rs256_public_key_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|source| {
                ConfigError::UnreadableKey {
                    path: path.clone(),
                    source,
                }
            })?),
            None => None,
        };
        Ok(canopy_auth::Verifier::new(&canopy_auth::AuthConfig {
            hs256_secret: self.secret.jwt_secret.clone(),
            accept_hs256: rs256_public_key_pem.is_none() || self.allow_hs256,
            rs256_public_key_pem,
            runner_secret: self.secret.runner_jwt_secret.clone(),
            leeway_secs: Self::LEEWAY_SECS,
        })?)
    }
}

/// The browser origins both APIs allow by CORS.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CorsArgs {
    /// Origins allowed by CORS (comma-separated; none by default).
    #[arg(long, env = "CANOPY_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
}

/// Which webhook targets are accepted: command-api checks them at creation, the delivery
/// service before every delivery (`canopy-webhook`'s target check).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WebhookTargetArgs {
    /// Accept plain http and loopback webhook targets (development and tests only; private and
    /// link-local addresses stay refused).
    #[arg(
        long = "webhooks-allow-insecure",
        env = "CANOPY_WEBHOOKS_ALLOW_INSECURE"
    )]
    pub webhooks_allow_insecure: bool,
}

/// Parses a duration: a number with a unit (`250ms`, `30s`, `5m`, `2h`, `1d`), or a bare
/// number of seconds (`30`, `0.5`). Every duration setting of every binary reads this way
/// (`value_parser = canopy_config::parse_duration`), and its name carries no unit.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a duration (like 250ms, 30s, 5m, 2h or 1d)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {value:?} (ms, s, m, h or d)"
            ));
        }
    };
    Duration::try_from_secs_f64(number * scale).map_err(|error| format!("{value:?}: {error}"))
}

/// Parses a size in bytes: a whole number with an optional unit, binary (`KiB`, `MiB`, `GiB`,
/// `TiB`, or `K`, `M`, `G`, `T` meaning the same) or a bare number of bytes (`65536`). Every
/// size setting reads this way (`value_parser = canopy_config::parse_bytes`).
pub fn parse_bytes(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a size (like 65536, 512MiB or 4GiB)"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {value:?} (KiB, MiB, GiB or TiB)"
            ));
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{value:?} is too large"))
}

fn configured(flag: Option<&str>, fallback_env: &str) -> Option<String> {
    flag.map(str::to_owned)
        .or_else(|| std::env::var(fallback_env).ok())
        .filter(|url| !url.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_or_without_a_unit() {
        let cases = [
            ("30", 30_000),
            ("0.5", 500),
            ("250ms", 250),
            ("30s", 30_000),
            ("5m", 300_000),
            ("2h", 7_200_000),
            ("1d", 86_400_000),
        ];
        for (text, millis) in cases {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_millis(millis),
                "{text}"
            );
        }
        for bad in ["", "s", "10 weeks", "-1", "1e3x"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_read_with_or_without_a_binary_unit() {
        let cases = [
            ("65536", 65_536),
            ("512MiB", 512 << 20),
            ("4GiB", 4 << 30),
            ("4G", 4 << 30),
            ("64 MiB", 64 << 20),
            ("1TiB", 1 << 40),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_bytes(text).unwrap(), bytes, "{text}");
        }
        for bad in ["", "MiB", "1.5GiB", "-1", "4GB", "99999999999TiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_group_flattens_into_one_command() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct All {
            #[command(flatten)]
            database: DatabaseArgs,
            #[command(flatten)]
            nats: NatsArgs,
            #[command(flatten)]
            stream: StreamArgs,
            #[command(flatten)]
            replicas: StreamReplicasArgs,
            #[command(flatten)]
            tokens: TokenArgs,
            #[command(flatten)]
            cors: CorsArgs,
        }
        All::command().debug_assert();
    }

    #[test]
    fn the_token_secret_stays_out_of_debug_output() {
        let tokens = TokenArgs {
            secret: JwtSecretArgs::new("a-secret-of-at-least-16-bytes"),
            rs256_public_key_file: None,
            allow_hs256: false,
        };
        assert!(!format!("{tokens:?}").contains("a-secret"));
        tokens.verifier().unwrap();
    }

    #[test]
    fn the_public_dev_secret_is_refused_on_an_address_others_reach() {
        let dev = TokenArgs {
            secret: JwtSecretArgs::default(),
            rs256_public_key_file: None,
            allow_hs256: false,
        };
        assert!(dev.check_listen("127.0.0.1:8080".parse().unwrap()).is_ok());
        assert!(dev.check_listen("[::1]:8080".parse().unwrap()).is_ok());
        assert!(matches!(
            dev.check_listen("0.0.0.0:8080".parse().unwrap()),
            Err(ConfigError::DevSecretExposed { .. })
        ));
        assert!(dev.check_listen("10.0.0.5:8080".parse().unwrap()).is_err());
        let own = TokenArgs {
            secret: JwtSecretArgs::new("a-secret-of-at-least-16-bytes"),
            ..dev
        };
        assert!(own.check_listen("0.0.0.0:8080".parse().unwrap()).is_ok());
    }

    #[test]
    fn runner_tokens_need_a_secret_of_their_own_off_loopback() {
        let mut tokens = TokenArgs {
            secret: JwtSecretArgs::new("a-secret-of-at-least-16-bytes"),
            rs256_public_key_file: None,
            allow_hs256: false,
        };
        let open: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert!(
            tokens
                .check_runner_secret("127.0.0.1:8080".parse().unwrap())
                .is_ok()
        );
        assert!(matches!(
            tokens.check_runner_secret(open),
            Err(ConfigError::RunnerSecretShared { .. })
        ));
        tokens.secret.runner_jwt_secret = Some("a-secret-of-at-least-16-bytes".to_owned());
        assert!(tokens.check_runner_secret(open).is_err());
        tokens.secret.runner_jwt_secret = Some("another-secret-for-the-runner".to_owned());
        assert!(tokens.check_runner_secret(open).is_ok());
        assert_eq!(
            tokens.secret.runner_secret(),
            "another-secret-for-the-runner"
        );
    }

    #[test]
    fn a_nats_url_list_names_every_node() {
        let servers =
            nats_servers("nats://127.0.0.1:4222, nats://127.0.0.1:4223,nats://127.0.0.1:4224")
                .unwrap();
        assert_eq!(servers.len(), 3);
        assert!(nats_servers(" , ").is_err());
        assert!(matches!(
            nats_servers("http://[::1"),
            Err(ConfigError::BadNatsUrl { .. })
        ));
    }
}
