//! Given/when/then tests of the domain's aggregates, in one test binary to keep link times down.

mod budgets;
mod checkpoints;
mod compact_state;
mod feature;
mod plans_and_tools;
mod queue;
mod roles;
mod schema_drift;
mod session_lifecycle;
mod support;
