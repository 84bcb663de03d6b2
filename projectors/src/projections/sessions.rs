//! Projection "sessions": sessions, prompts, plans, tool approvals and executions,
//! checkpoints and daily usage.

use canopy_domain::SessionEvent;
use canopy_domain::session::{CheckpointTrigger, ToolPhase, ToolStatus};
use canopy_relay::Envelope;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{ProjectionError, decode, uuid, xid};

const PREVIEW_CHARS: usize = 280;

pub(super) async fn handle(
    conn: &mut PgConnection,
    event: &Envelope,
) -> Result<(), ProjectionError> {
    let session_id = uuid(event)?;
    let at = event.recorded_at;
    let decoded: SessionEvent = decode(event)?;
    match decoded {
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
            .bind(event.sequence)
            .bind(xid(event))
            .bind(event.position)
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
            .bind(event.sequence)
            .bind(at)
            .bind(xid(event))
            .bind(event.position)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "UPDATE sessions SET prompt_count = prompt_count + 1 WHERE session_id = $1",
            )
            .bind(session_id)
            .execute(&mut *conn)
            .await?;
            requeue(conn, session_id).await?;
        }
        SessionEvent::PromptStarted(e) => {
            sqlx::query(
                "UPDATE prompts SET status = 'running', started_at = $2 WHERE prompt_id = $1",
            )
            .bind(e.prompt_id)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            sqlx::query("UPDATE sessions SET running_prompt_id = $2 WHERE session_id = $1")
                .bind(session_id)
                .bind(e.prompt_id)
                .execute(&mut *conn)
                .await?;
            requeue(conn, session_id).await?;
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
            finish_prompt(conn, session_id, e.prompt_id).await?;
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
            finish_prompt(conn, session_id, e.prompt_id).await?;
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
            finish_prompt(conn, session_id, e.prompt_id).await?;
        }
        SessionEvent::PlanProposed(e) => {
            sqlx::query(
                "INSERT INTO plans (plan_id, prompt_id, session_id, workspace_id, status, summary, steps,
                     proposed_by, proposed_at, created_xid, created_position)
                 SELECT $1, $2, $3, s.workspace_id, 'pending', $4, $5, $6, $7, $8, $9
                   FROM sessions s WHERE s.session_id = $3",
            )
            .bind(e.plan_id)
            .bind(e.prompt_id)
            .bind(session_id)
            .bind(&e.summary)
            .bind(serde_json::to_value(&e.steps)?)
            .bind(&event.metadata.actor_id)
            .bind(at)
            .bind(xid(event))
            .bind(event.position)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::PlanApproved(e) => {
            decide_plan(
                conn,
                e.plan_id,
                "approved",
                &e.reviewer_id,
                &e.reviewer_name,
                None,
                event,
            )
            .await?;
        }
        SessionEvent::PlanRejected(e) => {
            decide_plan(
                conn,
                e.plan_id,
                "rejected",
                &e.reviewer_id,
                &e.reviewer_name,
                Some(&e.comment),
                event,
            )
            .await?;
        }
        SessionEvent::ToolApprovalRequested(e) => {
            sqlx::query(
                "INSERT INTO tool_approvals (request_id, session_id, workspace_id, prompt_id, call_id, tool,
                     input_summary, status, requested_at, created_xid, created_position)
                 SELECT $1, $2, s.workspace_id, $3, $4, $5, $6, 'pending', $7, $8, $9
                   FROM sessions s WHERE s.session_id = $2",
            )
            .bind(e.request_id)
            .bind(session_id)
            .bind(e.prompt_id)
            .bind(&e.call_id)
            .bind(&e.tool)
            .bind(&e.input_summary)
            .bind(at)
            .bind(xid(event))
            .bind(event.position)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::ToolApprovalGranted(e) => {
            decide_tool(
                conn,
                e.request_id,
                "granted",
                &e.reviewer_id,
                &e.reviewer_name,
                None,
                event,
            )
            .await?;
        }
        SessionEvent::ToolApprovalDenied(e) => {
            decide_tool(
                conn,
                e.request_id,
                "denied",
                &e.reviewer_id,
                &e.reviewer_name,
                e.comment.as_deref(),
                event,
            )
            .await?;
        }
        SessionEvent::ToolExecuted(e) => {
            sqlx::query(
                "INSERT INTO tool_executions (event_id, session_id, workspace_id, prompt_id, call_id, tool,
                     phase, status, duration_ms, input_summary, output_summary, approval_request_id,
                     approval_status, executed_at, sequence, created_xid, created_position)
                 SELECT $1, $2, s.workspace_id, $3, $4, $5, $6, $7, $8, $9, $10, a.request_id, a.status, $11, $12, $13, $14
                   FROM sessions s
                   LEFT JOIN LATERAL (SELECT request_id, status FROM tool_approvals
                                       WHERE session_id = $2 AND call_id = $4
                                       ORDER BY requested_at DESC, request_id LIMIT 1) a ON true
                  WHERE s.session_id = $2",
            )
            .bind(event.id)
            .bind(session_id)
            .bind(e.prompt_id)
            .bind(&e.call_id)
            .bind(&e.tool)
            .bind(phase(e.phase))
            .bind(status(e.status))
            .bind(i64::try_from(e.duration_ms).unwrap_or(i64::MAX))
            .bind(&e.input_summary)
            .bind(&e.output_summary)
            .bind(at)
            .bind(event.sequence)
            .bind(xid(event))
            .bind(event.position)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "UPDATE sessions SET tool_execution_count = tool_execution_count + 1 WHERE session_id = $1",
            )
            .bind(session_id)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::UsageRecorded(e) => {
            sqlx::query(
                "INSERT INTO usage_daily (session_id, workspace_id, user_id, day, tokens_in, tokens_out, cost_micro_usd)
                 SELECT $1, p.workspace_id, p.author_id, ($3 AT TIME ZONE 'UTC')::date, $4, $5, $6
                   FROM prompts p WHERE p.prompt_id = $2
                 ON CONFLICT (session_id, user_id, day) DO UPDATE
                    SET tokens_in = usage_daily.tokens_in + EXCLUDED.tokens_in,
                        tokens_out = usage_daily.tokens_out + EXCLUDED.tokens_out,
                        cost_micro_usd = usage_daily.cost_micro_usd + EXCLUDED.cost_micro_usd",
            )
            .bind(session_id)
            .bind(e.prompt_id)
            .bind(at)
            .bind(i64::try_from(e.tokens_in).unwrap_or(i64::MAX))
            .bind(i64::try_from(e.tokens_out).unwrap_or(i64::MAX))
            .bind(i64::try_from(e.cost_micro_usd).unwrap_or(i64::MAX))
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::CheckpointTaken(e) => {
            sqlx::query(
                "INSERT INTO checkpoints (checkpoint_id, session_id, workspace_id, prompt_id, label, commit_sha,
                     files_changed, trigger, taken_at, created_xid, created_position)
                 SELECT $1, $2, s.workspace_id, $3, $4, $5, $6, $7, $8, $9, $10
                   FROM sessions s WHERE s.session_id = $2",
            )
            .bind(e.checkpoint_id)
            .bind(session_id)
            .bind(e.prompt_id)
            .bind(&e.label)
            .bind(&e.commit_sha)
            .bind(serde_json::to_value(&e.files_changed)?)
            .bind(match e.trigger {
                CheckpointTrigger::Auto => "auto",
                CheckpointTrigger::Manual => "manual",
            })
            .bind(at)
            .bind(xid(event))
            .bind(event.position)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "UPDATE sessions SET checkpoint_count = checkpoint_count + 1 WHERE session_id = $1",
            )
            .bind(session_id)
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::CheckpointRestored(e) => {
            sqlx::query(
                "UPDATE checkpoints SET restore_count = restore_count + 1, last_restored_at = $2
                  WHERE checkpoint_id = $1",
            )
            .bind(e.checkpoint_id)
            .bind(at)
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
        // Shown in the timeline; nothing to keep here beyond the activity time.
        SessionEvent::AgentMessageRecorded(_)
        | SessionEvent::CheckpointRequested(_)
        | SessionEvent::RestoreRequested(_)
        | SessionEvent::PushRequested(_)
        | SessionEvent::BranchPushed(_) => {}
    }
    let touched = sqlx::query(
        "UPDATE sessions SET last_activity_at = $2, version = $3 WHERE session_id = $1",
    )
    .bind(session_id)
    .bind(at)
    .bind(event.sequence)
    .execute(&mut *conn)
    .await?;
    if touched.rows_affected() == 0 {
        return Err(ProjectionError::Inconsistent(format!(
            "session {session_id} has no row (event {} before SessionStarted)",
            event.sequence
        )));
    }
    Ok(())
}

