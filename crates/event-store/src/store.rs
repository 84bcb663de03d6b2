//! Runs commands against aggregates: load (snapshot + later events), decide, append, report.
//!
//! A command runs against the state the previous successful command of this process left (kept
//! in a bounded cache), brought up to date with the events appended since; without one, against
//! the latest snapshot and the events after it.
//!
//! Commands to one aggregate are serialized inside the process by a per-aggregate async lock, so
//! contention between requests of one process never surfaces as a conflict. Between processes
//! the primary key `(aggregate_type, aggregate_id, sequence)` detects the race; the loser reloads
//! and retries with jittered backoff, and only reports [`ExecuteError::Conflict`] when its
//! retries run out.
//!
//! The append is our own transaction (postgres-es's `persist` opens one we could not add to):
//! the same `INSERT` per event as postgres-es, returning the id and position the database
//! assigned, then the caller's [`Fence`], if any, then the commit. What the fence writes commits
//! with the events or not at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{PersistedEventRepository, PersistenceError};
use cqrs_es::{Aggregate, DomainEvent};
use postgres_es::PostgresEventRepository;
use rand::Rng;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::wake::Waker;
use crate::{EventMetadata, StoreError};

/// Tuning for [`AggregateStore`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// A snapshot is written each time an aggregate's version crosses a multiple of this.
    pub snapshot_every: usize,
    pub retry: RetryPolicy,
    /// Brings a stored payload `(event_type, event_version, payload)` to its current version
    /// before it is decoded (the domain's `canopy_domain::upcast::upcast_payload`; by default
    /// none).
    pub upcast: Upcast,
    /// Aggregates whose state the store keeps in memory after a command, so that the next
    /// command to one of them reads only the events appended since (usually none) instead of its
    /// snapshot and up to `snapshot_every` events. 0 turns the cache off.
    pub cached_aggregates: usize,
}

/// A stored payload brought to its event type's current version.
pub type Upcast = fn(&str, &str, serde_json::Value) -> serde_json::Value;

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            snapshot_every: 100,
            retry: RetryPolicy::default(),
            upcast: |_, _, payload| payload,
            cached_aggregates: 10_000,
        }
    }
}

/// Retries of a command that lost an append race to another process.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(200),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a random delay up to an exponentially growing cap.
    fn delay(&self, attempt: u32) -> Duration {
        let cap = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX).max(1);
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }
}

/// An aggregate as loaded from the store.
#[derive(Debug)]
pub struct Loaded<A> {
    pub aggregate: A,
    /// Sequence of the last event applied (0 for an aggregate with no events).
    pub version: usize,
    /// The version the snapshot was taken at, when one was used.
    pub snapshot_version: Option<usize>,
    /// Events read and applied on top of the snapshot (or from the start).
    pub events_replayed: usize,
    snapshot_counter: Option<usize>,
}

/// One appended event, as the database recorded it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CommittedEvent {
    pub event_id: Uuid,
    pub sequence: usize,
    pub position: i64,
    pub event_type: String,
}

/// What a command appended. `(aggregate_id, version)` is the read-your-writes token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Committed {
    pub aggregate_id: String,
    pub version: usize,
    pub events: Vec<CommittedEvent>,
}

