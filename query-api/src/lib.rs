//! Canopy query-api: read models, analytics and live subscriptions over HTTP.
//!
//! Not built yet: this crate is a placeholder in the workspace layout; the issue that builds it
//! replaces this file with the service's `build(config) -> App`.
