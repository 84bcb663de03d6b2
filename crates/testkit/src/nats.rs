//! NATS JetStream for tests: a server (from `NATS_URL` or started here) and a unique prefix per
//! test for its streams and subjects; and [`OwnedNats`], a server one test owns and may stop and
//! start again.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use tokio::sync::OnceCell;

use canopy_local_servers::{LocalServer, free_port, fresh_dir, start_nats as start};

/// A NATS server with JetStream enabled.
#[derive(Debug, Clone)]
pub struct NatsServer {
    pub url: String,
    /// Whether the kit started this server (and it dies with the test process).
    pub owned: bool,
}

/// The server of this test process: `NATS_URL` when set, otherwise one started on first use.
pub async fn nats_server() -> Result<&'static NatsServer> {
    static SERVER: OnceCell<NatsServer> = OnceCell::const_new();
    SERVER
        .get_or_try_init(|| async {
            match std::env::var("NATS_URL") {
                Ok(url) if !url.is_empty() => Ok(NatsServer { url, owned: false }),
                _ => {
                    let server = tokio::task::spawn_blocking(start_nats).await??;
                    wait_ready(&server.url).await?;
                    Ok(server)
                }
            }
        })
        .await
}

/// A connected client and a prefix no other test uses. Streams whose name starts with the
/// (upper-cased) prefix are deleted on drop.
#[derive(Debug)]
pub struct TestNats {
    pub client: async_nats::Client,
    pub jetstream: async_nats::jetstream::Context,
    /// Lower-case alphanumeric, usable in subjects (`<prefix>.canopy.events.>`) and, upper-cased,
    /// in stream names.
    pub prefix: String,
    pub url: String,
}

impl Drop for TestNats {
    fn drop(&mut self) {
        let url = self.url.clone();
        let prefix = self.prefix.to_uppercase();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let client = connect(&url).await?;
                let jetstream = async_nats::jetstream::new(client);
                let mut names = jetstream.stream_names();
                let mut mine = Vec::new();
                while let Some(Ok(name)) = names.next().await {
                    if name.starts_with(&prefix) {
                        mine.push(name);
                    }
                }
                for name in mine {
                    let _ = jetstream.delete_stream(&name).await;
                }
                anyhow::Ok(())
            })
        });
        if let Ok(Err(error)) = cleanup.join() {
            tracing::warn!(%error, prefix = %self.prefix, "could not delete test streams");
        }
    }
}

/// A client on the test server with a fresh prefix.
pub async fn nats() -> Result<TestNats> {
    let server = nats_server().await?;
    let client = connect(&server.url).await.context("connect to NATS")?;
    let jetstream = async_nats::jetstream::new(client.clone());
    Ok(TestNats {
        client,
        jetstream,
        prefix: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        url: server.url.clone(),
    })
}

/// A nats-server owned by one test, which can stop it and start it again on the same port with
/// the same JetStream store (to test outages). Always started here, even when `NATS_URL` is set.
/// Killed on drop.
#[derive(Debug)]
pub struct OwnedNats {
    pub url: String,
    port: u16,
    dir: PathBuf,
    server: Option<LocalServer>,
}

impl OwnedNats {
    /// Starts a fresh server (new store, free port) and waits until JetStream answers.
    pub async fn start() -> Result<Self> {
        let dir = fresh_dir("nats-owned")?;
        let port = free_port()?;
        let mut nats = Self {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            dir,
            server: None,
        };
        nats.start_again().await?;
        Ok(nats)
    }

    /// Starts the server again on its port and store; waits until JetStream answers.
    pub async fn start_again(&mut self) -> Result<()> {
        anyhow::ensure!(self.server.is_none(), "nats-server is already running");
        let (dir, port) = (self.dir.clone(), self.port);
        let server = tokio::task::spawn_blocking(move || start(&dir, port)).await??;
        self.url = server.url.clone();
        self.server = Some(server);
        wait_ready(&self.url).await
    }

    /// Stops the server gracefully (SIGTERM) and waits until it has exited (SIGKILL after 10 s).
    pub async fn stop(&mut self) -> Result<()> {
        self.end("TERM").await
    }

    /// Kills the server (SIGKILL), as a crash would, and waits until it has exited.
    pub async fn kill(&mut self) -> Result<()> {
        self.end("KILL").await
    }

    pub fn is_running(&self) -> bool {
        self.server.as_ref().is_some_and(|s| !s.has_exited())
    }

    /// A client that reconnects for ever, and keeps trying when the server is down at first.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        canopy_config::nats_options(&self.url)?
            .retry_on_initial_connect()
            .connect(&self.url)
            .await
            .context("connect to the owned NATS server")
    }

    async fn end(&mut self, signal: &str) -> Result<()> {
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        server.signal(signal)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.has_exited() {
            if Instant::now() > deadline {
                server.signal("KILL")?;
                anyhow::ensure!(
                    wait_exit(&server, Duration::from_secs(5)).await,
                    "nats-server {} did not exit",
                    server.pid
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for OwnedNats {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.signal("KILL");
        }
    }
}

async fn wait_exit(server: &LocalServer, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while !server.has_exited() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// A client of the server at `url`, with the credentials the URL carries (the local servers
/// require them; async-nats reads none from a URL).
pub async fn connect(url: &str) -> Result<async_nats::Client> {
    Ok(canopy_config::nats_options(url)?.connect(url).await?)
}

fn start_nats() -> Result<NatsServer> {
    let server = start(&fresh_dir("nats")?, free_port()?)?;
    Ok(NatsServer {
        url: server.url,
        owned: true,
    })
}

async fn wait_ready(url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last_error = match connect(url).await {
            // Asked raw: async-nats 0.51 cannot parse nats-server 2.9's account info reply.
            Ok(client) => match client.request("$JS.API.INFO", "".into()).await {
                Ok(reply) if !String::from_utf8_lossy(&reply.payload).contains("\"error\"") => {
                    return Ok(());
                }
                Ok(reply) => String::from_utf8_lossy(&reply.payload).into_owned(),
                Err(error) => error.to_string(),
            },
            Err(error) => error.to_string(),
        };
        if Instant::now() > deadline {
            anyhow::bail!("JetStream at {url} did not become ready within 30 s: {last_error}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
