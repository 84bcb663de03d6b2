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
                     text_preview, text_length, status, submitted_sequence, submitted_at, created_xid, created_position)
                 SELECT $1, $2, s.workspace_id, $3, $4, $5, $6, 'queued', $7, $8, $9, $10
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
            requeue(conn, session_id).await
        }
        SessionEvent::PromptStarted(e) => {
            sqlx::query(
                "UPDATE prompts SET status = 'running', started_at = $2 WHERE prompt_id = $1",
            )
            .bind(e.prompt_id)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            requeue(conn, session_id).await
        }
        SessionEvent::PromptCompleted(e) => {
            sqlx::query(
                "UPDATE prompts SET status = 'completed', finished_at = $2, summary = $3 WHERE prompt_id = $1",
            )
            .bind(e.prompt_id)
            .bind(at)
            .bind(&e.summary)
            .execute(&mut *conn)
            .await?;
            requeue(conn, session_id).await
        }
        SessionEvent::PromptFailed(e) => {
            sqlx::query(
                "UPDATE prompts SET status = 'failed', finished_at = $2, failure_reason = $3 WHERE prompt_id = $1",
            )
            .bind(e.prompt_id)
            .bind(at)
            .bind(&e.reason)
            .execute(&mut *conn)
            .await?;
            requeue(conn, session_id).await
        }
        SessionEvent::PromptCancelled(e) => {
            sqlx::query(
                "UPDATE prompts SET status = 'cancelled', finished_at = $2, cancelled_by = $3 WHERE prompt_id = $1",
            )
            .bind(e.prompt_id)
            .bind(at)
            .bind(&e.cancelled_by)
            .execute(&mut *conn)
            .await?;
            requeue(conn, session_id).await
        }
        _ => Ok(()),
    }
}

/// Numbers the queued prompts in submission order (others get none). Only rows that are queued
/// or still carry a position can change, and the partial index `prompts_queue` holds just those,
/// so this reads the queue, not the session's history.
async fn requeue(conn: &mut PgConnection, session_id: Uuid) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE prompts p SET queue_position = q.position
           FROM (SELECT prompt_id,
                        CASE WHEN status = 'queued'
                             THEN row_number() OVER (PARTITION BY status = 'queued' ORDER BY submitted_sequence)
                        END::integer AS position
                   FROM prompts
                  WHERE session_id = $1 AND (status = 'queued' OR queue_position IS NOT NULL)) q
          WHERE p.prompt_id = q.prompt_id AND p.queue_position IS DISTINCT FROM q.position",
    )
    .bind(session_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
