//! Given/when/then tests of the domain's aggregates, in one test binary to keep link times down.

mod checkpoints;
mod feature;
mod plans_and_tools;
mod queue;
mod roles;
mod schema_drift;
mod session_lifecycle;
mod support;