/// Why a command did not append. A domain refusal and a storage failure stay apart.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E: std::error::Error> {
    #[error("command refused: {0}")]
    Domain(E),
    #[error("aggregate version is {actual}, expected {expected}")]
    VersionMismatch { expected: usize, actual: usize },
    #[error("aggregate was changed concurrently; retries ran out")]
    Conflict { retry_after: Duration },
    /// The caller's [`Fence`] refused the commit; nothing was written.
    #[error("the append's fence refused to commit")]
    Fenced,
    /// An event broke a unique index other than the sequence's (for example a session reusing a
    /// prompt id, `events_prompt_id_once`); nothing was written. Names the index.
    #[error("an event breaks the unique index {index}")]
    Duplicate { index: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What must commit together with an append, and can stop it.
///
/// [`AggregateStore::execute_fenced`] runs the fence inside the append's transaction, after the
/// event inserts (an event insert must be its transaction's first write), with what the
/// transaction is about to commit. `Ok(true)` lets the append commit with whatever the fence
/// wrote; `Ok(false)` rolls everything back and the command fails with
/// [`ExecuteError::Fenced`]; an error rolls back too. A command that yields no event still runs
/// its fence, alone in a transaction, so a fence sees every successful command once. An attempt
/// that loses an append race rolls back before its fence runs; the retry runs it again.
///
/// The store knows nothing of what a fence means: command-api completes an idempotency key with
/// the command's answer, conditional on still holding its claim.
pub trait Fence: Sync {
    fn check(
        &self,
        conn: &mut PgConnection,
        committed: &Committed,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send;
}

/// No fence: [`AggregateStore::execute`] appends without one and opens no transaction for a
/// command that yields nothing.
#[derive(Debug)]
struct Unfenced;

impl Fence for Unfenced {
    async fn check(&self, _: &mut PgConnection, _: &Committed) -> Result<bool, sqlx::Error> {
        Ok(true)
    }
}

/// Loads aggregates and appends the events their commands yield.
#[derive(Clone)]
pub struct AggregateStore {
    pool: PgPool,
    repo: Arc<PostgresEventRepository>,
    config: StoreConfig,
    locks: Arc<KeyedLocks>,
    waker: Arc<Waker>,
    cache: Arc<StateCache>,
}

impl std::fmt::Debug for AggregateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AggregateStore {
    pub fn new(pool: PgPool, config: StoreConfig) -> Self {
        let config_cache_capacity = config.cached_aggregates;
        Self {
            repo: Arc::new(PostgresEventRepository::new(pool.clone())),
            pool,
            config,
            locks: Arc::default(),
            waker: Arc::default(),
            cache: Arc::new(StateCache::new(config_cache_capacity)),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Loads an aggregate from its latest snapshot and the events after it. A snapshot that no
    /// longer decodes (the aggregate's shape changed) is ignored and the stream replayed whole.
    pub async fn load<A: Aggregate>(&self, aggregate_id: &str) -> Result<Loaded<A>, StoreError> {
        let snapshot = self
            .repo
            .get_snapshot::<A>(aggregate_id)
            .await
            .map_err(repository_error)?;
        let mut loaded = match snapshot {
            Some(snapshot) => match serde_json::from_value::<A>(snapshot.aggregate) {
                Ok(aggregate) => Loaded {
                    aggregate,
                    version: snapshot.current_sequence,
                    snapshot_version: Some(snapshot.current_sequence),
                    events_replayed: 0,
                    snapshot_counter: Some(snapshot.current_snapshot),
                },
                Err(error) => {
                    tracing::warn!(%error, aggregate_id, "snapshot no longer decodes; replaying");
                    Loaded {
                        snapshot_counter: Some(snapshot.current_snapshot),
                        ..Loaded::empty()
                    }
                }
            },
            None => Loaded::empty(),
        };
        self.catch_up(aggregate_id, &mut loaded).await?;
        Ok(loaded)
    }

    /// Applies the events after `loaded.version` to it.
    async fn catch_up<A: Aggregate>(
        &self,
        aggregate_id: &str,
        loaded: &mut Loaded<A>,
    ) -> Result<(), StoreError> {
        let events = self
            .repo
            .get_last_events::<A>(aggregate_id, loaded.version)
            .await
            .map_err(repository_error)?;
        for event in events {
            let payload =
                (self.config.upcast)(&event.event_type, &event.event_version, event.payload);
            let payload = serde_json::from_value::<A::Event>(payload).map_err(|error| {
                StoreError::Decode(format!(
                    "{} {} #{}: {error}",
                    A::TYPE,
                    aggregate_id,
                    event.sequence
                ))
            })?;
            loaded.aggregate.apply(payload);
            loaded.version = event.sequence;
            loaded.events_replayed += 1;
        }
        Ok(())
    }

    /// The aggregate a command runs against: the state this process left after its last command
    /// to it, brought up to date with what was appended since (by other processes), or else
    /// [`load`](Self::load). The caller holds the aggregate's lock, so no other command of this
    /// process moves it meanwhile; an append race with another process is still caught by the
    /// primary key, and the retry loads afresh.
    async fn load_for_command<A: Aggregate + 'static>(
        &self,
        aggregate_id: &str,
    ) -> Result<Loaded<A>, StoreError> {
        let key = cache_key::<A>(aggregate_id);
        let Some(mut loaded) = self.cache.take::<A>(&key) else {
            return self.load(aggregate_id).await;
        };
        self.catch_up(aggregate_id, &mut loaded).await?;
        Ok(loaded)
    }

    /// Runs `command` against the aggregate and appends the events it yields, all or none.
    ///
    /// `expected_version` makes the command conditional (`If-Match`). A command that yields no
    /// event appends nothing and reports the current version.
    pub async fn execute<A>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: &EventMetadata,
        expected_version: Option<usize>,
    ) -> Result<Committed, ExecuteError<A::Error>>
    where
        A: Aggregate + 'static,
        A::Command: Clone,
    {
        self.run::<A, Unfenced>(
            aggregate_id,
            command,
            services,
            metadata,
            expected_version,
            None,
        )
        .await
    }

    /// [`execute`](Self::execute), with `fence` run in the append's transaction: the append
    /// commits only if the fence agrees, and what the fence wrote commits with it.
    pub async fn execute_fenced<A, F>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: &EventMetadata,
        expected_version: Option<usize>,
        fence: &F,
    ) -> Result<Committed, ExecuteError<A::Error>>
    where
        A: Aggregate + 'static,
        A::Command: Clone,
        F: Fence,
    {
        self.run::<A, F>(
            aggregate_id,
            command,
            services,
            metadata,
            expected_version,
            Some(fence),
        )
        .await
    }

    async fn run<A, F>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: &EventMetadata,
        expected_version: Option<usize>,
        fence: Option<&F>,
    ) -> Result<Committed, ExecuteError<A::Error>>
    where
        A: Aggregate + 'static,
        A::Command: Clone,
        F: Fence,
    {
        let _guard = self.locks.lock(format!("{}/{aggregate_id}", A::TYPE)).await;
        let metadata = serde_json::to_value(metadata.to_map()).map_err(decode_error)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .try_execute::<A, F>(
                    aggregate_id,
                    command.clone(),
                    services,
                    &metadata,
                    expected_version,
                    fence,
                )
                .await
            {
                Err(Attempt::Conflict) if attempt < self.config.retry.max_attempts => {
                    tokio::time::sleep(self.config.retry.delay(attempt)).await;
                }
                Err(Attempt::Conflict) => {
                    return Err(ExecuteError::Conflict {
                        retry_after: Duration::from_secs(1),
                    });
                }
                Err(Attempt::Failed(error)) => return Err(error),
                Ok(committed) => return Ok(committed),
            }
        }
    }

    async fn try_execute<A: Aggregate + 'static, F: Fence>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: &serde_json::Value,
        expected_version: Option<usize>,
        fence: Option<&F>,
    ) -> Result<Committed, Attempt<A::Error>> {
        let mut loaded = self
            .load_for_command::<A>(aggregate_id)
            .await
            .map_err(|e| Attempt::Failed(e.into()))?;
        if let Some(expected) = expected_version
            && expected != loaded.version
        {
            return Err(Attempt::Failed(ExecuteError::VersionMismatch {
                expected,
                actual: loaded.version,
            }));
        }
        let sink = EventSink::<A>::default();
        loaded
            .aggregate
            .handle(command, services, &sink)
            .await
            .map_err(|e| Attempt::Failed(ExecuteError::Domain(e)))?;
        let events = sink.collect().await;
        let committed = self
            .append::<A, F>(aggregate_id, loaded.version, &events, metadata, fence)
            .await?;
        let counter = self
            .maybe_snapshot(aggregate_id, &loaded, committed.version)
            .await;
        // `handle` applied the events it wrote: this is the state at the committed version. Only
        // a successful command's state is kept; after a refusal or a failed append the next
        // command loads afresh.
        self.cache.put(
            cache_key::<A>(aggregate_id),
            Loaded {
                version: committed.version,
                snapshot_version: None,
                events_replayed: 0,
                snapshot_counter: counter,
                aggregate: loaded.aggregate,
            },
        );
        Ok(committed)
    }

    /// Appends `events` after `version` in one transaction, with the fence last. Without events
    /// or a fence there is nothing to write and no transaction; without a fence the one insert
    /// statement is the transaction.
    async fn append<A: Aggregate, F: Fence>(
        &self,
        aggregate_id: &str,
        version: usize,
        events: &[A::Event],
        metadata: &serde_json::Value,
        fence: Option<&F>,
    ) -> Result<Committed, Attempt<A::Error>> {
        let mut committed = Committed {
            aggregate_id: aggregate_id.to_owned(),
            version: version + events.len(),
            events: Vec::with_capacity(events.len()),
        };
        if events.is_empty() && fence.is_none() {
            return Ok(committed);
        }
        let payloads = events
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Attempt::Failed(decode_error(e)))?;
        let sequences: Vec<i64> = (1..=events.len()).map(|i| to_i64(version + i)).collect();
        let types: Vec<String> = events.iter().map(DomainEvent::event_type).collect();
        let versions: Vec<String> = events.iter().map(DomainEvent::event_version).collect();
        // The columns postgres-es writes, all events in one statement (the triggers fill in the
        // rest, row by row in sequence order, each seeing the rows before it). Without a fence
        // the statement is its own transaction: one round trip for the whole append.
        let insert = sqlx::query_as::<_, (Uuid, i64, i64)>(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT $1, $2, e.sequence, e.event_type, e.event_version, e.payload, $7 \
             FROM unnest($3::bigint[], $4::text[], $5::text[], $6::jsonb[]) AS e(sequence, event_type, event_version, payload) \
             ORDER BY e.sequence \
             RETURNING event_id, position, sequence",
        )
        .bind(A::TYPE)
        .bind(aggregate_id)
        .bind(&sequences)
        .bind(&types)
        .bind(&versions)
        .bind(&payloads)
        .bind(metadata);

        let Some(fence) = fence else {
            let rows = insert.fetch_all(&self.pool).await.map_err(insert_error)?;
            committed.events = committed_events(rows, types);
            self.waker.committed(&self.pool);
            return Ok(committed);
        };
        let mut tx = self.pool.begin().await.map_err(Attempt::database)?;
        if !events.is_empty() {
            // on failure dropping `tx` rolls back
            let rows = insert.fetch_all(&mut *tx).await.map_err(insert_error)?;
            committed.events = committed_events(rows, types);
        }
        let agreed = fence
            .check(&mut tx, &committed)
            .await
            .map_err(Attempt::database)?;
        if !agreed {
            if let Err(error) = tx.rollback().await {
                // the connection is closed with the transaction still open: it aborts
                tracing::warn!(%error, aggregate_id, "rollback of a fenced append failed");
            }
            return Err(Attempt::Failed(ExecuteError::Fenced));
        }
        tx.commit().await.map_err(Attempt::database)?;
        if !events.is_empty() {
            self.waker.committed(&self.pool);
        }
        Ok(committed)
    }

    /// Snapshots are a cache: written after the append's commit, outside its transaction, and a
    /// failure here only costs a longer replay later. The upsert never moves a snapshot back.
    /// Answers the snapshot counter the aggregate is at afterwards.
    async fn maybe_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
        loaded: &Loaded<A>,
        new_version: usize,
    ) -> Option<usize> {
        let every = self.config.snapshot_every.max(1);
        if new_version / every == loaded.version / every {
            return loaded.snapshot_counter;
        }
        let payload = match serde_json::to_value(&loaded.aggregate) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::warn!(%error, aggregate_id, "aggregate does not serialize; no snapshot");
                return loaded.snapshot_counter;
            }
        };
        let counter = loaded.snapshot_counter.map_or(1, |c| c + 1);
        let result = sqlx::query(
            "INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
               SET last_sequence = EXCLUDED.last_sequence, current_snapshot = EXCLUDED.current_snapshot, \
                   payload = EXCLUDED.payload, taken_at = now() \
             WHERE snapshots.last_sequence < EXCLUDED.last_sequence",
        )
        .bind(A::TYPE)
        .bind(aggregate_id)
        .bind(to_i64(new_version))
        .bind(to_i64(counter))
        .bind(payload)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Some(counter),
            Err(error) => {
                tracing::warn!(%error, aggregate_id, "snapshot write failed");
                loaded.snapshot_counter
            }
        }
    }
}

