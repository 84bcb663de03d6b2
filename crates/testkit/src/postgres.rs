//! PostgreSQL for tests: a server (from `DATABASE_URL` or started here) and a fresh migrated
//! database per test.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::OnceCell;

use canopy_local_servers::{Durability, free_port, fresh_dir, start_postgres as start};

/// A Postgres server the tests may create databases on.
#[derive(Debug, Clone)]
pub struct PgServer {
    /// URL of the server's maintenance database (`DATABASE_URL` as given, when set).
    pub url: String,
    /// Whether the kit started this server (and it dies with the test process).
    pub owned: bool,
}

impl PgServer {
    /// The URL of another database on this server.
    pub fn url_for(&self, database: &str) -> String {
        with_database(&self.url, database)
    }

    fn options(&self) -> Result<PgConnectOptions> {
        Ok(PgConnectOptions::from_str(&self.url)
            .context("parse the Postgres URL")?
            .disable_statement_logging())
    }
}

/// The server of this test process: `DATABASE_URL` when set, otherwise one started on first use.
pub async fn pg_server() -> Result<&'static PgServer> {
    static SERVER: OnceCell<PgServer> = OnceCell::const_new();
    SERVER
        .get_or_try_init(|| async {
            match std::env::var("DATABASE_URL") {
                Ok(url) if !url.is_empty() => Ok(PgServer { url, owned: false }),
                _ => {
                    let server = tokio::task::spawn_blocking(start_postgres).await??;
                    wait_ready(&server).await?;
                    Ok(server)
                }
            }
        })
        .await
}

/// A fresh database with every migration applied, dropped (with its connections) on drop.
#[derive(Debug)]
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    pub url: String,
    server: PgServer,
}

impl TestDb {
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `statements` as the tables' owner with every trigger off (`session_replication_role
    /// = replica`), on a connection of its own that closes after: how tests tamper with what the
    /// triggers guard (events, chain heads).
    pub async fn tamper(&self, statements: &str) -> Result<()> {
        let mut conn = PgConnection::connect(&self.url).await?;
        sqlx::query("SET session_replication_role = replica")
            .execute(&mut conn)
            .await?;
        sqlx::raw_sql(statements).execute(&mut conn).await?;
        Ok(())
    }

    /// Opens another pool on the same database (for a second "process" in a test).
    pub async fn new_pool(&self, max_connections: u32) -> Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&self.url)
            .await?)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: do the async clean-up on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect_with(&server.options()?).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                anyhow::Ok(())
            })
        });
        if let Ok(Err(error)) = cleanup.join() {
            tracing::warn!(%error, database = %self.name, "could not drop test database");
        }
    }
}

/// A fresh, migrated database for one test.
pub async fn database() -> Result<TestDb> {
    let server = pg_server().await?;
    let template = template(server).await?;
    let name = format!("canopy_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect_with(&server.options()?).await?;
    sqlx::query(&format!(
        "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
    ))
    .execute(&mut admin)
    .await
    .context("create the test database")?;
    admin.close().await?;
    let url = server.url_for(&name);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .context("connect to the test database")?;
    Ok(TestDb {
        pool,
        name,
        url,
        server: server.clone(),
    })
}

/// The name of a migrated template database for the current migration set, created once (under
/// an advisory lock, so concurrent test processes agree) and reused afterwards.
async fn template(server: &PgServer) -> Result<String> {
    static TEMPLATE: OnceCell<String> = OnceCell::const_new();
    TEMPLATE
        .get_or_try_init(|| async {
            let mut digest = Sha256::new();
            for migration in canopy_event_store::MIGRATOR.iter() {
                digest.update(migration.version.to_be_bytes());
                digest.update(&migration.checksum);
            }
            let name = format!("canopy_tmpl_{}", &hex::encode(digest.finalize())[..16]);
            let mut admin = PgConnection::connect_with(&server.options()?).await?;
            sqlx::query("SELECT pg_advisory_lock(7236010147322391657)")
                .execute(&mut admin)
                .await?;
            let built = build_template(server, &mut admin, &name).await;
            sqlx::query("SELECT pg_advisory_unlock(7236010147322391657)")
                .execute(&mut admin)
                .await?;
            built?;
            Ok(name)
        })
        .await
        .cloned()
}

async fn build_template(server: &PgServer, admin: &mut PgConnection, name: &str) -> Result<()> {
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut *admin)
        .await?;
    if exists.is_some() {
        return Ok(());
    }
    let building = format!("{name}_build");
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{building}\" WITH (FORCE)"
    ))
    .execute(&mut *admin)
    .await?;
    sqlx::query(&format!("CREATE DATABASE \"{building}\""))
        .execute(&mut *admin)
        .await?;
    // One plain connection, closed explicitly: nothing may stay connected to a template.
    let mut conn = PgConnection::connect(&server.url_for(&building)).await?;
    canopy_event_store::MIGRATOR
        .run(&mut conn)
        .await
        .context("migrate the template database")?;
    conn.close().await?;
    // The closed pool's backends exit asynchronously; until they have, the rename is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let renamed = sqlx::query(&format!(
            "ALTER DATABASE \"{building}\" RENAME TO \"{name}\""
        ))
        .execute(&mut *admin)
        .await;
        match renamed {
            Ok(_) => return Ok(()),
            Err(error) if Instant::now() < deadline && is_object_in_use(&error) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => {
                let users: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
                    "SELECT application_name, backend_type, state FROM pg_stat_activity WHERE datname = $1",
                )
                .bind(&building)
                .fetch_all(&mut *admin)
                .await
                .unwrap_or_default();
                return Err(error).context(format!(
                    "rename the template database (in use by {users:?})"
                ));
            }
        }
    }
}

fn is_object_in_use(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "55006")
}

/// Replaces the database name in a Postgres URL, keeping its query string.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

fn start_postgres() -> Result<PgServer> {
    let dir = fresh_dir("pg")?;
    let server = start(&dir, free_port()?, Durability::Throwaway)?;
    Ok(PgServer {
        url: server.url,
        owned: true,
    })
}

async fn wait_ready(server: &PgServer) -> Result<()> {
    let config = canopy_event_store::DbConfig::new(&server.url);
    let pool = canopy_event_store::connect_when_ready(&config, Duration::from_secs(30))
        .await
        .context("postgres did not accept connections within 30 s")?;
    pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_name_is_replaced_keeping_the_query() {
        assert_eq!(
            with_database("postgres://u@h:5/test?sslmode=disable", "x"),
            "postgres://u@h:5/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:5", "x"), "postgres://u@h:5/x");
        assert_eq!(with_database("postgres:///test", "x"), "postgres:///x");
    }
}
