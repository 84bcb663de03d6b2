//! Canopy agent-runner: workers that drive OpenCode in a sandbox and record what happens through command-api.
//!
//! Not built yet: this crate is a placeholder in the workspace layout; the issue that builds it
//! replaces this file with the service's `build(config) -> App`.
