//! canopy-webhooks' integration tests: real Postgres, NATS, relay and command-api, and local
//! receivers over real sockets.

mod crash;
mod delivery;
mod support;
mod targets;
