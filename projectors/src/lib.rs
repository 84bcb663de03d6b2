//! Canopy projectors: JetStream consumers that materialise the read models.
//!
//! Not built yet: this crate is a placeholder in the workspace layout; the issue that builds it
//! replaces this file with the service's `build(config) -> App`.
