//! The session's state stays the size of what the rules decide on: the queue is bounded, finished
//! prompts are forgotten beyond a short window (and stay refused), and a session of 10,000 prompts
//! snapshots to a few kilobytes.

use canopy_domain::prelude::*;
use cqrs_es::Aggregate;
use uuid::Uuid;

use crate::support::*;

fn policy(max_queued_prompts: usize) -> SessionPolicy {
    SessionPolicy { max_queued_prompts }
}

#[test]
fn a_full_queue_refuses_another_prompt() {
    let full = History::started()
        .submitted(P1, &member())
        .submitted(P2, &member());
    full.clone()
        .when_under(policy(2), cmd::submit(&member(), P3, "one more"))
        .then_expect_error(DomainError::PromptQueueFull(2));
    // the refusal is about the queue, not the caller: an owner is refused too
    full.when_under(policy(2), cmd::submit(&owner(), P3, "one more"))
        .then_expect_error(DomainError::PromptQueueFull(2));
}

#[test]
fn the_running_prompt_does_not_count_against_the_queue() {
    History::started()
        .joined(&member())
        .running(P1)
        .submitted(P2, &member())
        .when_under(policy(2), cmd::submit(&member(), P3, "fits"))
        .then_expect_events(vec![ev::submitted(P3, &member(), "fits")]);
}

#[test]
fn a_started_prompt_frees_its_place_in_the_queue() {
    History::started()
        .joined(&member())
        .submitted(P1, &member())
        .submitted(P2, &member())
        .prompt_started(P1)
        .when_under(policy(2), cmd::submit(&member(), P3, "fits"))
        .then_expect_events(vec![ev::submitted(P3, &member(), "fits")]);
}

#[test]
fn a_duplicate_id_is_told_before_a_full_queue() {
    History::started()
        .submitted(P1, &member())
        .when_under(policy(1), cmd::submit(&member(), P1, "again"))
        .then_expect_error(DomainError::DuplicateId("prompt_id"));
}

fn prompt(n: usize) -> Uuid {
    Uuid::from_u128(0x1_0000_0000 + n as u128)
}

/// `count` prompts, each run through a plan, an approved plan, a granted tool request and a
/// checkpoint before it completes.
fn worked_through(count: usize) -> History {
    let mut history = History::started().joined(&member());
    for n in 0..count {
        let (p, plan, req, cp) = (
            prompt(n),
            Uuid::from_u128(0x2_0000_0000 + n as u128),
            Uuid::from_u128(0x3_0000_0000 + n as u128),
            Uuid::from_u128(0x4_0000_0000 + n as u128),
        );
        history = history
            .running(p)
            .plan_proposed(plan, p)
            .plan_approved(plan, p)
            .tool_requested(req, p)
            .tool_granted(req, p)
            .with(ev::checkpoint_taken(cp, Some(p)))
            .prompt_completed(p);
    }
    history
}

#[test]
fn recently_finished_prompts_stay_refused_as_finished() {
    let history = worked_through(RECENT_FINISHED_PROMPTS);
    let first = prompt(0);
    history
        .clone()
        .when(cmd::complete_prompt(first, None))
        .then_expect_error(DomainError::PromptFinished(first));
    history
        .when(cmd::approve(&owner(), Uuid::from_u128(0x2_0000_0000)))
        .then_expect_error(DomainError::PlanAlreadyDecided(Uuid::from_u128(
            0x2_0000_0000,
        )));
}

#[test]
fn prompts_beyond_the_finished_window_are_forgotten_and_still_take_no_events() {
    let history = worked_through(RECENT_FINISHED_PROMPTS + 1);
    let (first, second) = (prompt(0), prompt(1));
    let session = history.clone().state();
    assert!(session.prompt(first).is_none());
    assert!(session.plan(Uuid::from_u128(0x2_0000_0000)).is_none());
    assert!(
        session
            .tool_approval(Uuid::from_u128(0x3_0000_0000))
            .is_none()
    );
    assert_eq!(
        session.prompt(second).map(|p| p.status),
        Some(PromptStatus::Completed)
    );

    // every command naming the forgotten prompt or its plan or request is refused
    for command in [
        cmd::complete_prompt(first, None),
        cmd::fail_prompt(first, "late"),
        cmd::start_prompt(first),
        cmd::cancel(&owner(), first),
        cmd::message(first, "late"),
        cmd::usage(first),
        cmd::propose(PLAN1, first),
        cmd::request_tool(REQ1, first),
    ] {
        assert_eq!(
            outcome(history.clone(), command),
            Err(DomainError::PromptNotFound(first))
        );
    }
    assert_eq!(
        outcome(
            history.clone(),
            cmd::approve(&owner(), Uuid::from_u128(0x2_0000_0000))
        ),
        Err(DomainError::PlanNotFound(Uuid::from_u128(0x2_0000_0000)))
    );
    assert_eq!(
        outcome(
            history,
            cmd::grant(&owner(), Uuid::from_u128(0x3_0000_0000))
        ),
        Err(DomainError::ApprovalRequestNotFound(Uuid::from_u128(
            0x3_0000_0000
        )))
    );
}

#[test]
fn restores_reach_back_to_the_latest_checkpoints() {
    let history = worked_through(RECENT_CHECKPOINTS + 1);
    let oldest = Uuid::from_u128(0x4_0000_0000);
    let kept = Uuid::from_u128(0x4_0000_0001);
    assert_eq!(
        history.clone().state().checkpoints().len(),
        RECENT_CHECKPOINTS
    );
    assert_eq!(
        outcome(history.clone(), cmd::request_restore(&owner(), oldest)),
        Err(DomainError::CheckpointNotFound(oldest))
    );
    assert!(outcome(history, cmd::request_restore(&owner(), kept)).is_ok());
}

/// The bound the issue asks for: a session that has seen 10,000 prompts, each with a plan, a
/// tool approval and a checkpoint (70,000 events), snapshots to less than 32 KiB, and to the
/// same bytes as a session that has seen 300.
#[test]
fn a_snapshot_stays_under_32_kib_after_10_000_prompts() {
    const LIMIT: usize = 32 * 1024;
    let mut session = worked_through(0).state();
    let mut sizes = Vec::new();
    for n in 0..10_000 {
        let p = prompt(n);
        let plan = Uuid::from_u128(0x2_0000_0000 + n as u128);
        let req = Uuid::from_u128(0x3_0000_0000 + n as u128);
        let cp = Uuid::from_u128(0x4_0000_0000 + n as u128);
        for command in [
            cmd::submit(&member(), p, "do it"),
            cmd::start_prompt(p),
            cmd::propose(plan, p),
            cmd::approve(&owner(), plan),
            cmd::request_tool(req, p),
            cmd::grant(&owner(), req),
            cmd::record_checkpoint(cp, Some(p)),
            cmd::complete_prompt(p, Some("done")),
        ] {
            for event in session.decide(command, &SessionPolicy::default()).unwrap() {
                session.apply(event);
            }
        }
        if n == 299 || n == 9_999 {
            sizes.push(serde_json::to_vec(&session).unwrap().len());
        }
    }
    let size = sizes[1];
    assert!(size < LIMIT, "snapshot is {size} bytes");
    assert_eq!(
        sizes[0], sizes[1],
        "the snapshot grew between 300 and 10,000 prompts"
    );
}
