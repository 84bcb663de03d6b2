//! Read models: get by id and list with filters and cursor pagination, scoped to the reader's
//! workspace (another workspace's rows are 404, never 403).

use axum::Json;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Reader;
use crate::error::ApiError;
use crate::query::{
    ConsistencyParams, Cursor, Filter, Listed, PageParams, TimeRange, list_query, page_of,
    time_filters, wait_consistent,
};

macro_rules! listed {
    ($row:ty) => {
        impl Listed for $row {
            fn cursor(&self) -> Cursor {
                Cursor {
                    xid: self.created_xid,
                    position: self.created_position,
                }
            }
        }
    };
}

/// A page of rows and the cursor of the next page (absent on the last page).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

async fn fetch_page<T>(
    state: &AppState,
    table: &str,
    columns: &str,
    reader: &Reader,
    filters: &[Filter],
    page: &PageParams,
) -> Result<Json<Page<T>>, ApiError>
where
    T: for<'r> FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin + Listed,
{
    let (mut query, limit, _) = list_query(table, columns, &reader.workspace_id, filters, page)?;
    let rows: Vec<T> = query
        .build_query_as()
        .fetch_all(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    let (items, next_cursor) = page_of(rows, limit);
    Ok(Json(Page { items, next_cursor }))
}

async fn fetch_one<T>(
    state: &AppState,
    table: &str,
    columns: &str,
    key: &str,
    id: Uuid,
    reader: &Reader,
    what: &'static str,
) -> Result<Json<T>, ApiError>
where
    T: for<'r> FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let row: Option<T> = sqlx::query_as(&format!(
        "SELECT {columns}, created_xid, created_position FROM read.{table} WHERE {key} = $1 AND workspace_id = $2"
    ))
    .bind(id)
    .bind(&reader.workspace_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    row.map(Json).ok_or(ApiError::NotFound(what))
}

fn parse_id(id: &str, what: &'static str) -> Result<Uuid, ApiError> {
    id.parse().map_err(|_| ApiError::NotFound(what))
}

fn text(filters: &mut Vec<Filter>, column: &'static str, value: &Option<String>) {
    if let Some(value) = value {
        filters.push(Filter::Text(column, value.clone()));
    }
}

fn id(filters: &mut Vec<Filter>, column: &'static str, value: Option<Uuid>) {
    if let Some(value) = value {
        filters.push(Filter::Id(column, value));
    }
}

fn status(value: &Option<String>, allowed: &[&str]) -> Result<(), ApiError> {
    match value {
        Some(status) if !allowed.contains(&status.as_str()) => Err(ApiError::invalid(
            "status",
            format!("must be one of {}", allowed.join(", ")),
        )),
        _ => Ok(()),
    }
}

// ---- sessions ----

const SESSION_COLUMNS: &str = "session_id, workspace_id, feature_id, title, repository_url, base_branch, \
    session_branch, status, started_by, started_at, finished_at, archived_at, failure_reason, participants, \
    participant_count, queue_length, running_prompt_id, prompt_count, tool_execution_count, checkpoint_count, \
    sandbox_id, opencode_session_id, last_activity_at, version";

/// A session as the UI lists it.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct Session {
    pub session_id: Uuid,
    pub workspace_id: String,
    pub feature_id: Option<Uuid>,
    pub title: String,
    pub repository_url: String,
    pub base_branch: String,
    pub session_branch: String,
    /// active, completed, failed or archived.
    pub status: String,
    pub started_by: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
    pub failure_reason: Option<String>,
    /// `[{"user_id", "name", "role"}]` in joining order.
    #[schema(value_type = Vec<Object>)]
    pub participants: serde_json::Value,
    pub participant_count: i32,
    pub queue_length: i32,
    pub running_prompt_id: Option<Uuid>,
    pub prompt_count: i32,
    pub tool_execution_count: i32,
    pub checkpoint_count: i32,
    pub sandbox_id: Option<String>,
    pub opencode_session_id: Option<String>,
    pub last_activity_at: DateTime<Utc>,
    /// The session's version (its last event's sequence) this row reflects.
    pub version: i64,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_xid: i64,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_position: i64,
}
listed!(Session);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SessionFilters {
    /// active, completed, failed or archived.
    pub status: Option<String>,
    pub feature_id: Option<Uuid>,
    /// Who started it (user id).
    pub started_by: Option<String>,
}

