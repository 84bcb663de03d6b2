//! What a live stream reads from the event store, a page at a time: a session's events in
//! sequence order (its history, and the gaps the live feed left), and the changes to a
//! workspace's sessions in relay order.
//!
//! A page is at most [`PageLimits::events`] events and, past its first event, at most
//! [`PageLimits::bytes`] of payload text, so what one stream holds while it sends a page does
//! not grow with the history, nor with the size of the events in it.

use canopy_relay::StoredEvent;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// How much one page of history may hold.
pub(crate) use canopy_relay::history::Page as PageLimits;

/// Up to one page of the session's events with `after < sequence < before` (no upper bound
/// without `before`), in sequence order. An empty page means there are no more.
pub(crate) async fn session_page(
    pool: &PgPool,
    session_id: Uuid,
    after: i64,
    before: Option<i64>,
    limits: PageLimits,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    canopy_relay::history::of_aggregate(
        pool,
        "session",
        &session_id.to_string(),
        after,
        before,
        limits,
    )
    .await
}

/// A change to a session of a workspace: what the workspace stream sends, without the payload.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ChangeRow {
    pub(crate) session_id: String,
    pub(crate) event_id: Uuid,
    pub(crate) event_type: String,
    pub(crate) sequence: i64,
    pub(crate) recorded_at: DateTime<Utc>,
    pub(crate) transaction_id: i64,
    pub(crate) position: i64,
}

/// Up to `limit` changes to the workspace's sessions after `(xid, position)` in relay order,
/// committed and below the snapshot horizon (as the relay publishes them), so that paging on
/// the last row's place returns every change once.
pub(crate) async fn workspace_page(
    pool: &PgPool,
    workspace: &str,
    after: (u64, i64),
    limit: usize,
) -> Result<Vec<ChangeRow>, sqlx::Error> {
    canopy_relay::history::committed_after(
        pool,
        "e.aggregate_id AS session_id, e.event_id, e.event_type, e.sequence, e.recorded_at, \
         e.transaction_id::text::bigint AS transaction_id, e.position",
        canopy_relay::history::Scope::WorkspaceSessions(workspace),
        canopy_relay::Cursor {
            transaction_id: after.0,
            position: after.1,
        },
        limit.max(1),
    )
    .await
}
