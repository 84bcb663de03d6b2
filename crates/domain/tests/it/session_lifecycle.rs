//! Starting, joining, leaving, completing, failing and archiving a session; workspace isolation;
//! the sandbox.

use canopy_domain::prelude::*;

use crate::support::*;

#[test]
fn start_session_records_it_then_joins_the_starter() {
    History::none()
        .when(cmd::start_session(&member()))
        .then_expect_events(ev::session_started(&member()));
}

#[test]
fn start_session_twice_is_refused() {
    History::started()
        .when(cmd::start_session(&owner()))
        .then_expect_error(DomainError::SessionAlreadyStarted);
}

#[test]
fn start_session_in_another_workspace_is_forbidden() {
    History::none()
        .when(cmd::start_session(&outsider()))
        .then_expect_error(DomainError::Forbidden);
}

fn start_with(title: &str, repository_url: &str, base: &str, branch: &str) -> SessionCommand {
    SessionCommand::StartSession {
        actor: owner(),
        session_id: SESSION,
        workspace_id: WS.into(),
        feature_id: None,
        title: title.into(),
        repository_url: repository_url.into(),
        base_branch: base.into(),
        session_branch: branch.into(),
    }
}

#[test]
fn start_session_needs_every_text_field() {
    for (command, field) in [
        (start_with("  ", REPO, BASE, BRANCH), "title"),
        (start_with(TITLE, "", BASE, BRANCH), "repository_url"),
        (start_with(TITLE, REPO, "", BRANCH), "base_branch"),
        (start_with(TITLE, REPO, BASE, "\n"), "session_branch"),
    ] {
        History::none()
            .when(command)
            .then_expect_error(DomainError::InvalidCommand(field));
    }
}

#[test]
fn commands_on_a_session_that_was_never_started_find_nothing() {
    History::none()
        .when(cmd::submit(&owner(), P1, "hello"))
        .then_expect_error(DomainError::NotFound);
    History::none()
        .when(cmd::join(&member()))
        .then_expect_error(DomainError::NotFound);
    History::none()
        .when(cmd::start_prompt(P1))
        .then_expect_error(DomainError::NotFound);
}

#[test]
fn another_workspace_sees_no_session_whatever_its_role_or_state() {
    for command in [
        cmd::join(&outsider()),
        cmd::submit(&outsider(), P1, "hello"),
        cmd::archive(&outsider()),
        cmd::request_push(&outsider(), None),
    ] {
        History::started()
            .when(command.clone())
            .then_expect_error(DomainError::NotFound);
        // Not "archived" either: that would reveal the session exists.
        History::started()
            .archived()
            .when(command)
            .then_expect_error(DomainError::NotFound);
    }
}

#[test]
fn a_person_without_a_workspace_sees_no_session() {
    let mut drifter = owner();
    drifter.workspace_id = None;
    History::started()
        .when(cmd::join(&drifter))
        .then_expect_error(DomainError::NotFound);
}

#[test]
fn the_runner_acts_in_any_workspace() {
    History::started()
        .when(cmd::sandbox_started(SANDBOX))
        .then_expect_events(vec![
            SandboxStarted {
                sandbox_id: SANDBOX.into(),
                opencode_session_id: "ses_1".into(),
            }
            .into(),
        ]);
}

#[test]
fn join_adds_a_participant() {
    History::started()
        .when(cmd::join(&member()))
        .then_expect_events(vec![ev::joined(&member())]);
}

#[test]
fn joining_again_changes_nothing() {
    History::started()
        .joined(&member())
        .when(cmd::join(&member()))
        .then_expect_events(vec![]);
}

#[test]
fn leave_removes_a_participant() {
    History::started()
        .joined(&member())
        .when(cmd::leave(&member()))
        .then_expect_events(vec![
            ParticipantLeft {
                user_id: member().id,
            }
            .into(),
        ]);
}

#[test]
fn leaving_without_having_joined_is_refused() {
    History::started()
        .when(cmd::leave(&member()))
        .then_expect_error(DomainError::NotAParticipant);
    History::started()
        .joined(&member())
        .with(ParticipantLeft {
            user_id: member().id,
        })
        .when(cmd::leave(&member()))
        .then_expect_error(DomainError::NotAParticipant);
}

