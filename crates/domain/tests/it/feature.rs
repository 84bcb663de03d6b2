//! The feature aggregate: creation, attached sessions, learnings, decisions, completion, and its
//! half of the role table.

use canopy_domain::prelude::*;
use cqrs_es::test::{AggregateResultValidator, TestFramework};
use uuid::Uuid;

use crate::support::*;

const S1: Uuid = Uuid::from_u128(0x5001);
const S2: Uuid = Uuid::from_u128(0x5002);
const L1: Uuid = Uuid::from_u128(0x6001);
const D1: Uuid = Uuid::from_u128(0x7001);

fn given(events: Vec<FeatureEvent>) -> FeatureGiven {
    FeatureGiven(events)
}

fn created() -> FeatureGiven {
    given(vec![created_event()])
}

fn created_event() -> FeatureEvent {
    FeatureCreated {
        feature_id: FEATURE,
        workspace_id: WS.into(),
        title: "Passwordless login".into(),
        description: "magic links".into(),
        created_by: owner().id,
    }
    .into()
}

struct FeatureGiven(Vec<FeatureEvent>);

impl FeatureGiven {
    fn with(mut self, event: impl Into<FeatureEvent>) -> Self {
        self.0.push(event.into());
        self
    }

    fn attached(self, session_id: Uuid) -> Self {
        self.with(SessionAttached {
            session_id,
            attached_by: member().id,
        })
    }

    fn completed(self) -> Self {
        self.with(FeatureCompleted {
            completed_by: owner().id,
        })
    }

    fn when(self, command: FeatureCommand) -> AggregateResultValidator<Feature> {
        TestFramework::<Feature>::with(())
            .given(self.0)
            .when(command)
    }
}

fn create(actor: &Actor) -> FeatureCommand {
    FeatureCommand::CreateFeature {
        actor: actor.clone(),
        feature_id: FEATURE,
        workspace_id: WS.into(),
        title: "Passwordless login".into(),
        description: "magic links".into(),
    }
}

fn attach(actor: &Actor, session_id: Uuid) -> FeatureCommand {
    FeatureCommand::AttachSession {
        actor: actor.clone(),
        session_id,
    }
}

fn share(actor: &Actor, session_id: Option<Uuid>, text: &str) -> FeatureCommand {
    FeatureCommand::ShareLearning {
        actor: actor.clone(),
        learning_id: L1,
        session_id,
        text: text.into(),
    }
}

fn decide(actor: &Actor, title: &str, rationale: &str) -> FeatureCommand {
    FeatureCommand::RecordDecision {
        actor: actor.clone(),
        decision_id: D1,
        title: title.into(),
        rationale: rationale.into(),
    }
}

fn complete(actor: &Actor) -> FeatureCommand {
    FeatureCommand::CompleteFeature {
        actor: actor.clone(),
    }
}

#[test]
fn create_a_feature() {
    given(vec![])
        .when(create(&member()))
        .then_expect_events(vec![
            FeatureCreated {
                feature_id: FEATURE,
                workspace_id: WS.into(),
                title: "Passwordless login".into(),
                description: "magic links".into(),
                created_by: member().id,
            }
            .into(),
        ]);
}

#[test]
fn a_feature_is_created_once() {
    created()
        .when(create(&owner()))
        .then_expect_error(DomainError::FeatureAlreadyCreated);
}

#[test]
fn a_feature_is_created_in_ones_own_workspace() {
    given(vec![])
        .when(create(&outsider()))
        .then_expect_error(DomainError::Forbidden);
}

#[test]
fn a_feature_needs_a_title_but_not_a_description() {
    given(vec![])
        .when(FeatureCommand::CreateFeature {
            actor: owner(),
            feature_id: FEATURE,
            workspace_id: WS.into(),
            title: " ".into(),
            description: String::new(),
        })
        .then_expect_error(DomainError::InvalidCommand("title"));
    given(vec![])
        .when(FeatureCommand::CreateFeature {
            actor: owner(),
            feature_id: FEATURE,
            workspace_id: WS.into(),
            title: "t".into(),
            description: String::new(),
        })
        .then_expect_events(vec![
            FeatureCreated {
                feature_id: FEATURE,
                workspace_id: WS.into(),
                title: "t".into(),
                description: String::new(),
                created_by: owner().id,
            }
            .into(),
        ]);
}

#[test]
fn commands_on_a_missing_or_foreign_feature_find_nothing() {
    given(vec![])
        .when(attach(&owner(), S1))
        .then_expect_error(DomainError::NotFound);
    created()
        .when(attach(&outsider(), S1))
        .then_expect_error(DomainError::NotFound);
    created()
        .completed()
        .when(share(&outsider(), None, "x"))
        .then_expect_error(DomainError::NotFound);
}

