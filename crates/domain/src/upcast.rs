//! Upcasting stored events to their current version, so every reader decodes an event the same
//! way whatever version it was stored at.
//!
//! Events are never rewritten in the store (the hash chain covers them): an event keeps the
//! version and payload it was appended with, and readers turn it into the current payload struct
//! here, one [`Upcaster`] step at a time. Exports carry the stored version and payload.

use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::event::EventPayload;
use crate::schema::EventSchema;

use crate::feature::FeatureEvent;
use crate::session::SessionEvent;

/// One step from a stored version of an event type to the next.
#[derive(Debug, Clone, Copy)]
pub struct Upcaster {
    pub event_type: &'static str,
    pub from_version: &'static str,
    pub to_version: &'static str,
    /// Rewrites the whole stored payload (`{"<EventType>": body}`).
    pub upcast: fn(Value) -> Value,
}

/// Every upcasting step the domain knows.
pub const UPCASTERS: &[Upcaster] = &[Upcaster {
    event_type: "UsageRecorded",
    from_version: "1",
    to_version: "2",
    upcast: usage_recorded_v1_to_v2,
}];

/// `UsageRecorded` v1 → v2: `tokens_in`, `tokens_out` are now `input_tokens`, `output_tokens`.
fn usage_recorded_v1_to_v2(mut payload: Value) -> Value {
    if let Some(body) = payload
        .get_mut("UsageRecorded")
        .and_then(Value::as_object_mut)
    {
        for (old, new) in [
            ("tokens_in", "input_tokens"),
            ("tokens_out", "output_tokens"),
        ] {
            if let Some(value) = body.remove(old) {
                body.insert(new.to_owned(), value);
            }
        }
    }
    payload
}

/// The JSON Schemas of the stored versions that are no longer written (events stored at them
/// are still in the store and in exports).
pub fn legacy_schemas() -> Vec<EventSchema> {
    vec![EventSchema::of::<UsageRecordedV1>()]
}

// `UsageRecorded` as version 1 stored it (its doc is the schema's description, unchanged).
/// Model usage the running prompt consumed since the last report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "UsageRecorded")]
pub struct UsageRecordedV1 {
    pub prompt_id: Uuid,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Cost in millionths of a US dollar, kept integral so sums are exact.
    pub cost_micro_usd: u64,
}

impl EventPayload for UsageRecordedV1 {
    const AGGREGATE_TYPE: &'static str = "session";
    const EVENT_TYPE: &'static str = "UsageRecorded";
    const VERSION: &'static str = "1";
}

/// The payload and version of a stored event brought to its current version.
pub fn upcast(event_type: &str, version: &str, mut payload: Value) -> (String, Value) {
    let mut version = version.to_owned();
    while let Some(step) = UPCASTERS
        .iter()
        .find(|step| step.event_type == event_type && step.from_version == version)
    {
        payload = (step.upcast)(payload);
        step.to_version.clone_into(&mut version);
    }
    (version, payload)
}

/// The payload alone, for readers that decode it themselves (the event store's `Upcast`).
pub fn upcast_payload(event_type: &str, version: &str, payload: Value) -> Value {
    upcast(event_type, version, payload).1
}

/// A stored session event as the current `SessionEvent`.
pub fn decode_session_event(
    event_type: &str,
    version: &str,
    payload: Value,
) -> Result<SessionEvent, serde_json::Error> {
    serde_json::from_value(upcast(event_type, version, payload).1)
}

/// A stored budget event as the current `BudgetEvent`.
pub fn decode_budget_event(
    event_type: &str,
    version: &str,
    payload: Value,
) -> Result<crate::budget::BudgetEvent, serde_json::Error> {
    serde_json::from_value(upcast(event_type, version, payload).1)
}

/// A stored feature event as the current `FeatureEvent`.
pub fn decode_feature_event(
    event_type: &str,
    version: &str,
    payload: Value,
) -> Result<FeatureEvent, serde_json::Error> {
    serde_json::from_value(upcast(event_type, version, payload).1)
}

impl EventUpcaster for Upcaster {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        self.event_type == event_type && self.from_version == event_version
    }

    fn upcast(&self, mut event: SerializedEvent) -> SerializedEvent {
        event.payload = (self.upcast)(event.payload);
        self.to_version.clone_into(&mut event.event_version);
        event
    }
}
