//! command-api over HTTP against a real Postgres: every endpoint, every error class, idempotency,
//! concurrency within and across processes, and the role table cell by cell.

mod budgets;
mod concurrency;
mod contract;
mod errors;
mod features;
mod idempotency;
mod openapi;
mod prompt_queue;
mod roles;
mod runner;
mod security;
mod sessions;
mod support;
