//! Session leases in Postgres: one driver per session across every runner.
//!
//! A runner may drive a session only while it holds the session's row in `runner_leases` with
//! an expiry in the future; it renews the row while it works and deletes it when the session has
//! nothing left to do. Taking a lease is one statement that succeeds only when the row is free,
//! expired, or already this runner's, so two runners never both hold it. Expiry is the database
//! clock's, so runners' clocks do not matter.
//!
//! A workspace's cap on sessions running an agent at once (the `concurrent_sessions` budget,
//! `docs/budgets.md`) is held here: a lease row notes its workspace, and a session is taken only
//! while fewer unexpired leases of its workspace exist than the cap. The count and the take run
//! under a transaction-scoped advisory lock per workspace, so two runners cannot both take the
//! last slot. A session over the cap stays queued: its wake-up is handed back and comes again.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

/// What became of an attempt to take a session's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// `owner` holds it now.
    Held,
    /// Another runner holds it.
    Elsewhere,
    /// The workspace already runs as many sessions as its cap allows; the session waits.
    Capped { cap: u64 },
}

/// Takes (or keeps) the lease of `session` for `owner`. True when `owner` holds it now (a
/// session over its workspace's cap is not taken).
pub async fn acquire(
    pool: &PgPool,
    session: Uuid,
    owner: &str,
    ttl: Duration,
) -> Result<bool, sqlx::Error> {
    Ok(take(pool, session, owner, ttl).await? == Taken::Held)
}

/// Takes (or keeps) the lease of `session` for `owner`, within its workspace's cap on sessions
/// running at once.
pub async fn take(
    pool: &PgPool,
    session: Uuid,
    owner: &str,
    ttl: Duration,
) -> Result<Taken, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let capped: Option<(String, Option<i64>)> = sqlx::query_as(
        r#"SELECT s.ws, (SELECT "limit" FROM budget_limits
                           WHERE workspace_id = s.ws AND kind = 'concurrent_sessions')
             FROM (SELECT payload #>> '{SessionStarted,workspace_id}' AS ws FROM events
                    WHERE aggregate_type = 'session' AND aggregate_id = $1 AND sequence = 1) s"#,
    )
    .bind(session.to_string())
    .fetch_optional(&mut *tx)
    .await?;
    let workspace = capped.as_ref().map(|(ws, _)| ws.clone());
    if let Some((workspace, Some(cap))) = &capped {
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('canopy-session-cap:' || $1, 0))",
        )
        .bind(workspace)
        .execute(&mut *tx)
        .await?;
        let (running, ours): (i64, bool) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE session_id <> $2),
                    COALESCE(bool_or(session_id = $2 AND (owner = $3 OR expires_at >= now())), false)
               FROM runner_leases WHERE workspace_id = $1 AND expires_at >= now()",
        )
        .bind(workspace)
        .bind(session.to_string())
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        // a session that already holds a slot keeps it; a new one needs a free one
        if !ours && running >= *cap {
            return Ok(Taken::Capped {
                cap: u64::try_from(*cap).unwrap_or(0),
            });
        }
    }
    let row: Option<(String,)> = sqlx::query_as(
        "INSERT INTO runner_leases (session_id, owner, expires_at, workspace_id)
              VALUES ($1, $2, now() + make_interval(secs => $3), $4)
         ON CONFLICT (session_id) DO UPDATE
                 SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at,
                     renewed_at = now(), workspace_id = EXCLUDED.workspace_id,
                     acquired_at = CASE WHEN runner_leases.owner = EXCLUDED.owner
                                        THEN runner_leases.acquired_at ELSE now() END
               WHERE runner_leases.owner = EXCLUDED.owner OR runner_leases.expires_at < now()
         RETURNING owner",
    )
    .bind(session.to_string())
    .bind(owner)
    .bind(ttl.as_secs_f64())
    .bind(workspace)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(if row.is_some() {
        Taken::Held
    } else {
        Taken::Elsewhere
    })
}

/// Extends `owner`'s lease. False when the lease is no longer `owner`'s (it expired and another
/// runner took it): the driver must stop at once.
pub async fn renew(
    pool: &PgPool,
    session: Uuid,
    owner: &str,
    ttl: Duration,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE runner_leases SET expires_at = now() + make_interval(secs => $3), renewed_at = now()
          WHERE session_id = $1 AND owner = $2",
    )
    .bind(session.to_string())
    .bind(owner)
    .bind(ttl.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives the lease up (the session has no work, or the runner is stopping).
pub async fn release(pool: &PgPool, session: Uuid, owner: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM runner_leases WHERE session_id = $1 AND owner = $2")
        .bind(session.to_string())
        .bind(owner)
        .execute(pool)
        .await?;
    Ok(())
}

/// Notes (or clears) the prompt whose build phase `owner` is running.
pub async fn set_building(
    pool: &PgPool,
    session: Uuid,
    owner: &str,
    prompt: Option<Uuid>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE runner_leases SET building_prompt = $3 WHERE session_id = $1 AND owner = $2",
    )
    .bind(session.to_string())
    .bind(owner)
    .bind(prompt)
    .execute(pool)
    .await?;
    Ok(())
}

/// The prompt a previous holder was building when it lost the lease, if any.
pub async fn building(pool: &PgPool, session: Uuid) -> Result<Option<Uuid>, sqlx::Error> {
    let row: Option<(Option<Uuid>,)> =
        sqlx::query_as("SELECT building_prompt FROM runner_leases WHERE session_id = $1")
            .bind(session.to_string())
            .fetch_optional(pool)
            .await?;
    Ok(row.and_then(|(prompt,)| prompt))
}

/// Sessions whose lease has expired: their runner died (or stalled) with work outstanding.
pub async fn expired(pool: &PgPool, limit: i64) -> Result<Vec<Uuid>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT session_id FROM runner_leases WHERE expires_at < now()
          ORDER BY expires_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id,)| Uuid::parse_str(&id).ok())
        .collect())
}
