//! Event store tests against a real Postgres (a fresh database per test, from the testkit).

mod append;
mod chain;
mod invariants;
mod notify;
mod snapshots;
mod support;
