//! The budget aggregate: what a workspace allows its agents to spend, one stream per workspace
//! (its id is [`budget_id`], derived from the workspace id, so nobody chooses it).
//!
//! Owners and admins set and clear limits; every member reads them (query-api). The limits are
//! enforced elsewhere, from the spending ledger that command-api keeps in the transaction of each
//! `UsageRecorded` (`docs/budgets.md`): command-api refuses a prompt that would draw on a spent
//! budget, the runner stops a turn that runs one out, and the runner's lease take holds the cap
//! on concurrent sessions.

use std::collections::BTreeMap;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::actor::{Actor, Permission};
use crate::error::DomainError;
use crate::event::domain_events;

/// The namespace of [`budget_id`]'s name-based UUIDs.
const BUDGET_NAMESPACE: Uuid = Uuid::from_u128(0x6361_6e6f_7079_2d62_7564_6765_7473_0001);

/// The id of a workspace's budget stream: a name-based (v5) UUID of the workspace id, so the
/// server derives it and the stream's subject never carries the workspace id's own characters.
pub fn budget_id(workspace_id: &str) -> Uuid {
    Uuid::new_v5(&BUDGET_NAMESPACE, workspace_id.as_bytes())
}

/// What a budget limits, and over which period.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    /// Cost of the whole workspace per calendar month (UTC), in micro-USD.
    WorkspaceMonthlyCost,
    /// Tokens (input plus output) of the whole workspace per calendar month (UTC).
    WorkspaceMonthlyTokens,
    /// Cost of one session over its life, in micro-USD.
    SessionCost,
    /// Tokens (input plus output) of one session over its life.
    SessionTokens,
    /// Agent time of one session over its life, in seconds (people's time excluded, as the
    /// runner counts it).
    SessionAgentSeconds,
    /// Cost charged to one person (the author of the prompts run) per UTC day, in micro-USD.
    PersonDailyCost,
    /// Sessions running an agent at once in the workspace.
    ConcurrentSessions,
}

impl BudgetKind {
    /// Every kind, in table order.
    pub const ALL: [Self; 7] = [
        Self::WorkspaceMonthlyCost,
        Self::WorkspaceMonthlyTokens,
        Self::SessionCost,
        Self::SessionTokens,
        Self::SessionAgentSeconds,
        Self::PersonDailyCost,
        Self::ConcurrentSessions,
    ];

    /// The wire name, as serde writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WorkspaceMonthlyCost => "workspace_monthly_cost",
            Self::WorkspaceMonthlyTokens => "workspace_monthly_tokens",
            Self::SessionCost => "session_cost",
            Self::SessionTokens => "session_tokens",
            Self::SessionAgentSeconds => "session_agent_seconds",
            Self::PersonDailyCost => "person_daily_cost",
            Self::ConcurrentSessions => "concurrent_sessions",
        }
    }

    /// The kind of this wire name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The unit its limit is counted in.
    pub const fn unit(self) -> &'static str {
        match self {
            Self::WorkspaceMonthlyCost | Self::SessionCost | Self::PersonDailyCost => "micro_usd",
            Self::WorkspaceMonthlyTokens | Self::SessionTokens => "tokens",
            Self::SessionAgentSeconds => "seconds",
            Self::ConcurrentSessions => "sessions",
        }
    }
}

impl std::fmt::Display for BudgetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The largest limit a budget may have: what a signed 64-bit ledger column holds.
pub const MAX_LIMIT: u64 = i64::MAX as u64;

/// A request to change a workspace's budgets (owners and admins only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BudgetCommand {
    /// Sets (or replaces) the limit of one kind.
    SetBudget {
        actor: Actor,
        workspace_id: String,
        kind: BudgetKind,
        limit: u64,
    },
    /// Removes the limit of one kind; a no-op when none is set.
    ClearBudget {
        actor: Actor,
        workspace_id: String,
        kind: BudgetKind,
    },
}

impl BudgetCommand {
    pub fn actor(&self) -> &Actor {
        match self {
            Self::SetBudget { actor, .. } | Self::ClearBudget { actor, .. } => actor,
        }
    }

    fn workspace_id(&self) -> &str {
        match self {
            Self::SetBudget { workspace_id, .. } | Self::ClearBudget { workspace_id, .. } => {
                workspace_id
            }
        }
    }

