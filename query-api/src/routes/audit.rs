//! Auditors' endpoints (owner, admin, auditor; reads only): a session's full event log with its
//! chain fields, the workspace's log for export in relay order, the session's state at any
//! sequence (replayed through the domain), and the verification of a session's chain by the one
//! verification core (`canopy_event_store::chain`) that `canopy audit verify` runs offline.
//! Everything is read from the event store, never from read models. Another workspace's session
//! is 404.

use axum::Json;
use axum::extract::State;
use canopy_event_store::{ChainRecord, Head, audit};
use canopy_relay::Cursor;
use canopy_relay::history::{self, Page};
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Auditor;
use crate::error::ApiError;
use crate::query::{Ids, Params};
use crate::routes::AuditProblems;

/// Events per page when the client does not say.
const DEFAULT_LIMIT: u32 = 100;
/// The most events a page holds.
const MAX_LIMIT: u32 = 1000;
/// Events read per query while replaying a session.
const REPLAY_PAGE: usize = 256;

/// One stored event with everything an auditor needs: who, when, why (correlation, causation,
/// idempotency key), the payload as stored, and its place in the hash chain.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AuditEvent {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// 1-based, gap-free per aggregate.
    pub sequence: i64,
    pub event_type: String,
    /// The stored payload version (before any upcasting).
    pub event_version: String,
    /// When the appending transaction started, UTC with microseconds (the text hashed).
    pub recorded_at: String,
    pub actor_id: String,
    pub actor_name: String,
    /// `user` or `service`.
    pub actor_kind: String,
    pub correlation_id: String,
    pub request_id: String,
    pub causation_id: Option<String>,
    pub idempotency_key: Option<String>,
    /// The whole stored metadata.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// The stored payload, `{"<EventType>": body}`.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// Whether the payload was replaced by its erasure tombstone.
    pub erased: bool,
    /// SHA-256 of the payload text recorded at append time (hex).
    pub payload_digest: String,
    pub event_digest: String,
    pub prev_hash: String,
    pub hash: String,
}

/// A stream's latest sequence and hash as recorded outside the events table.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ChainHead {
    pub sequence: i64,
    pub hash: String,
}

/// A page of a session's events in sequence order.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SessionLog {
    pub events: Vec<AuditEvent>,
    /// `after` of the next page; absent on the last page.
    pub next_after: Option<i64>,
    pub head: Option<ChainHead>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LogParams {
    /// Events after this sequence (default 0: from the first).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// Events per page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// A session's event log with metadata and chain fields, paged by sequence.
#[utoipa::path(get, path = "/audit/sessions/{session_id}/events", tag = "audit",
    params(("session_id" = Uuid, Path, description = "The session's id"), LogParams),
    responses((status = 200, body = SessionLog, description = "A page of the session's events"), AuditProblems),
    security(("bearer" = [])))]
pub(crate) async fn session_events(
    State(state): State<AppState>,
    auditor: Auditor,
    Ids(session_id): Ids<Uuid>,
    Params(params): Params<LogParams>,
) -> Result<Json<SessionLog>, ApiError> {
    let after = params.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::invalid("after", "must be at least 0"));
    }
    let limit = limit(params.limit)?;
    let id = session_in_workspace(&state, &auditor, session_id).await?;
    let records = audit::read_stream(&state.pool, SESSION, &id, after, i64::from(limit) + 1)
        .await
        .map_err(ApiError::internal)?;
    let head = audit::read_head(&state.pool, SESSION, &id)
        .await
        .map_err(ApiError::internal)?;
    let more = records.len() > limit as usize;
    let events: Vec<AuditEvent> = records
        .iter()
        .take(limit as usize)
        .map(audit_event)
        .collect::<Result<_, _>>()?;
    let next_after = more.then(|| events.last().map(|e| e.sequence)).flatten();
    Ok(Json(SessionLog {
        events,
        next_after,
        head: head.map(chain_head),
    }))
}

/// The verification of a session's chain.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Verification {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub events_checked: usize,
    pub intact: bool,
    /// The first sequence where the chain does not hold.
    pub first_bad_sequence: Option<i64>,
    /// Every problem in sequence order.
    pub problems: Vec<VerificationProblem>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VerificationProblem {
    pub sequence: i64,
    /// `sequence_gap`, `payload_altered`, `event_altered`, `prev_hash_mismatch`,
    /// `hash_mismatch`, `head_mismatch` or `malformed`.
    pub kind: String,
    pub reason: String,
}

