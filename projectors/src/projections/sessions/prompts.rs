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
            let was = sqlx::query_scalar(
                "UPDATE prompts p SET status = 'running', started_at = $2, queue_position = NULL
                   FROM (SELECT prompt_id, queue_position AS was FROM prompts WHERE prompt_id = $1) o
                  WHERE p.prompt_id = o.prompt_id
                 RETURNING o.was",
            )
            .bind(e.prompt_id)
            .bind(at)
            .fetch_optional(&mut *conn)
            .await?;
            close_gap(conn, session_id, was.flatten()).await
        }
        SessionEvent::PromptCompleted(e) => {
            let was = sqlx::query_scalar(
                "UPDATE prompts p SET status = 'completed', finished_at = $2, summary = $3, queue_position = NULL
                   FROM (SELECT prompt_id, queue_position AS was FROM prompts WHERE prompt_id = $1) o
                  WHERE p.prompt_id = o.prompt_id
                 RETURNING o.was",
            )
            .bind(e.prompt_id)
            .bind(at)
            .bind(&e.summary)
            .fetch_optional(&mut *conn)
            .await?;
            close_gap(conn, session_id, was.flatten()).await
        }
        SessionEvent::PromptFailed(e) => {
            let was = sqlx::query_scalar(
                "UPDATE prompts p SET status = 'failed', finished_at = $2, failure_reason = $3, queue_position = NULL
                   FROM (SELECT prompt_id, queue_position AS was FROM prompts WHERE prompt_id = $1) o
                  WHERE p.prompt_id = o.prompt_id
                 RETURNING o.was",
            )
            .bind(e.prompt_id)
            .bind(at)
            .bind(&e.reason)
            .fetch_optional(&mut *conn)
            .await?;
            close_gap(conn, session_id, was.flatten()).await
        }
        SessionEvent::PromptCancelled(e) => {
            let was = sqlx::query_scalar(
                "UPDATE prompts p SET status = 'cancelled', finished_at = $2, cancelled_by = $3, queue_position = NULL
                   FROM (SELECT prompt_id, queue_position AS was FROM prompts WHERE prompt_id = $1) o
                  WHERE p.prompt_id = o.prompt_id
                 RETURNING o.was",
            )
            .bind(e.prompt_id)
            .bind(at)
            .bind(&e.cancelled_by)
            .fetch_optional(&mut *conn)
            .await?;
            close_gap(conn, session_id, was.flatten()).await
        }
        _ => Ok(()),
    }
}

/// The queue's positions are 1..n in submission order, and only queued prompts have one: a new
/// prompt takes the session's queue length + 1 (no other row changes), and a prompt that leaves
/// the queue (started, cancelled, failed) moves up the ones behind it. Nothing here reads the
/// session's history; a submit reads no other prompt at all. (It renumbered the whole queue on
/// every prompt event before: quadratic in a long queue, 213 events/s rebuilding the bench's
/// history.)
async fn close_gap(
    conn: &mut PgConnection,
    session_id: Uuid,
    was: Option<i32>,
) -> Result<(), ProjectionError> {
    let Some(was) = was else {
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
