//! Table `prompts`: one row per prompt, with its status, queue position, times and outcome.

use canopy_domain::SessionEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use super::Origin;
use crate::projections::ProjectionError;

/// How much of a prompt's text its row keeps.
const PREVIEW_CHARS: usize = 280;

pub(super) async fn apply(
    conn: &mut PgConnection,
    origin: &Origin<'_>,
    event: &SessionEvent,
) -> Result<(), ProjectionError> {
    let session_id = origin.session_id;
    let at = origin.at();
    match event {
        SessionEvent::PromptSubmitted(e) => {
            let preview: String = e.text.chars().take(PREVIEW_CHARS).collect();
            sqlx::query(
                "INSERT INTO prompts (prompt_id, session_id, workspace_id, author_id, author_name,
                     text_preview, text_length, status, queue_position, submitted_sequence,
                     submitted_at, created_xid, created_position)
                 SELECT $1, $2, s.workspace_id, $3, $4, $5, $6, 'queued', s.queue_length + 1, $7,
                        $8, $9, $10
                   FROM sessions s WHERE s.session_id = $2",
            )
            .bind(e.prompt_id)
            .bind(session_id)
            .bind(&e.author_id)
            .bind(&e.author_name)
            .bind(preview)
            .bind(i32::try_from(e.text.chars().count()).unwrap_or(i32::MAX))
            .bind(origin.sequence())
            .bind(at)
            .bind(origin.xid())
            .bind(origin.position())
            .execute(&mut *conn)
            .await?;
            Ok(())
        }
        SessionEvent::PromptStarted(e) => {
            let sql = leaving("status = 'running', started_at = $2");
            let query = sqlx::query_scalar(&sql).bind(e.prompt_id).bind(at);
            leave(conn, session_id, query).await
        }
        SessionEvent::PromptCompleted(e) => {
            let sql = leaving("status = 'completed', finished_at = $2, summary = $3");
            let query = sqlx::query_scalar(&sql)
                .bind(e.prompt_id)
                .bind(at)
                .bind(&e.summary);
            leave(conn, session_id, query).await
        }
        SessionEvent::PromptFailed(e) => {
            let sql = leaving("status = 'failed', finished_at = $2, failure_reason = $3");
            let query = sqlx::query_scalar(&sql)
                .bind(e.prompt_id)
                .bind(at)
                .bind(&e.reason);
            leave(conn, session_id, query).await
        }
        SessionEvent::PromptCancelled(e) => {
            let sql = leaving("status = 'cancelled', finished_at = $2, cancelled_by = $3");
            let query = sqlx::query_scalar(&sql)
                .bind(e.prompt_id)
                .bind(at)
                .bind(&e.cancelled_by);
            leave(conn, session_id, query).await
        }
        _ => Ok(()),
    }
}

/// The update of prompt `$1` that sets `set` (its status and times) and takes it out of the
/// queue, returning the position it had (if it was queued).
fn leaving(set: &str) -> String {
    format!(
        "UPDATE prompts p SET {set}, queue_position = NULL
           FROM (SELECT prompt_id, queue_position AS was FROM prompts WHERE prompt_id = $1) o
          WHERE p.prompt_id = o.prompt_id
         RETURNING o.was"
    )
}

/// The queue's positions are 1..n in submission order, and only queued prompts have one: a new
/// prompt takes the session's queue length + 1 (no other row changes), and a prompt that leaves
/// the queue (started, cancelled, failed) moves up the ones behind it. Nothing here reads the
/// session's history; a submit reads no other prompt at all. (It renumbered the whole queue on
/// every prompt event before: quadratic in a long queue, 213 events/s rebuilding the bench's
/// history.) Runs `update` (a [`leaving`] statement) and closes the gap the prompt left.
async fn leave(
    conn: &mut PgConnection,
    session_id: Uuid,
    update: sqlx::query::QueryScalar<'_, sqlx::Postgres, Option<i32>, sqlx::postgres::PgArguments>,
) -> Result<(), ProjectionError> {
    let Some(was) = update.fetch_optional(&mut *conn).await?.flatten() else {
        return Ok(());
    };
    sqlx::query(
        "UPDATE prompts SET queue_position = queue_position - 1
          WHERE session_id = $1 AND status = 'queued' AND queue_position > $2",
    )
    .bind(session_id)
    .bind(was)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
