//! Read models: get by id and list with filters and cursor pagination, scoped to the reader's
//! workspace (another workspace's rows are 404, never 403).
//!
//! Each read model is one [`read_model!`] declaration: its row (the columns selected are its
//! fields), its table, key and projection, the column its time range filters on, its filters
//! (each a field of its query string and the column it compares) and its routes with their docs.
//! The shared [`list`] and [`get`] serve every model; adding a field to a read model's row is
//! one line in its declaration (the column is selected, serialized and documented from there).

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Reader;
use crate::error::ApiError;
use crate::query::{
    ConsistencyParams, Cursor, Filter, Ids, Listed, PageParams, Params, TimeRange, check_text,
    list_query, page_of, time_filters, wait_consistent,
};
use crate::routes::{GetProblems, ListProblems};

/// A page of rows and the cursor of the next page (absent on the last page).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// A read model as [`list`] and [`get`] serve it.
pub(crate) trait ReadModel:
    for<'r> FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin + Listed + 'static
{
    /// Its table in schema `read`.
    const TABLE: &'static str;
    /// The columns a row is read from (its fields, in order).
    const COLUMNS: &'static str;
    /// The column of its id.
    const KEY: &'static str;
    /// What a 404 says is missing.
    const NOUN: &'static str;
    /// The projection's positions table, which `consistent_with` waits on.
    const POSITIONS: &'static str;
    /// The column its time range (`from`, `to`) filters on.
    const TIME: &'static str;
    /// Its query string's filters.
    type Filters: DeserializeOwned + Send + 'static;
    /// The filters a query asks for, in the order of its declaration.
    fn filters(filters: &Self::Filters, list: &mut Vec<Filter>) -> Result<(), ApiError>;
}

