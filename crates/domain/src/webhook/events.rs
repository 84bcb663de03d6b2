//! The facts a webhook subscription records, one versioned payload struct per event type.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::domain_events;
use crate::webhook::Webhook;

domain_events! {
    /// Everything that can happen to a webhook subscription. Externally tagged:
    /// `{"WebhookSubscribed": {..}}`.
    pub enum WebhookEvent for <Webhook as cqrs_es::Aggregate>::TYPE => {
        WebhookSubscribed => "1",
        WebhookPaused => "1",
        WebhookResumed => "1",
        WebhookSecretRotated => "1",
        WebhookDeleted => "1",
        WebhookRedeliveryRequested => "1",
    }
}

/// An endpoint was subscribed to some event types of a workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookSubscribed {
    pub webhook_id: Uuid,
    pub workspace_id: String,
    /// The target URL (https unless the deployment allows loopback http for development).
    pub url: String,
    /// Event types delivered, sorted and without duplicates.
    pub event_types: Vec<String>,
    /// May be empty.
    pub description: String,
    /// The signing secret's version (1 here); the secret itself is never in an event.
    pub secret_version: i64,
    /// First 16 hex digits of the SHA-256 of the secret, to tell secrets apart.
    pub secret_fingerprint: String,
    /// User id of the person who subscribed it.
    pub created_by: String,
}

/// Deliveries stop until the subscription is resumed; events keep being queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookPaused {
    pub paused_by: String,
}

/// Deliveries go on, also after the delivery service paused the endpoint on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookResumed {
    pub resumed_by: String,
}

/// A new signing secret replaced the previous one (which still signs for a grace period).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookSecretRotated {
    pub secret_version: i64,
    pub secret_fingerprint: String,
    pub rotated_by: String,
}

/// The subscription was deleted; nothing more is delivered and it accepts no command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookDeleted {
    pub deleted_by: String,
}

/// Someone asked for an event to be delivered again (a new series of attempts, same
/// `webhook-id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookRedeliveryRequested {
    /// The event whose delivery is repeated.
    pub event_id: Uuid,
    pub requested_by: String,
}