#[test]
fn participants_are_kept_in_join_order() {
    let session = History::started()
        .joined(&member())
        .joined(&admin())
        .with(ParticipantLeft {
            user_id: member().id,
        })
        .joined(&member())
        .state();
    let ids: Vec<_> = session
        .participants()
        .iter()
        .map(|p| p.user_id.as_str())
        .collect();
    assert_eq!(ids, [owner().id, admin().id, member().id]);
}

#[test]
fn prompting_joins_a_non_participant_first() {
    History::started()
        .when(cmd::submit(&member(), P1, "fix it"))
        .then_expect_events(vec![
            ev::joined(&member()),
            ev::submitted(P1, &member(), "fix it"),
        ]);
}

#[test]
fn prompting_as_a_participant_does_not_join_again() {
    History::started()
        .when(cmd::submit(&owner(), P1, "fix it"))
        .then_expect_events(vec![ev::submitted(P1, &owner(), "fix it")]);
}

#[test]
fn complete_session_when_idle() {
    History::started()
        .running(P1)
        .prompt_completed(P1)
        .when(cmd::complete_session(&member()))
        .then_expect_events(vec![
            SessionCompleted {
                completed_by: member().id,
            }
            .into(),
        ]);
}

#[test]
fn complete_session_waits_for_queued_and_running_prompts() {
    History::started()
        .submitted(P1, &member())
        .when(cmd::complete_session(&owner()))
        .then_expect_error(DomainError::PromptsOutstanding);
    History::started()
        .running(P1)
        .when(cmd::complete_session(&owner()))
        .then_expect_error(DomainError::PromptsOutstanding);
}

#[test]
fn fail_session_fails_the_running_then_the_queued_prompts() {
    History::started()
        .running(P1)
        .submitted(P2, &member())
        .submitted(P3, &owner())
        .when(cmd::fail_session("sandbox lost"))
        .then_expect_events(vec![
            PromptFailed {
                prompt_id: P1,
                reason: "sandbox lost".into(),
            }
            .into(),
            PromptFailed {
                prompt_id: P2,
                reason: "sandbox lost".into(),
            }
            .into(),
            PromptFailed {
                prompt_id: P3,
                reason: "sandbox lost".into(),
            }
            .into(),
            SessionFailed {
                reason: "sandbox lost".into(),
            }
            .into(),
        ]);
}

#[test]
fn fail_session_needs_a_reason() {
    History::started()
        .when(cmd::fail_session(" "))
        .then_expect_error(DomainError::InvalidCommand("reason"));
}

#[test]
fn archive_an_active_completed_or_failed_session() {
    let archived = || {
        vec![
            SessionArchived {
                archived_by: admin().id,
            }
            .into(),
        ]
    };
    for history in [
        History::started(),
        History::started().completed(),
        History::started().failed(),
    ] {
        history
            .when(cmd::archive(&admin()))
            .then_expect_events(archived());
    }
}

#[test]
fn archive_waits_for_outstanding_prompts() {
    History::started()
        .submitted(P1, &member())
        .when(cmd::archive(&owner()))
        .then_expect_error(DomainError::PromptsOutstanding);
}

#[test]
fn an_archived_session_accepts_nothing() {
    for command in [
        cmd::submit(&owner(), P1, "hello"),
        cmd::join(&member()),
        cmd::leave(&owner()),
        cmd::archive(&owner()),
        cmd::sandbox_stopped(SANDBOX),
        cmd::fail_session("late"),
    ] {
        History::started()
            .sandbox(SANDBOX)
            .completed()
            .archived()
            .when(command)
            .then_expect_error(DomainError::SessionArchived);
    }
}

