//! The feature aggregate's state, folded from its events and snapshotted; ordered collections
//! only, so it serializes deterministically.

use std::collections::BTreeSet;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::feature::{FeatureCommand, FeatureEvent};

/// Where a feature is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureStatus {
    /// No `FeatureCreated` yet: the feature does not exist.
    #[default]
    NotCreated,
    Active,
    Completed,
}

/// The feature aggregate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
// Missing fields default so that snapshots taken before a field was added still load.
#[serde(default)]
pub struct Feature {
    pub(crate) status: FeatureStatus,
    pub(crate) feature_id: Option<Uuid>,
    pub(crate) workspace_id: String,
    pub(crate) title: String,
    /// Attached session ids, in the order they were attached.
    pub(crate) sessions: Vec<Uuid>,
    pub(crate) learnings: BTreeSet<Uuid>,
    pub(crate) decisions: BTreeSet<Uuid>,
}

impl Aggregate for Feature {
    const TYPE: &'static str = "feature";
    type Command = FeatureCommand;
    type Event = FeatureEvent;
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
            FeatureEvent::FeatureCreated(e) => {
                self.status = FeatureStatus::Active;
                self.feature_id = Some(e.feature_id);
                self.workspace_id = e.workspace_id;
                self.title = e.title;
            }
            FeatureEvent::SessionAttached(e) => {
                if !self.sessions.contains(&e.session_id) {
                    self.sessions.push(e.session_id);
                }
            }
            FeatureEvent::LearningShared(e) => {
                self.learnings.insert(e.learning_id);
            }
            FeatureEvent::DecisionRecorded(e) => {
                self.decisions.insert(e.decision_id);
            }
            FeatureEvent::FeatureCompleted(_) => self.status = FeatureStatus::Completed,
        }
    }
}

impl Feature {
    pub fn status(&self) -> FeatureStatus {
        self.status
    }

    /// The feature's id, once created.
    pub fn id(&self) -> Option<Uuid> {
        self.feature_id
    }

    /// The workspace the feature belongs to; empty before it is created.
    pub fn workspace_id(&self) -> &str {
        &self.workspace_id
    }

    pub fn title(&self) -> &str {
        &self.title
    }

    /// Attached session ids, in the order they were attached.
    pub fn sessions(&self) -> &[Uuid] {
        &self.sessions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feature::*;

    #[test]
    fn snapshot_round_trips_through_json() {
        let mut feature = Feature::default();
        let events: Vec<FeatureEvent> = vec![
            FeatureCreated {
                feature_id: Uuid::from_u128(1),
                workspace_id: "ws".into(),
                title: "t".into(),
                description: String::new(),
                created_by: "alice".into(),
            }
            .into(),
            SessionAttached {
                session_id: Uuid::from_u128(2),
                attached_by: "alice".into(),
            }
            .into(),
            LearningShared {
                learning_id: Uuid::from_u128(3),
                session_id: Some(Uuid::from_u128(2)),
                text: "x".into(),
                shared_by: "alice".into(),
                shared_by_name: "Alice".into(),
            }
            .into(),
            DecisionRecorded {
                decision_id: Uuid::from_u128(4),
                title: "d".into(),
                rationale: "r".into(),
                recorded_by: "alice".into(),
            }
            .into(),
        ];
        for event in events {
            feature.apply(event);
        }
        let json = serde_json::to_string(&feature).unwrap();
        let back: Feature = serde_json::from_str(&json).unwrap();
        assert_eq!(back, feature);
    }
}
