//! The erasure aggregate: the record that a person's personal data was erased from stored
//! events, who asked, why, and exactly which events (one stream per erasure and workspace).
//!
//! The payloads themselves are rewritten by the database (`canopy_erasure_tombstone`), in the
//! transaction that appends this record and only then: the guard trigger accepts a payload
//! change only when a `PersonalDataErased` of the same transaction lists the event with its
//! original digest and the tombstone's digest. Verifiers accept an erased payload on the same
//! terms, so an erasure cannot forge history.

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::actor::Actor;
use crate::error::DomainError;
use crate::event::domain_events;

/// An erasure: absent until recorded, then closed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erasure {
    recorded: bool,
}

/// Record an erasure (the caller computed the tombstones' digests in the database).
#[derive(Debug, Clone)]
pub struct RecordErasure {
    pub actor: Actor,
    pub erasure_id: Uuid,
    pub workspace_id: String,
    pub user_id: String,
    pub reason: String,
    pub events: Vec<ErasedEvent>,
}

domain_events! {
    /// What happens to an erasure. Externally tagged: `{"PersonalDataErased": {..}}`.
    pub enum ErasureEvent for <Erasure as cqrs_es::Aggregate>::TYPE => {
        PersonalDataErased => "1",
    }
}

/// A person's personal fields in the listed events were replaced by their canonical tombstone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PersonalDataErased {
    pub erasure_id: Uuid,
    /// The workspace whose events were erased (an erasure is recorded per workspace).
    pub workspace_id: String,
    /// Whose data was erased (user id).
    pub user_id: String,
    /// Why (e.g. the request's reference).
    pub reason: String,
    /// Who erased it (the operator's id).
    pub erased_by: String,
    pub events: Vec<ErasedEvent>,
}

/// One event an erasure rewrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErasedEvent {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_id: Uuid,
    /// SHA-256 (hex) of the payload text as appended (the event's `payload_digest`).
    pub original_digest: String,
    /// SHA-256 (hex) of the tombstone's text that replaced it.
    pub tombstone_digest: String,
}

/// The most a reason may hold, in characters.
pub const MAX_REASON: usize = 1000;

impl Aggregate for Erasure {
    const TYPE: &'static str = "erasure";
    type Command = RecordErasure;
    type Event = ErasureEvent;
    type Error = DomainError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        if self.recorded {
            return Err(DomainError::DuplicateId("erasure"));
        }
        if !command.actor.role.can_audit() {
            return Err(DomainError::Forbidden);
        }
        let reason = command.reason.trim();
        if reason.is_empty() || reason.chars().count() > MAX_REASON {
            return Err(DomainError::InvalidCommand(
                "an erasure needs a reason of at most 1000 characters",
            ));
        }
        if command.events.is_empty() {
            return Err(DomainError::InvalidCommand("an erasure lists its events"));
        }
        let event = PersonalDataErased {
            erasure_id: command.erasure_id,
            workspace_id: command.workspace_id,
            user_id: command.user_id,
            reason: reason.to_owned(),
            erased_by: command.actor.id,
            events: command.events,
        };
        sink.write(event.into(), self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        let ErasureEvent::PersonalDataErased(_) = event;
        self.recorded = true;
    }
}
