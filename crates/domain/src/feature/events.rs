//! The facts a feature records, one versioned payload struct per event type. Same conventions as
//! the session events: unknown fields are accepted, and only added optional fields keep a version.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::domain_events;
use crate::feature::Feature;

domain_events! {
    /// Everything that can happen to a feature. Externally tagged: `{"FeatureCreated": {..}}`.
    pub enum FeatureEvent for <Feature as cqrs_es::Aggregate>::TYPE => {
        FeatureCreated => "1",
        SessionAttached => "1",
        LearningShared => "1",
        DecisionRecorded => "1",
        FeatureCompleted => "1",
    }
}

/// A feature was created in a workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FeatureCreated {
    pub feature_id: Uuid,
    pub workspace_id: String,
    pub title: String,
    /// May be empty.
    pub description: String,
    /// User id of the person who created it.
    pub created_by: String,
}

/// A session was attached to the feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionAttached {
    pub session_id: Uuid,
    pub attached_by: String,
}

/// Someone shared something they learned, possibly from one of the attached sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LearningShared {
    pub learning_id: Uuid,
    pub session_id: Option<Uuid>,
    pub text: String,
    pub shared_by: String,
    pub shared_by_name: String,
}

/// A decision about the feature was recorded with its rationale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DecisionRecorded {
    pub decision_id: Uuid,
    pub title: String,
    pub rationale: String,
    pub recorded_by: String,
}

/// A reviewer declared the feature done; it accepts nothing more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FeatureCompleted {
    pub completed_by: String,
}
