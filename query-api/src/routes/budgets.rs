//! Budgets as they stand: every budget set for the reader's workspace with what is spent,
//! reserved and left, and the spending ledger by workspace, person and session
//! (`docs/budgets.md`). Read from the tables command-api's append transactions keep
//! (`budget_limits`, `budget_ledger`, `budget_reservations`), so a refusal and this answer use
//! the same numbers.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Reader;
use crate::error::ApiError;
use crate::query::{Params, check_text};
use crate::routes::{AnalyticsProblems, BudgetProblems};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct BudgetParams {
    /// Also show the session budgets of this session (of the reader's workspace; else 404).
    pub session_id: Option<Uuid>,
    /// Whose daily budget to show; the reader by default.
    #[param(max_length = 255, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
    pub user_id: Option<String>,
}

/// One budget as it stands now.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BudgetStanding {
    /// `workspace_monthly_cost`, `workspace_monthly_tokens`, `session_cost`, `session_tokens`,
    /// `session_agent_seconds`, `person_daily_cost` or `concurrent_sessions`.
    pub kind: String,
    /// `micro_usd`, `tokens`, `seconds` or `sessions`.
    pub unit: String,
    pub limit: i64,
    /// `workspace`, `person:<user id>` or `session:<session id>`; absent for a session budget
    /// when no session was asked for.
    pub scope: Option<String>,
    /// `YYYY-MM` or `YYYY-MM-DD` (UTC), empty for a session's life or the concurrency cap.
    pub period: String,
    /// Recorded so far in the period (for the cap: sessions holding a runner's lease now).
    pub spent: i64,
    /// Held back by admitted prompts that have not finished.
    pub reserved: i64,
    /// `limit - spent - reserved`, at least 0.
    pub remaining: i64,
    /// `spent / limit`, in percent.
    pub used_percent: f64,
}

/// Every budget of the reader's workspace.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Budgets {
    pub workspace_id: String,
    /// The current UTC month, `YYYY-MM`.
    pub month: String,
    /// The current UTC day, `YYYY-MM-DD`.
    pub day: String,
    pub budgets: Vec<BudgetStanding>,
}

#[derive(Debug, FromRow)]
struct Row {
    kind: String,
    limit: i64,
    scope: Option<String>,
    period: String,
    spent: i64,
    reserved: i64,
}

/// Every budget set for the reader's workspace, with spent, reserved and remaining. Every
/// member reads them; owners and admins set them through command-api.
#[utoipa::path(get, path = "/budgets", tag = "budgets",
    params(BudgetParams),
    responses((status = 200, body = Budgets, description = "The workspace's budgets as they stand"), BudgetProblems),
    security(("bearer" = [])))]