impl<A> Loaded<A> {
    fn empty() -> Self
    where
        A: Default,
    {
        Self {
            aggregate: A::default(),
            version: 0,
            snapshot_version: None,
            events_replayed: 0,
            snapshot_counter: None,
        }
    }
}

enum Attempt<E: std::error::Error> {
    Conflict,
    Failed(ExecuteError<E>),
}

impl<E: std::error::Error> Attempt<E> {
    fn database(error: sqlx::Error) -> Self {
        Self::Failed(ExecuteError::Store(StoreError::Database(error)))
    }
}

/// What an insert's failure means: another writer took the sequence (retry), an id the session
/// already used (`Duplicate`), or a database failure.
fn insert_error<E: std::error::Error>(error: sqlx::Error) -> Attempt<E> {
    if is_sequence_taken(&error) {
        return Attempt::Conflict;
    }
    match duplicate_index(&error) {
        Some(index) => Attempt::Failed(ExecuteError::Duplicate { index }),
        None => Attempt::database(error),
    }
}

/// The inserted rows, in sequence order, with their event types.
fn committed_events(mut rows: Vec<(Uuid, i64, i64)>, types: Vec<String>) -> Vec<CommittedEvent> {
    rows.sort_by_key(|&(_, _, sequence)| sequence);
    rows.into_iter()
        .zip(types)
        .map(
            |((event_id, position, sequence), event_type)| CommittedEvent {
                event_id,
                sequence: usize::try_from(sequence).unwrap_or(usize::MAX),
                position,
                event_type,
            },
        )
        .collect()
}

