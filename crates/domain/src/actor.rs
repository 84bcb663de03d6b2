//! Who is acting: the [`Actor`] every command carries and the [`Role`] table that says what each
//! role may do.
//!
//! The role table lives here and only here; the aggregates ask a command which [`Permission`] it
//! needs and the role answers. People belong to one workspace; the agent runner is a service that
//! acts in every workspace but may only record what the agent did.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The role an actor holds in its workspace, or `runner` for the agent runner service.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Admin,
    Member,
    Viewer,
    Auditor,
    /// The agent runner service. Not bound to a workspace, never a person.
    Runner,
}

/// What a command needs from its actor's role. Each command maps to exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read and watch sessions and features.
    Read,
    /// Start sessions, join, prompt, cancel one's own prompt, request a checkpoint, complete a
    /// session, and create, attach, share and record on features.
    Prompt,
    /// Approve or reject plans and tool asks, cancel anyone's prompt, request a restore or a push,
    /// archive sessions and complete features.
    Moderate,
    /// Read the audit trail.
    Audit,
    /// Anything a person may do on their own membership, whatever their role (leaving a session).
    Person,
    /// Record what the agent did; reserved to the runner service.
    Runner,
}

impl Role {
    /// Every role, in table order; handy for exhaustive checks.
    pub const ALL: [Self; 6] = [
        Self::Owner,
        Self::Admin,
        Self::Member,
        Self::Viewer,
        Self::Auditor,
        Self::Runner,
    ];

    /// Read and watch. Every person may; the runner reads through its own service channel, not
    /// as a workspace member.
    pub const fn can_read(self) -> bool {
        !self.is_runner()
    }

    /// Start sessions, prompt, cancel own prompt, join, request checkpoints, complete sessions,
    /// and create, attach, share and record on features.
    pub const fn can_prompt(self) -> bool {
        matches!(self, Self::Owner | Self::Admin | Self::Member)
    }

    /// Approve or reject plans and tool asks, cancel any prompt, request restores and pushes,
    /// archive sessions, complete features.
    pub const fn can_moderate(self) -> bool {
        matches!(self, Self::Owner | Self::Admin)
    }

    /// Read the audit trail.
    pub const fn can_audit(self) -> bool {
        matches!(self, Self::Owner | Self::Admin | Self::Auditor)
    }

    /// The agent runner service, the only role allowed to record agent-side events.
    pub const fn is_runner(self) -> bool {
        matches!(self, Self::Runner)
    }

    /// Whether this role grants `permission`.
    pub const fn allows(self, permission: Permission) -> bool {
        match permission {
            Permission::Read => self.can_read(),
            Permission::Prompt => self.can_prompt(),
            Permission::Moderate => self.can_moderate(),
            Permission::Audit => self.can_audit(),
            Permission::Person => !self.is_runner(),
            Permission::Runner => self.is_runner(),
        }
    }

    /// The wire name, as serde writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Member => "member",
            Self::Viewer => "viewer",
            Self::Auditor => "auditor",
            Self::Runner => "runner",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The person or service issuing a command, as authenticated by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Actor {
    /// User id (token subject) or the runner's service name.
    pub id: String,
    /// Display name, copied into events where people see who did what.
    pub name: String,
    pub role: Role,
    /// The workspace a person belongs to; `None` only for the runner.
    pub workspace_id: Option<String>,
    pub email: Option<String>,
}

impl Actor {
    /// A person with `role` in `workspace_id`.
    pub fn person(
        id: impl Into<String>,
        name: impl Into<String>,
        role: Role,
        workspace_id: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            role,
            workspace_id: Some(workspace_id.into()),
            email: None,
        }
    }

    /// The agent runner service, which is not bound to a workspace.
    pub fn runner(id: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            role: Role::Runner,
            workspace_id: None,
            email: None,
        }
    }

    /// Whether this actor is the runner service rather than a person.
    pub const fn is_runner(&self) -> bool {
        self.role.is_runner()
    }

    /// Whether a person belongs to `workspace_id`. The runner belongs to none, and is let into
    /// every workspace by the aggregates instead.
    pub fn belongs_to(&self, workspace_id: &str) -> bool {
        self.workspace_id.as_deref() == Some(workspace_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_serializes_snake_case() {
        for role in Role::ALL {
            let json = serde_json::to_value(role).unwrap();
            assert_eq!(json, serde_json::Value::String(role.as_str().to_owned()));
        }
    }
}
