//! Runs commands against aggregates: load (snapshot + later events), decide, append, report.
//!
//! Commands to one aggregate are serialized inside the process by a per-aggregate async lock, so
//! contention between requests of one process never surfaces as a conflict. Between processes
//! the primary key `(aggregate_type, aggregate_id, sequence)` detects the race; the loser reloads
//! and retries with jittered backoff, and only reports [`ExecuteError::Conflict`] when its
//! retries run out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{PersistedEventRepository, PersistenceError, SerializedEvent};
use cqrs_es::{Aggregate, DomainEvent};
use postgres_es::PostgresEventRepository;
use rand::Rng;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{EventMetadata, StoreError};

/// Tuning for [`AggregateStore`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// A snapshot is written each time an aggregate's version crosses a multiple of this.
    pub snapshot_every: usize,
    pub retry: RetryPolicy,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            snapshot_every: 100,
            retry: RetryPolicy::default(),
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
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Loads aggregates and appends the events their commands yield.
#[derive(Clone)]
pub struct AggregateStore {
    pool: PgPool,
    repo: Arc<PostgresEventRepository>,
    config: StoreConfig,
    locks: Arc<KeyedLocks>,
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
        Self {
            repo: Arc::new(PostgresEventRepository::new(pool.clone())),
            pool,
            config,
            locks: Arc::default(),
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
        let events = self
            .repo
            .get_last_events::<A>(aggregate_id, loaded.version)
            .await
            .map_err(repository_error)?;
        for event in events {
            let payload = serde_json::from_value::<A::Event>(event.payload).map_err(|error| {
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
        A: Aggregate,
        A::Command: Clone,
    {
        let _guard = self.locks.lock(format!("{}/{aggregate_id}", A::TYPE)).await;
        let metadata = metadata.to_map();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .try_execute::<A>(
                    aggregate_id,
                    command.clone(),
                    services,
                    &metadata,
                    expected_version,
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

    async fn try_execute<A: Aggregate>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: &HashMap<String, String>,
        expected_version: Option<usize>,
    ) -> Result<Committed, Attempt<A::Error>> {
        let mut loaded = self
            .load::<A>(aggregate_id)
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
        if events.is_empty() {
            return Ok(Committed {
                aggregate_id: aggregate_id.to_owned(),
                version: loaded.version,
                events: Vec::new(),
            });
        }

        let metadata_value =
            serde_json::to_value(metadata).map_err(|e| Attempt::Failed(decode_error(e)))?;
        let mut serialized = Vec::with_capacity(events.len());
        for (offset, event) in events.iter().enumerate() {
            serialized.push(SerializedEvent::new(
                aggregate_id.to_owned(),
                loaded.version + offset + 1,
                A::TYPE.to_owned(),
                event.event_type(),
                event.event_version(),
                serde_json::to_value(event).map_err(|e| Attempt::Failed(decode_error(e)))?,
                metadata_value.clone(),
            ));
        }
        match self.repo.persist::<A>(&serialized, None).await {
            Ok(()) => {}
            Err(PersistenceError::OptimisticLockError) => return Err(Attempt::Conflict),
            Err(other) => return Err(Attempt::Failed(repository_error(other).into())),
        }

        let first = loaded.version;
        let last = first + events.len();
        let committed = self
            .committed_events::<A>(aggregate_id, first, last)
            .await
            .map_err(|e| Attempt::Failed(e.into()))?;
        self.maybe_snapshot(aggregate_id, &loaded, last).await;
        Ok(Committed {
            aggregate_id: aggregate_id.to_owned(),
            version: last,
            events: committed,
        })
    }

    async fn committed_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        after: usize,
        up_to: usize,
    ) -> Result<Vec<CommittedEvent>, StoreError> {
        let rows: Vec<(Uuid, i64, i64, String)> = sqlx::query_as(
            "SELECT event_id, sequence, position, event_type FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 AND sequence <= $4 \
             ORDER BY sequence",
        )
        .bind(A::TYPE)
        .bind(aggregate_id)
        .bind(to_i64(after))
        .bind(to_i64(up_to))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(event_id, sequence, position, event_type)| CommittedEvent {
                    event_id,
                    sequence: usize::try_from(sequence).unwrap_or_default(),
                    position,
                    event_type,
                },
            )
            .collect())
    }

    /// Snapshots are a cache: written after the append's commit, outside its transaction, and a
    /// failure here only costs a longer replay later. The upsert never moves a snapshot back.
    async fn maybe_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
        loaded: &Loaded<A>,
        new_version: usize,
    ) {
        let every = self.config.snapshot_every.max(1);
        if new_version / every == loaded.version / every {
            return;
        }
        let payload = match serde_json::to_value(&loaded.aggregate) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::warn!(%error, aggregate_id, "aggregate does not serialize; no snapshot");
                return;
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
        if let Err(error) = result {
            tracing::warn!(%error, aggregate_id, "snapshot write failed");
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
