//! The webhook aggregate's state and rules. Checks run in the same order as the other
//! aggregates': existence, workspace (another workspace's subscription is `not_found`), role,
//! lifecycle, input.

use std::collections::BTreeSet;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::feature::FeatureEvent;
use crate::session::SessionEvent;
use crate::validate::required;
use crate::webhook::{
    WebhookCommand, WebhookDeleted, WebhookEvent, WebhookPaused, WebhookRedeliveryRequested,
    WebhookResumed, WebhookSecretRotated, WebhookSubscribed,
};

/// Where a subscription is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookStatus {
    /// No `WebhookSubscribed` yet: the subscription does not exist.
    #[default]
    NotCreated,
    Active,
    Paused,
    /// Deleted subscriptions answer as absent.
    Deleted,
}

/// The webhook subscription aggregate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Webhook {
    pub(crate) status: WebhookStatus,
    pub(crate) webhook_id: Option<Uuid>,
    pub(crate) workspace_id: String,
    pub(crate) secret_version: i64,
}

/// The event types a subscription may name: every session and feature event type.
pub fn subscribable_event_types() -> BTreeSet<&'static str> {
    SessionEvent::schemas()
        .into_iter()
        .chain(FeatureEvent::schemas())
        .map(|schema| schema.event_type)
        .collect()
}

impl Aggregate for Webhook {
    const TYPE: &'static str = "webhook";
    type Command = WebhookCommand;
    type Event = WebhookEvent;
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
            WebhookEvent::WebhookSubscribed(e) => {
                self.status = WebhookStatus::Active;
                self.webhook_id = Some(e.webhook_id);
                self.workspace_id = e.workspace_id;
                self.secret_version = e.secret_version;
            }
            WebhookEvent::WebhookPaused(_) => self.status = WebhookStatus::Paused,
            WebhookEvent::WebhookResumed(_) => self.status = WebhookStatus::Active,
            WebhookEvent::WebhookSecretRotated(e) => self.secret_version = e.secret_version,
            WebhookEvent::WebhookDeleted(_) => self.status = WebhookStatus::Deleted,
            WebhookEvent::WebhookRedeliveryRequested(_) => {}
        }
    }
}

impl Webhook {
    pub fn status(&self) -> WebhookStatus {
        self.status
    }

    /// The workspace the subscription belongs to; empty before it is created.
    pub fn workspace_id(&self) -> &str {
        &self.workspace_id
    }

    /// The current signing secret's version (0 before it is created).
    pub fn secret_version(&self) -> i64 {
        self.secret_version
    }

    /// Whether the subscription exists for `actor`'s workspace (not created, deleted and
    /// another workspace's all look the same: absent).
    pub fn visible_to(&self, workspace_id: Option<&str>) -> bool {
        matches!(self.status, WebhookStatus::Active | WebhookStatus::Paused)
            && workspace_id == Some(self.workspace_id.as_str())
    }

    /// Decides what `command` does to this subscription: the events to record or why it is
    /// refused.
    pub fn decide(&self, command: WebhookCommand) -> Result<Vec<WebhookEvent>, DomainError> {
        self.admit(&command)?;
        let event: WebhookEvent = match command {
            WebhookCommand::Subscribe {
                actor,
                webhook_id,
                workspace_id,
                url,
                event_types,
                description,
                secret_fingerprint,
            } => {
                required("url", &url)?;
                required("secret_fingerprint", &secret_fingerprint)?;
                let known = subscribable_event_types();
                let mut types = BTreeSet::new();
                for event_type in event_types {
                    if !known.contains(event_type.as_str()) {
                        return Err(DomainError::UnknownEventType(event_type));
                    }
                    types.insert(event_type);
                }
                if types.is_empty() {
                    return Err(DomainError::InvalidCommand("event_types"));
                }
                WebhookSubscribed {
                    webhook_id,
                    workspace_id,
                    url,
                    event_types: types.into_iter().collect(),
                    description,
                    secret_version: 1,
                    secret_fingerprint,
                    created_by: actor.id,
                }
                .into()
            }
            WebhookCommand::Pause { actor } => {
                if self.status == WebhookStatus::Paused {
                    return Ok(vec![]);
                }
                WebhookPaused {
                    paused_by: actor.id,
                }
                .into()
            }
            // recorded even when not paused: it also lifts a pause the delivery service made
            // on its own after repeated failures
            WebhookCommand::Resume { actor } => WebhookResumed {
                resumed_by: actor.id,
            }
            .into(),
            WebhookCommand::RotateSecret {
                actor,
                secret_fingerprint,
            } => {
                required("secret_fingerprint", &secret_fingerprint)?;
                WebhookSecretRotated {
                    secret_version: self.secret_version + 1,
                    secret_fingerprint,
                    rotated_by: actor.id,
                }
                .into()
            }
            WebhookCommand::Delete { actor } => WebhookDeleted {
                deleted_by: actor.id,
            }
            .into(),
            WebhookCommand::RequestRedelivery { actor, event_id } => WebhookRedeliveryRequested {
                event_id,
                requested_by: actor.id,
            }
            .into(),
        };
        Ok(vec![event])
    }

