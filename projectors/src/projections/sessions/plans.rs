//! Table `plans`: one row per proposed plan, with its steps and the decision on it.

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
        SessionEvent::PlanProposed(e) => {
            sqlx::query(
                "INSERT INTO plans (plan_id, prompt_id, session_id, workspace_id, status, summary, steps,
                     proposed_by, proposed_at, created_xid, created_position)
                 SELECT $1, $2, $3, s.workspace_id, 'pending', $4, $5, $6, $7, $8, $9
                   FROM sessions s WHERE s.session_id = $3",
            )
            .bind(e.plan_id)
            .bind(e.prompt_id)
            .bind(origin.session_id)
            .bind(&e.summary)
            .bind(serde_json::to_value(&e.steps)?)
            .bind(origin.actor_id())
            .bind(origin.at())
            .bind(origin.xid())
            .bind(origin.position())
            .execute(&mut *conn)
            .await?;
            Ok(())
        }
        SessionEvent::PlanApproved(e) => {
            let review = Review {
                status: "approved",
                reviewer_id: &e.reviewer_id,
                reviewer_name: &e.reviewer_name,
                comment: None,
            };
            decide(conn, origin, e.plan_id, review).await
        }
        SessionEvent::PlanRejected(e) => {
            let review = Review {
                status: "rejected",
                reviewer_id: &e.reviewer_id,
                reviewer_name: &e.reviewer_name,
                comment: Some(&e.comment),
            };
            decide(conn, origin, e.plan_id, review).await
        }
        _ => Ok(()),
    }
}

async fn decide(
    conn: &mut PgConnection,
    origin: &Origin<'_>,
    plan_id: Uuid,
    review: Review<'_>,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE plans SET status = $2, reviewer_id = $3, reviewer_name = $4, review_comment = $5,
                decided_at = $6,
                time_to_decision_ms = (extract(epoch FROM ($6 - proposed_at)) * 1000)::bigint
          WHERE plan_id = $1",
    )
    .bind(plan_id)
    .bind(review.status)
    .bind(review.reviewer_id)
    .bind(review.reviewer_name)
    .bind(review.comment)
    .bind(origin.at())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