pub(crate) async fn budgets(
    State(state): State<AppState>,
    reader: Reader,
    Params(params): Params<BudgetParams>,
) -> Result<Json<Budgets>, ApiError> {
    check_text("user_id", params.user_id.as_deref())?;
    if let Some(session_id) = params.session_id {
        // another workspace's session answers as one that does not exist
        let workspace: Option<Option<String>> = sqlx::query_scalar(
            "SELECT payload #>> '{SessionStarted,workspace_id}' FROM events
              WHERE aggregate_type = 'session' AND aggregate_id = $1 AND sequence = 1",
        )
        .bind(session_id.to_string())
        .fetch_optional(&state.pool)
        .await
        .map_err(ApiError::internal)?;
        if workspace.flatten().as_deref() != Some(reader.workspace_id.as_str()) {
            return Err(ApiError::NotFound("session"));
        }
    }
    let person = params.user_id.unwrap_or_else(|| reader.person.clone());
    let (month, day): (String, String) = sqlx::query_as(
        "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'), to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    )
    .fetch_one(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    let rows: Vec<Row> = sqlx::query_as(BUDGETS)
        .bind(&reader.workspace_id)
        .bind(&month)
        .bind(&day)
        .bind(format!("person:{person}"))
        .bind(&person)
        .bind(params.session_id.map(|s| format!("session:{s}")))
        .bind(params.session_id)
        .fetch_all(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    let budgets = rows
        .into_iter()
        .map(|row| {
            let unit = canopy_domain::BudgetKind::parse(&row.kind)
                .map(canopy_domain::BudgetKind::unit)
                .unwrap_or_default();
            BudgetStanding {
                unit: unit.to_owned(),
                remaining: (row.limit - row.spent - row.reserved).max(0),
                used_percent: row.spent as f64 * 100.0 / row.limit.max(1) as f64,
                kind: row.kind,
                limit: row.limit,
                scope: row.scope,
                period: row.period,
                spent: row.spent,
                reserved: row.reserved,
            }
        })
        .collect();
    Ok(Json(Budgets {
        workspace_id: reader.workspace_id,
        month,
        day,
        budgets,
    }))
}

/// Each limit with the ledger row and the reservations it is measured against. $1 workspace,
/// $2 month, $3 day, $4 the person's scope, $5 the person, $6 the session's scope (or null),
/// $7 the session (or null).
const BUDGETS: &str = r#"
SELECT b.kind, b."limit",
       CASE WHEN b.kind LIKE 'workspace_%' THEN 'workspace'
            WHEN b.kind LIKE 'person_%' THEN $4
            WHEN b.kind LIKE 'session_%' THEN $6
            ELSE NULL END AS scope,
       CASE WHEN b.kind LIKE 'workspace_%' THEN $2
            WHEN b.kind LIKE 'person_%' THEN $3
            ELSE '' END AS period,
       COALESCE(CASE b.kind
            WHEN 'workspace_monthly_cost' THEN
                (SELECT cost_micro_usd FROM budget_ledger
                  WHERE workspace_id = $1 AND scope = 'workspace' AND period = $2)
            WHEN 'workspace_monthly_tokens' THEN
                (SELECT tokens FROM budget_ledger
                  WHERE workspace_id = $1 AND scope = 'workspace' AND period = $2)
            WHEN 'person_daily_cost' THEN
                (SELECT cost_micro_usd FROM budget_ledger
                  WHERE workspace_id = $1 AND scope = $4 AND period = $3)
            WHEN 'session_cost' THEN
                (SELECT cost_micro_usd FROM budget_ledger
                  WHERE workspace_id = $1 AND scope = $6 AND period = '')
            WHEN 'session_tokens' THEN
                (SELECT tokens FROM budget_ledger
                  WHERE workspace_id = $1 AND scope = $6 AND period = '')
            WHEN 'session_agent_seconds' THEN
                (SELECT agent_ms / 1000 FROM budget_ledger
                  WHERE workspace_id = $1 AND scope = $6 AND period = '')
            WHEN 'concurrent_sessions' THEN
                (SELECT count(*) FROM runner_leases
                  WHERE workspace_id = $1 AND expires_at > now())
            END, 0)::bigint AS spent,
       COALESCE(CASE b.kind
            WHEN 'workspace_monthly_cost' THEN
                (SELECT sum(GREATEST(cost_micro_usd - used_cost, 0)) FROM budget_reservations
                  WHERE workspace_id = $1 AND month = $2)
            WHEN 'workspace_monthly_tokens' THEN
                (SELECT sum(GREATEST(tokens - used_tokens, 0)) FROM budget_reservations
                  WHERE workspace_id = $1 AND month = $2)
            WHEN 'person_daily_cost' THEN
                (SELECT sum(GREATEST(cost_micro_usd - used_cost, 0)) FROM budget_reservations
                  WHERE workspace_id = $1 AND person_id = $5 AND day = $3)
            WHEN 'session_cost' THEN
                (SELECT sum(GREATEST(cost_micro_usd - used_cost, 0)) FROM budget_reservations
                  WHERE workspace_id = $1 AND session_id = $7)
            WHEN 'session_tokens' THEN
                (SELECT sum(GREATEST(tokens - used_tokens, 0)) FROM budget_reservations
                  WHERE workspace_id = $1 AND session_id = $7)
            END, 0)::bigint AS reserved
  FROM budget_limits b
 WHERE b.workspace_id = $1
 ORDER BY b.kind"#;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SpendParams {
    /// `workspace` (default: per month), `user` (per day) or `session` (over its life).
    #[param(inline)]
    pub group_by: Option<SpendGroup>,
}

/// What spend is summed per.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SpendGroup {
    #[default]
    Workspace,
    User,
    Session,
}

/// What one scope spent in one period, from the budget ledger.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct Spend {
    /// The month (`YYYY-MM`) for the workspace, the user id, or the session id.
    pub key: String,
    /// `YYYY-MM` for the workspace, `YYYY-MM-DD` for a user, empty for a session.
    pub period: String,
    pub cost_micro_usd: i64,
    pub tokens: i64,
    /// Time the session's prompts ran (sessions only; 0 otherwise).
    pub agent_ms: i64,
}

/// Spend from the budget ledger per month, per person and day, or per session (most expensive
/// first; at most 1000 rows).
#[utoipa::path(get, path = "/analytics/spend", tag = "analytics",
    params(SpendParams),
    responses((status = 200, body = Vec<Spend>, description = "Spend per key and period"), AnalyticsProblems),
    security(("bearer" = [])))]
pub(crate) async fn spend(
    State(state): State<AppState>,
    reader: Reader,
    Params(params): Params<SpendParams>,
) -> Result<Json<Vec<Spend>>, ApiError> {
    let prefix = match params.group_by.unwrap_or_default() {
        SpendGroup::Workspace => "workspace",
        SpendGroup::User => "person:",
        SpendGroup::Session => "session:",
    };
    let rows = sqlx::query_as(
        "SELECT CASE WHEN scope = 'workspace' THEN period
                     ELSE substr(scope, strpos(scope, ':') + 1) END AS key,
                period, cost_micro_usd, tokens, agent_ms
           FROM budget_ledger
          WHERE workspace_id = $1 AND starts_with(scope, $2)
            AND (cost_micro_usd > 0 OR tokens > 0 OR agent_ms > 0)
          ORDER BY cost_micro_usd DESC, tokens DESC, key, period
          LIMIT 1000",
    )
    .bind(&reader.workspace_id)
    .bind(prefix)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(rows))
}
