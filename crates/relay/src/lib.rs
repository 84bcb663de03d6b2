//! Gap-safe relay of committed events from the Postgres event store to NATS JetStream.
//!
//! Postgres is the source of truth; the relay copies every committed event to one JetStream
//! stream, in relay order `(transaction_id, position)`, once per event id. It is a library with no global state: the
//! `canopy relay` command runs it alone, and command-api can run it in its own process
//! ([`Relay::run_until`] with the process's shutdown signal). Any number of relays may run
//! against one database; a Postgres advisory lock elects the one that publishes.
//!
//! # How it stays gap-free
//!
//! - **Horizon.** A position is taken at INSERT but visible at COMMIT, so reading "after the
//!   last position seen" skips slow transactions. The relay reads only rows whose transaction
//!   id is below `pg_snapshot_xmin(pg_current_snapshot())`, every transaction below which has
//!   ended, and orders and checkpoints by `(transaction_id, position)`. An event insert is
//!   always its transaction's first write (a trigger enforces it), so a later append to an
//!   aggregate has the larger transaction id and that order keeps each aggregate's order.
//!   The horizon is cluster-wide: a long transaction in *any* database of the cluster pauses
//!   the relay (watch `canopy_relay_lag_seconds`; the services bound idle transactions).
//! - **Checkpoint** (`relay_checkpoints`): the `(transaction_id, position)` of the last event
//!   whose PubAck arrived with every earlier one acknowledged, written once per batch.
//! - **Retry from the first unacknowledged event.** Up to `max_in_flight` publishes are
//!   pipelined. On any failure the relay drops what is in flight, backs off (exponential, with
//!   jitter, capped) and publishes again from the first event not acknowledged. `Nats-Msg-Id`
//!   (the event id) makes JetStream drop the copies it already has, within its duplicate window.
//! - **Ordering fence.** After a reconnect, message N may have died with the old connection
//!   while N+1 was still queued. Each message therefore carries `Nats-Expected-Last-Sequence`:
//!   JetStream stores it only directly after its predecessor. So the stream holds the events in
//!   relay order with no gap, duplicate-free within the window.
//! - **Start-up check.** A leader compares its checkpoint with the stream's last message. Stream
//!   behind (lost, recreated): logged as an error, counted (`canopy_relay_stream_behind_total`)
//!   and the relay republishes from the stream's last event (from the start when it is empty).
//!   Stream ahead (a crash between PubAck and checkpoint): it republishes from the checkpoint
//!   and lets `Nats-Msg-Id` drop the copies; it never skips ahead.
//! - **Single publisher.** The leader holds `pg_try_advisory_lock(lock_key)` on a dedicated
//!   connection and does all its queries there, so a lost connection stops it at its next
//!   query; standbys retry every second and take over within seconds.
//! - **Wake-ups.** `LISTEN canopy_events` (the event store notifies after its commits, one
//!   notification per burst of them, never inside the appending transaction), a poll every
//!   `poll_interval` as a safety net and for writers that do not notify, and a quick re-poll
//!   while committed events wait beyond the horizon.
//!
//! # The contract for consumers (any language)
//!
//! - **Stream** `CANOPY_EVENTS` (configurable), subjects `canopy.events.>`.
//! - **Subject** `canopy.events.<aggregate_type>.<aggregate_id>.<event_type>`, e.g.
//!   `canopy.events.session.6f1c…-…e2.SessionStarted`. Filter one aggregate type with
//!   `canopy.events.session.>`, one aggregate with `canopy.events.session.<id>.*`. A part
//!   containing `.`, `*`, `>`, `%`, whitespace or control characters is percent-encoded
//!   (`%2E`...; an empty part is `%`); UUIDs and event type names never are.
//! - **Headers**: `Nats-Msg-Id` = event id; `ce-specversion: 1.0`, `ce-id` (event id),
//!   `ce-source: canopy`, `ce-type` (event type), `ce-time` (recorded_at, RFC 3339 UTC),
//!   `ce-subject: <aggregate_type>/<aggregate_id>`, `content-type: application/json`,
//!   `canopy-sequence`, `canopy-position`, `canopy-transaction-id`, `canopy-event-version`,
//!   `canopy-chain-hash` (the event's hash chain link, hex: the stream's head as of this event,
//!   kept outside the database for auditors); and the relay's fence `Nats-Expected-Last-Sequence` (ignore it).
//! - **Body**: the JSON [`Envelope`]: `id`, `type`, `version`, `aggregate_type`,
//!   `aggregate_id`, `sequence`, `position`, `transaction_id`, `recorded_at` (RFC 3339),
//!   `metadata` (`actor_id`, `actor_name`, `actor_kind`, `correlation_id`, `request_id`, and
//!   when set `causation_id`, `idempotency_key`), `data` (the event payload without its
//!   `{"<EventType>": …}` tag).
//! - **Order and duplicates.** Stream order is relay order `(transaction_id, position)`: per
//!   aggregate, append order (`sequence` runs 1, 2, 3…); across aggregates, the order in which
//!   the appending transactions made their first write (close to, not exactly, commit order).
//!   Still, consumers must deduplicate by `(aggregate_type, aggregate_id, sequence)`: apply an
//!   event only when `sequence == last applied + 1`, skip `sequence <= last applied` (a copy: a
//!   relay restarted after longer than the duplicate window, or [`republish`]), and treat
//!   `sequence > last applied + 1` as "an earlier event is still coming" (nak with delay; it only
//!   happens if something other than the relay published into the stream). `position` is unique
//!   but not in relay order; do not order events by it.
//!
//! # Production
//!
//! The local nats-server is 2.9.10. In production use NATS ≥ 2.10 with `sync_interval: always`
//! (or a short interval) and replicated streams (`stream_replicas: 3`): Jepsen (2025) found
//! acknowledged writes lost with the default two-minute fsync interval, and an acknowledged but
//! lost event is exactly what the relay cannot see afterwards (its checkpoint has moved on). The
//! start-up check catches a stream that lost its tail, not one that lost events in the middle;
//! [`republish`] repairs that. Keep `duplicate_window` longer than a relay's worst restart or
//! failover time.

