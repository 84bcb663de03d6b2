//! The session aggregate: one multiplayer AI coding session on a repository branch.
//!
//! People join, queue prompts (strictly FIFO, one running at a time), review the agent's plans and
//! risky tool calls, and ask for checkpoints, restores and pushes; the agent runner records what
//! the agent and its sandbox actually did. See the `rules` module docs for the order in which a
//! command's checks run.

mod command;
mod events;
mod rules;
mod state;

pub use command::SessionCommand;
pub use events::*;
pub use rules::READ_ONLY_TOOLS;
pub use state::{
    ApprovalRecord, ApprovalStatus, Participant, PlanRecord, PlanStatus, PromptRecord,
    PromptStatus, RECENT_CHECKPOINTS, RECENT_FINISHED_PROMPTS, Session, SessionPolicy,
    SessionStatus, SnapshotShape,
};
