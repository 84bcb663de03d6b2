//! Fan-out of live events: one NATS subscription per process for all session events, routed to
//! the subscribers of each session (and of each workspace) through bounded channels. A
//! subscriber whose channel is full is dropped and marked overflowed; the others never wait for
//! it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use canopy_relay::Envelope;
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    Event(Arc<Envelope>),
    /// The set of people connected to the session changed.
    Presence,
}

/// A registered subscriber's end.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) rx: mpsc::Receiver<Item>,
    pub(crate) overflowed: Arc<AtomicBool>,
    id: u64,
    key: Key,
    hub: Arc<Hub>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(&self.key, self.id);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Session(Uuid),
    Workspace(String),
}

#[derive(Debug)]
struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Item>,
    overflowed: Arc<AtomicBool>,
}

/// The process's fan-out.
#[derive(Debug)]
pub(crate) struct Hub {
    subscribers: Mutex<HashMap<Key, Vec<Subscriber>>>,
    workspaces: Mutex<HashMap<Uuid, String>>,
    next_id: AtomicU64,
    buffer: usize,
    pool: PgPool,
}

impl Hub {
    pub(crate) fn new(pool: PgPool, buffer: usize) -> Arc<Self> {
        Arc::new(Self {
            subscribers: Mutex::default(),
            workspaces: Mutex::default(),
            next_id: AtomicU64::new(1),
            buffer: buffer.max(1),
            pool,
        })
    }

    pub(crate) fn subscribe_session(self: &Arc<Self>, session_id: Uuid) -> Subscription {
        self.subscribe(Key::Session(session_id))
    }

    pub(crate) fn subscribe_workspace(self: &Arc<Self>, workspace_id: &str) -> Subscription {
        self.subscribe(Key::Workspace(workspace_id.to_owned()))
    }

    fn subscribe(self: &Arc<Self>, key: Key) -> Subscription {
        let (tx, rx) = mpsc::channel(self.buffer);
        let overflowed = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(key.clone())
            .or_default()
            .push(Subscriber {
                id,
                tx,
                overflowed: overflowed.clone(),
            });
        metrics::gauge!("canopy_live_subscribers").increment(1.0);
        Subscription {
            rx,
            overflowed,
            id,
            key,
            hub: self.clone(),
        }
    }

    fn remove(&self, key: &Key, id: u64) {
        let mut subscribers = self.lock();
        if let Some(list) = subscribers.get_mut(key) {
            let before = list.len();
            list.retain(|s| s.id != id);
            if list.len() < before {
                metrics::gauge!("canopy_live_subscribers").decrement(1.0);
            }
            if list.is_empty() {
                subscribers.remove(key);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Subscriber>>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers to every subscriber of `key` without waiting: a full buffer drops that
    /// subscriber (it ends with a resumable position).
    fn deliver(&self, key: &Key, item: &Item) {
        let mut subscribers = self.lock();
        let Some(list) = subscribers.get_mut(key) else {
            return;
        };
        list.retain(|subscriber| match subscriber.tx.try_send(item.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                subscriber.overflowed.store(true, Ordering::SeqCst);
                metrics::counter!("canopy_live_overflows_total").increment(1);
                metrics::gauge!("canopy_live_subscribers").decrement(1.0);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                metrics::gauge!("canopy_live_subscribers").decrement(1.0);
                false
            }
        });
        if list.is_empty() {
            subscribers.remove(key);
        }
    }

    /// Tells a session's subscribers that its presence changed.
    pub(crate) fn presence_changed(&self, session_id: Uuid) {
        self.deliver(&Key::Session(session_id), &Item::Presence);
    }

    /// Consumes the process's one subscription to session events until it ends.
    pub(crate) async fn run(self: Arc<Self>, mut subscriber: async_nats::Subscriber) {
        while let Some(message) = subscriber.next().await {
            let envelope = match serde_json::from_slice::<Envelope>(&message.payload) {
                Ok(envelope) => envelope,
                Err(error) => {
                    // not skipped for the session's streams: the next event they get finds the
                    // gap and reads it from the store, where it ends them as unreadable
                    metrics::counter!("canopy_live_unreadable_total", "source" => "nats")
                        .increment(1);
                    tracing::warn!(%error, subject = %message.subject, "a live event does not decode");
                    continue;
                }
            };
            let Ok(session_id) = envelope.aggregate_id.parse::<Uuid>() else {
                continue;
            };
            let workspace = self.workspace_of(session_id).await;
            let item = Item::Event(Arc::new(envelope));
            self.deliver(&Key::Session(session_id), &item);
            if let Some(workspace) = workspace {
                self.deliver(&Key::Workspace(workspace), &item);
            }
        }
    }

    /// The workspace of a session: remembered, else read once from the event store. Never
    /// from a message: whoever can publish on the bus must not be able to move a session into
    /// another workspace's stream.
    async fn workspace_of(&self, session_id: Uuid) -> Option<String> {
        if let Some(workspace) = self
            .workspaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&session_id)
        {
            return Some(workspace.clone());
        }
        let workspace = session_workspace(&self.pool, session_id)
            .await
            .ok()
            .flatten()?;
        self.remember(session_id, &workspace);
        Some(workspace)
    }

    fn remember(&self, session_id: Uuid, workspace: &str) {
        let mut workspaces = self.workspaces.lock().unwrap_or_else(|p| p.into_inner());
        if workspaces.len() > 100_000 {
            workspaces.clear();
        }
        workspaces.insert(session_id, workspace.to_owned());
    }
}

/// The workspace a session was started in, from the event store (the authority: a session's
/// stream must not depend on a projection having caught up).
pub(crate) async fn session_workspace(
    pool: &PgPool,
    session_id: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT payload -> 'SessionStarted' ->> 'workspace_id' FROM events
          WHERE aggregate_type = 'session' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(session_id.to_string())
    .fetch_optional(pool)
    .await
    .map(Option::flatten)
}
