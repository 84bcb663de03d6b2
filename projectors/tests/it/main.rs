//! Projectors against real Postgres, NATS JetStream and the relay: exactly-once application
//! across crashes, parking of poisoned events, and read models equal to their rebuild.

mod crash;
mod equality;
mod poison;
mod rows;
mod support;