/// Verify a session's hash chain (against its head and its erasures); names the first bad
/// sequence.
#[utoipa::path(get, path = "/audit/sessions/{session_id}/verify", tag = "audit",
    params(("session_id" = Uuid, Path, description = "The session's id")),
    responses((status = 200, body = Verification, description = "What the verification found (intact or not)"), AuditProblems),
    security(("bearer" = [])))]
pub(crate) async fn verify_session(
    State(state): State<AppState>,
    auditor: Auditor,
    Ids(session_id): Ids<Uuid>,
) -> Result<Json<Verification>, ApiError> {
    let id = session_in_workspace(&state, &auditor, session_id).await?;
    let report = canopy_event_store::verify_chain(&state.pool, SESSION, &id)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(Verification {
        first_bad_sequence: report.first_problem().map(|p| p.sequence),
        intact: report.is_intact(),
        problems: report
            .problems
            .iter()
            .map(|p| VerificationProblem {
                sequence: p.sequence,
                kind: serde_json::to_value(p.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                reason: p.kind.describe().to_owned(),
            })
            .collect(),
        aggregate_type: report.aggregate_type,
        aggregate_id: report.aggregate_id,
        events_checked: report.events_checked,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct StateParams {
    /// The sequence to replay up to (inclusive), at most the session's last: past it is 422
    /// `validation_failed` naming `at_sequence` (how many events the session has is in the message).
    #[param(minimum = 1)]
    pub at_sequence: i64,
}

/// A session's state right after one of its events.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SessionStateAt {
    pub session_id: Uuid,
    pub at_sequence: i64,
    /// `recorded_at` of that event.
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    /// The `Session` aggregate's state after applying events 1..=at_sequence (upcast to their
    /// current versions), as the domain serializes it.
    #[schema(value_type = Object)]
    pub state: serde_json::Value,
}

/// A session's state at a sequence, rebuilt by replaying its events through the domain.
#[utoipa::path(get, path = "/audit/sessions/{session_id}/state", tag = "audit",
    params(("session_id" = Uuid, Path, description = "The session's id"), StateParams),
    responses((status = 200, body = SessionStateAt, description = "The session's state after that event"), AuditProblems),
    security(("bearer" = [])))]
pub(crate) async fn session_state(
    State(state): State<AppState>,
    auditor: Auditor,
    Ids(session_id): Ids<Uuid>,
    Params(params): Params<StateParams>,
) -> Result<Json<SessionStateAt>, ApiError> {
    if params.at_sequence < 1 {
        return Err(ApiError::invalid("at_sequence", "must be at least 1"));
    }
    let id = session_in_workspace(&state, &auditor, session_id).await?;
    let mut session = canopy_domain::Session::default();
    let mut after = 0;
    let mut recorded_at = None;
    loop {
        let page = history::of_aggregate(
            &state.pool,
            SESSION,
            &id,
            after,
            Some(params.at_sequence + 1),
            Page::events(REPLAY_PAGE),
        )
        .await
        .map_err(ApiError::internal)?;
        let Some(last) = page.last() else { break };
        after = last.sequence;
        for event in page {
            let decoded = canopy_domain::upcast::decode_session_event(
                &event.event_type,
                &event.event_version,
                event.payload,
            )
            .map_err(ApiError::internal)?;
            session.apply(decoded);
            recorded_at = Some(event.recorded_at);
        }
    }
    let Some(recorded_at) = recorded_at.filter(|_| after == params.at_sequence) else {
        return Err(ApiError::invalid(
            "at_sequence",
            format!("the session has {after} events"),
        ));
    };
    Ok(Json(SessionStateAt {
        session_id,
        at_sequence: params.at_sequence,
        recorded_at,
        state: serde_json::to_value(&session).map_err(ApiError::internal)?,
    }))
}

/// A page of the workspace's events in relay order.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WorkspaceLog {
    pub events: Vec<AuditEvent>,
    /// `after` of the next page (`<transaction id>.<position>`); equal to the one given when
    /// nothing more has committed below the horizon yet.
    pub next_after: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct WorkspaceLogParams {
    /// `next_after` of the previous page (default: from the first event).
    #[param(pattern = "^[0-9]{1,19}\\.[0-9]{1,18}$", example = "1234.56")]
    pub after: Option<String>,
    /// Events per page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// The workspace's event log for export (sessions, features and erasures), paged in relay order
/// below the relay's horizon, so no page misses an event that commits late.
#[utoipa::path(get, path = "/audit/events", tag = "audit",
    params(WorkspaceLogParams),
    responses((status = 200, body = WorkspaceLog, description = "A page of the workspace's events"), AuditProblems),
    security(("bearer" = [])))]
