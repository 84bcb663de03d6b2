//! Idempotency keys, scoped per caller and kept at least 24 hours (`idempotency_keys`).
//!
//! - A new key is claimed as in flight before the command runs. Every claim writes a new random
//!   claim token into the key's row, and carries a lease (`CANOPY_IDEMPOTENCY_LEASE`, 10 s by
//!   default).
//! - The key is completed inside the transaction that appends the command's events
//!   ([`CompleteOnAppend`], an event-store [`Fence`]): the same statement that stores the answer
//!   checks that the row still carries this claim's token, and the append rolls back when it
//!   does not. So a key's events commit if and only if its answer does: a failure after the
//!   commit (the commit's acknowledgement lost, the process gone) leaves a completed key whose
//!   retry replays the answer, never an in-flight one.
//! - The same key with the same request (method, path, canonical JSON body) gets the first
//!   response back, status and body, and writes nothing; with another request, 422.
//! - While the first request is in flight and its lease runs, 409 with `Retry-After`.
//! - The lease is not renewed. Once it has run out, the same request takes the key over with a
//!   new token (the first request may have died, or be stuck behind a slow database). If the
//!   first request is still running, its append then fails its fence and rolls back, and it
//!   answers like a duplicate (the answer if the key has one by then, else 409): whichever request
//!   holds the key last appends, once. The lease only decides how soon a retry may run instead of
//!   getting 409, never whether a command is appended twice, so it needs no heartbeat (which a
//!   stalled database would stall too).
//! - Answers that a retry could change (5xx, conflicts) are not remembered: the key is released,
//!   and only while it is still in flight under this claim's token, so the release can neither
//!   undo a commit nor free a key another request took over.
//! - A refusal is an answer too: it is stored (under the token) and replayed.

use std::time::Duration;

use canopy_event_store::{Committed, Fence, PgConnection};
use sqlx::PgPool;
use uuid::Uuid;

use crate::dto::CommandAccepted;
use crate::error::ApiError;

/// A stored key: request hash, state and answer.
type KeyRow = (Vec<u8>, String, Option<i16>, Option<serde_json::Value>);

/// What to do with a request carrying an idempotency key.
#[derive(Debug)]
pub(crate) enum Claim {
    /// Run the command; the key is ours under this claim.
    Proceed(Claimed),
    /// Answer with the remembered response.
    Replay {
        status: u16,
        body: serde_json::Value,
    },
}

/// A key claimed for one run of a command.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    scope: String,
    key: String,
    token: Uuid,
}

/// Claims `key` for this request, or says how to answer instead.
pub(crate) async fn claim(
    pool: &PgPool,
    scope: &str,
    key: &str,
    fingerprint: &[u8],
    lease: Duration,
    ttl: Duration,
) -> Result<Claim, ApiError> {
    let token = Uuid::new_v4();
    // One statement claims a fresh key, one whose retention ran out, or (the same request only)
    // one whose in-flight lease ran out. Each claim gets a new token, which fences out the
    // previous claimant's append.
    let claimed: Option<bool> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (caller, key, request_hash, state, claim_token, locked_until, expires_at)
         VALUES ($1, $2, $3, 'in_flight', $4, now() + $5, now() + $6)
         ON CONFLICT (caller, key) DO UPDATE
            SET request_hash = EXCLUDED.request_hash, state = 'in_flight', response_status = NULL,
                response_body = NULL, claim_token = EXCLUDED.claim_token,
                locked_until = EXCLUDED.locked_until, expires_at = EXCLUDED.expires_at,
                created_at = CASE WHEN idempotency_keys.expires_at < now() THEN now()
                                  ELSE idempotency_keys.created_at END
          WHERE idempotency_keys.expires_at < now()
             OR (idempotency_keys.state = 'in_flight' AND idempotency_keys.locked_until < now()
                 AND idempotency_keys.request_hash = EXCLUDED.request_hash)
         RETURNING true",
    )
    .bind(scope)
    .bind(key)
    .bind(fingerprint)
    .bind(token)
    .bind(interval(lease))
    .bind(interval(ttl))
    .fetch_optional(pool)
    .await
    .map_err(ApiError::internal)?;
    if claimed.is_some() {
        return Ok(Claim::Proceed(Claimed {
            scope: scope.to_owned(),
            key: key.to_owned(),
            token,
        }));
    }
    let (status, body) = answer_of(pool, scope, key, fingerprint).await?;
    Ok(Claim::Replay { status, body })
}

