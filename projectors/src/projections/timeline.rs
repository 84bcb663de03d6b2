//! Projection "timeline": one row per session event, with a line a UI can show as is.

use canopy_domain::SessionEvent;
use canopy_domain::session::ToolStatus;
use canopy_relay::Envelope;
use sqlx::PgConnection;

use super::{ProjectionError, decode, uuid, xid};

pub(super) async fn handle(
    conn: &mut PgConnection,
    event: &Envelope,
) -> Result<(), ProjectionError> {
    let session_id = uuid(event)?;
    let decoded: SessionEvent = decode(event)?;
    let workspace = match &decoded {
        SessionEvent::SessionStarted(e) => Some(e.workspace_id.clone()),
        _ => None,
    };
    let summary = summary(&decoded, &event.metadata.actor_name);
    let inserted = sqlx::query(
        "INSERT INTO session_timeline (event_id, session_id, workspace_id, sequence, event_type, actor_id,
             actor_name, recorded_at, summary, data, created_xid, created_position)
         SELECT $1, $2, COALESCE($3, (SELECT workspace_id FROM session_timeline
                                       WHERE session_id = $2 AND sequence = 1)),
                $4, $5, $6, $7, $8, $9, $10, $11, $12
          WHERE $3 IS NOT NULL OR EXISTS (SELECT 1 FROM session_timeline WHERE session_id = $2 AND sequence = 1)",
    )
    .bind(event.id)
    .bind(session_id)
    .bind(workspace)
    .bind(event.sequence)
    .bind(&event.event_type)
    .bind(&event.metadata.actor_id)
    .bind(&event.metadata.actor_name)
    .bind(event.recorded_at)
    .bind(summary)
    .bind(&event.data)
    .bind(xid(event))
    .bind(event.position)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ProjectionError::Inconsistent(format!(
            "session {session_id}: event {} arrived before SessionStarted",
            event.sequence
        )));
    }
    Ok(())
}

fn summary(event: &SessionEvent, actor: &str) -> String {
    use SessionEvent as E;
    match event {
        E::SessionStarted(e) => format!("{actor} started \"{}\" on {}", e.title, e.session_branch),
        E::ParticipantJoined(e) => format!("{} joined as {}", e.name, e.role),
        E::ParticipantLeft(_) => format!("{actor} left"),
        E::PromptSubmitted(e) => format!("{} asked: {}", e.author_name, preview(&e.text)),
        E::PromptStarted(_) => "The agent started on a prompt".to_owned(),
        E::PromptCompleted(_) => "The agent finished a prompt".to_owned(),
        E::PromptFailed(e) => format!("A prompt failed: {}", preview(&e.reason)),
        E::PromptCancelled(e) if e.was_running => format!("{actor} interrupted the running prompt"),
        E::PromptCancelled(_) => format!("{actor} cancelled a queued prompt"),
        E::PlanProposed(e) => format!("The agent proposed a plan: {}", preview(&e.summary)),
        E::PlanApproved(e) => format!("{} approved the plan", e.reviewer_name),
        E::PlanRejected(e) => format!(
            "{} rejected the plan: {}",
            e.reviewer_name,
            preview(&e.comment)
        ),
        E::ToolApprovalRequested(e) => format!(
            "The agent asks to run {}: {}",
            e.tool,
            preview(&e.input_summary)
        ),
        E::ToolApprovalGranted(e) => format!("{} allowed the tool call", e.reviewer_name),
        E::ToolApprovalDenied(e) => format!("{} denied the tool call", e.reviewer_name),
        E::ToolExecuted(e) => {
            let outcome = match e.status {
                ToolStatus::Completed => "completed",
                ToolStatus::Failed => "failed",
                ToolStatus::Denied => "denied",
            };
            format!("The agent ran {} ({outcome}, {} ms)", e.tool, e.duration_ms)
        }
        E::AgentMessageRecorded(e) => format!("The agent said: {}", preview(&e.text)),
        E::UsageRecorded(e) => format!("{} tokens in, {} out", e.input_tokens, e.output_tokens),
        E::CheckpointRequested(_) => format!("{actor} asked for a checkpoint"),
        E::CheckpointTaken(e) => format!(
            "Checkpoint {} ({} files changed)",
            &e.commit_sha[..e.commit_sha.len().min(8)],
            e.files_changed.len()
        ),
        E::RestoreRequested(_) => format!("{actor} asked to restore a checkpoint"),
        E::CheckpointRestored(_) => "A checkpoint was restored".to_owned(),
        E::PushRequested(e) => format!("{actor} asked to push {}", e.branch),
        E::BranchPushed(e) => format!(
            "Pushed {} at {}",
            e.branch,
            &e.commit_sha[..e.commit_sha.len().min(8)]
        ),
        E::SandboxStarted(_) => "The sandbox started".to_owned(),
        E::SandboxStopped(e) => format!("The sandbox stopped: {}", preview(&e.reason)),
        E::SessionCompleted(_) => format!("{actor} completed the session"),
        E::SessionFailed(e) => format!("The session failed: {}", preview(&e.reason)),
        E::SessionArchived(_) => format!("{actor} archived the session"),
        E::BudgetThresholdReached(e) => format!(
            "The {} budget ({}) is {}% used: {} of {} {}",
            e.budget,
            if e.scope.starts_with("person:") {
                "a person's"
            } else {
                e.scope.split(':').next().unwrap_or("")
            },
            e.percent,
            e.spent,
            e.limit,
            e.budget.unit()
        ),
    }
}

fn preview(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    let mut out: String = line.chars().take(120).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}