/// List the workspace's sessions (time range on `started_at`).
#[utoipa::path(get, path = "/sessions", tag = "sessions",
    params(SessionFilters, TimeRange, PageParams, ConsistencyParams),
    responses((status = 200, body = Page<Session>), (status = 401, body = crate::error::Problem),
              (status = 403, body = crate::error::Problem), (status = 409, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn list_sessions(
    State(state): State<AppState>,
    reader: Reader,
    Query(filters): Query<SessionFilters>,
    Query(range): Query<TimeRange>,
    Query(page): Query<PageParams>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<Page<Session>>, ApiError> {
    status(
        &filters.status,
        &["active", "completed", "failed", "archived"],
    )?;
    wait_consistent(&state, "sessions_positions", &consistency).await?;
    let mut list = time_filters("started_at", &range)?;
    text(&mut list, "status", &filters.status);
    id(&mut list, "feature_id", filters.feature_id);
    text(&mut list, "started_by", &filters.started_by);
    fetch_page(&state, "sessions", SESSION_COLUMNS, &reader, &list, &page).await
}

/// One session.
#[utoipa::path(get, path = "/sessions/{session_id}", tag = "sessions",
    params(("session_id" = Uuid, Path), ConsistencyParams),
    responses((status = 200, body = Session), (status = 404, body = crate::error::Problem),
              (status = 409, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn get_session(
    State(state): State<AppState>,
    reader: Reader,
    Path(session_id): Path<String>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<Session>, ApiError> {
    let session_id = parse_id(&session_id, "session")?;
    wait_consistent(&state, "sessions_positions", &consistency).await?;
    fetch_one(
        &state,
        "sessions",
        SESSION_COLUMNS,
        "session_id",
        session_id,
        &reader,
        "session",
    )
    .await
}

// ---- prompts ----

const PROMPT_COLUMNS: &str = "prompt_id, session_id, workspace_id, author_id, author_name, text_preview, \
    text_length, status, queue_position, submitted_at, started_at, finished_at, summary, failure_reason, cancelled_by";

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct Prompt {
    pub prompt_id: Uuid,
    pub session_id: Uuid,
    pub workspace_id: String,
    pub author_id: String,
    pub author_name: String,
    pub text_preview: String,
    pub text_length: i32,
    /// queued, running, completed, failed or cancelled.
    pub status: String,
    /// 1-based place in the queue while queued.
    pub queue_position: Option<i32>,
    pub submitted_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub summary: Option<String>,
    pub failure_reason: Option<String>,
    pub cancelled_by: Option<String>,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_xid: i64,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_position: i64,
}
listed!(Prompt);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PromptFilters {
    pub session_id: Option<Uuid>,
    /// queued, running, completed, failed or cancelled.
    pub status: Option<String>,
    /// The author's user id.
    pub author: Option<String>,
}

/// List prompts (time range on `submitted_at`).
#[utoipa::path(get, path = "/prompts", tag = "sessions",
    params(PromptFilters, TimeRange, PageParams, ConsistencyParams),
    responses((status = 200, body = Page<Prompt>), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn list_prompts(
    State(state): State<AppState>,
    reader: Reader,
    Query(filters): Query<PromptFilters>,
    Query(range): Query<TimeRange>,
    Query(page): Query<PageParams>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<Page<Prompt>>, ApiError> {
    status(
        &filters.status,
        &["queued", "running", "completed", "failed", "cancelled"],
    )?;
    wait_consistent(&state, "sessions_positions", &consistency).await?;
    let mut list = time_filters("submitted_at", &range)?;
    id(&mut list, "session_id", filters.session_id);
    text(&mut list, "status", &filters.status);
    text(&mut list, "author_id", &filters.author);
    fetch_page(&state, "prompts", PROMPT_COLUMNS, &reader, &list, &page).await
}

/// One prompt.
#[utoipa::path(get, path = "/prompts/{prompt_id}", tag = "sessions",
    params(("prompt_id" = Uuid, Path), ConsistencyParams),
    responses((status = 200, body = Prompt), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn get_prompt(
    State(state): State<AppState>,
    reader: Reader,
    Path(prompt_id): Path<String>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<Prompt>, ApiError> {
    let prompt_id = parse_id(&prompt_id, "prompt")?;
    wait_consistent(&state, "sessions_positions", &consistency).await?;
    fetch_one(
        &state,
        "prompts",
        PROMPT_COLUMNS,
        "prompt_id",
        prompt_id,
        &reader,
        "prompt",
    )
    .await
}

// ---- plans ----

const PLAN_COLUMNS: &str = "plan_id, prompt_id, session_id, workspace_id, status, summary, steps, proposed_by, \
    proposed_at, reviewer_id, reviewer_name, review_comment, decided_at, time_to_decision_ms";

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct Plan {
    pub plan_id: Uuid,
    pub prompt_id: Uuid,
    pub session_id: Uuid,
    pub workspace_id: String,
    /// pending, approved or rejected.
    pub status: String,
    pub summary: String,
    #[schema(value_type = Vec<String>)]
    pub steps: serde_json::Value,
    pub proposed_by: String,
    pub proposed_at: DateTime<Utc>,
    pub reviewer_id: Option<String>,
    pub reviewer_name: Option<String>,
    pub review_comment: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub time_to_decision_ms: Option<i64>,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_xid: i64,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_position: i64,
}
listed!(Plan);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PlanFilters {
    pub session_id: Option<Uuid>,
    /// pending, approved or rejected.
    pub status: Option<String>,
}

/// List plans (time range on `proposed_at`).
#[utoipa::path(get, path = "/plans", tag = "sessions",
    params(PlanFilters, TimeRange, PageParams, ConsistencyParams),
    responses((status = 200, body = Page<Plan>), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn list_plans(
    State(state): State<AppState>,
    reader: Reader,
    Query(filters): Query<PlanFilters>,
    Query(range): Query<TimeRange>,
    Query(page): Query<PageParams>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<Page<Plan>>, ApiError> {
    status(&filters.status, &["pending", "approved", "rejected"])?;
    wait_consistent(&state, "sessions_positions", &consistency).await?;
    let mut list = time_filters("proposed_at", &range)?;
    id(&mut list, "session_id", filters.session_id);
    text(&mut list, "status", &filters.status);
    fetch_page(&state, "plans", PLAN_COLUMNS, &reader, &list, &page).await
}

/// One plan.
#[utoipa::path(get, path = "/plans/{plan_id}", tag = "sessions",
    params(("plan_id" = Uuid, Path), ConsistencyParams),
    responses((status = 200, body = Plan), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn get_plan(
    State(state): State<AppState>,
    reader: Reader,
    Path(plan_id): Path<String>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<Plan>, ApiError> {
    let plan_id = parse_id(&plan_id, "plan")?;
    wait_consistent(&state, "sessions_positions", &consistency).await?;
    fetch_one(
        &state,
        "plans",
        PLAN_COLUMNS,
        "plan_id",
        plan_id,
        &reader,
        "plan",
    )
    .await
}

// ---- tool executions and approvals ----

const TOOL_EXECUTION_COLUMNS: &str = "event_id, session_id, workspace_id, prompt_id, call_id, tool, phase, status, \
    duration_ms, input_summary, output_summary, approval_request_id, approval_status, executed_at";

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct ToolExecution {
    pub event_id: Uuid,
    pub session_id: Uuid,
    pub workspace_id: String,
    pub prompt_id: Uuid,
    pub call_id: String,
    pub tool: String,
    /// plan or build.
    pub phase: String,
    /// completed, failed or denied.
    pub status: String,
    pub duration_ms: i64,
    pub input_summary: String,
    pub output_summary: String,
    pub approval_request_id: Option<Uuid>,
    pub approval_status: Option<String>,
    pub executed_at: DateTime<Utc>,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_xid: i64,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_position: i64,
}
listed!(ToolExecution);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ToolExecutionFilters {
    pub session_id: Option<Uuid>,
    pub prompt_id: Option<Uuid>,
    pub tool: Option<String>,
    /// completed, failed or denied.
    pub status: Option<String>,
}

/// List tool executions (time range on `executed_at`).
#[utoipa::path(get, path = "/tool-executions", tag = "sessions",
    params(ToolExecutionFilters, TimeRange, PageParams, ConsistencyParams),
    responses((status = 200, body = Page<ToolExecution>), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn list_tool_executions(
    State(state): State<AppState>,
    reader: Reader,
    Query(filters): Query<ToolExecutionFilters>,
    Query(range): Query<TimeRange>,
    Query(page): Query<PageParams>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<Page<ToolExecution>>, ApiError> {
    status(&filters.status, &["completed", "failed", "denied"])?;
    wait_consistent(&state, "sessions_positions", &consistency).await?;
    let mut list = time_filters("executed_at", &range)?;
    id(&mut list, "session_id", filters.session_id);
    id(&mut list, "prompt_id", filters.prompt_id);
    text(&mut list, "tool", &filters.tool);
    text(&mut list, "status", &filters.status);
    fetch_page(
        &state,
        "tool_executions",
        TOOL_EXECUTION_COLUMNS,
        &reader,
        &list,
        &page,
    )
    .await
}

const TOOL_APPROVAL_COLUMNS: &str = "request_id, session_id, workspace_id, prompt_id, call_id, tool, input_summary, \
    status, requested_at, decided_at, reviewer_id, reviewer_name, comment";

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct ToolApproval {
    pub request_id: Uuid,
    pub session_id: Uuid,
    pub workspace_id: String,
    pub prompt_id: Uuid,
    pub call_id: String,
    pub tool: String,
    pub input_summary: String,
    /// pending, granted or denied.
    pub status: String,
    pub requested_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub reviewer_id: Option<String>,
    pub reviewer_name: Option<String>,
    pub comment: Option<String>,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_xid: i64,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_position: i64,
}
listed!(ToolApproval);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ToolApprovalFilters {
    pub session_id: Option<Uuid>,
    /// pending, granted or denied.
    pub status: Option<String>,
}

/// List tool approval requests (time range on `requested_at`).
#[utoipa::path(get, path = "/tool-approvals", tag = "sessions",
    params(ToolApprovalFilters, TimeRange, PageParams, ConsistencyParams),
    responses((status = 200, body = Page<ToolApproval>), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn list_tool_approvals(
    State(state): State<AppState>,
    reader: Reader,
    Query(filters): Query<ToolApprovalFilters>,
    Query(range): Query<TimeRange>,
    Query(page): Query<PageParams>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<Page<ToolApproval>>, ApiError> {
    status(&filters.status, &["pending", "granted", "denied"])?;
    wait_consistent(&state, "sessions_positions", &consistency).await?;
    let mut list = time_filters("requested_at", &range)?;
    id(&mut list, "session_id", filters.session_id);
    text(&mut list, "status", &filters.status);
    fetch_page(
        &state,
        "tool_approvals",
        TOOL_APPROVAL_COLUMNS,
        &reader,
        &list,
        &page,
    )
    .await
}

// ---- checkpoints ----

const CHECKPOINT_COLUMNS: &str = "checkpoint_id, session_id, workspace_id, prompt_id, label, commit_sha, files_changed, \
    trigger, taken_at, restore_count, last_restored_at";

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct Checkpoint {
    pub checkpoint_id: Uuid,
    pub session_id: Uuid,
    pub workspace_id: String,
    pub prompt_id: Option<Uuid>,
    pub label: Option<String>,
    pub commit_sha: String,
    #[schema(value_type = Vec<String>)]
    pub files_changed: serde_json::Value,
    /// auto or manual.
    pub trigger: String,
    pub taken_at: DateTime<Utc>,
    pub restore_count: i32,
    pub last_restored_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_xid: i64,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_position: i64,
}
listed!(Checkpoint);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct CheckpointFilters {
    pub session_id: Option<Uuid>,
}

/// List checkpoints (time range on `taken_at`).
#[utoipa::path(get, path = "/checkpoints", tag = "sessions",
    params(CheckpointFilters, TimeRange, PageParams, ConsistencyParams),
    responses((status = 200, body = Page<Checkpoint>), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn list_checkpoints(
    State(state): State<AppState>,
    reader: Reader,
    Query(filters): Query<CheckpointFilters>,
    Query(range): Query<TimeRange>,
    Query(page): Query<PageParams>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<Page<Checkpoint>>, ApiError> {
    wait_consistent(&state, "sessions_positions", &consistency).await?;
    let mut list = time_filters("taken_at", &range)?;
    id(&mut list, "session_id", filters.session_id);
    fetch_page(
        &state,
        "checkpoints",
        CHECKPOINT_COLUMNS,
        &reader,
        &list,
        &page,
    )
    .await
}

// ---- timeline ----

const TIMELINE_COLUMNS: &str = "event_id, session_id, workspace_id, sequence, event_type, actor_id, actor_name, recorded_at, summary, data";

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct TimelineEntry {
    pub event_id: Uuid,
    pub session_id: Uuid,
    pub workspace_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub actor_id: String,
    pub actor_name: String,
    pub recorded_at: DateTime<Utc>,
    /// One line a UI can show as is.
    pub summary: String,
    /// The event's payload.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_xid: i64,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_position: i64,
}
listed!(TimelineEntry);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TimelineFilters {
    pub event_type: Option<String>,
}

/// A session's timeline (time range on `recorded_at`; `order=asc` replays it).
#[utoipa::path(get, path = "/sessions/{session_id}/timeline", tag = "sessions",
    params(("session_id" = Uuid, Path), TimelineFilters, TimeRange, PageParams, ConsistencyParams),
    responses((status = 200, body = Page<TimelineEntry>), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn session_timeline(
    State(state): State<AppState>,
    reader: Reader,
    Path(session_id): Path<String>,
    Query(filters): Query<TimelineFilters>,
    Query(range): Query<TimeRange>,
    Query(page): Query<PageParams>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<Page<TimelineEntry>>, ApiError> {
    let session_id = parse_id(&session_id, "session")?;
    wait_consistent(&state, "timeline_positions", &consistency).await?;
    let exists: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM read.session_timeline WHERE session_id = $1 AND workspace_id = $2 LIMIT 1",
    )
    .bind(session_id)
    .bind(&reader.workspace_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    if exists.is_none() {
        return Err(ApiError::NotFound("session"));
    }
    let mut list = time_filters("recorded_at", &range)?;
    list.push(Filter::Id("session_id", session_id));
    text(&mut list, "event_type", &filters.event_type);
    fetch_page(
        &state,
        "session_timeline",
        TIMELINE_COLUMNS,
        &reader,
        &list,
        &page,
    )
    .await
}

// ---- features ----

const FEATURE_COLUMNS: &str = "feature_id, workspace_id, title, description, status, created_by, created_at, \
    completed_at, session_count, learning_count, decision_count, version";

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct Feature {
    pub feature_id: Uuid,
    pub workspace_id: String,
    pub title: String,
    pub description: String,
    /// active or completed.
    pub status: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub session_count: i32,
    pub learning_count: i32,
    pub decision_count: i32,
    pub version: i64,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_xid: i64,
    #[serde(skip)]
    #[schema(ignore)]
    pub created_position: i64,
}
listed!(Feature);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct FeatureFilters {
    /// active or completed.
    pub status: Option<String>,
}

/// List features (time range on `created_at`).
#[utoipa::path(get, path = "/features", tag = "features",
    params(FeatureFilters, TimeRange, PageParams, ConsistencyParams),
    responses((status = 200, body = Page<Feature>), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn list_features(
    State(state): State<AppState>,
    reader: Reader,
    Query(filters): Query<FeatureFilters>,
    Query(range): Query<TimeRange>,
    Query(page): Query<PageParams>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<Page<Feature>>, ApiError> {
    status(&filters.status, &["active", "completed"])?;
    wait_consistent(&state, "features_positions", &consistency).await?;
    let mut list = time_filters("created_at", &range)?;
    text(&mut list, "status", &filters.status);
    fetch_page(&state, "features", FEATURE_COLUMNS, &reader, &list, &page).await
}

/// A feature with its sessions, learnings and decisions.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FeatureDetail {
    #[serde(flatten)]
    pub feature: Feature,
    pub session_ids: Vec<Uuid>,
    pub learnings: Vec<Learning>,
    pub decisions: Vec<Decision>,
}

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct Learning {
    pub learning_id: Uuid,
    pub session_id: Option<Uuid>,
    pub text: String,
    pub shared_by: String,
    pub shared_by_name: String,
    pub shared_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct Decision {
    pub decision_id: Uuid,
    pub title: String,
    pub rationale: String,
    pub recorded_by: String,
    pub recorded_at: DateTime<Utc>,
}

/// One feature, with the context its sessions share.
#[utoipa::path(get, path = "/features/{feature_id}", tag = "features",
    params(("feature_id" = Uuid, Path), ConsistencyParams),
    responses((status = 200, body = FeatureDetail), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn get_feature(
    State(state): State<AppState>,
    reader: Reader,
    Path(feature_id): Path<String>,
    Query(consistency): Query<ConsistencyParams>,
) -> Result<Json<FeatureDetail>, ApiError> {
    let feature_id = parse_id(&feature_id, "feature")?;
    wait_consistent(&state, "features_positions", &consistency).await?;
    let Json(feature) = fetch_one::<Feature>(
        &state,
        "features",
        FEATURE_COLUMNS,
        "feature_id",
        feature_id,
        &reader,
        "feature",
    )
    .await?;
    let session_ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT session_id FROM read.feature_sessions WHERE feature_id = $1 ORDER BY attached_at, session_id",
    )
    .bind(feature_id)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    let learnings: Vec<Learning> = sqlx::query_as(
        "SELECT learning_id, session_id, text, shared_by, shared_by_name, shared_at
           FROM read.feature_learnings WHERE feature_id = $1 ORDER BY shared_at, learning_id",
    )
    .bind(feature_id)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    let decisions: Vec<Decision> = sqlx::query_as(
        "SELECT decision_id, title, rationale, recorded_by, recorded_at
           FROM read.feature_decisions WHERE feature_id = $1 ORDER BY recorded_at, decision_id",
    )
    .bind(feature_id)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(FeatureDetail {
        feature,
        session_ids,
        learnings,
        decisions,
    }))
}