/// How to answer a request whose claim was taken over by a later request with its key (its
/// append rolled back): like a duplicate of that request.
pub(crate) async fn after_takeover(
    pool: &PgPool,
    claimed: &Claimed,
    fingerprint: &[u8],
) -> Result<(u16, serde_json::Value), ApiError> {
    answer_of(pool, &claimed.scope, &claimed.key, fingerprint).await
}

/// The answer remembered under a key another request holds or held; 409 while it has none.
async fn answer_of(
    pool: &PgPool,
    scope: &str,
    key: &str,
    fingerprint: &[u8],
) -> Result<(u16, serde_json::Value), ApiError> {
    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT request_hash, state, response_status, response_body
           FROM idempotency_keys WHERE caller = $1 AND key = $2",
    )
    .bind(scope)
    .bind(key)
    .fetch_optional(pool)
    .await
    .map_err(ApiError::internal)?;
    let Some((hash, state, status, body)) = row else {
        // released since: a retry will claim it
        return Err(ApiError::IdempotencyInFlight);
    };
    if hash != fingerprint {
        return Err(ApiError::IdempotencyKeyReused);
    }
    match (state.as_str(), status, body) {
        ("completed", Some(status), Some(body)) => Ok((u16::try_from(status).unwrap_or(500), body)),
        _ => Err(ApiError::IdempotencyInFlight),
    }
}

/// The fence that completes a claimed key in the transaction appending the command's events,
/// with the answer built from what the transaction commits. Refuses (the append rolls back) when
/// the claim was taken over.
pub(crate) struct CompleteOnAppend<'a, F> {
    pub(crate) claimed: &'a Claimed,
    pub(crate) status: u16,
    pub(crate) answer: F,
}

impl<F> Fence for CompleteOnAppend<'_, F>
where
    F: Fn(&Committed) -> CommandAccepted + Sync,
{
    async fn check(
        &self,
        conn: &mut PgConnection,
        committed: &Committed,
    ) -> Result<bool, sqlx::Error> {
        let body = sqlx::types::Json((self.answer)(committed));
        let completed = sqlx::query(COMPLETE)
            .bind(&self.claimed.scope)
            .bind(&self.claimed.key)
            .bind(self.claimed.token)
            .bind(status_column(self.status))
            .bind(body)
            .execute(conn)
            .await?;
        Ok(completed.rows_affected() == 1)
    }
}

/// Remembers an answer given without an append (a refusal). Does nothing when the claim was
/// taken over: that request answers for the key.
pub(crate) async fn complete(
    pool: &PgPool,
    claimed: &Claimed,
    status: u16,
    body: &serde_json::Value,
) -> Result<(), ApiError> {
    sqlx::query(COMPLETE)
        .bind(&claimed.scope)
        .bind(&claimed.key)
        .bind(claimed.token)
        .bind(status_column(status))
        .bind(body)
        .execute(pool)
        .await
        .map_err(ApiError::internal)?;
    Ok(())
}

/// Gives a claimed key back, so that a retry of a transient failure runs the command. A key
/// that is completed (its append committed, even if we never heard so) or claimed again by
/// another request stays.
pub(crate) async fn release(pool: &PgPool, claimed: &Claimed) {
    let released = sqlx::query(
        "DELETE FROM idempotency_keys
          WHERE caller = $1 AND key = $2 AND claim_token = $3 AND state = 'in_flight'",
    )
    .bind(&claimed.scope)
    .bind(&claimed.key)
    .bind(claimed.token)
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

/// Completes a key only under the claim that ran the command.
const COMPLETE: &str = "UPDATE idempotency_keys
    SET state = 'completed', response_status = $4, response_body = $5
  WHERE caller = $1 AND key = $2 AND claim_token = $3 AND state = 'in_flight'";

fn status_column(status: u16) -> i16 {
    i16::try_from(status).unwrap_or(500)
}

fn interval(duration: Duration) -> sqlx::postgres::types::PgInterval {
    sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(duration.as_micros()).unwrap_or(i64::MAX),
    }
}