/// Recomputes the queue: positions of the queued prompts, in submission order, and its length.
async fn requeue(conn: &mut PgConnection, session_id: Uuid) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE prompts p SET queue_position = q.position
           FROM (SELECT prompt_id,
                        CASE WHEN status = 'queued'
                             THEN row_number() OVER (PARTITION BY status = 'queued' ORDER BY submitted_sequence)
                        END::integer AS position
                   FROM prompts WHERE session_id = $1) q
          WHERE p.prompt_id = q.prompt_id AND p.queue_position IS DISTINCT FROM q.position",
    )
    .bind(session_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE sessions SET queue_length = (SELECT count(*) FROM prompts WHERE session_id = $1 AND status = 'queued')
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
    requeue(conn, session_id).await
}

async fn decide_plan(
    conn: &mut PgConnection,
    plan_id: Uuid,
    status: &str,
    reviewer_id: &str,
    reviewer_name: &str,
    comment: Option<&str>,
    event: &Envelope,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE plans SET status = $2, reviewer_id = $3, reviewer_name = $4, review_comment = $5,
                decided_at = $6,
                time_to_decision_ms = (extract(epoch FROM ($6 - proposed_at)) * 1000)::bigint
          WHERE plan_id = $1",
    )
    .bind(plan_id)
    .bind(status)
    .bind(reviewer_id)
    .bind(reviewer_name)
    .bind(comment)
    .bind(event.recorded_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn decide_tool(
    conn: &mut PgConnection,
    request_id: Uuid,
    status: &str,
    reviewer_id: &str,
    reviewer_name: &str,
    comment: Option<&str>,
    event: &Envelope,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE tool_approvals SET status = $2, reviewer_id = $3, reviewer_name = $4, comment = $5,
                decided_at = $6
          WHERE request_id = $1",
    )
    .bind(request_id)
    .bind(status)
    .bind(reviewer_id)
    .bind(reviewer_name)
    .bind(comment)
    .bind(event.recorded_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn phase(phase: ToolPhase) -> &'static str {
    match phase {
        ToolPhase::Plan => "plan",
        ToolPhase::Build => "build",
    }
}

fn status(status: ToolStatus) -> &'static str {
    match status {
        ToolStatus::Completed => "completed",
        ToolStatus::Failed => "failed",
        ToolStatus::Denied => "denied",
    }
}
