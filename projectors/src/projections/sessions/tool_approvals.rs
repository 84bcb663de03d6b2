//! Table `tool_approvals`: one row per request to run a tool, with the decision on it.

use canopy_domain::SessionEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Origin, Review};
use crate::projections::ProjectionError;

pub(super) async fn apply(
    conn: &mut PgConnection,
    origin: &Origin<'_>,
    event: &SessionEvent,
) -> Result<(), ProjectionError> {
    match event {
        SessionEvent::ToolApprovalRequested(e) => {
            sqlx::query(
                "INSERT INTO tool_approvals (request_id, session_id, workspace_id, prompt_id, call_id, tool,
                     input_summary, status, requested_at, created_xid, created_position)
                 SELECT $1, $2, s.workspace_id, $3, $4, $5, $6, 'pending', $7, $8, $9
                   FROM sessions s WHERE s.session_id = $2",
            )
            .bind(e.request_id)
            .bind(origin.session_id)
            .bind(e.prompt_id)
            .bind(&e.call_id)
            .bind(&e.tool)
            .bind(&e.input_summary)
            .bind(origin.at())
            .bind(origin.xid())
            .bind(origin.position())
            .execute(&mut *conn)
            .await?;
            Ok(())
        }
        SessionEvent::ToolApprovalGranted(e) => {
            let review = Review {
                status: "granted",
                reviewer_id: &e.reviewer_id,
                reviewer_name: &e.reviewer_name,
                comment: None,
            };
            decide(conn, origin, e.request_id, review).await
        }
        SessionEvent::ToolApprovalDenied(e) => {
            let review = Review {
                status: "denied",
                reviewer_id: &e.reviewer_id,
                reviewer_name: &e.reviewer_name,
                comment: e.comment.as_deref(),
            };
            decide(conn, origin, e.request_id, review).await
        }
        _ => Ok(()),
    }
}

async fn decide(
    conn: &mut PgConnection,
    origin: &Origin<'_>,
    request_id: Uuid,
    review: Review<'_>,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE tool_approvals SET status = $2, reviewer_id = $3, reviewer_name = $4, comment = $5,
                decided_at = $6
          WHERE request_id = $1",
    )
    .bind(request_id)
    .bind(review.status)
    .bind(review.reviewer_id)
    .bind(review.reviewer_name)
    .bind(review.comment)
    .bind(origin.at())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
