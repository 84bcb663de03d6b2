//! Wakes the relay after appends, without making appends wait on each other.
//!
//! A `NOTIFY` queues its notification at commit under a database-wide lock, so when every
//! appending transaction notified (the `events_notify` trigger of the first migration), every
//! append's commit waited for every other's: appends did not scale with connections. Now the
//! appending transaction notifies nothing; after it commits, [`Waker::committed`] asks a
//! background task to send one `pg_notify` in a transaction of its own. Commits that arrive
//! while one is in flight are covered by the next, so the notifications cost one short
//! transaction per round trip, not one per append, and never hold up an append. The relay
//! LISTENs as before and wakes within a round trip of the commit; a writer that bypasses
//! [`AggregateStore`](crate::AggregateStore) is picked up by the relay's poll.

use std::sync::{Arc, OnceLock};

use sqlx::PgPool;
use tokio::sync::Notify;

/// The channel the relay LISTENs on for "events were committed".
pub const NOTIFY_CHANNEL: &str = "canopy_events";

/// Sends `NOTIFY canopy_events` once now (its own transaction), for writers outside
/// [`AggregateStore`](crate::AggregateStore) that want the relay awake at once.
pub async fn wake_relay(executor: impl sqlx::PgExecutor<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .execute(executor)
        .await?;
    Ok(())
}

/// One per [`AggregateStore`](crate::AggregateStore), shared by its clones: coalesces wake-ups.
/// Dropping the last clone stops its notifier.
#[derive(Debug, Default)]
pub(crate) struct Waker {
    pending: Arc<Notify>,
    task: OnceLock<tokio::task::JoinHandle<()>>,
}

impl Waker {
    /// Events were committed: the relay will hear of it once the notifier's next transaction
    /// commits. Starts the notifier on first use (it needs the caller's runtime).
    pub(crate) fn committed(&self, pool: &PgPool) {
        self.pending.notify_one();
        self.task
            .get_or_init(|| tokio::spawn(notifier(Arc::clone(&self.pending), pool.clone())));
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

/// Sends one notification per burst of commits: `Notify` keeps a single permit, so every commit
/// made while a notification is on its way is covered by the one after it.
async fn notifier(pending: Arc<Notify>, pool: PgPool) {
    loop {
        pending.notified().await;
        if let Err(error) = wake_relay(&pool).await {
            // the relay's poll picks the events up; nothing is lost
            tracing::debug!(%error, "waking the relay failed");
        }
    }
}
