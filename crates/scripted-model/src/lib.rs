//! A scripted, OpenAI-compatible chat-completions server: the fake of a hosted LLM.
//!
//! It stands in for the LLM provider in two places:
//!
//! - **Tests.** The provider is the one edge Canopy's tests cannot reach (no network, no keys,
//!   and a real model does not answer the same way twice), so tests drive OpenCode against this
//!   fake instead, with a [`Script`] per test. `canopy-testkit` re-exports it.
//! - **The demo.** With no model configured, `canopy up` serves [`demo_script`], a stateless
//!   script that plays a plausible agent (a plan, then a file written and a command run), so
//!   the whole agent loop works out of the box.
//!
//! It speaks the part of the OpenAI API that OpenCode's `@ai-sdk/openai-compatible` provider
//! uses: `POST /v1/chat/completions` (streamed as SSE chunks, or as one JSON body when the
//! request says `"stream": false`) and `GET /v1/models`.
//!
//! A [`Script`] says how to answer: an ordered list of [`Step`]s, one consumed per request
//! (answer text, call tools, fail with an HTTP status, end the stream early, reset the
//! connection mid-stream, hang), plus rules that answer requests matching a predicate without
//! consuming a step. The default rule answers OpenCode's session-title requests (sent by the
//! `small_model`, concurrently with the real turn, so their position in the request order is not
//! fixed) with a canned title. Every request is recorded as a [`RecordedRequest`] for
//! assertions and for rules to inspect, and [`ModelServer::wait_for_requests`] lets a test await
//! the n-th request instead of sleeping.
//!
//! [`ModelServer::start`] binds a free port of 127.0.0.1, [`ModelServer::start_on`] a chosen
//! address. [`ModelServer::shutdown`] stops it gracefully; dropping it stops it at once.
//!
//! This crate is a product dependency (the demo), so it depends on no test-only crate.

mod demo;
mod server;

pub use demo::{DEMO_DONE, DEMO_FALLBACK, DEMO_FILE, demo_script};
pub use server::{
    Answer, ModelServer, RecordedRequest, SCRIPTED_MODEL_ID, SCRIPTED_TITLE, Script, Step, ToolCall,
};
