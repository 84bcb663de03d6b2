//! agent-runner's integration tests: real Postgres, NATS JetStream, OpenCode and bubblewrap;
//! the only fake is the hosted LLM (the scripted model).

mod budgets;
mod failures;
mod flow;
mod requests;
mod safety;
mod support;
