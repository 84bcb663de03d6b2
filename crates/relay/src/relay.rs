//! The relay process: elect a single publisher, then publish committed events until shutdown.
//!
//! Election is a Postgres session advisory lock taken on a connection of the relay's own
//! (outside the pool). The leader runs every query of its work on that same connection (reads,
//! checkpoint writes, lag), so when the connection, and with it the lock, is lost, its next
//! query fails and it stops publishing; a query that hangs counts as lost after `db_timeout`.
//! A standby retries the lock every `standby_retry`, so it takes over within about a second of
//! the leader's session ending.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::envelope::encode;
use crate::publish::{Pipeline, is_fence_refusal};
use crate::status::{RelayStatus, Shared};
use crate::stream::{TailEvent, context, ensure, last_sequence, tail};
use crate::{Cursor, RelayConfig, RelayError, StoredEvent, db};
use canopy_process::Backoff;

/// The channel [`AggregateStore`](canopy_event_store::AggregateStore) notifies after commits
/// that appended events.
pub use canopy_event_store::NOTIFY_CHANNEL;

/// One relay: a candidate publisher. Any number may run against one database; one leads.
#[derive(Debug)]
pub struct Relay {
    config: RelayConfig,
    pool: PgPool,
    client: async_nats::Client,
    shared: Arc<Shared>,
}

impl Relay {
    /// A relay reading from `pool`'s database and publishing through `client`. It takes one
    /// pool connection for LISTEN while leading, plus a dedicated connection for its lock.
    pub fn new(config: RelayConfig, pool: PgPool, client: async_nats::Client) -> Self {
        let shared = Arc::new(Shared::new(config.name.clone()));
        Self {
            config,
            pool,
            client,
            shared,
        }
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// A snapshot of what this relay is doing.
    pub fn status(&self) -> RelayStatus {
        self.shared.snapshot()
    }

    /// The last event acknowledged with every earlier one, updated on each acknowledgment
    /// (so at publish rate). It moves back only if the stream is found behind the checkpoint.
    pub fn watch_acked(&self) -> watch::Receiver<Option<Cursor>> {
        self.shared.subscribe_acked()
    }

    /// Runs until `shutdown` completes, then finishes in-flight publishes (bounded by
    /// `ack_timeout`), writes the checkpoint and releases the lock. Failures of Postgres or NATS
    /// are retried with backoff forever; only an invalid configuration returns an error.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
        self.config.validate()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let work = self.run(stop_rx);
        tokio::pin!(work);
        tokio::pin!(shutdown);
        tokio::select! {
            result = &mut work => return result,
            () = &mut shutdown => {
                stop_tx.send_replace(true);
            }
        }
        work.await
    }

    async fn run(&self, stop: watch::Receiver<bool>) -> Result<(), RelayError> {
        let js = context(self.client.clone(), &self.config);
        let mut lock_conn: Option<PgConnection> = None;
        let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_max);
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            // a database that does not answer must not hold up a shutdown
            let attempt = tokio::select! {
                attempt = self.try_lock(&mut lock_conn) => attempt,
                () = stopped(&stop) => return Ok(()),
            };
            match attempt {
                Ok(true) => {
                    let Some(conn) = lock_conn.take() else {
                        continue;
                    };
                    backoff.reset();
                    let mut leader = Leader::new(self, js.clone(), conn, stop.clone());
                    self.shared.set_leader(true);
                    info!(relay = %self.config.name, "leading: this relay publishes");
                    let outcome = leader.lead().await;
                    self.shared.set_leader(false);
                    match outcome {
                        Ok(()) => {
                            leader.step_down().await;
                            info!(relay = %self.config.name, "stopped; lock released");
                            return Ok(());
                        }
                        Err(error) => {
                            // dropping the connection ends the session, which releases the lock
                            drop(leader);
                            self.shared.other_error(&error);
                            warn!(relay = %self.config.name, %error, "lost leadership; will retry");
                            pause(&stop, backoff.next_delay()).await;
                        }
                    }
                }
                Ok(false) => pause(&stop, self.config.standby_retry).await,
                Err(error) => {
                    lock_conn = None;
                    self.shared.other_error(&error);
                    warn!(relay = %self.config.name, %error, "cannot reach the database for the relay lock");
                    pause(&stop, backoff.next_delay()).await;
                }
            }
        }
    }

    /// Tries the lock on the relay's own connection, opening it first when needed.
    async fn try_lock(&self, conn: &mut Option<PgConnection>) -> Result<bool, RelayError> {
        let timeout = self.config.db_timeout;
        if conn.is_none() {
            let options: PgConnectOptions = (*self.pool.connect_options())
                .clone()
                .application_name(&format!("canopy-relay {}", self.config.name));
            *conn = Some(bounded(timeout, PgConnection::connect_with(&options)).await?);
        }
        let Some(connection) = conn.as_mut() else {
            return Ok(false);
        };
        bounded(timeout, db::try_lock(connection, self.config.lock_key)).await
    }
}

