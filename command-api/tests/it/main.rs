//! command-api over HTTP against a real Postgres: every endpoint, every error class, idempotency,
//! concurrency within and across processes, and the role table cell by cell.

mod concurrency;
mod errors;
mod features;
mod idempotency;
mod openapi;
mod roles;
mod runner;
mod sessions;
mod support;
