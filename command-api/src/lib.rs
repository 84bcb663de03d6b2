//! Canopy command-api: the only writer of events: authenticated HTTP commands validated against the aggregates.
//!
//! Not built yet: this crate is a placeholder in the workspace layout; the issue that builds it
//! replaces this file with the service's `build(config) -> App`.