/// Runs a relay until `shutdown` completes: [`Relay::new`] then [`Relay::run_until`].
pub async fn run(
    config: RelayConfig,
    pool: PgPool,
    client: async_nats::Client,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RelayError> {
    Relay::new(config, pool, client).run_until(shutdown).await
}

/// How a publishing round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// Everything below the horizon is published.
    CaughtUp,
    /// A duplicate broke the pipeline's sequence predictions: go again at once.
    Again,
    /// Shutdown was requested; in-flight publishes are drained.
    Stopped,
}

/// Why a round failed. A database failure ends the leadership (the lock may be gone); a NATS
/// failure is retried while keeping it.
#[derive(Debug)]
enum Failure {
    Db(RelayError),
    Nats(RelayError),
}

/// The leader's state for one term.
struct Leader<'r> {
    relay: &'r Relay,
    config: &'r RelayConfig,
    js: jetstream::Context,
    conn: PgConnection,
    stop: watch::Receiver<bool>,
    /// Last event acknowledged with all earlier ones.
    acked: Cursor,
    /// Last checkpoint written.
    saved: Cursor,
    /// The stream's last sequence, when known (unknown after a failure).
    stream_last: Option<u64>,
    backoff: Backoff,
    lag_measured: Option<Instant>,
}

impl<'r> Leader<'r> {
    fn new(
        relay: &'r Relay,
        js: jetstream::Context,
        conn: PgConnection,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            relay,
            config: &relay.config,
            js,
            conn,
            stop,
            acked: Cursor::START,
            saved: Cursor::START,
            stream_last: None,
            backoff: Backoff::new(relay.config.backoff_base, relay.config.backoff_max),
            lag_measured: None,
        }
    }

    /// Leads until shutdown (`Ok`) or until the database fails (`Err`: leadership is lost).
    async fn lead(&mut self) -> Result<(), RelayError> {
        let wake = Arc::new(Notify::new());
        let _listener = self.listen(Arc::clone(&wake)).await?;
        let timeout = self.config.db_timeout;
        self.acked = bounded(
            timeout,
            db::load_checkpoint(&mut self.conn, &self.config.name),
        )
        .await?;
        self.saved = self.acked;
        self.relay.shared.checkpoint(self.acked);

        let mut synced = false;
        loop {
            if self.stopped() {
                return Ok(());
            }
            if !synced {
                match self.sync_stream().await {
                    Ok(()) => synced = true,
                    Err(Failure::Db(error)) => return Err(error),
                    Err(Failure::Nats(error)) => {
                        self.relay.shared.publish_error(&error);
                        warn!(relay = %self.config.name, %error, "stream not ready; retrying");
                        pause(&self.stop, self.backoff.next_delay()).await;
                        continue;
                    }
                }
            }
            let before = self.acked;
            match self.round().await {
                Ok(Round::Stopped) => return Ok(()),
                Ok(Round::Again) => continue,
                Ok(Round::CaughtUp) => self.backoff.reset(),
                Err(Failure::Db(error)) => return Err(error),
                Err(Failure::Nats(error)) => {
                    self.relay.shared.publish_error(&error);
                    let progressed = self.acked != before;
                    if progressed {
                        self.backoff.reset();
                    }
                    if is_fence_refusal(&error) {
                        // something else published into the stream: re-read where it ends
                        warn!(relay = %self.config.name, %error, "stream moved under the relay; resyncing");
                        if !progressed {
                            pause(&self.stop, self.backoff.next_delay()).await;
                        }
                    } else {
                        warn!(relay = %self.config.name, %error, "publish failed; restarting from the first unacknowledged event");
                        synced = false;
                        pause(&self.stop, self.backoff.next_delay()).await;
                    }
                    continue;
                }
            }

            // Idle. Committed events still after the checkpoint are beyond the horizon (an
            // older transaction is open) or arrived just now: look again soon in both cases.
            let lag = self.measure_lag().await?;
            let wait = if lag > 0 {
                self.config.horizon_poll_interval
            } else {
                self.config.poll_interval
            };
            tokio::select! {
                _ = self.stop.changed() => {}
                () = wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Creates or updates the stream and checks it against the checkpoint.
    async fn sync_stream(&mut self) -> Result<(), Failure> {
        ensure(&self.js, self.config).await.map_err(Failure::Nats)?;
        let tail = tail(&self.js, &self.config.stream_name)
            .await
            .map_err(Failure::Nats)?;
        self.stream_last = Some(tail.last_sequence);
        let checkpoint = self.acked;
        let resume = match tail.last {
            TailEvent::Empty if checkpoint > Cursor::START => Some(Cursor::START),
            TailEvent::Event(last) if last < checkpoint => Some(last),
            TailEvent::Event(last) if last > checkpoint => {
                // A crash between PubAck and checkpoint. Do not skip ahead: republish from the
                // checkpoint; Nats-Msg-Id makes the already stored ones duplicates.
                info!(relay = %self.config.name, ?checkpoint, stream_last = ?last,
                    "stream is ahead of the checkpoint; republishing from the checkpoint");
                None
            }
            TailEvent::Unknown => {
                debug!(relay = %self.config.name, "stream's last message is not readable; trusting the checkpoint");
                None
            }
            _ => None,
        };
        if let Some(resume) = resume {
            error!(
                relay = %self.config.name,
                stream = %self.config.stream_name,
                ?checkpoint,
                ?resume,
                "STREAM IS BEHIND THE CHECKPOINT: it lost events or was recreated; republishing from its last event"
            );
            self.acked = resume;
            self.relay.shared.rewound(resume);
            self.save_checkpoint().await.map_err(Failure::Db)?;
        }
        Ok(())
    }

    /// Publishes everything below the horizon after the acked cursor.
    async fn round(&mut self) -> Result<Round, Failure> {
        let stream_last = match self.stream_last {
            Some(last) => last,
            None => {
                let last = last_sequence(&self.js, &self.config.stream_name)
                    .await
                    .map_err(Failure::Nats)?;
                self.stream_last = Some(last);
                last
            }
        };
        let mut pipeline = Pipeline::new(self.js.clone(), self.config.max_in_flight, stream_last);
        let result = self.feed(&mut pipeline).await;
        self.absorb(&mut pipeline);
        match result {
            Ok(round) => {
                self.stream_last = Some(pipeline.stream_last());
                self.save_checkpoint().await.map_err(Failure::Db)?;
                Ok(round)
            }
            Err(Failure::Nats(error)) => {
                // keep what was acknowledged before the failure
                self.save_checkpoint().await.map_err(Failure::Db)?;
                if pipeline.is_broken() && is_fence_refusal(&error) {
                    self.stream_last = Some(pipeline.stream_last());
                    return Ok(Round::Again);
                }
                self.stream_last = None;
                Err(Failure::Nats(error))
            }
            Err(db) => Err(db),
        }
    }

    async fn feed(&mut self, pipeline: &mut Pipeline) -> Result<Round, Failure> {
        let config = self.config;
        let mut rows = bounded(
            config.db_timeout,
            db::read_batch(&mut self.conn, self.acked, config.batch_size),
        )
        .await
        .map_err(Failure::Db)?;
        loop {
            if self.stopped() {
                pipeline.drain().await.map_err(Failure::Nats)?;
                return Ok(Round::Stopped);
            }
            let next_from = match rows.last() {
                Some(last) if rows.len() >= config.batch_size => Some(last.cursor()),
                _ => None,
            };
            let Leader {
                conn, relay, acked, ..
            } = &mut *self;
            let publishing = publish_rows(pipeline, &rows, &config.subject_prefix, relay, acked);
            // While catching up, the next batch is read while this one is published: the
            // database and JetStream work at the same time.
            let (published, next) = match next_from {
                Some(from) => {
                    let reading = bounded(
                        config.db_timeout,
                        db::read_batch(conn, from, config.batch_size),
                    );
                    let (published, next) = tokio::join!(publishing, reading);
                    (published, Some(next))
                }
                None => (publishing.await, None),
            };
            published.map_err(Failure::Nats)?;
            let next = match next {
                Some(next) if !pipeline.is_broken() => next.map_err(Failure::Db)?,
                _ => {
                    pipeline.drain().await.map_err(Failure::Nats)?;
                    self.note_acked(pipeline);
                    return Ok(if pipeline.is_broken() {
                        Round::Again
                    } else {
                        Round::CaughtUp
                    });
                }
            };
            // One checkpoint write per batch, for the prefix acknowledged so far, while the
            // publishes of this batch are still in flight.
            self.absorb(pipeline);
            self.save_checkpoint().await.map_err(Failure::Db)?;
            if self
                .lag_measured
                .is_none_or(|at| at.elapsed() >= config.lag_interval)
            {
                self.measure_lag().await.map_err(Failure::Db)?;
            }
            rows = next;
        }
    }

    fn note_acked(&mut self, pipeline: &Pipeline) {
        note_acked(pipeline, self.relay, &mut self.acked);
    }

    fn absorb(&mut self, pipeline: &mut Pipeline) {
        self.note_acked(pipeline);
        let (stored, duplicates) = pipeline.take_counts();
        self.relay
            .shared
            .published(stored, duplicates, pipeline.acked());
    }

    async fn save_checkpoint(&mut self) -> Result<(), RelayError> {
        if self.acked == self.saved {
            return Ok(());
        }
        bounded(
            self.config.db_timeout,
            db::save_checkpoint(&mut self.conn, &self.config.name, self.acked),
        )
        .await?;
        self.saved = self.acked;
        self.relay.shared.checkpoint(self.acked);
        Ok(())
    }

    /// Measures and reports the lag; returns the number of committed events after the checkpoint.
    async fn measure_lag(&mut self) -> Result<u64, RelayError> {
        let sample = bounded(
            self.config.db_timeout,
            db::lag_after(&mut self.conn, self.acked),
        )
        .await?;
        self.lag_measured = Some(Instant::now());
        self.relay.shared.lag(sample.events, sample.seconds);
        Ok(sample.events)
    }

    /// LISTENs on its own pool connection and turns notifications into wake-ups. A Notify keeps
    /// one permit, so a burst of commits during a round costs a single extra read.
    async fn listen(&self, wake: Arc<Notify>) -> Result<AbortOnDrop, RelayError> {
        let timeout = self.config.db_timeout;
        let mut listener = bounded(timeout, PgListener::connect_with(&self.relay.pool)).await?;
        bounded(timeout, listener.listen(NOTIFY_CHANNEL)).await?;
        let name = self.config.name.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.try_recv().await {
                    // Some: a commit. None: the connection was re-established and notifications
                    // may have been lost in between, so read anyway.
                    Ok(_) => wake.notify_one(),
                    Err(error) => {
                        warn!(relay = %name, %error, "LISTEN failed; relying on polling until it recovers");
                        wake.notify_one();
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(AbortOnDrop(task))
    }

    /// Releases the lock and closes the connection (a clean shutdown).
    async fn step_down(self) {
        let mut conn = self.conn;
        let timeout = self.config.db_timeout;
        if let Err(error) = bounded(timeout, db::unlock(&mut conn, self.config.lock_key)).await {
            debug!(%error, "unlock failed; closing the session releases the lock anyway");
        }
        let _ = tokio::time::timeout(timeout, conn.close()).await;
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }
}

/// Publishes `rows` in order until the pipeline breaks on a duplicate.
async fn publish_rows(
    pipeline: &mut Pipeline,
    rows: &[StoredEvent],
    prefix: &str,
    relay: &Relay,
    acked: &mut Cursor,
) -> Result<(), RelayError> {
    for row in rows {
        pipeline.push(row.cursor(), encode(row, prefix)).await?;
        note_acked(pipeline, relay, acked);
        if pipeline.is_broken() {
            break;
        }
    }
    Ok(())
}

/// Moves the leader's acked cursor (and the watchers') to the pipeline's.
fn note_acked(pipeline: &Pipeline, relay: &Relay, acked: &mut Cursor) {
    if let Some(now) = pipeline.acked()
        && now != *acked
    {
        *acked = now;
        relay.shared.acked(now);
    }
}

/// Aborts the LISTEN task when leadership ends.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Completes when shutdown is requested.
async fn stopped(stop: &watch::Receiver<bool>) {
    let mut stop = stop.clone();
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Waits for `delay`, or less when shutdown is requested.
async fn pause(stop: &watch::Receiver<bool>, delay: Duration) {
    tokio::select! {
        () = stopped(stop) => {}
        () = tokio::time::sleep(delay) => {}
    }
}

/// Bounds a database call: one that does not answer within `timeout` is treated as failed.
async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, RelayError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(RelayError::Database),
        Err(_) => Err(RelayError::DatabaseTimeout(timeout)),
    }
}
