//! Projection "features": features with their sessions, learnings and decisions.

use canopy_domain::FeatureEvent;
use canopy_relay::Envelope;
use sqlx::PgConnection;

use super::{ProjectionError, decode, uuid, xid};

pub(super) async fn handle(
    conn: &mut PgConnection,
    event: &Envelope,
) -> Result<(), ProjectionError> {
    let feature_id = uuid(event)?;
    let at = event.recorded_at;
    match decode::<FeatureEvent>(event)? {
        FeatureEvent::FeatureCreated(e) => {
            sqlx::query(
                "INSERT INTO features (feature_id, workspace_id, title, description, status, created_by,
                     created_at, version, created_xid, created_position)
                 VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, $8, $9)",
            )
            .bind(feature_id)
            .bind(&e.workspace_id)
            .bind(&e.title)
            .bind(&e.description)
            .bind(&e.created_by)
            .bind(at)
            .bind(event.sequence)
            .bind(xid(event))
            .bind(event.position)
            .execute(&mut *conn)
            .await?;
            return Ok(());
        }
        FeatureEvent::SessionAttached(e) => {
            sqlx::query(
                "INSERT INTO feature_sessions (feature_id, session_id, attached_by, attached_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(feature_id)
            .bind(e.session_id)
            .bind(&e.attached_by)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "UPDATE features SET session_count = session_count + 1 WHERE feature_id = $1",
            )
            .bind(feature_id)
            .execute(&mut *conn)
            .await?;
        }
        FeatureEvent::LearningShared(e) => {
            sqlx::query(
                "INSERT INTO feature_learnings (learning_id, feature_id, session_id, text, shared_by,
                     shared_by_name, shared_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(e.learning_id)
            .bind(feature_id)
            .bind(e.session_id)
            .bind(&e.text)
            .bind(&e.shared_by)
            .bind(&e.shared_by_name)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "UPDATE features SET learning_count = learning_count + 1 WHERE feature_id = $1",
            )
            .bind(feature_id)
            .execute(&mut *conn)
            .await?;
        }
        FeatureEvent::DecisionRecorded(e) => {
            sqlx::query(
                "INSERT INTO feature_decisions (decision_id, feature_id, title, rationale, recorded_by, recorded_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(e.decision_id)
            .bind(feature_id)
            .bind(&e.title)
            .bind(&e.rationale)
            .bind(&e.recorded_by)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "UPDATE features SET decision_count = decision_count + 1 WHERE feature_id = $1",
            )
            .bind(feature_id)
            .execute(&mut *conn)
            .await?;
        }
        FeatureEvent::FeatureCompleted(_) => {
            sqlx::query(
                "UPDATE features SET status = 'completed', completed_at = $2 WHERE feature_id = $1",
            )
            .bind(feature_id)
            .bind(at)
            .execute(&mut *conn)
            .await?;
        }
    }
    let touched = sqlx::query("UPDATE features SET version = $2 WHERE feature_id = $1")
        .bind(feature_id)
        .bind(event.sequence)
        .execute(&mut *conn)
        .await?;
    if touched.rows_affected() == 0 {
        return Err(ProjectionError::Inconsistent(format!(
            "feature {feature_id} has no row (event {} before FeatureCreated)",
            event.sequence
        )));
    }
    Ok(())
}