#[test]
fn attach_sessions() {
    created()
        .when(attach(&member(), S1))
        .then_expect_events(vec![
            SessionAttached {
                session_id: S1,
                attached_by: member().id,
            }
            .into(),
        ]);
    use cqrs_es::Aggregate;
    let mut feature = Feature::default();
    for event in created().attached(S2).attached(S1).0 {
        feature.apply(event);
    }
    assert_eq!(feature.sessions(), [S2, S1]);
    assert_eq!(feature.status(), FeatureStatus::Active);
    assert_eq!(feature.id(), Some(FEATURE));
    assert_eq!(feature.workspace_id(), WS);
    assert_eq!(feature.title(), "Passwordless login");
}

#[test]
fn a_session_is_attached_once() {
    created()
        .attached(S1)
        .when(attach(&owner(), S1))
        .then_expect_error(DomainError::SessionAlreadyAttached(S1));
}

#[test]
fn share_a_learning_with_or_without_a_session() {
    created()
        .when(share(&member(), None, "magic links expire fast"))
        .then_expect_events(vec![
            LearningShared {
                learning_id: L1,
                session_id: None,
                text: "magic links expire fast".into(),
                shared_by: member().id,
                shared_by_name: member().name,
            }
            .into(),
        ]);
    created()
        .attached(S1)
        .when(share(&member(), Some(S1), "x"))
        .then_expect_events(vec![
            LearningShared {
                learning_id: L1,
                session_id: Some(S1),
                text: "x".into(),
                shared_by: member().id,
                shared_by_name: member().name,
            }
            .into(),
        ]);
}

#[test]
fn a_learning_names_only_an_attached_session() {
    created()
        .attached(S1)
        .when(share(&member(), Some(S2), "x"))
        .then_expect_error(DomainError::SessionNotAttached(S2));
}

#[test]
fn a_learning_needs_text_and_a_fresh_id() {
    created()
        .when(share(&member(), None, ""))
        .then_expect_error(DomainError::InvalidCommand("text"));
    created()
        .with(LearningShared {
            learning_id: L1,
            session_id: None,
            text: "x".into(),
            shared_by: member().id,
            shared_by_name: member().name,
        })
        .when(share(&member(), None, "y"))
        .then_expect_error(DomainError::DuplicateId("learning_id"));
}

#[test]
fn record_a_decision() {
    created()
        .when(decide(&admin(), "Use magic links", "no passwords to leak"))
        .then_expect_events(vec![
            DecisionRecorded {
                decision_id: D1,
                title: "Use magic links".into(),
                rationale: "no passwords to leak".into(),
                recorded_by: admin().id,
            }
            .into(),
        ]);
}

#[test]
fn a_decision_needs_title_rationale_and_a_fresh_id() {
    created()
        .when(decide(&admin(), "", "r"))
        .then_expect_error(DomainError::InvalidCommand("title"));
    created()
        .when(decide(&admin(), "t", " "))
        .then_expect_error(DomainError::InvalidCommand("rationale"));
    created()
        .with(DecisionRecorded {
            decision_id: D1,
            title: "t".into(),
            rationale: "r".into(),
            recorded_by: admin().id,
        })
        .when(decide(&admin(), "t2", "r2"))
        .then_expect_error(DomainError::DuplicateId("decision_id"));
}

#[test]
fn complete_a_feature() {
    created().when(complete(&admin())).then_expect_events(vec![
        FeatureCompleted {
            completed_by: admin().id,
        }
        .into(),
    ]);
}

#[test]
fn a_completed_feature_accepts_nothing() {
    for command in [
        attach(&owner(), S1),
        share(&owner(), None, "x"),
        decide(&owner(), "t", "r"),
        complete(&owner()),
    ] {
        created()
            .completed()
            .when(command)
            .then_expect_error(DomainError::FeatureCompleted);
    }
}

#[test]
fn feature_commands_follow_the_role_table() {
    type Case = (
        &'static str,
        bool,
        fn(&Actor) -> (FeatureGiven, FeatureCommand),
    );
    // (name, needs moderate rather than prompt, setup)
    let cases: [Case; 5] = [
        ("create", false, |a| (given(vec![]), create(a))),
        ("attach", false, |a| (created(), attach(a, S1))),
        ("share", false, |a| (created(), share(a, None, "x"))),
        ("decide", false, |a| (created(), decide(a, "t", "r"))),
        ("complete", true, |a| (created(), complete(a))),
    ];
    let mut wrong = Vec::new();
    for role in Role::ALL {
        let actor = actor_for(role);
        for (name, moderate, case) in &cases {
            let expected_allowed = match role {
                Role::Owner | Role::Admin => true,
                Role::Member => !moderate,
                Role::Viewer | Role::Auditor | Role::Runner => false,
            };
            let (history, command) = case(&actor);
            let result = history.when(command).inspect_result();
            let ok = match &result {
                Ok(_) => expected_allowed,
                Err(DomainError::Forbidden) => !expected_allowed,
                Err(_) => false,
            };
            if !ok {
                wrong.push(format!("{role} / {name}: got {result:?}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "role table mismatch:\n{}",
        wrong.join("\n")
    );
}
