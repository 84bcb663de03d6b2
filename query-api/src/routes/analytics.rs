//! Analytics over the read models, for the reader's workspace.

use axum::Json;
use axum::extract::State;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Reader;
use crate::error::ApiError;
use crate::query::{Params, TimeRange};
use crate::routes::AnalyticsProblems;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ToolUsageParams {
    /// One session instead of the whole workspace.
    pub session_id: Option<Uuid>,
}

/// How much a tool was used and how often it failed.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct ToolUsage {
    pub tool: String,
    pub executions: i64,
    pub failures: i64,
    /// failures / executions.
    pub failure_rate: f64,
    pub avg_duration_ms: f64,
}

/// Tool usage and failure rate, per tool, for the workspace or one session (time range on
/// `executed_at`).
#[utoipa::path(get, path = "/analytics/tools", tag = "analytics",
    params(ToolUsageParams, TimeRange),
    responses((status = 200, body = Vec<ToolUsage>, description = "Usage per tool"), AnalyticsProblems),
    security(("bearer" = [])))]
pub(crate) async fn tools(
    State(state): State<AppState>,
    reader: Reader,
    Params(params): Params<ToolUsageParams>,
    Params(range): Params<TimeRange>,
) -> Result<Json<Vec<ToolUsage>>, ApiError> {
    let rows = sqlx::query_as(
        "SELECT tool, count(*) AS executions,
                count(*) FILTER (WHERE status = 'failed') AS failures,
                (count(*) FILTER (WHERE status = 'failed'))::float8 / count(*) AS failure_rate,
                avg(duration_ms)::float8 AS avg_duration_ms
           FROM read.tool_executions
          WHERE workspace_id = $1 AND ($2::uuid IS NULL OR session_id = $2)
            AND ($3::timestamptz IS NULL OR executed_at >= $3) AND ($4::timestamptz IS NULL OR executed_at < $4)
          GROUP BY tool ORDER BY executions DESC, tool",
    )
    .bind(&reader.workspace_id)
    .bind(params.session_id)
    .bind(range.from)
    .bind(range.to)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(rows))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LatencyParams {
    /// `approved` (default) or `rejected`.
    #[param(inline)]
    pub status: Option<Decision>,
}

/// How a plan's review ended.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Decision {
    #[default]
    Approved,
    Rejected,
}

/// Percentiles of the time from a plan's proposal to its decision.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct PlanLatency {
    pub decisions: i64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<i64>,
}

/// Plan approval latency percentiles (time range on `decided_at`).
#[utoipa::path(get, path = "/analytics/plan-latency", tag = "analytics",
    params(LatencyParams, TimeRange),
    responses((status = 200, body = PlanLatency, description = "Plan approval latency percentiles"), AnalyticsProblems),
    security(("bearer" = [])))]
pub(crate) async fn plan_latency(
    State(state): State<AppState>,
    reader: Reader,
    Params(params): Params<LatencyParams>,
    Params(range): Params<TimeRange>,
) -> Result<Json<PlanLatency>, ApiError> {
    let status = match params.status.unwrap_or_default() {
        Decision::Approved => "approved",
        Decision::Rejected => "rejected",
    };
    let row = sqlx::query_as(
        "SELECT count(*) AS decisions,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY time_to_decision_ms) AS p50_ms,
                percentile_cont(0.9) WITHIN GROUP (ORDER BY time_to_decision_ms) AS p90_ms,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY time_to_decision_ms) AS p99_ms,
                max(time_to_decision_ms) AS max_ms
           FROM read.plans
          WHERE workspace_id = $1 AND status = $2
            AND ($3::timestamptz IS NULL OR decided_at >= $3) AND ($4::timestamptz IS NULL OR decided_at < $4)",
    )
    .bind(&reader.workspace_id)
    .bind(status)
    .bind(range.from)
    .bind(range.to)
    .fetch_one(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(row))
}

