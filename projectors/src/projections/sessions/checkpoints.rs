//! Table `checkpoints`: one row per checkpoint taken, with its restores.

use canopy_domain::SessionEvent;
use canopy_domain::session::CheckpointTrigger;
use sqlx::PgConnection;

use super::Origin;
use crate::projections::ProjectionError;

pub(super) async fn apply(
    conn: &mut PgConnection,
    origin: &Origin<'_>,
    event: &SessionEvent,
) -> Result<(), ProjectionError> {
    match event {
        SessionEvent::CheckpointTaken(e) => {
            sqlx::query(
                "INSERT INTO checkpoints (checkpoint_id, session_id, workspace_id, prompt_id, label, commit_sha,
                     files_changed, trigger, taken_at, created_xid, created_position)
                 SELECT $1, $2, s.workspace_id, $3, $4, $5, $6, $7, $8, $9, $10
                   FROM sessions s WHERE s.session_id = $2",
            )
            .bind(e.checkpoint_id)
            .bind(origin.session_id)
            .bind(e.prompt_id)
            .bind(&e.label)
            .bind(&e.commit_sha)
            .bind(serde_json::to_value(&e.files_changed)?)
            .bind(match e.trigger {
                CheckpointTrigger::Auto => "auto",
                CheckpointTrigger::Manual => "manual",
            })
            .bind(origin.at())
            .bind(origin.xid())
            .bind(origin.position())
            .execute(&mut *conn)
            .await?;
        }
        SessionEvent::CheckpointRestored(e) => {
            sqlx::query(
                "UPDATE checkpoints SET restore_count = restore_count + 1, last_restored_at = $2
                  WHERE checkpoint_id = $1",
            )
            .bind(e.checkpoint_id)
            .bind(origin.at())
            .execute(&mut *conn)
            .await?;
        }
        _ => {}
    }
    Ok(())
}
