//! Relay tests against real Postgres and NATS (testkit servers, a fresh database and a unique
//! stream per test). They measure timing-sensitive behaviour (horizon, takeover, outages), so
//! nextest runs them one at a time in the `relay` test group.

mod contract;
mod crash;
mod gaps;
mod leader;
mod outage;
mod recovery;
mod support;
mod wake;