pub(crate) async fn workspace_events(
    State(state): State<AppState>,
    auditor: Auditor,
    Params(params): Params<WorkspaceLogParams>,
) -> Result<Json<WorkspaceLog>, ApiError> {
    let limit = limit(params.limit)?;
    let after = match params.after.as_deref() {
        None => Cursor::START,
        Some(text) => parse_cursor(text)
            .ok_or_else(|| ApiError::invalid("after", "must be `<transaction id>.<position>`"))?,
    };
    let rows =
        history::chain_of_workspace(&state.pool, after, &auditor.workspace_id, limit as usize)
            .await
            .map_err(ApiError::internal)?;
    let next = rows.last().map_or(after, |(cursor, _)| *cursor);
    let events = rows
        .iter()
        .map(|(_, record)| audit_event(record))
        .collect::<Result<_, _>>()?;
    Ok(Json(WorkspaceLog {
        events,
        next_after: format!("{}.{}", next.transaction_id, next.position),
    }))
}

const SESSION: &str = <canopy_domain::Session as Aggregate>::TYPE;

fn limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        _ => Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        )),
    }
}

fn parse_cursor(text: &str) -> Option<Cursor> {
    let (xid, position) = text.split_once('.')?;
    let valid = |part: &str, max: usize| {
        !part.is_empty() && part.len() <= max && part.bytes().all(|b| b.is_ascii_digit())
    };
    if !valid(xid, 19) || !valid(position, 18) {
        return None;
    }
    Some(Cursor {
        transaction_id: xid.parse().ok()?,
        position: position.parse().ok()?,
    })
}

/// The session's aggregate id when it exists in the auditor's workspace (per its first event in
/// the store); 404 otherwise, the same whether it is absent or another workspace's.
async fn session_in_workspace(
    state: &AppState,
    auditor: &Auditor,
    session_id: Uuid,
) -> Result<String, ApiError> {
    let id = session_id.to_string();
    let workspace: Option<Option<String>> = sqlx::query_scalar(
        "SELECT payload -> 'SessionStarted' ->> 'workspace_id' FROM events \
          WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = 1",
    )
    .bind(SESSION)
    .bind(&id)
    .fetch_optional(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    match workspace.flatten() {
        Some(workspace) if workspace == auditor.workspace_id => Ok(id),
        _ => Err(ApiError::NotFound("session")),
    }
}

fn chain_head(head: Head) -> ChainHead {
    ChainHead {
        sequence: head.sequence,
        hash: head.hash,
    }
}

fn audit_event(record: &ChainRecord) -> Result<AuditEvent, ApiError> {
    let metadata: serde_json::Value =
        serde_json::from_str(&record.metadata).map_err(ApiError::internal)?;
    let payload: serde_json::Value =
        serde_json::from_str(&record.payload).map_err(ApiError::internal)?;
    let text = |key: &str| {
        metadata
            .get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    Ok(AuditEvent {
        event_id: record.event_id.parse().map_err(ApiError::internal)?,
        aggregate_type: record.aggregate_type.clone(),
        aggregate_id: record.aggregate_id.clone(),
        sequence: record.sequence,
        event_type: record.event_type.clone(),
        event_version: record.event_version.clone(),
        recorded_at: record.recorded_at.clone(),
        actor_id: text("actor_id").unwrap_or_default(),
        actor_name: text("actor_name").unwrap_or_default(),
        actor_kind: text("actor_kind").unwrap_or_default(),
        correlation_id: text("correlation_id").unwrap_or_default(),
        request_id: text("request_id").unwrap_or_default(),
        causation_id: text("causation_id"),
        idempotency_key: text("idempotency_key"),
        erased: record.erased,
        payload_digest: record.payload_digest.clone(),
        event_digest: record.event_digest.clone(),
        prev_hash: record.prev_hash.clone(),
        hash: record.hash.clone(),
        metadata,
        payload,
    })
}