mod config;
mod db;
mod envelope;
pub mod history;
mod publish;
mod relay;
mod republish;
mod status;
mod stream;

use serde::{Deserialize, Serialize};

pub use config::RelayConfig;
pub use envelope::{Envelope, EnvelopeMetadata, StoredEvent, headers, subject, subject_token};
pub use relay::{NOTIFY_CHANNEL, Relay, run};
pub use republish::{Lag, RepublishReport, measure_lag, republish};
pub use status::{RelayStatus, metric};
pub use stream::{ensure_stream, stream_config, wait_for_stream};

/// A place in relay order: `(transaction_id, position)`, compared in that order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Cursor {
    /// The committing transaction (`xid8`).
    pub transaction_id: u64,
    pub position: i64,
}

impl Cursor {
    /// Before every event.
    pub const START: Cursor = Cursor {
        transaction_id: 0,
        position: 0,
    };
}

/// Why the relay (or one of its operations) failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("invalid relay configuration: {0}")]
    Config(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database did not answer within {0:?}")]
    DatabaseTimeout(std::time::Duration),
    #[error("could not create or update the stream: {0}")]
    Stream(#[source] async_nats::jetstream::context::CreateStreamError),
    #[error("could not read the stream's state: {0}")]
    StreamInfo(#[source] async_nats::jetstream::context::GetStreamError),
    #[error("could not read the stream's last message: {0}")]
    StreamMessage(#[source] async_nats::jetstream::stream::RawMessageError),
    #[error("publish failed: {0}")]
    Publish(#[source] async_nats::jetstream::context::PublishError),
}
