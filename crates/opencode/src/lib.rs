//! Typed client for the OpenCode server (opencode serve): process, sessions, prompts, SSE events, permissions.
//!
//! Not built yet.