/// A unique violation of the events' primary key: the sequence was appended by someone else.
fn is_sequence_taken(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|e| {
        e.kind() == sqlx::error::ErrorKind::UniqueViolation && e.constraint() == Some("events_pkey")
    })
}

/// The unique index, other than the primary key, that an event insert broke.
fn duplicate_index(error: &sqlx::Error) -> Option<String> {
    let error = error.as_database_error()?;
    if error.kind() != sqlx::error::ErrorKind::UniqueViolation {
        return None;
    }
    error
        .constraint()
        .filter(|c| c.starts_with("events_") && c.ends_with("_once"))
        .map(str::to_owned)
}

fn repository_error(error: PersistenceError) -> StoreError {
    match error {
        PersistenceError::DeserializationError(e) => StoreError::Decode(e.to_string()),
        other => StoreError::Repository(other.to_string()),
    }
}

fn decode_error<E: std::error::Error>(error: serde_json::Error) -> ExecuteError<E> {
    ExecuteError::Store(StoreError::Decode(error.to_string()))
}

fn to_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn cache_key<A: Aggregate>(aggregate_id: &str) -> String {
    format!("{}/{aggregate_id}", A::TYPE)
}

/// The states commands left, by aggregate, for the next command to the same aggregate. A state
/// is taken out while a command runs (under the aggregate's lock) and put back only when the
/// command succeeded, so no state here is ever ahead of the store. Bounded: when full, an
/// arbitrary entry makes room (a miss only costs a load from the snapshot).
struct StateCache {
    capacity: usize,
    states: Mutex<HashMap<String, Box<dyn std::any::Any + Send>>>,
}

impl StateCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            states: Mutex::default(),
        }
    }

    fn take<A: Aggregate + 'static>(&self, key: &str) -> Option<Loaded<A>> {
        let state = self
            .states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)?;
        state.downcast::<Loaded<A>>().ok().map(|loaded| *loaded)
    }

    fn put<A: Aggregate + 'static>(&self, key: String, loaded: Loaded<A>) {
        if self.capacity == 0 {
            return;
        }
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if states.len() >= self.capacity && !states.contains_key(&key) {
            let evicted = states.keys().next().cloned();
            if let Some(evicted) = evicted {
                states.remove(&evicted);
            }
        }
        states.insert(key, Box::new(loaded));
    }
}

impl std::fmt::Debug for StateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// One async mutex per aggregate, created on demand and dropped when nobody holds or waits on it.
#[derive(Debug, Default)]
struct KeyedLocks {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    async fn lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            if locks.len() > 1024 {
                locks.retain(|_, weak| weak.strong_count() > 0);
            }
            match locks.get(&key).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key, Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}
