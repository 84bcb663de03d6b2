//! Idempotency keys, scoped per caller and kept at least 24 hours (`idempotency_keys`).
//!
//! - A new key is claimed as in flight, with a lease, before the command runs.
//! - The same key with the same request (method, path, canonical JSON body) gets the first
//!   response back, status and body, and writes nothing; with another request, 422.
//! - While the first request is still in flight, 409 with `Retry-After`.
//! - Answers that a retry could change (5xx, conflicts, rate limits) are not remembered: the key
//!   is released so the retry runs.
//! - A request that died after appending but before recording its answer leaves an in-flight key
//!   whose lease runs out. The next request with that key finds the events appended under it
//!   (the key is in their metadata) and rebuilds the same answer from the planned status and id
//!   recorded when the key was claimed, instead of appending twice.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::dto::CommandAccepted;
use crate::error::ApiError;

/// How long an in-flight claim holds before another request may take the key over.
const LEASE: Duration = Duration::from_secs(30);

/// A stored key: request hash, state, answer (or planned answer), whether its lease ran out.
type KeyRow = (
    Vec<u8>,
    String,
    Option<i16>,
    Option<serde_json::Value>,
    bool,
);

/// What to do with a request carrying an idempotency key.
#[derive(Debug)]
pub(crate) enum Claim {
    /// Run the command; the key is ours.
    Proceed,
    /// Answer with the remembered response.
    Replay {
        status: u16,
        body: serde_json::Value,
    },
}

/// The response a command plans to give, known before it runs.
#[derive(Debug, Clone)]
pub(crate) struct Plan<'a> {
    pub(crate) status: u16,
    pub(crate) aggregate_type: &'a str,
    pub(crate) aggregate_id: &'a str,
    pub(crate) created_id: Option<&'a str>,
}

/// Claims `key` for this request, or says how to answer instead.
pub(crate) async fn claim(
    pool: &PgPool,
    scope: &str,
    actor_id: &str,
    key: &str,
    fingerprint: &[u8],
    plan: &Plan<'_>,
    ttl: Duration,
) -> Result<Claim, ApiError> {
    let planned = serde_json::json!({
        "status": plan.status,
        "aggregate_type": plan.aggregate_type,
        "aggregate_id": plan.aggregate_id,
        "id": plan.created_id,
    });
    // A fresh key, or one whose retention ran out, is ours at once.
    let claimed: Option<bool> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (caller, key, request_hash, state, response_body, locked_until, expires_at)
         VALUES ($1, $2, $3, 'in_flight', $4, now() + $5, now() + $6)
         ON CONFLICT (caller, key) DO UPDATE
            SET request_hash = EXCLUDED.request_hash, state = 'in_flight', response_status = NULL,
                response_body = EXCLUDED.response_body, locked_until = EXCLUDED.locked_until,
                created_at = now(), expires_at = EXCLUDED.expires_at
          WHERE idempotency_keys.expires_at < now()
         RETURNING true",
    )
    .bind(scope)
    .bind(key)
    .bind(fingerprint)
    .bind(&planned)
    .bind(interval(LEASE))
    .bind(interval(ttl))
    .fetch_optional(pool)
    .await
    .map_err(ApiError::internal)?;
    if claimed.is_some() {
        return Ok(Claim::Proceed);
    }

    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT request_hash, state, response_status, response_body, locked_until < now()
               FROM idempotency_keys WHERE caller = $1 AND key = $2",
    )
    .bind(scope)
    .bind(key)
    .fetch_optional(pool)
    .await
    .map_err(ApiError::internal)?;
    let Some((hash, state, status, body, lease_expired)) = row else {
        // released between our insert and select: a retry will claim it
        return Err(ApiError::IdempotencyInFlight);
    };
    if hash != fingerprint {
        return Err(ApiError::IdempotencyKeyReused);
    }
    match (state.as_str(), status, body) {
        ("completed", Some(status), Some(body)) => Ok(Claim::Replay {
            status: u16::try_from(status).unwrap_or(500),
            body,
        }),
        ("in_flight", _, planned) if lease_expired => {
            take_over(pool, scope, actor_id, key, planned).await
        }
        _ => Err(ApiError::IdempotencyInFlight),
    }
}

/// Takes over the key of a request that died in flight: if it appended events, its answer is
/// rebuilt from them; otherwise the command runs now.
async fn take_over(
    pool: &PgPool,
    scope: &str,
    actor_id: &str,
    key: &str,
    planned: Option<serde_json::Value>,
) -> Result<Claim, ApiError> {
    let renewed = sqlx::query(
        "UPDATE idempotency_keys SET locked_until = now() + $3
          WHERE caller = $1 AND key = $2 AND state = 'in_flight' AND locked_until < now()",
    )
    .bind(scope)
    .bind(key)
    .bind(interval(LEASE))
    .execute(pool)
    .await
    .map_err(ApiError::internal)?;
    if renewed.rows_affected() == 0 {
        return Err(ApiError::IdempotencyInFlight);
    }
    let planned = planned.unwrap_or_default();
    let events: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT event_id, sequence FROM events
          WHERE metadata ->> 'actor_id' = $1 AND metadata ->> 'idempotency_key' = $2
            AND aggregate_type = $3 AND aggregate_id = $4
          ORDER BY sequence",
    )
    .bind(actor_id)
    .bind(key)
    .bind(planned["aggregate_type"].as_str().unwrap_or_default())
    .bind(planned["aggregate_id"].as_str().unwrap_or_default())
    .fetch_all(pool)
    .await
    .map_err(ApiError::internal)?;
    let Some(&(_, last)) = events.last() else {
        return Ok(Claim::Proceed);
    };
    let status = planned["status"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .unwrap_or(200);
    let body = CommandAccepted {
        aggregate_type: planned["aggregate_type"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        aggregate_id: planned["aggregate_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        version: usize::try_from(last).unwrap_or_default(),
        event_ids: events.iter().map(|(id, _)| *id).collect(),
        id: planned["id"].as_str().map(str::to_owned),
    };
    let body = serde_json::to_value(body).map_err(ApiError::internal)?;
    complete(pool, scope, key, status, &body).await?;
    Ok(Claim::Replay { status, body })
}

/// Remembers the answer to a claimed key.
pub(crate) async fn complete(
    pool: &PgPool,
    scope: &str,
    key: &str,
    status: u16,
    body: &serde_json::Value,
) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE idempotency_keys SET state = 'completed', response_status = $3, response_body = $4
          WHERE caller = $1 AND key = $2",
    )
    .bind(scope)
    .bind(key)
    .bind(i16::try_from(status).unwrap_or(500))
    .bind(body)
    .execute(pool)
    .await
    .map_err(ApiError::internal)?;
    Ok(())
}

/// Gives a claimed key back, so that a retry of a transient failure runs the command.
pub(crate) async fn release(pool: &PgPool, scope: &str, key: &str) {
    let released = sqlx::query(
        "DELETE FROM idempotency_keys WHERE caller = $1 AND key = $2 AND state = 'in_flight'",
    )
    .bind(scope)
    .bind(key)
    .execute(pool)
    .await;
    if let Err(error) = released {
        tracing::warn!(%error, "could not release an idempotency key; it frees when its lease ends");
    }
}

/// Deletes keys past their retention. Run periodically.
pub(crate) async fn purge_expired(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at < now()")
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected())
}

fn interval(duration: Duration) -> sqlx::postgres::types::PgInterval {
    sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(duration.as_micros()).unwrap_or(i64::MAX),
    }
}
