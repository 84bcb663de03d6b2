//! Presence: who is connected to a session now, across every query-api process.
//!
//! Ephemeral by design (nats-server 2.9 has no per-key TTL nor expiry notices, and
//! `ParticipantJoined` stays an event): each process publishes a heartbeat on
//! `<presence_prefix>.<session_id>` for every person it has connected, every interval, and a
//! "left" message when their last connection closes. Every process keeps the heartbeats it hears
//! and counts a person present while their last heartbeat is younger than three intervals.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::hub::Hub;

/// A person connected to a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub(crate) struct Present {
    pub user_id: String,
    pub name: String,
    /// Milliseconds since this person's last heartbeat.
    pub last_seen_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Beat {
    session_id: Uuid,
    user_id: String,
    name: String,
    left: bool,
}

type Sessions = HashMap<Uuid, HashMap<String, (String, Instant)>>;

/// The process's view of presence, and its own connections.
#[derive(Debug)]
pub(crate) struct Presence {
    client: async_nats::Client,
    prefix: String,
    interval: Duration,
    seen: Mutex<Sessions>,
    local: Mutex<HashMap<(Uuid, String), (String, usize)>>,
}

/// Held while a person is connected through this process.
#[derive(Debug)]
pub(crate) struct Connected {
    presence: Arc<Presence>,
    session_id: Uuid,
    user_id: String,
}

impl Drop for Connected {
    fn drop(&mut self) {
        let mut local = self
            .presence
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (self.session_id, self.user_id.clone());
        let last = match local.get_mut(&key) {
            Some((_, count)) if *count > 1 => {
                *count -= 1;
                None
            }
            Some(_) => local.remove(&key).map(|(name, _)| name),
            None => None,
        };
        drop(local);
        if let Some(name) = last {
            let presence = self.presence.clone();
            let beat = Beat {
                session_id: self.session_id,
                user_id: self.user_id.clone(),
                name,
                left: true,
            };
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { presence.publish(&beat).await });
            }
        }
    }
}

impl Presence {
    pub(crate) fn new(client: async_nats::Client, prefix: String, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            client,
            prefix,
            interval,
            seen: Mutex::default(),
            local: Mutex::default(),
        })
    }

    pub(crate) fn subject(&self) -> String {
        format!("{}.*", self.prefix)
    }

    /// Registers a connection of `user_id` to `session_id` and announces it at once.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        session_id: Uuid,
        user_id: &str,
        name: &str,
    ) -> Connected {
        {
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            local
                .entry((session_id, user_id.to_owned()))
                .or_insert_with(|| (name.to_owned(), 0))
                .1 += 1;
        }
        self.publish(&Beat {
            session_id,
            user_id: user_id.to_owned(),
            name: name.to_owned(),
            left: false,
        })
        .await;
        Connected {
            presence: self.clone(),
            session_id,
            user_id: user_id.to_owned(),
        }
    }

    /// Who is present in `session_id` now.
    pub(crate) fn list(&self, session_id: Uuid) -> Vec<Present> {
        let now = Instant::now();
        let ttl = self.interval * 3;
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut present: Vec<Present> = seen
            .get(&session_id)
            .into_iter()
            .flatten()
            .filter(|(_, (_, at))| now.duration_since(*at) < ttl)
            .map(|(user_id, (name, at))| Present {
                user_id: user_id.clone(),
                name: name.clone(),
                last_seen_ms: u64::try_from(now.duration_since(*at).as_millis())
                    .unwrap_or(u64::MAX),
            })
            .collect();
        present.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        present
    }

    async fn publish(&self, beat: &Beat) {
        let subject = format!("{}.{}", self.prefix, beat.session_id);
        if let Ok(body) = serde_json::to_vec(beat)
            && let Err(error) = self.client.publish(subject, body.into()).await
        {
            tracing::warn!(%error, "could not publish presence");
        }
    }

    /// Applies heartbeats heard from every process, and tells the hub when a session's presence
    /// changes.
    pub(crate) async fn listen(
        self: Arc<Self>,
        mut subscriber: async_nats::Subscriber,
        hub: Arc<Hub>,
    ) {
        while let Some(message) = subscriber.next().await {
            let Ok(beat) = serde_json::from_slice::<Beat>(&message.payload) else {
                continue;
            };
            let changed = {
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                let users = seen.entry(beat.session_id).or_default();
                if beat.left {
                    users.remove(&beat.user_id).is_some()
                } else {
                    users
                        .insert(beat.user_id.clone(), (beat.name.clone(), Instant::now()))
                        .is_none()
                }
            };
            if changed {
                hub.presence_changed(beat.session_id);
            }
        }
    }

    /// Every interval: heartbeats for this process's connections, and expiry of silent ones.
    pub(crate) async fn heartbeat(self: Arc<Self>, hub: Arc<Hub>) {
        let mut tick = tokio::time::interval(self.interval);
        loop {
            tick.tick().await;
            let local: Vec<Beat> = self
                .local
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|((session_id, user_id), (name, _))| Beat {
                    session_id: *session_id,
                    user_id: user_id.clone(),
                    name: name.clone(),
                    left: false,
                })
                .collect();
            for beat in &local {
                self.publish(beat).await;
            }
            let expired: Vec<Uuid> = {
                let now = Instant::now();
                let ttl = self.interval * 3;
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                let mut changed = Vec::new();
                for (session_id, users) in seen.iter_mut() {
                    let before = users.len();
                    users.retain(|_, (_, at)| now.duration_since(*at) < ttl);
                    if users.len() != before {
                        changed.push(*session_id);
                    }
                }
                seen.retain(|_, users| !users.is_empty());
                changed
            };
            for session_id in expired {
                hub.presence_changed(session_id);
            }
        }
    }
}
