//! The projections: pure functions from events to read-model rows.
//!
//! Each projection owns a set of tables in schema `read` and a `<name>_positions` table holding
//! the last sequence it applied per aggregate. Handlers use unqualified table names: the caller
//! sets `search_path` for the transaction, to `read` for the live tables or to a shadow schema
//! during a rebuild, so one handler serves both. Handlers never read the clock: every time they
//! write is an event's `recorded_at`, so a rebuild ends identical to the live tables.

mod features;
mod sessions;
mod timeline;

use canopy_relay::Envelope;
use sqlx::PgConnection;

/// A projection's failure to apply an event (retried, then parked).
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("event data does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Inconsistent(String),
}

/// The read-model projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// Sessions, prompts, plans, tool approvals and executions, checkpoints, usage.
    Sessions,
    /// One row per session event: what a UI renders.
    Timeline,
    /// Features with their sessions, learnings and decisions.
    Features,
}

impl Projection {
    pub const ALL: [Self; 3] = [Self::Sessions, Self::Timeline, Self::Features];

    pub fn name(self) -> &'static str {
        match self {
            Self::Sessions => "sessions",
            Self::Timeline => "timeline",
            Self::Features => "features",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Bumped when the projection's logic or tables change: a projection whose built version
    /// differs is rebuilt from the event store at start-up.
    pub fn definition_version(self) -> i32 {
        2
    }

    /// The aggregate type whose events the projection consumes.
    pub fn aggregate_type(self) -> &'static str {
        match self {
            Self::Sessions | Self::Timeline => "session",
            Self::Features => "feature",
        }
    }

    /// The tables the projection owns (rebuilt and swapped together), positions last.
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            Self::Sessions => &[
                "sessions",
                "prompts",
                "plans",
                "tool_approvals",
                "tool_executions",
                "checkpoints",
                "usage_daily",
                "sessions_positions",
            ],
            Self::Timeline => &["session_timeline", "timeline_positions"],
            Self::Features => &[
                "features",
                "feature_sessions",
                "feature_learnings",
                "feature_decisions",
                "features_positions",
            ],
        }
    }

    pub fn positions_table(self) -> &'static str {
        match self {
            Self::Sessions => "sessions_positions",
            Self::Timeline => "timeline_positions",
            Self::Features => "features_positions",
        }
    }

    /// Writes what `event` means for this projection. The caller has opened the transaction,
    /// set its `search_path`, and checked that the event is the aggregate's next one.
    pub(crate) async fn handle(
        self,
        conn: &mut PgConnection,
        event: &Envelope,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != self.aggregate_type() {
            return Ok(());
        }
        match self {
            Self::Sessions => sessions::handle(conn, event).await,
            Self::Timeline => timeline::handle(conn, event).await,
            Self::Features => features::handle(conn, event).await,
        }
    }
}

/// Rebuilds the domain's tagged event from an envelope.
pub(crate) fn decode<E: serde::de::DeserializeOwned>(
    event: &Envelope,
) -> Result<E, ProjectionError> {
    let mut tagged = serde_json::Map::new();
    tagged.insert(event.event_type.clone(), event.data.clone());
    let payload = canopy_domain::upcast::upcast_payload(
        &event.event_type,
        &event.version,
        serde_json::Value::Object(tagged),
    );
    Ok(serde_json::from_value(payload)?)
}

pub(crate) fn uuid(event: &Envelope) -> Result<uuid::Uuid, ProjectionError> {
    event.aggregate_id.parse().map_err(|_| {
        ProjectionError::Inconsistent(format!("aggregate id {} is not a uuid", event.aggregate_id))
    })
}

/// The creating event's transaction id: the listing order's first key.
pub(crate) fn xid(event: &Envelope) -> i64 {
    i64::try_from(event.transaction_id).unwrap_or(i64::MAX)
}