    /// Owners and admins (the moderators) set budgets; nobody else, the runner included.
    pub const fn permission(&self) -> Permission {
        Permission::Moderate
    }
}

domain_events! {
    /// What happens to a workspace's budgets. Externally tagged: `{"BudgetSet": {..}}`.
    pub enum BudgetEvent for <Budget as cqrs_es::Aggregate>::TYPE => {
        BudgetSet => "1",
        BudgetCleared => "1",
    }
}

/// A budget's limit was set or replaced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BudgetSet {
    pub workspace_id: String,
    pub kind: BudgetKind,
    /// In the kind's unit (micro-USD, tokens, seconds or sessions); at least 1.
    pub limit: u64,
    /// User id of the owner or admin who set it.
    pub set_by: String,
}

/// A budget's limit was removed: that kind is unlimited again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BudgetCleared {
    pub workspace_id: String,
    pub kind: BudgetKind,
    pub cleared_by: String,
}

/// A workspace's budgets: the limit of each kind that has one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Budget {
    workspace_id: String,
    limits: BTreeMap<BudgetKind, u64>,
}

impl Budget {
    /// The workspace these budgets belong to; empty before the first one is set.
    pub fn workspace_id(&self) -> &str {
        &self.workspace_id
    }

    /// The limit of `kind`, if one is set.
    pub fn limit(&self, kind: BudgetKind) -> Option<u64> {
        self.limits.get(&kind).copied()
    }

    /// Every limit that is set, in kind order.
    pub fn limits(&self) -> &BTreeMap<BudgetKind, u64> {
        &self.limits
    }

    /// Decides what `command` does: the events to record or why it is refused.
    pub fn decide(&self, command: BudgetCommand) -> Result<Vec<BudgetEvent>, DomainError> {
        let actor = command.actor();
        // another workspace's budgets are not there for this person, and the runner has none
        if !actor.belongs_to(command.workspace_id())
            || (!self.workspace_id.is_empty() && self.workspace_id != command.workspace_id())
        {
            return Err(DomainError::NotFound);
        }
        if !actor.role.allows(command.permission()) {
            return Err(DomainError::Forbidden);
        }
        match command {
            BudgetCommand::SetBudget {
                actor,
                workspace_id,
                kind,
                limit,
            } => {
                if limit == 0 || limit > MAX_LIMIT {
                    return Err(DomainError::InvalidCommand("limit"));
                }
                if self.limit(kind) == Some(limit) {
                    return Ok(vec![]);
                }
                Ok(vec![
                    BudgetSet {
                        workspace_id,
                        kind,
                        limit,
                        set_by: actor.id,
                    }
                    .into(),
                ])
            }
            BudgetCommand::ClearBudget {
                actor,
                workspace_id,
                kind,
            } => {
                if self.limit(kind).is_none() {
                    return Ok(vec![]);
                }
                Ok(vec![
                    BudgetCleared {
                        workspace_id,
                        kind,
                        cleared_by: actor.id,
                    }
                    .into(),
                ])
            }
        }
    }
}

impl Aggregate for Budget {
    const TYPE: &'static str = "budget";
    type Command = BudgetCommand;
    type Event = BudgetEvent;
    type Error = DomainError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            BudgetEvent::BudgetSet(e) => {
                self.workspace_id = e.workspace_id;
                self.limits.insert(e.kind, e.limit);
            }
            BudgetEvent::BudgetCleared(e) => {
                self.workspace_id = e.workspace_id;
                self.limits.remove(&e.kind);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_ids_are_per_workspace_and_stable() {
        assert_eq!(budget_id("acme"), budget_id("acme"));
        assert_ne!(budget_id("acme"), budget_id("acme2"));
        assert_eq!(budget_id("acme").get_version_num(), 5);
    }

    #[test]
    fn kinds_round_trip_their_wire_names() {
        for kind in BudgetKind::ALL {
            assert_eq!(BudgetKind::parse(kind.as_str()), Some(kind));
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::String(kind.as_str().to_owned())
            );
        }
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut budget = Budget::default();
        budget.apply(
            BudgetSet {
                workspace_id: "ws".into(),
                kind: BudgetKind::SessionTokens,
                limit: 5,
                set_by: "o".into(),
            }
            .into(),
        );
        let json = serde_json::to_string(&budget).unwrap();
        assert_eq!(serde_json::from_str::<Budget>(&json).unwrap(), budget);
    }
}
