//! The FIFO prompt queue: submitting, starting in order, cancelling queued prompts, interrupting
//! the running one, and finishing prompts.

use canopy_domain::prelude::*;

use crate::support::*;

#[test]
fn submitted_prompts_queue_in_order() {
    let session = History::started()
        .submitted(P1, &member())
        .submitted(P2, &owner())
        .submitted(P3, &member())
        .state();
    assert_eq!(session.queue(), [P1, P2, P3]);
    assert_eq!(session.running_prompt(), None);
    assert_eq!(
        session.prompt(P2).map(|p| p.status),
        Some(PromptStatus::Queued)
    );
}

#[test]
fn the_head_of_the_queue_starts() {
    History::started()
        .submitted(P1, &member())
        .submitted(P2, &member())
        .when(cmd::start_prompt(P1))
        .then_expect_events(vec![PromptStarted { prompt_id: P1 }.into()]);
}

#[test]
fn a_prompt_behind_the_head_cannot_jump_the_queue() {
    History::started()
        .submitted(P1, &member())
        .submitted(P2, &member())
        .when(cmd::start_prompt(P2))
        .then_expect_error(DomainError::PromptNotAtHead(P2));
}

#[test]
fn fifo_order_holds_across_completions() {
    let history = History::started()
        .submitted(P1, &member())
        .submitted(P2, &owner())
        .submitted(P3, &member())
        .prompt_started(P1)
        .prompt_completed(P1);
    history
        .clone()
        .when(cmd::start_prompt(P3))
        .then_expect_error(DomainError::PromptNotAtHead(P3));
    history
        .clone()
        .when(cmd::start_prompt(P2))
        .then_expect_events(vec![PromptStarted { prompt_id: P2 }.into()]);
    let session = history.prompt_started(P2).state();
    assert_eq!(session.running_prompt(), Some(P2));
    assert_eq!(session.queue(), [P3]);
}

#[test]
fn only_one_prompt_runs_at_a_time() {
    History::started()
        .running(P1)
        .submitted(P2, &member())
        .when(cmd::start_prompt(P2))
        .then_expect_error(DomainError::PromptAlreadyRunning);
    History::started()
        .running(P1)
        .when(cmd::start_prompt(P1))
        .then_expect_error(DomainError::PromptAlreadyRunning);
}

#[test]
fn starting_an_unknown_prompt_is_refused() {
    History::started()
        .when(cmd::start_prompt(P1))
        .then_expect_error(DomainError::PromptNotFound(P1));
}

#[test]
fn a_finished_prompt_cannot_start_again() {
    History::started()
        .running(P1)
        .prompt_completed(P1)
        .when(cmd::start_prompt(P1))
        .then_expect_error(DomainError::PromptFinished(P1));
    History::started()
        .submitted(P1, &member())
        .prompt_cancelled(P1, false)
        .when(cmd::start_prompt(P1))
        .then_expect_error(DomainError::PromptFinished(P1));
}

#[test]
fn cancelling_a_queued_prompt_removes_it_from_the_queue() {
    let history = History::started()
        .submitted(P1, &member())
        .submitted(P2, &owner());
    history
        .clone()
        .when(cmd::cancel(&member(), P1))
        .then_expect_events(vec![ev::cancelled(P1, &member(), false)]);

    let history = history.with(ev::cancelled(P1, &member(), false));
    assert_eq!(history.clone().state().queue(), [P2]);
    // The next prompt is now at the head.
    history
        .when(cmd::start_prompt(P2))
        .then_expect_events(vec![PromptStarted { prompt_id: P2 }.into()]);
}

#[test]
fn cancelling_the_running_prompt_interrupts_it_and_frees_the_slot() {
    let history = History::started().running(P1).submitted(P2, &owner());
    history
        .clone()
        .when(cmd::cancel(&member(), P1))
        .then_expect_events(vec![ev::cancelled(P1, &member(), true)]);

    let history = history.with(ev::cancelled(P1, &member(), true));
    let session = history.clone().state();
    assert_eq!(session.running_prompt(), None);
    assert_eq!(
        session.prompt(P1).map(|p| p.status),
        Some(PromptStatus::Cancelled)
    );
    history
        .when(cmd::start_prompt(P2))
        .then_expect_events(vec![PromptStarted { prompt_id: P2 }.into()]);
}

#[test]
fn members_cancel_only_their_own_prompts() {
    History::started()
        .submitted(P1, &other_member())
        .when(cmd::cancel(&member(), P1))
        .then_expect_error(DomainError::Forbidden);
    History::started()
        .running(P1)
        .when(cmd::cancel(&other_member(), P1))
        .then_expect_error(DomainError::Forbidden);
}