#[test]
fn a_finished_session_refuses_everything_but_archive_leave_and_sandbox_stop() {
    for finished in [
        History::started().sandbox(SANDBOX).completed(),
        History::started().sandbox(SANDBOX).failed(),
    ] {
        for command in [
            cmd::submit(&owner(), P1, "hello"),
            cmd::join(&member()),
            cmd::request_checkpoint(&owner(), None),
            cmd::request_push(&owner(), None),
            cmd::complete_session(&owner()),
            cmd::start_prompt(P1),
            cmd::record_checkpoint(CP1, None),
            cmd::fail_session("late"),
        ] {
            finished
                .clone()
                .when(command)
                .then_expect_error(DomainError::SessionFinished);
        }
        finished
            .clone()
            .when(cmd::leave(&owner()))
            .then_expect_events(vec![
                ParticipantLeft {
                    user_id: owner().id,
                }
                .into(),
            ]);
        finished
            .clone()
            .when(cmd::sandbox_stopped(SANDBOX))
            .then_expect_events(vec![
                SandboxStopped {
                    sandbox_id: SANDBOX.into(),
                    reason: "idle".into(),
                }
                .into(),
            ]);
        finished
            .when(cmd::archive(&owner()))
            .then_expect_events(vec![
                SessionArchived {
                    archived_by: owner().id,
                }
                .into(),
            ]);
    }
}

#[test]
fn sandbox_start_and_stop_are_tracked() {
    let session = History::started().sandbox(SANDBOX).state();
    assert_eq!(session.sandbox_id(), Some(SANDBOX));
    assert_eq!(session.opencode_session_id(), Some("ses_1"));

    History::started()
        .sandbox(SANDBOX)
        .when(cmd::sandbox_stopped(SANDBOX))
        .then_expect_events(vec![
            SandboxStopped {
                sandbox_id: SANDBOX.into(),
                reason: "idle".into(),
            }
            .into(),
        ]);
    let session = History::started()
        .sandbox(SANDBOX)
        .with(SandboxStopped {
            sandbox_id: SANDBOX.into(),
            reason: "idle".into(),
        })
        .state();
    assert_eq!(session.sandbox_id(), None);
    assert_eq!(session.opencode_session_id(), None);
}

#[test]
fn a_second_sandbox_while_one_runs_is_refused() {
    History::started()
        .sandbox(SANDBOX)
        .when(cmd::sandbox_started("sbx-2"))
        .then_expect_error(DomainError::SandboxAlreadyRunning);
}

#[test]
fn stopping_a_sandbox_that_is_not_running_is_refused() {
    History::started()
        .when(cmd::sandbox_stopped(SANDBOX))
        .then_expect_error(DomainError::SandboxNotFound(SANDBOX.into()));
    History::started()
        .sandbox(SANDBOX)
        .when(cmd::sandbox_stopped("sbx-2"))
        .then_expect_error(DomainError::SandboxNotFound("sbx-2".into()));
}

#[test]
fn sandbox_reports_need_their_text_fields() {
    History::started()
        .when(cmd::sandbox_started(""))
        .then_expect_error(DomainError::InvalidCommand("sandbox_id"));
    History::started()
        .sandbox(SANDBOX)
        .when(SessionCommand::RecordSandboxStopped {
            actor: runner(),
            sandbox_id: SANDBOX.into(),
            reason: String::new(),
        })
        .then_expect_error(DomainError::InvalidCommand("reason"));
}

#[test]
fn started_state_reflects_the_start_command() {
    let session = History::started().state();
    assert_eq!(session.status(), SessionStatus::Active);
    assert_eq!(session.id(), Some(SESSION));
    assert_eq!(session.workspace_id(), WS);
    assert_eq!(session.feature_id(), Some(FEATURE));
    assert_eq!(session.title(), TITLE);
    assert_eq!(session.repository_url(), REPO);
    assert_eq!(session.base_branch(), BASE);
    assert_eq!(session.session_branch(), BRANCH);
    assert_eq!(session.started_by(), owner().id);
    assert_eq!(
        History::started().completed().state().status(),
        SessionStatus::Completed
    );
    assert_eq!(
        History::started().failed().state().status(),
        SessionStatus::Failed
    );
    assert_eq!(
        History::started().archived().state().status(),
        SessionStatus::Archived
    );
}
