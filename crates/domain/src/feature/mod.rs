//! The feature aggregate: a piece of product work that several sessions contribute to, with the
//! learnings and decisions people want to keep beyond any one session.

mod command;
mod events;
mod rules;
mod state;

pub use command::FeatureCommand;
pub use events::*;
pub use state::{Feature, FeatureStatus};
