//! Projection "sessions": one module per table it owns (`sessions` (in `sessions_table`), `prompts`, `plans`,
//! `tool_approvals`, `tool_executions`, `checkpoints`, `usage_daily`), each applying the events
//! that change its rows, so "where is `plans.status` written?" is answered by `plans.rs`.
//!
//! [`handle`] decodes an event once and hands it to every table in a fixed order. The
//! `sessions` table comes last: its counters (`prompt_count`, `queue_length`, ...) count rows the
//! other tables have just written, and every event moves its row's version and activity time.

mod checkpoints;
mod plans;
mod prompts;
mod sessions_table;
mod tool_approvals;
mod tool_executions;
mod usage_daily;

use canopy_domain::SessionEvent;
use canopy_relay::Envelope;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{ProjectionError, decode, uuid, xid};

pub(super) async fn handle(
    conn: &mut PgConnection,
    event: &Envelope,
) -> Result<(), ProjectionError> {
    let origin = Origin {
        session_id: uuid(event)?,
        event,
    };
    let decoded: SessionEvent = decode(event)?;
    prompts::apply(conn, &origin, &decoded).await?;
    plans::apply(conn, &origin, &decoded).await?;
    tool_approvals::apply(conn, &origin, &decoded).await?;
    tool_executions::apply(conn, &origin, &decoded).await?;
    checkpoints::apply(conn, &origin, &decoded).await?;
    usage_daily::apply(conn, &origin, &decoded).await?;
    sessions_table::apply(conn, &origin, &decoded).await
}

/// The event a row is written from: its session, time and place in relay order.
struct Origin<'a> {
    session_id: Uuid,
    event: &'a Envelope,
}

impl Origin<'_> {
    /// When it happened: every time a handler writes is an event's.
    fn at(&self) -> DateTime<Utc> {
        self.event.recorded_at
    }

    /// The creating event's transaction id (a listing's first order key).
    fn xid(&self) -> i64 {
        xid(self.event)
    }

    /// The creating event's position (a listing's second order key).
    fn position(&self) -> i64 {
        self.event.position
    }

    fn sequence(&self) -> i64 {
        self.event.sequence
    }

    /// Who acted (the runner's id for what the agent proposed).
    fn actor_id(&self) -> &str {
        &self.event.metadata.actor_id
    }
}

/// A person's decision on a plan or a tool approval request.
struct Review<'a> {
    status: &'static str,
    reviewer_id: &'a str,
    reviewer_name: &'a str,
    comment: Option<&'a str>,
}