    fn admit(&self, command: &WebhookCommand) -> Result<(), DomainError> {
        let actor = command.actor();
        if let WebhookCommand::Subscribe { workspace_id, .. } = command {
            if !actor.role.allows(command.permission()) || !actor.belongs_to(workspace_id) {
                return Err(DomainError::Forbidden);
            }
            if self.status != WebhookStatus::NotCreated {
                return Err(DomainError::WebhookAlreadyCreated);
            }
            return Ok(());
        }
        if !self.visible_to(actor.workspace_id.as_deref()) {
            return Err(DomainError::NotFound);
        }
        if !actor.role.allows(command.permission()) {
            return Err(DomainError::Forbidden);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::{Actor, Role};

    fn subscribe(actor: Actor) -> WebhookCommand {
        WebhookCommand::Subscribe {
            actor,
            webhook_id: Uuid::from_u128(1),
            workspace_id: "ws".into(),
            url: "https://hooks.example/in".into(),
            event_types: vec!["PlanProposed".into(), "PlanProposed".into()],
            description: String::new(),
            secret_fingerprint: "00ff".into(),
        }
    }

    fn given(events: Vec<WebhookEvent>) -> Webhook {
        let mut webhook = Webhook::default();
        for event in events {
            webhook.apply(event);
        }
        webhook
    }

    #[test]
    fn owners_and_admins_subscribe_members_may_not() {
        let owner = Actor::person("o", "O", Role::Owner, "ws");
        let events = Webhook::default().decide(subscribe(owner)).unwrap();
        let WebhookEvent::WebhookSubscribed(subscribed) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(subscribed.event_types, vec!["PlanProposed".to_owned()]);
        assert_eq!(subscribed.secret_version, 1);
        for role in [Role::Member, Role::Viewer, Role::Auditor] {
            let actor = Actor::person("m", "M", role, "ws");
            assert_eq!(
                Webhook::default().decide(subscribe(actor)),
                Err(DomainError::Forbidden)
            );
        }
    }

    #[test]
    fn unknown_event_types_are_refused() {
        let mut command = subscribe(Actor::person("o", "O", Role::Admin, "ws"));
        if let WebhookCommand::Subscribe { event_types, .. } = &mut command {
            event_types.push("NoSuchEvent".into());
        }
        assert_eq!(
            Webhook::default().decide(command),
            Err(DomainError::UnknownEventType("NoSuchEvent".into()))
        );
    }

    #[test]
    fn another_workspace_and_a_deleted_subscription_are_absent() {
        let owner = Actor::person("o", "O", Role::Owner, "ws");
        let created = Webhook::default().decide(subscribe(owner.clone())).unwrap();
        let stranger = Actor::person("x", "X", Role::Owner, "other");
        let webhook = given(created.clone());
        assert_eq!(
            webhook.decide(WebhookCommand::Pause { actor: stranger }),
            Err(DomainError::NotFound)
        );
        let mut events = created;
        events.push(
            WebhookDeleted {
                deleted_by: "o".into(),
            }
            .into(),
        );
        assert_eq!(
            given(events).decide(WebhookCommand::Resume { actor: owner }),
            Err(DomainError::NotFound)
        );
    }

    #[test]
    fn rotation_counts_secret_versions_and_pause_twice_records_once() {
        let owner = Actor::person("o", "O", Role::Owner, "ws");
        let mut events = Webhook::default().decide(subscribe(owner.clone())).unwrap();
        events.push(
            WebhookPaused {
                paused_by: "o".into(),
            }
            .into(),
        );
        let webhook = given(events);
        assert_eq!(
            webhook.decide(WebhookCommand::Pause {
                actor: owner.clone()
            }),
            Ok(vec![])
        );
        let rotated = webhook
            .decide(WebhookCommand::RotateSecret {
                actor: owner,
                secret_fingerprint: "aa".into(),
            })
            .unwrap();
        assert!(matches!(
            &rotated[0],
            WebhookEvent::WebhookSecretRotated(e) if e.secret_version == 2
        ));
    }
}
