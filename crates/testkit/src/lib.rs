//! The test kit every Canopy test uses for real infrastructure.
//!
//! - [`database`] gives each test a fresh, migrated Postgres database (created from a template
//!   database that is migrated once per migration set), dropped when the [`TestDb`] is dropped.
//! - [`nats`] gives each test a connected JetStream client and a unique subject/stream prefix.
//! - [`ModelServer`] and its [`Script`] are the scripted fake of the hosted LLM, re-exported
//!   from `canopy-scripted-model` so tests keep one place to import their fakes from.
//!
//! Servers come from `DATABASE_URL` / `NATS_URL` when set. Otherwise the kit starts throwaway
//! PostgreSQL and `nats-server -js` from the installed binaries, on free ports in temp dirs, once
//! per test process; they are started with a parent-death signal, so they stop when the test
//! process ends, and their directories are swept by the next run.

mod nats;
mod postgres;

pub use canopy_scripted_model::{
    Answer, ModelServer, RecordedRequest, SCRIPTED_MODEL_ID, SCRIPTED_TITLE, Script, Step, ToolCall,
};
pub use nats::{NatsServer, OwnedNats, TestNats, connect as connect_nats, nats, nats_server};
pub use postgres::{PgServer, TestDb, database, pg_server};
