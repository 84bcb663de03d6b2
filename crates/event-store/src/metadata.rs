//! The metadata every event carries: who caused it and which request, correlation and idempotency
//! key it belongs to. Stored as a JSON object of strings in `events.metadata`; a table constraint
//! refuses an event without the required keys.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Whether the actor is a person or one of Canopy's services (the agent runner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    User,
    Service,
}

impl ActorKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Service => "service",
        }
    }
}

/// Metadata attached to every event of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMetadata {
    /// User id (JWT subject) or service name.
    pub actor_id: String,
    /// Display name of the user, or the service name.
    pub actor_name: String,
    pub actor_kind: ActorKind,
    /// Ties together everything one user action caused, across services.
    pub correlation_id: String,
    /// The event or command that caused this one, when there is one.
    pub causation_id: Option<String>,
    /// The HTTP request (or job) that appended the event.
    pub request_id: String,
    pub idempotency_key: Option<String>,
}

impl EventMetadata {
    pub const ACTOR_ID: &'static str = "actor_id";
    pub const ACTOR_NAME: &'static str = "actor_name";
    pub const ACTOR_KIND: &'static str = "actor_kind";
    pub const CORRELATION_ID: &'static str = "correlation_id";
    pub const CAUSATION_ID: &'static str = "causation_id";
    pub const REQUEST_ID: &'static str = "request_id";
    pub const IDEMPOTENCY_KEY: &'static str = "idempotency_key";

    /// Metadata for a command with fresh request and correlation ids.
    pub fn new(
        actor_id: impl Into<String>,
        actor_name: impl Into<String>,
        kind: ActorKind,
    ) -> Self {
        let request_id = uuid::Uuid::new_v4().to_string();
        Self {
            actor_id: actor_id.into(),
            actor_name: actor_name.into(),
            actor_kind: kind,
            correlation_id: request_id.clone(),
            causation_id: None,
            request_id,
            idempotency_key: None,
        }
    }

    /// The form cqrs-es stores: a flat map of strings. Absent optional values are left out.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::from([
            (Self::ACTOR_ID.to_owned(), self.actor_id.clone()),
            (Self::ACTOR_NAME.to_owned(), self.actor_name.clone()),
            (
                Self::ACTOR_KIND.to_owned(),
                self.actor_kind.as_str().to_owned(),
            ),
            (Self::CORRELATION_ID.to_owned(), self.correlation_id.clone()),
            (Self::REQUEST_ID.to_owned(), self.request_id.clone()),
        ]);
        if let Some(causation) = &self.causation_id {
            map.insert(Self::CAUSATION_ID.to_owned(), causation.clone());
        }
        if let Some(key) = &self.idempotency_key {
            map.insert(Self::IDEMPOTENCY_KEY.to_owned(), key.clone());
        }
        map
    }

    /// Reads metadata back from its stored map; `None` when a required key is missing.
    pub fn from_map(map: &HashMap<String, String>) -> Option<Self> {
        let kind = match map.get(Self::ACTOR_KIND)?.as_str() {
            "user" => ActorKind::User,
            "service" => ActorKind::Service,
            _ => return None,
        };
        Some(Self {
            actor_id: map.get(Self::ACTOR_ID)?.clone(),
            actor_name: map.get(Self::ACTOR_NAME)?.clone(),
            actor_kind: kind,
            correlation_id: map.get(Self::CORRELATION_ID)?.clone(),
            causation_id: map.get(Self::CAUSATION_ID).cloned(),
            request_id: map.get(Self::REQUEST_ID)?.clone(),
            idempotency_key: map.get(Self::IDEMPOTENCY_KEY).cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_its_map() {
        let mut meta = EventMetadata::new("u1", "Ada", ActorKind::User);
        meta.causation_id = Some("c".into());
        meta.idempotency_key = Some("k".into());
        assert_eq!(EventMetadata::from_map(&meta.to_map()), Some(meta.clone()));

        let plain = EventMetadata::new("runner", "agent-runner", ActorKind::Service);
        let map = plain.to_map();
        assert!(!map.contains_key(EventMetadata::CAUSATION_ID));
        assert_eq!(EventMetadata::from_map(&map), Some(plain));
    }

    #[test]
    fn missing_required_key_is_refused() {
        let mut map = EventMetadata::new("u1", "Ada", ActorKind::User).to_map();
        map.remove(EventMetadata::REQUEST_ID);
        assert_eq!(EventMetadata::from_map(&map), None);
    }
}
