//! The feature's rules. Checks run in the same order as the session's: existence, workspace (a
//! person from another workspace gets `not_found`), role, lifecycle, input, then the named ids.

use crate::error::DomainError;
use crate::feature::{
    DecisionRecorded, Feature, FeatureCommand, FeatureCompleted, FeatureCreated, FeatureEvent,
    FeatureStatus, LearningShared, SessionAttached,
};
use crate::validate::required;

impl Feature {
    /// Decides what `command` does to this feature: the events to record or why it is refused.
    pub fn decide(&self, command: FeatureCommand) -> Result<Vec<FeatureEvent>, DomainError> {
        self.admit(&command)?;
        let event = match command {
            FeatureCommand::CreateFeature {
                actor,
                feature_id,
                workspace_id,
                title,
                description,
            } => {
                required("title", &title)?;
                FeatureCreated {
                    feature_id,
                    workspace_id,
                    title,
                    description,
                    created_by: actor.id,
                }
                .into()
            }
            FeatureCommand::AttachSession { actor, session_id } => {
                if self.sessions.contains(&session_id) {
                    return Err(DomainError::SessionAlreadyAttached(session_id));
                }
                SessionAttached {
                    session_id,
                    attached_by: actor.id,
                }
                .into()
            }
            FeatureCommand::ShareLearning {
                actor,
                learning_id,
                session_id,
                text,
            } => {
                required("text", &text)?;
                if self.learnings.contains(&learning_id) {
                    return Err(DomainError::DuplicateId("learning_id"));
                }
                // A learning that names a session must name one of this feature's, or the link
                // would point readers at unrelated work.
                if let Some(session_id) = session_id
                    && !self.sessions.contains(&session_id)
                {
                    return Err(DomainError::SessionNotAttached(session_id));
                }
                LearningShared {
                    learning_id,
                    session_id,
                    text,
                    shared_by: actor.id,
                    shared_by_name: actor.name,
                }
                .into()
            }
            FeatureCommand::RecordDecision {
                actor,
                decision_id,
                title,
                rationale,
            } => {
                required("title", &title)?;
                required("rationale", &rationale)?;
                if self.decisions.contains(&decision_id) {
                    return Err(DomainError::DuplicateId("decision_id"));
                }
                DecisionRecorded {
                    decision_id,
                    title,
                    rationale,
                    recorded_by: actor.id,
                }
                .into()
            }
            FeatureCommand::CompleteFeature { actor } => FeatureCompleted {
                completed_by: actor.id,
            }
            .into(),
        };
        Ok(vec![event])
    }

    fn admit(&self, command: &FeatureCommand) -> Result<(), DomainError> {
        let actor = command.actor();
        if let FeatureCommand::CreateFeature { workspace_id, .. } = command {
            if !actor.role.allows(command.permission()) || !actor.belongs_to(workspace_id) {
                return Err(DomainError::Forbidden);
            }
            if self.status != FeatureStatus::NotCreated {
                return Err(DomainError::FeatureAlreadyCreated);
            }
            return Ok(());
        }
        if self.status == FeatureStatus::NotCreated {
            return Err(DomainError::NotFound);
        }
        // As with sessions the runner is not bound to a workspace; it is refused by the role
        // table instead, since no feature command is a runner command.
        if !actor.is_runner() && !actor.belongs_to(&self.workspace_id) {
            return Err(DomainError::NotFound);
        }
        if !actor.role.allows(command.permission()) {
            return Err(DomainError::Forbidden);
        }
        if self.status == FeatureStatus::Completed {
            return Err(DomainError::FeatureCompleted);
        }
        Ok(())
    }
}
