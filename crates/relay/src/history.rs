//! Reading committed events back from the event store: the one place that knows the relay
//! order and the horizon, for every consumer that reads the store directly (the relay itself, a
//! projection's rebuild, a consumer filling a gap, a stream's history).
//!
//! Postgres is the source of truth and JetStream is a derived log: a consumer that sees an
//! aggregate's `sequence` ahead of what it applied reads the missing events here
//! ([`of_aggregate`]) instead of waiting for the stream to bring them. That read needs no
//! horizon: an aggregate's event `n + 1` can only be appended once event `n` has committed, so
//! every event below one that was published is visible.
//!
//! Reading *across* aggregates in relay order ([`committed_after`]) does need it: a position is
//! taken at INSERT but visible at COMMIT, so only rows whose transaction is older than the
//! oldest transaction still running can be read without skipping one that commits late.

use canopy_event_store::ChainRecord;
use canopy_event_store::audit::{CHAIN_COLUMNS, chain_record};
use sqlx::postgres::PgRow;
use sqlx::{Executor, Postgres, Row};

use crate::{Cursor, StoredEvent};

pub(crate) const COLUMNS: &str = "transaction_id::text::bigint AS transaction_id, position, event_id, \
    aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, \
    recorded_at, encode(hash, 'hex') AS hash";

/// Which committed events a read in relay order returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every event (the relay).
    All,
    /// The events of one aggregate type (a projection's rebuild).
    AggregateType(&'a str),
    /// The events at or after a position (a republish from a position).
    FromPosition(i64),
    /// The events of every aggregate whose first event names this workspace as its
    /// `workspace_id`: sessions, features, erasures (an auditor's export).
    Workspace(&'a str),
    /// The events of this workspace's sessions (the live workspace stream).
    WorkspaceSessions(&'a str),
}

impl Scope<'_> {
    /// The scope's condition on `e`, with its one parameter as `$4`.
    fn condition(&self) -> &'static str {
        match self {
            Self::All => "",
            Self::AggregateType(_) => "AND e.aggregate_type = $4",
            Self::FromPosition(_) => "AND e.position >= $4",
            Self::Workspace(_) => {
                "AND EXISTS (SELECT 1 FROM public.events first \
                              WHERE first.aggregate_type = e.aggregate_type \
                                AND first.aggregate_id = e.aggregate_id AND first.sequence = 1 \
                                AND first.payload -> first.event_type ->> 'workspace_id' = $4)"
            }
            Self::WorkspaceSessions(_) => {
                "AND e.aggregate_type = 'session' \
                 AND EXISTS (SELECT 1 FROM public.events first \
                              WHERE first.aggregate_type = 'session' \
                                AND first.aggregate_id = e.aggregate_id AND first.sequence = 1 \
                                AND first.payload -> 'SessionStarted' ->> 'workspace_id' = $4)"
            }
        }
    }
}

/// The one read of committed events in relay order: up to `limit` rows of `columns` (over
/// `public.events` as `e`) after `after` in `(transaction_id, position)` order, below the
/// horizon, in `scope`. Every reader of the store across aggregates goes through here, so the
/// order and the horizon are written once.
pub async fn committed_after<'e, T>(
    executor: impl Executor<'e, Database = Postgres>,
    columns: &str,
    scope: Scope<'_>,
    after: Cursor,
    limit: usize,
) -> Result<Vec<T>, sqlx::Error>
where
    T: Send + Unpin + for<'r> sqlx::FromRow<'r, PgRow>,
{
    let sql = format!(
        "SELECT {columns} FROM public.events e \
          WHERE (e.transaction_id, e.position) > ($1::bigint::text::xid8, $2) \
            AND e.transaction_id < (SELECT pg_snapshot_xmin(pg_current_snapshot())) \
            {} \
          ORDER BY e.transaction_id, e.position \
          LIMIT $3",
        scope.condition()
    );
    let query = sqlx::query_as::<_, T>(&sql)
        .bind(xid_param(after))
        .bind(after.position)
        .bind(limit_param(limit));
    let query = match scope {
        Scope::All => query,
        Scope::AggregateType(text) | Scope::Workspace(text) | Scope::WorkspaceSessions(text) => {
            query.bind(text)
        }
        Scope::FromPosition(position) => query.bind(position),
    };
    query.fetch_all(executor).await
}

