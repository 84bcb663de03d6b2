//! JSON Schemas of every event payload, the contract consumers of the event stream code against.
//!
//! The checked-in copies live in the repository's `schemas/` directory, one file per event type
//! and version; an integration test regenerates them from [`event_schemas`] and fails when they
//! drift.

use schemars::JsonSchema;
use serde::Serialize;

use crate::erasure::ErasureEvent;
use crate::event::EventPayload;
use crate::feature::FeatureEvent;
use crate::session::SessionEvent;
use crate::webhook::WebhookEvent;

/// The schema of one event type at one version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventSchema {
    pub aggregate_type: &'static str,
    pub event_type: &'static str,
    pub version: &'static str,
    /// A JSON Schema (draft 2020-12) of the payload body, i.e. the value under the event type key.
    pub schema: serde_json::Value,
}

impl EventSchema {
    /// The schema of payload type `P`.
    pub fn of<P: EventPayload + JsonSchema>() -> Self {
        Self {
            aggregate_type: P::AGGREGATE_TYPE,
            event_type: P::EVENT_TYPE,
            version: P::VERSION,
            schema: schemars::schema_for!(P).to_value(),
        }
    }

    /// Where the checked-in copy lives, relative to the `schemas/` directory:
    /// `<aggregate_type>/<EventType>.v<version>.json`.
    pub fn relative_path(&self) -> String {
        format!(
            "{}/{}.v{}.json",
            self.aggregate_type, self.event_type, self.version
        )
    }

    /// The checked-in file contents: pretty JSON with a trailing newline.
    pub fn to_file_contents(&self) -> String {
        let mut text = serde_json::to_string_pretty(&self.schema)
            .expect("a json value with string keys always serializes");
        text.push('\n');
        text
    }
}

/// The schema of every event type of every aggregate.
pub fn event_schemas() -> Vec<EventSchema> {
    let mut schemas = SessionEvent::schemas();
    schemas.extend(FeatureEvent::schemas());
    schemas.extend(ErasureEvent::schemas());
    schemas.extend(WebhookEvent::schemas());
    schemas.extend(crate::budget::BudgetEvent::schemas());
    schemas.extend(crate::upcast::legacy_schemas());
    schemas
}
