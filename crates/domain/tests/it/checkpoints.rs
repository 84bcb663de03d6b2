//! Checkpoints, restores and pushes: people ask, the runner records what it did.

use canopy_domain::prelude::*;

use crate::support::*;

#[test]
fn anyone_who_prompts_may_ask_for_a_checkpoint() {
    for actor in [owner(), admin(), member()] {
        History::started()
            .when(cmd::request_checkpoint(&actor, Some("before refactor")))
            .then_expect_events(vec![
                CheckpointRequested {
                    requested_by: actor.id.clone(),
                    label: Some("before refactor".into()),
                }
                .into(),
            ]);
    }
    History::started()
        .when(cmd::request_checkpoint(&member(), None))
        .then_expect_events(vec![
            CheckpointRequested {
                requested_by: member().id,
                label: None,
            }
            .into(),
        ]);
}

#[test]
fn a_checkpoint_label_may_be_absent_but_not_blank() {
    History::started()
        .when(cmd::request_checkpoint(&member(), Some(" ")))
        .then_expect_error(DomainError::InvalidCommand("label"));
}

#[test]
fn the_runner_records_a_checkpoint() {
    History::started()
        .when(cmd::record_checkpoint(CP1, None))
        .then_expect_events(vec![ev::checkpoint_taken(CP1, None)]);
}

#[test]
fn an_automatic_checkpoint_may_name_a_prompt_that_just_finished() {
    History::started()
        .running(P1)
        .prompt_completed(P1)
        .when(cmd::record_checkpoint(CP1, Some(P1)))
        .then_expect_events(vec![ev::checkpoint_taken(CP1, Some(P1))]);
}

#[test]
fn a_checkpoint_naming_an_unknown_prompt_is_refused() {
    History::started()
        .when(cmd::record_checkpoint(CP1, Some(P1)))
        .then_expect_error(DomainError::PromptNotFound(P1));
}

#[test]
fn a_checkpoint_id_can_be_used_once() {
    History::started()
        .checkpoint(CP1)
        .when(cmd::record_checkpoint(CP1, None))
        .then_expect_error(DomainError::DuplicateId("checkpoint_id"));
}

#[test]
fn a_checkpoint_needs_its_commit() {
    History::started()
        .when(SessionCommand::RecordCheckpoint {
            actor: runner(),
            checkpoint_id: CP1,
            prompt_id: None,
            label: None,
            commit_sha: String::new(),
            files_changed: vec![],
            trigger: CheckpointTrigger::Manual,
        })
        .then_expect_error(DomainError::InvalidCommand("commit_sha"));
}

#[test]
fn checkpoints_are_kept_in_the_order_taken() {
    let session = History::started().checkpoint(CP2).checkpoint(CP1).state();
    assert_eq!(session.checkpoints(), [CP2, CP1]);
}

#[test]
fn owners_and_admins_request_a_restore_to_a_checkpoint_of_this_session() {
    for actor in [owner(), admin()] {
        History::started()
            .checkpoint(CP1)
            .when(cmd::request_restore(&actor, CP1))
            .then_expect_events(vec![
                RestoreRequested {
                    checkpoint_id: CP1,
                    requested_by: actor.id.clone(),
                }
                .into(),
            ]);
    }
}

#[test]
fn members_cannot_request_a_restore() {
    History::started()
        .checkpoint(CP1)
        .when(cmd::request_restore(&member(), CP1))
        .then_expect_error(DomainError::Forbidden);
}

#[test]
fn restoring_an_unknown_checkpoint_is_refused() {
    History::started()
        .checkpoint(CP1)
        .when(cmd::request_restore(&owner(), CP2))
        .then_expect_error(DomainError::CheckpointNotFound(CP2));
    History::started()
        .checkpoint(CP1)
        .when(cmd::record_restore(CP2))
        .then_expect_error(DomainError::CheckpointNotFound(CP2));
}

#[test]
fn the_runner_records_a_restore() {
    History::started()
        .checkpoint(CP1)
        .when(cmd::record_restore(CP1))
        .then_expect_events(vec![CheckpointRestored { checkpoint_id: CP1 }.into()]);
}

#[test]
fn a_requested_restore_stays_pending_until_recorded() {
    let requested = History::started().checkpoint(CP1).with(RestoreRequested {
        checkpoint_id: CP1,
        requested_by: owner().id,
    });
    assert_eq!(requested.clone().state().pending_restore(), Some(CP1));
    let restored = requested.with(CheckpointRestored { checkpoint_id: CP1 });
    assert_eq!(restored.state().pending_restore(), None);
}

#[test]
fn a_push_goes_to_the_session_branch_unless_another_is_named() {
    History::started()
        .when(cmd::request_push(&owner(), None))
        .then_expect_events(vec![
            PushRequested {
                requested_by: owner().id,
                branch: BRANCH.into(),
            }
            .into(),
        ]);
    History::started()
        .when(cmd::request_push(&admin(), Some("canopy/review")))
        .then_expect_events(vec![
            PushRequested {
                requested_by: admin().id,
                branch: "canopy/review".into(),
            }
            .into(),
        ]);
    History::started()
        .when(cmd::request_push(&admin(), Some("")))
        .then_expect_error(DomainError::InvalidCommand("branch"));
}

#[test]
fn members_cannot_request_a_push() {
    History::started()
        .when(cmd::request_push(&member(), None))
        .then_expect_error(DomainError::Forbidden);
}

#[test]
fn the_runner_records_a_push() {
    History::started()
        .when(cmd::branch_pushed(BRANCH, "0a1b2c3"))
        .then_expect_events(vec![
            BranchPushed {
                branch: BRANCH.into(),
                commit_sha: "0a1b2c3".into(),
            }
            .into(),
        ]);
    History::started()
        .when(cmd::branch_pushed(BRANCH, ""))
        .then_expect_error(DomainError::InvalidCommand("commit_sha"));
}
