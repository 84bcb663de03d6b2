//! Table `usage_daily`: model tokens and cost per session, person (the prompt's author) and
//! UTC day.

use canopy_domain::SessionEvent;
use sqlx::PgConnection;

use super::Origin;
use crate::projections::ProjectionError;

pub(super) async fn apply(
    conn: &mut PgConnection,
    origin: &Origin<'_>,
    event: &SessionEvent,
) -> Result<(), ProjectionError> {
    let SessionEvent::UsageRecorded(e) = event else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO usage_daily (session_id, workspace_id, user_id, day, tokens_in, tokens_out, cost_micro_usd)
         SELECT $1, p.workspace_id, p.author_id, ($3 AT TIME ZONE 'UTC')::date, $4, $5, $6
           FROM prompts p WHERE p.prompt_id = $2
         ON CONFLICT (session_id, user_id, day) DO UPDATE
            SET tokens_in = usage_daily.tokens_in + EXCLUDED.tokens_in,
                tokens_out = usage_daily.tokens_out + EXCLUDED.tokens_out,
                cost_micro_usd = usage_daily.cost_micro_usd + EXCLUDED.cost_micro_usd",
    )
    .bind(origin.session_id)
    .bind(e.prompt_id)
    .bind(origin.at())
    .bind(i64::try_from(e.input_tokens).unwrap_or(i64::MAX))
    .bind(i64::try_from(e.output_tokens).unwrap_or(i64::MAX))
    .bind(i64::try_from(e.cost_micro_usd).unwrap_or(i64::MAX))
    .execute(&mut *conn)
    .await?;
    Ok(())
}
