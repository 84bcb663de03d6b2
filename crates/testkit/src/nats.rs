//! NATS JetStream for tests: a server (from `NATS_URL` or started here) and a unique prefix per
//! test for its streams and subjects.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use tokio::sync::OnceCell;

use canopy_local_servers::{free_port, fresh_dir, start_nats as start};

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
                let client = async_nats::connect(&url).await?;
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
    let client = async_nats::connect(&server.url)
        .await
        .context("connect to NATS")?;
    let jetstream = async_nats::jetstream::new(client.clone());
    Ok(TestNats {
        client,
        jetstream,
        prefix: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        url: server.url.clone(),
    })
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
        let last_error = match async_nats::connect(url).await {
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