#[test]
fn owners_and_admins_cancel_anyones_prompt() {
    for moderator in [owner(), admin()] {
        History::started()
            .submitted(P1, &member())
            .when(cmd::cancel(&moderator, P1))
            .then_expect_events(vec![ev::cancelled(P1, &moderator, false)]);
        History::started()
            .running(P1)
            .when(cmd::cancel(&moderator, P1))
            .then_expect_events(vec![ev::cancelled(P1, &moderator, true)]);
    }
}

#[test]
fn a_finished_prompt_cannot_be_cancelled() {
    for finished in [
        History::started().running(P1).prompt_completed(P1),
        History::started().running(P1).prompt_failed(P1),
        History::started()
            .submitted(P1, &member())
            .prompt_cancelled(P1, false),
    ] {
        finished
            .when(cmd::cancel(&member(), P1))
            .then_expect_error(DomainError::PromptFinished(P1));
    }
}

#[test]
fn cancelling_an_unknown_prompt_is_refused() {
    History::started()
        .when(cmd::cancel(&owner(), P1))
        .then_expect_error(DomainError::PromptNotFound(P1));
}

#[test]
fn a_prompt_id_can_be_used_once() {
    History::started()
        .submitted(P1, &member())
        .when(cmd::submit(&owner(), P1, "again"))
        .then_expect_error(DomainError::DuplicateId("prompt_id"));
}

#[test]
fn a_prompt_needs_text() {
    History::started()
        .when(cmd::submit(&owner(), P1, " \t"))
        .then_expect_error(DomainError::InvalidCommand("text"));
}

#[test]
fn the_runner_completes_the_running_prompt() {
    History::started()
        .running(P1)
        .when(cmd::complete_prompt(P1, Some("fixed the race")))
        .then_expect_events(vec![
            PromptCompleted {
                prompt_id: P1,
                summary: Some("fixed the race".into()),
            }
            .into(),
        ]);
    History::started()
        .running(P1)
        .when(cmd::complete_prompt(P1, Some("")))
        .then_expect_error(DomainError::InvalidCommand("summary"));
}

#[test]
fn the_runner_fails_the_running_prompt() {
    History::started()
        .running(P1)
        .when(cmd::fail_prompt(P1, "model error"))
        .then_expect_events(vec![
            PromptFailed {
                prompt_id: P1,
                reason: "model error".into(),
            }
            .into(),
        ]);
    History::started()
        .running(P1)
        .when(cmd::fail_prompt(P1, ""))
        .then_expect_error(DomainError::InvalidCommand("reason"));
}

#[test]
fn agent_reports_need_the_prompt_to_be_running() {
    let reports = || {
        vec![
            cmd::complete_prompt(P1, None),
            cmd::fail_prompt(P1, "x"),
            cmd::message(P1, "hello"),
            cmd::usage(P1),
            cmd::propose(PLAN1, P1),
            cmd::request_tool(REQ1, P1),
            cmd::tool(P1, "read", ToolPhase::Plan, ToolStatus::Completed),
        ]
    };
    for command in reports() {
        History::started()
            .submitted(P1, &member())
            .when(command)
            .then_expect_error(DomainError::PromptNotRunning(P1));
    }
    for command in reports() {
        History::started()
            .running(P1)
            .prompt_completed(P1)
            .when(command)
            .then_expect_error(DomainError::PromptFinished(P1));
    }
    for command in reports() {
        History::started()
            .when(command)
            .then_expect_error(DomainError::PromptNotFound(P1));
    }
}

#[test]
fn agent_messages_and_usage_are_recorded_for_the_running_prompt() {
    History::started()
        .running(P1)
        .when(cmd::message(P1, "looking at the test"))
        .then_expect_events(vec![
            AgentMessageRecorded {
                prompt_id: P1,
                message_id: "msg_1".into(),
                text: "looking at the test".into(),
            }
            .into(),
        ]);
    History::started()
        .running(P1)
        .when(cmd::usage(P1))
        .then_expect_events(vec![
            UsageRecorded {
                prompt_id: P1,
                input_tokens: 1200,
                output_tokens: 340,
                cost_micro_usd: 5600,
            }
            .into(),
        ]);
}

#[test]
fn an_agent_message_needs_text() {
    History::started()
        .running(P1)
        .when(cmd::message(P1, ""))
        .then_expect_error(DomainError::InvalidCommand("text"));
}