/// Up to `limit` committed events after `after` in relay order, below the horizon, in `scope`.
pub async fn events_after<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    scope: Scope<'_>,
    after: Cursor,
    limit: usize,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    committed_after(executor, COLUMNS, scope, after, limit).await
}

/// An event's chain fields with its place in relay order.
struct Chained(Cursor, ChainRecord);

impl<'r> sqlx::FromRow<'r, PgRow> for Chained {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let transaction_id: i64 = row.try_get(14)?;
        let cursor = Cursor {
            transaction_id: u64::try_from(transaction_id).unwrap_or_default(),
            position: row.try_get(15)?,
        };
        Ok(Self(cursor, chain_record(row)?))
    }
}

/// Up to `limit` committed events of one workspace ([`Scope::Workspace`]) after `after` in
/// relay order, below the horizon, with their chain fields as text: an auditor's export, which
/// pages like the relay so no page misses an event that commits late.
pub async fn chain_of_workspace<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    after: Cursor,
    workspace_id: &str,
    limit: usize,
) -> Result<Vec<(Cursor, ChainRecord)>, sqlx::Error> {
    let rows: Vec<Chained> = committed_after(
        executor,
        &format!("{CHAIN_COLUMNS}, e.transaction_id::text::bigint, e.position"),
        Scope::Workspace(workspace_id),
        after,
        limit,
    )
    .await?;
    Ok(rows.into_iter().map(|Chained(c, r)| (c, r)).collect())
}

/// How much one page of an aggregate's events may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Events in a page (at least 1).
    pub events: usize,
    /// Payload text (as JSON) in a page, in bytes; a page always has its first event, however
    /// large.
    pub bytes: usize,
}

impl Page {
    /// Up to `events` events, with no byte budget.
    pub fn events(events: usize) -> Self {
        Self {
            events,
            bytes: usize::MAX,
        }
    }
}

/// One page of the events of one aggregate with `after < sequence < before` (no upper bound
/// without `before`), in sequence order; an empty page means there are no more. What the
/// caller holds per page is bounded by `page`, not by the aggregate's history.
pub async fn of_aggregate<'e>(
    executor: impl Executor<'e, Database = Postgres>,
    aggregate_type: &str,
    aggregate_id: &str,
    after: i64,
    before: Option<i64>,
    page: Page,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    // The running size is a window over the primary key's order, so Postgres stops reading at
    // the LIMIT; the outer filter then cuts the page at the byte budget (keeping the first row).
    sqlx::query_as::<_, StoredEvent>(
        "SELECT transaction_id, position, event_id, aggregate_type, aggregate_id, sequence,
                event_type, event_version, payload, metadata, recorded_at, hash
           FROM (SELECT transaction_id::text::bigint AS transaction_id, position, event_id,
                        aggregate_type, aggregate_id, sequence, event_type, event_version,
                        payload, metadata, recorded_at, encode(hash, 'hex') AS hash,
                        row_number() OVER w AS n,
                        sum(octet_length(payload::text)) OVER w AS bytes_upto
                   FROM public.events
                  WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
                    AND ($4::bigint IS NULL OR sequence < $4)
                 WINDOW w AS (ORDER BY sequence ROWS UNBOUNDED PRECEDING)
                  ORDER BY sequence
                  LIMIT $5) page
          WHERE n = 1 OR bytes_upto <= $6
          ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(after)
    .bind(before)
    .bind(limit_param(page.events.max(1)))
    .bind(limit_param(page.bytes))
    .fetch_all(executor)
    .await
}

pub(crate) fn xid_param(cursor: Cursor) -> i64 {
    i64::try_from(cursor.transaction_id).unwrap_or(i64::MAX)
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}
