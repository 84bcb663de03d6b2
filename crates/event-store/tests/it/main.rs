//! Event store tests against a real Postgres (a fresh database per test, from the testkit).

mod append;
mod chain;
mod fence;
mod invariants;
mod notify;
mod snapshots;
mod state_cache;
mod support;