/// Prompts one person submitted on one day (UTC).
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct PromptsPerDay {
    pub user_id: String,
    pub day: NaiveDate,
    pub prompts: i64,
}

/// Prompts per user per day (time range on `submitted_at`).
#[utoipa::path(get, path = "/analytics/prompts-per-user-per-day", tag = "analytics",
    params(TimeRange),
    responses((status = 200, body = Vec<PromptsPerDay>, description = "Prompts per user per day"), AnalyticsProblems),
    security(("bearer" = [])))]
pub(crate) async fn prompts_per_user_per_day(
    State(state): State<AppState>,
    reader: Reader,
    Params(range): Params<TimeRange>,
) -> Result<Json<Vec<PromptsPerDay>>, ApiError> {
    let rows = sqlx::query_as(
        "SELECT author_id AS user_id, (submitted_at AT TIME ZONE 'UTC')::date AS day, count(*) AS prompts
           FROM read.prompts
          WHERE workspace_id = $1
            AND ($2::timestamptz IS NULL OR submitted_at >= $2) AND ($3::timestamptz IS NULL OR submitted_at < $3)
          GROUP BY 1, 2 ORDER BY day, user_id",
    )
    .bind(&reader.workspace_id)
    .bind(range.from)
    .bind(range.to)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(rows))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct AgentTimeParams {
    /// `session` (default) or `user`.
    #[param(inline)]
    pub group_by: Option<GroupBy>,
}

/// What agent time is summed per.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum GroupBy {
    #[default]
    Session,
    User,
}

/// Agent time (prompts from start to finish) and model usage, per session or per user.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct AgentTime {
    /// A session id or a user id.
    pub key: String,
    pub prompts: i64,
    pub agent_ms: i64,
    pub tokens_in: i64,
    pub tokens_out: i64,
    pub cost_micro_usd: i64,
}

/// Agent time and cost per session or per user (all time).
#[utoipa::path(get, path = "/analytics/agent-time", tag = "analytics",
    params(AgentTimeParams),
    responses((status = 200, body = Vec<AgentTime>, description = "Agent time and cost per key"), AnalyticsProblems),
    security(("bearer" = [])))]
pub(crate) async fn agent_time(
    State(state): State<AppState>,
    reader: Reader,
    Params(params): Params<AgentTimeParams>,
) -> Result<Json<Vec<AgentTime>>, ApiError> {
    let (prompt_key, usage_key) = match params.group_by.unwrap_or_default() {
        GroupBy::Session => ("session_id::text", "session_id::text"),
        GroupBy::User => ("author_id", "user_id"),
    };
    let rows = sqlx::query_as(&format!(
        "WITH agent AS (
             SELECT {prompt_key} AS key, count(*) AS prompts,
                    COALESCE(sum((extract(epoch FROM finished_at - started_at) * 1000)::bigint), 0)::bigint AS agent_ms
               FROM read.prompts
              WHERE workspace_id = $1 AND started_at IS NOT NULL AND finished_at IS NOT NULL
              GROUP BY 1),
         spend AS (
             SELECT {usage_key} AS key, sum(tokens_in)::bigint AS tokens_in, sum(tokens_out)::bigint AS tokens_out,
                    sum(cost_micro_usd)::bigint AS cost_micro_usd
               FROM read.usage_daily WHERE workspace_id = $1 GROUP BY 1)
         SELECT key, COALESCE(prompts, 0) AS prompts, COALESCE(agent_ms, 0) AS agent_ms,
                COALESCE(tokens_in, 0) AS tokens_in, COALESCE(tokens_out, 0) AS tokens_out,
                COALESCE(cost_micro_usd, 0) AS cost_micro_usd
           FROM agent FULL JOIN spend USING (key)
          ORDER BY cost_micro_usd DESC, agent_ms DESC, key"
    ))
    .bind(&reader.workspace_id)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(rows))
}
