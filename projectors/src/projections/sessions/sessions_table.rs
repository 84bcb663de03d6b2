//! Table `sessions`: one row per session, with its participants, counters, running prompt,
//! queue length, sandbox and status. Every event moves its version and activity time.

use canopy_domain::SessionEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use super::Origin;
use crate::projections::ProjectionError;

pub(super) async fn apply(
    conn: &mut PgConnection,
    origin: &Origin<'_>,
    event: &SessionEvent,
) -> Result<(), ProjectionError> {
    let session_id = origin.session_id;
    let at = origin.at();
    match event {
        SessionEvent::SessionStarted(e) => {
            sqlx::query(
                "INSERT INTO sessions (session_id, workspace_id, feature_id, title, repository_url,
                     base_branch, session_branch, status, started_by, started_at, last_activity_at, version, created_xid, created_position)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $9, $9, $10, $11, $12)",
            )
            .bind(session_id)
            .bind(&e.workspace_id)
            .bind(e.feature_id)
            .bind(&e.title)
            .bind(&e.repository_url)
            .bind(&e.base_branch)
            .bind(&e.session_branch)
            .bind(&e.started_by)
            .bind(at)
            .bind(origin.sequence())
            .bind(origin.xid())
            .bind(origin.position())
            .execute(&mut *conn)
            .await?;
            return Ok(());
        }
        SessionEvent::ParticipantJoined(e) => {
            let participant =
                serde_json::json!({"user_id": e.user_id, "name": e.name, "role": e.role});
            sqlx::query(
                "UPDATE sessions SET participants = participants || jsonb_build_array($2::jsonb),
                        participant_count = participant_count + 1
                  WHERE session_id = $1",
            )
            .bind(session_id)
            .bind(participant)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::ParticipantLeft(e) => {
            sqlx::query(
                "UPDATE sessions SET
                        participants = COALESCE((SELECT jsonb_agg(p ORDER BY o)
                                                   FROM jsonb_array_elements(participants) WITH ORDINALITY AS x(p, o)
                                                  WHERE p ->> 'user_id' <> $2), '[]'::jsonb),
                        participant_count = participant_count - 1
                  WHERE session_id = $1",
            )
            .bind(session_id)
            .bind(&e.user_id)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::PromptSubmitted(_) => {
            sqlx::query(
                "UPDATE sessions SET prompt_count = prompt_count + 1, queue_length = queue_length + 1
                  WHERE session_id = $1",
            )
            .bind(session_id)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::PromptStarted(e) => {
            sqlx::query("UPDATE sessions SET running_prompt_id = $2 WHERE session_id = $1")
                .bind(session_id)
                .bind(e.prompt_id)
                .execute(&mut *conn)
                .await?;
            count_queue(conn, session_id).await?;
        }
        SessionEvent::PromptCompleted(e) => finish_prompt(conn, session_id, e.prompt_id).await?,
        SessionEvent::PromptFailed(e) => finish_prompt(conn, session_id, e.prompt_id).await?,
        SessionEvent::PromptCancelled(e) => finish_prompt(conn, session_id, e.prompt_id).await?,
        SessionEvent::ToolExecuted(_) => {
            sqlx::query(
                "UPDATE sessions SET tool_execution_count = tool_execution_count + 1 WHERE session_id = $1",
            )
            .bind(session_id)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::CheckpointTaken(_) => {
            sqlx::query(
                "UPDATE sessions SET checkpoint_count = checkpoint_count + 1 WHERE session_id = $1",
            )
            .bind(session_id)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::SandboxStarted(e) => {
            sqlx::query(
                "UPDATE sessions SET sandbox_id = $2, opencode_session_id = $3 WHERE session_id = $1",
            )
            .bind(session_id)
            .bind(&e.sandbox_id)
            .bind(&e.opencode_session_id)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::SandboxStopped(_) => {
            sqlx::query(
                "UPDATE sessions SET sandbox_id = NULL, opencode_session_id = NULL WHERE session_id = $1",
            )
            .bind(session_id)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::SessionCompleted(_) => {
            sqlx::query(
                "UPDATE sessions SET status = 'completed', finished_at = $2 WHERE session_id = $1",
            )
            .bind(session_id)
            .bind(at)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::SessionFailed(e) => {
            sqlx::query(
                "UPDATE sessions SET status = 'failed', finished_at = $2, failure_reason = $3 WHERE session_id = $1",
            )
            .bind(session_id)
            .bind(at)
            .bind(&e.reason)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::SessionArchived(_) => {
            sqlx::query(
                "UPDATE sessions SET status = 'archived', archived_at = $2 WHERE session_id = $1",
            )
            .bind(session_id)
            .bind(at)
            .execute(&mut *conn)
            .await?;
        }
        // Rows of other tables, or only the activity time here.
        SessionEvent::PlanProposed(_)
        | SessionEvent::PlanApproved(_)
        | SessionEvent::PlanRejected(_)
        | SessionEvent::ToolApprovalRequested(_)
        | SessionEvent::ToolApprovalGranted(_)
        | SessionEvent::ToolApprovalDenied(_)
        | SessionEvent::UsageRecorded(_)
        | SessionEvent::CheckpointRestored(_)
        | SessionEvent::AgentMessageRecorded(_)
        | SessionEvent::CheckpointRequested(_)
        | SessionEvent::RestoreRequested(_)
        | SessionEvent::PushRequested(_)
        | SessionEvent::BranchPushed(_)
        | SessionEvent::BudgetThresholdReached(_) => {}
    }
    let touched = sqlx::query(
        "UPDATE sessions SET last_activity_at = $2, version = $3 WHERE session_id = $1",
    )
    .bind(session_id)
    .bind(at)
    .bind(origin.sequence())
    .execute(&mut *conn)
    .await?;
    if touched.rows_affected() == 0 {
        return Err(ProjectionError::Inconsistent(format!(
            "session {session_id} has no row (event {} before SessionStarted)",
            origin.sequence()
        )));
    }
    Ok(())
}

/// The queue's length after a prompt left it, from the prompts' rows (written before this
/// table's): positions are 1..n in submission order, so it is the position of the last queued
/// prompt, one entry read backwards from the partial index `prompts_queue` (`status = 'queued'`
/// implies its predicate), not a count of the queue.
async fn count_queue(conn: &mut PgConnection, session_id: Uuid) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE sessions SET queue_length = COALESCE(
                (SELECT queue_position FROM prompts
                  WHERE session_id = $1 AND status = 'queued'
                  ORDER BY submitted_sequence DESC LIMIT 1), 0)
          WHERE session_id = $1",
    )
    .bind(session_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn finish_prompt(
    conn: &mut PgConnection,
    session_id: Uuid,
    prompt_id: Uuid,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE sessions SET running_prompt_id = NULL WHERE session_id = $1 AND running_prompt_id = $2",
    )
    .bind(session_id)
    .bind(prompt_id)
    .execute(&mut *conn)
    .await?;
    count_queue(conn, session_id).await
}
