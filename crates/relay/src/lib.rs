//! Gap-safe relay of committed events from the Postgres event store to NATS JetStream.
//!
//! Not built yet.