/// A value a filter compares a column with.
pub(crate) trait FilterValue {
    /// The filter on `column` (`field` names the query parameter in a 422).
    fn filter(&self, column: &'static str, field: &str) -> Result<Filter, ApiError>;
}

impl FilterValue for Uuid {
    fn filter(&self, column: &'static str, _: &str) -> Result<Filter, ApiError> {
        Ok(Filter::Id(column, *self))
    }
}

/// Free text (checked: see [`check_text`]).
impl FilterValue for String {
    fn filter(&self, column: &'static str, field: &str) -> Result<Filter, ApiError> {
        check_text(field, Some(self))?;
        Ok(Filter::Text(column, self.clone()))
    }
}

/// Lists a read model's rows of the reader's workspace: its filters, then the time range, a
/// keyset page, and read-your-writes.
pub(crate) async fn list<M: ReadModel>(
    state: &AppState,
    reader: &Reader,
    filters: &M::Filters,
    range: &TimeRange,
    page: &PageParams,
    consistency: &ConsistencyParams,
) -> Result<Json<Page<M>>, ApiError> {
    let mut list = time_filters(M::TIME, range);
    M::filters(filters, &mut list)?;
    wait_consistent(state, reader, M::POSITIONS, consistency).await?;
    fetch_page(state, M::TABLE, M::COLUMNS, reader, &list, page).await
}

/// One row of a read model, of the reader's workspace (else 404).
pub(crate) async fn get<M: ReadModel>(
    state: &AppState,
    reader: &Reader,
    id: Uuid,
    consistency: &ConsistencyParams,
) -> Result<Json<M>, ApiError> {
    wait_consistent(state, reader, M::POSITIONS, consistency).await?;
    fetch_one::<M>(state, reader, id).await.map(Json)
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
    let relation = format!("read.{table}");
    let (mut query, limit, _) =
        list_query(&relation, columns, &reader.workspace_id, filters, page)?;
    let rows: Vec<T> = query
        .build_query_as()
        .fetch_all(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    let (items, next_cursor) = page_of(rows, limit);
    Ok(Json(Page { items, next_cursor }))
}

async fn fetch_one<M: ReadModel>(
    state: &AppState,
    reader: &Reader,
    id: Uuid,
) -> Result<M, ApiError> {
    let row: Option<M> = sqlx::query_as(&format!(
        "SELECT {}, created_xid, created_position FROM read.{} WHERE {} = $1 AND workspace_id = $2",
        M::COLUMNS,
        M::TABLE,
        M::KEY
    ))
    .bind(id)
    .bind(&reader.workspace_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    row.ok_or(ApiError::NotFound(M::NOUN))
}

/// A closed set of values of a `status` column, as a query parameter takes them.
macro_rules! statuses {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub(crate) enum $name {
            $($variant),+
        }

        impl $name {
            pub(crate) fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl FilterValue for $name {
            fn filter(&self, column: &'static str, _: &str) -> Result<Filter, ApiError> {
                Ok(Filter::Text(column, self.as_str().to_owned()))
            }
        }
    };
}

/// One read model: its row, where it lives, its filters, and (optionally) its list and get
/// routes with their OpenAPI docs. See the module's docs.
macro_rules! read_model {
    (@columns $first:ident $($rest:ident)*) => {
        concat!(stringify!($first) $(, ", ", stringify!($rest))*)
    };
    (
        $(#[$doc:meta])*
        $name:ident in $table:literal {
            key: $key:ident ($noun:literal),
            positions: $positions:literal,
            time: $time:ident,
        }
        $(#[$filters_doc:meta])*
        filters $filters:ident {
            $( $(#[$filter_meta:meta])* $param:ident: $param_type:ty => $column:literal, )*
        }
        row {
            $( $(#[$field_meta:meta])* $field:ident: $field_type:ty, )+
        }
        $(
            list $list_fn:ident {
                $(#[$list_doc:meta])*
                path: $list_path:literal, tag: $list_tag:literal, answer: $page_doc:literal,
            }
        )?
        $(
            get $get_fn:ident {
                $(#[$get_doc:meta])*
                path: $get_path:literal, tag: $get_tag:literal, id: $id_param:literal ($id_doc:literal), answer: $one_doc:literal,
            }
        )?
    ) => {
        $(#[$doc])*
        #[derive(Debug, Serialize, FromRow, ToSchema)]
        pub(crate) struct $name {
            $( $(#[$field_meta])* pub $field: $field_type, )+
            #[serde(skip)]
            #[schema(ignore)]
            pub created_xid: i64,
            #[serde(skip)]
            #[schema(ignore)]
            pub created_position: i64,
        }

        impl Listed for $name {
            fn cursor(&self) -> Cursor {
                Cursor {
                    xid: self.created_xid,
                    position: self.created_position,
                }
            }
        }

        $(#[$filters_doc])*
        #[derive(Debug, Deserialize, IntoParams)]
        #[into_params(parameter_in = Query)]
        pub(crate) struct $filters {
            $( $(#[$filter_meta])* pub $param: Option<$param_type>, )*
        }

        impl ReadModel for $name {
            const TABLE: &'static str = $table;
            const COLUMNS: &'static str = read_model!(@columns $($field)+);
            const KEY: &'static str = stringify!($key);
            const NOUN: &'static str = $noun;
            const POSITIONS: &'static str = $positions;
            const TIME: &'static str = stringify!($time);
            type Filters = $filters;

            #[allow(unused_variables, reason = "a model may have no filters")]
            fn filters(filters: &$filters, list: &mut Vec<Filter>) -> Result<(), ApiError> {
                $(
                    if let Some(value) = &filters.$param {
                        list.push(value.filter($column, stringify!($param))?);
                    }
                )*
                Ok(())
            }
        }

        $(
            $(#[$list_doc])*
            #[utoipa::path(get, path = $list_path, tag = $list_tag,
                params($filters, TimeRange, PageParams, ConsistencyParams),
                responses((status = 200, body = Page<$name>, description = $page_doc), ListProblems),
                security(("bearer" = [])))]
            pub(crate) async fn $list_fn(
                State(state): State<AppState>,
                reader: Reader,
                Params(filters): Params<$filters>,
                Params(range): Params<TimeRange>,
                Params(page): Params<PageParams>,
                Params(consistency): Params<ConsistencyParams>,
            ) -> Result<Json<Page<$name>>, ApiError> {
                list::<$name>(&state, &reader, &filters, &range, &page, &consistency).await
            }
        )?

        $(
            $(#[$get_doc])*
            #[utoipa::path(get, path = $get_path, tag = $get_tag,
                params(($id_param = Uuid, Path, description = $id_doc), ConsistencyParams),
                responses((status = 200, body = $name, description = $one_doc), GetProblems),
                security(("bearer" = [])))]
            pub(crate) async fn $get_fn(
                State(state): State<AppState>,
                reader: Reader,
                Ids(id): Ids<Uuid>,
                Params(consistency): Params<ConsistencyParams>,
            ) -> Result<Json<$name>, ApiError> {
                get::<$name>(&state, &reader, id, &consistency).await
            }
        )?
    };
}

// ---- sessions ----

statuses!(
    /// Where a session is in its life.
    SessionStatus { Active => "active", Completed => "completed", Failed => "failed", Archived => "archived" }
);

read_model! {
    /// A session as the UI lists it.
    Session in "sessions" {
        key: session_id ("session"),
        positions: "sessions_positions",
        time: started_at,
    }
    filters SessionFilters {
        #[param(inline)]
        status: SessionStatus => "status",
        feature_id: Uuid => "feature_id",
        /// Who started it (user id).
        #[param(max_length = 255, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
        started_by: String => "started_by",
    }
    row {
        session_id: Uuid,
        workspace_id: String,
        feature_id: Option<Uuid>,
        title: String,
        repository_url: String,
        base_branch: String,
        session_branch: String,
        /// active, completed, failed or archived.
        status: String,
        started_by: String,
        started_at: DateTime<Utc>,
        finished_at: Option<DateTime<Utc>>,
        archived_at: Option<DateTime<Utc>>,
        failure_reason: Option<String>,
        /// `[{"user_id", "name", "role"}]` in joining order.
        #[schema(value_type = Vec<Object>)]
        participants: serde_json::Value,
        participant_count: i32,
        queue_length: i32,
        running_prompt_id: Option<Uuid>,
        prompt_count: i32,
        tool_execution_count: i32,
        checkpoint_count: i32,
        sandbox_id: Option<String>,
        opencode_session_id: Option<String>,
        last_activity_at: DateTime<Utc>,
        /// The session's version (its last event's sequence) this row reflects.
        version: i64,
    }
    list list_sessions {
        /// List the workspace's sessions (time range on `started_at`).
        path: "/sessions", tag: "sessions", answer: "A page of sessions",
    }
    get get_session {
        /// One session.
        path: "/sessions/{session_id}", tag: "sessions", id: "session_id" ("The session's id"), answer: "The session",
    }
}

// ---- prompts ----

statuses!(
    /// Where a prompt is in its life.
    PromptStatus { Queued => "queued", Running => "running", Completed => "completed", Failed => "failed", Cancelled => "cancelled" }
);

read_model! {
    Prompt in "prompts" {
        key: prompt_id ("prompt"),
        positions: "sessions_positions",
        time: submitted_at,
    }
    filters PromptFilters {
        session_id: Uuid => "session_id",
        #[param(inline)]
        status: PromptStatus => "status",
        /// The author's user id.
        #[param(max_length = 255, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
        author: String => "author_id",
    }
    row {
        prompt_id: Uuid,
        session_id: Uuid,
        workspace_id: String,
        author_id: String,
        author_name: String,
        text_preview: String,
        text_length: i32,
        /// queued, running, completed, failed or cancelled.
        status: String,
        /// 1-based place in the queue while queued.
        queue_position: Option<i32>,
        submitted_at: DateTime<Utc>,
        started_at: Option<DateTime<Utc>>,
        finished_at: Option<DateTime<Utc>>,
        summary: Option<String>,
        failure_reason: Option<String>,
        cancelled_by: Option<String>,
    }
    list list_prompts {
        /// List prompts (time range on `submitted_at`).
        path: "/prompts", tag: "sessions", answer: "A page of prompts",
    }
    get get_prompt {
        /// One prompt.
        path: "/prompts/{prompt_id}", tag: "sessions", id: "prompt_id" ("The prompt's id"), answer: "The prompt",
    }
}

// ---- plans ----

statuses!(
    /// Where a plan is in its review.
    PlanStatus { Pending => "pending", Approved => "approved", Rejected => "rejected" }
);

read_model! {
    Plan in "plans" {
        key: plan_id ("plan"),
        positions: "sessions_positions",
        time: proposed_at,
    }
    filters PlanFilters {
        session_id: Uuid => "session_id",
        #[param(inline)]
        status: PlanStatus => "status",
    }
    row {
        plan_id: Uuid,
        prompt_id: Uuid,
        session_id: Uuid,
        workspace_id: String,
        /// pending, approved or rejected.
        status: String,
        summary: String,
        #[schema(value_type = Vec<String>)]
        steps: serde_json::Value,
        proposed_by: String,
        proposed_at: DateTime<Utc>,
        reviewer_id: Option<String>,
        reviewer_name: Option<String>,
        review_comment: Option<String>,
        decided_at: Option<DateTime<Utc>>,
        time_to_decision_ms: Option<i64>,
    }
    list list_plans {
        /// List plans (time range on `proposed_at`).
        path: "/plans", tag: "sessions", answer: "A page of plans",
    }
    get get_plan {
        /// One plan.
        path: "/plans/{plan_id}", tag: "sessions", id: "plan_id" ("The plan's id"), answer: "The plan",
    }
}

// ---- tool executions and approvals ----

statuses!(
    /// How a tool call ended.
    ToolStatus { Completed => "completed", Failed => "failed", Denied => "denied" }
);

read_model! {
    ToolExecution in "tool_executions" {
        key: event_id ("tool execution"),
        positions: "sessions_positions",
        time: executed_at,
    }
    filters ToolExecutionFilters {
        session_id: Uuid => "session_id",
        prompt_id: Uuid => "prompt_id",
        /// The tool's name.
        #[param(max_length = 255, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
        tool: String => "tool",
        #[param(inline)]
        status: ToolStatus => "status",
    }
    row {
        event_id: Uuid,
        session_id: Uuid,
        workspace_id: String,
        prompt_id: Uuid,
        call_id: String,
        tool: String,
        /// plan or build.
        phase: String,
        /// completed, failed or denied.
        status: String,
        duration_ms: i64,
        input_summary: String,
        output_summary: String,
        approval_request_id: Option<Uuid>,
        approval_status: Option<String>,
        executed_at: DateTime<Utc>,
    }
    list list_tool_executions {
        /// List tool executions (time range on `executed_at`).
        path: "/tool-executions", tag: "sessions", answer: "A page of tool executions",
    }
}

statuses!(
    /// Where a tool approval request is.
    ApprovalStatus { Pending => "pending", Granted => "granted", Denied => "denied" }
);

read_model! {
    ToolApproval in "tool_approvals" {
        key: request_id ("tool approval request"),
        positions: "sessions_positions",
        time: requested_at,
    }
    filters ToolApprovalFilters {
        session_id: Uuid => "session_id",
        #[param(inline)]
        status: ApprovalStatus => "status",
    }
    row {
        request_id: Uuid,
        session_id: Uuid,
        workspace_id: String,
        prompt_id: Uuid,
        call_id: String,
        tool: String,
        input_summary: String,
        /// pending, granted or denied.
        status: String,
        requested_at: DateTime<Utc>,
        decided_at: Option<DateTime<Utc>>,
        reviewer_id: Option<String>,
        reviewer_name: Option<String>,
        comment: Option<String>,
    }
    list list_tool_approvals {
        /// List tool approval requests (time range on `requested_at`).
        path: "/tool-approvals", tag: "sessions", answer: "A page of tool approval requests",
    }
}

// ---- checkpoints ----

read_model! {
    Checkpoint in "checkpoints" {
        key: checkpoint_id ("checkpoint"),
        positions: "sessions_positions",
        time: taken_at,
    }
    filters CheckpointFilters {
        session_id: Uuid => "session_id",
    }
    row {
        checkpoint_id: Uuid,
        session_id: Uuid,
        workspace_id: String,
        prompt_id: Option<Uuid>,
        label: Option<String>,
        commit_sha: String,
        #[schema(value_type = Vec<String>)]
        files_changed: serde_json::Value,
        /// auto or manual.
        trigger: String,
        taken_at: DateTime<Utc>,
        restore_count: i32,
        last_restored_at: Option<DateTime<Utc>>,
    }
    list list_checkpoints {
        /// List checkpoints (time range on `taken_at`).
        path: "/checkpoints", tag: "sessions", answer: "A page of checkpoints",
    }
}

// ---- timeline ----

read_model! {
    TimelineEntry in "session_timeline" {
        key: event_id ("timeline entry"),
        positions: "timeline_positions",
        time: recorded_at,
    }
    filters TimelineFilters {
        /// An event type, e.g. `PromptSubmitted`.
        #[param(max_length = 255, pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$")]
        event_type: String => "event_type",
    }
    row {
        event_id: Uuid,
        session_id: Uuid,
        workspace_id: String,
        sequence: i64,
        event_type: String,
        actor_id: String,
        actor_name: String,
        recorded_at: DateTime<Utc>,
        /// One line a UI can show as is.
        summary: String,
        /// The event's payload.
        #[schema(value_type = Object)]
        data: serde_json::Value,
    }
}

/// A session's timeline (time range on `recorded_at`; `order=asc` replays it).
#[utoipa::path(get, path = "/sessions/{session_id}/timeline", tag = "sessions",
    params(("session_id" = Uuid, Path, description = "The session's id"), TimelineFilters, TimeRange, PageParams, ConsistencyParams),
    responses((status = 200, body = Page<TimelineEntry>, description = "A page of the session's timeline"), GetProblems),
    security(("bearer" = [])))]
pub(crate) async fn session_timeline(
    State(state): State<AppState>,
    reader: Reader,
    Ids(session_id): Ids<Uuid>,
    Params(filters): Params<TimelineFilters>,
    Params(range): Params<TimeRange>,
    Params(page): Params<PageParams>,
    Params(consistency): Params<ConsistencyParams>,
) -> Result<Json<Page<TimelineEntry>>, ApiError> {
    check_text("event_type", filters.event_type.as_deref())?;
    wait_consistent(&state, &reader, TimelineEntry::POSITIONS, &consistency).await?;
    // A session of another workspace, or none, is 404 (not an empty page).
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
    let mut list = time_filters(TimelineEntry::TIME, &range);
    list.push(Filter::Id("session_id", session_id));
    TimelineEntry::filters(&filters, &mut list)?;
    fetch_page(
        &state,
        TimelineEntry::TABLE,
        TimelineEntry::COLUMNS,
        &reader,
        &list,
        &page,
    )
    .await
}

// ---- features ----

statuses!(
    /// Where a feature is in its life.
    FeatureStatus { Active => "active", Completed => "completed" }
);

read_model! {
    Feature in "features" {
        key: feature_id ("feature"),
        positions: "features_positions",
        time: created_at,
    }
    filters FeatureFilters {
        #[param(inline)]
        status: FeatureStatus => "status",
    }
    row {
        feature_id: Uuid,
        workspace_id: String,
        title: String,
        description: String,
        /// active or completed.
        status: String,
        created_by: String,
        created_at: DateTime<Utc>,
        completed_at: Option<DateTime<Utc>>,
        session_count: i32,
        learning_count: i32,
        decision_count: i32,
        version: i64,
    }
    list list_features {
        /// List features (time range on `created_at`).
        path: "/features", tag: "features", answer: "A page of features",
    }
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
    params(("feature_id" = Uuid, Path, description = "The feature's id"), ConsistencyParams),
    responses((status = 200, body = FeatureDetail, description = "The feature and its shared context"), GetProblems),
    security(("bearer" = [])))]
pub(crate) async fn get_feature(
    State(state): State<AppState>,
    reader: Reader,
    Ids(feature_id): Ids<Uuid>,
    Params(consistency): Params<ConsistencyParams>,
) -> Result<Json<FeatureDetail>, ApiError> {
    wait_consistent(&state, &reader, Feature::POSITIONS, &consistency).await?;
    let feature = fetch_one::<Feature>(&state, &reader, feature_id).await?;
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
