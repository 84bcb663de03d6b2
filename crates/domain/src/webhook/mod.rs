//! The webhook aggregate: a workspace's subscription of an HTTPS endpoint to some event types,
//! managed by owners and admins. One stream per subscription, its id chosen by the server.
//!
//! The signing secret is never in an event (events reach NATS, audit exports and read models):
//! the API generates it, stores it outside the event store in the append's transaction and
//! returns it once; events carry only its version and a fingerprint.

mod command;
mod events;
mod state;

pub use command::WebhookCommand;
pub use events::*;
pub use state::{Webhook, WebhookStatus, subscribable_event_types};
