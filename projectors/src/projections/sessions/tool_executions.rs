//! Table `tool_executions`: one row per tool the agent ran, with the approval it ran under.

use canopy_domain::SessionEvent;
use canopy_domain::session::{ToolPhase, ToolStatus};
use sqlx::PgConnection;

use super::Origin;
use crate::projections::ProjectionError;

pub(super) async fn apply(
    conn: &mut PgConnection,
    origin: &Origin<'_>,
    event: &SessionEvent,
) -> Result<(), ProjectionError> {
    let SessionEvent::ToolExecuted(e) = event else {
        return Ok(());
    };
    // The approval is the session's latest request for this call (written before this table).
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
    .bind(origin.event.id)
    .bind(origin.session_id)
    .bind(e.prompt_id)
    .bind(&e.call_id)
    .bind(&e.tool)
    .bind(phase(e.phase))
    .bind(status(e.status))
    .bind(i64::try_from(e.duration_ms).unwrap_or(i64::MAX))
    .bind(&e.input_summary)
    .bind(&e.output_summary)
    .bind(origin.at())
    .bind(origin.sequence())
    .bind(origin.xid())
    .bind(origin.position())
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
