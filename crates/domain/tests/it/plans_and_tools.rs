//! Plans (propose, approve, reject, re-propose), the plan/build tool phases, and tool approval
//! requests.

use canopy_domain::prelude::*;

use crate::support::*;

#[test]
fn the_agent_proposes_a_plan_for_the_running_prompt() {
    History::started()
        .running(P1)
        .when(cmd::propose(PLAN1, P1))
        .then_expect_events(vec![ev::plan_proposed(PLAN1, P1)]);
}

#[test]
fn a_second_proposal_waits_for_the_first_decision() {
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .when(cmd::propose(PLAN2, P1))
        .then_expect_error(DomainError::PlanPending(P1));
}

#[test]
fn after_a_rejection_the_agent_may_propose_again() {
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .plan_rejected(PLAN1, P1)
        .when(cmd::propose(PLAN2, P1))
        .then_expect_events(vec![ev::plan_proposed(PLAN2, P1)]);
}

#[test]
fn a_plan_id_can_be_used_once() {
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .plan_rejected(PLAN1, P1)
        .when(cmd::propose(PLAN1, P1))
        .then_expect_error(DomainError::DuplicateId("plan_id"));
}

#[test]
fn a_plan_needs_a_summary() {
    History::started()
        .running(P1)
        .when(SessionCommand::ProposePlan {
            actor: runner(),
            plan_id: PLAN1,
            prompt_id: P1,
            summary: String::new(),
            steps: vec![],
        })
        .then_expect_error(DomainError::InvalidCommand("summary"));
}

#[test]
fn owners_and_admins_approve_a_pending_plan() {
    for reviewer in [owner(), admin()] {
        History::started()
            .running(P1)
            .plan_proposed(PLAN1, P1)
            .when(cmd::approve(&reviewer, PLAN1))
            .then_expect_events(vec![ev::plan_approved(PLAN1, P1, &reviewer)]);
    }
}

#[test]
fn owners_and_admins_reject_a_pending_plan_with_a_comment() {
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .when(cmd::reject(&admin(), PLAN1, "only touch tests"))
        .then_expect_events(vec![
            PlanRejected {
                plan_id: PLAN1,
                prompt_id: P1,
                reviewer_id: admin().id,
                reviewer_name: admin().name,
                comment: "only touch tests".into(),
            }
            .into(),
        ]);
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .when(cmd::reject(&admin(), PLAN1, " "))
        .then_expect_error(DomainError::InvalidCommand("comment"));
}

#[test]
fn members_cannot_decide_plans() {
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .when(cmd::approve(&member(), PLAN1))
        .then_expect_error(DomainError::Forbidden);
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .when(cmd::reject(&member(), PLAN1, "no"))
        .then_expect_error(DomainError::Forbidden);
}

#[test]
fn deciding_an_unknown_plan_is_refused() {
    History::started()
        .running(P1)
        .when(cmd::approve(&owner(), PLAN1))
        .then_expect_error(DomainError::PlanNotFound(PLAN1));
    History::started()
        .running(P1)
        .when(cmd::reject(&owner(), PLAN1, "no"))
        .then_expect_error(DomainError::PlanNotFound(PLAN1));
}

#[test]
fn a_plan_is_decided_once() {
    let approved = History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .plan_approved(PLAN1, P1);
    approved
        .clone()
        .when(cmd::approve(&owner(), PLAN1))
        .then_expect_error(DomainError::PlanAlreadyDecided(PLAN1));
    approved
        .when(cmd::reject(&owner(), PLAN1, "changed my mind"))
        .then_expect_error(DomainError::PlanAlreadyDecided(PLAN1));
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .plan_rejected(PLAN1, P1)
        .when(cmd::approve(&owner(), PLAN1))
        .then_expect_error(DomainError::PlanAlreadyDecided(PLAN1));
}

#[test]
fn a_plan_of_a_finished_prompt_cannot_be_decided() {
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .prompt_cancelled(P1, true)
        .when(cmd::approve(&owner(), PLAN1))
        .then_expect_error(DomainError::PromptFinished(P1));
}

#[test]
fn the_plan_phase_allows_read_only_tools() {
    for tool in READ_ONLY_TOOLS {
        History::started()
            .running(P1)
            .when(cmd::tool(P1, tool, ToolPhase::Plan, ToolStatus::Completed))
            .then_expect_events(vec![ev::tool_executed(
                P1,
                tool,
                ToolPhase::Plan,
                ToolStatus::Completed,
            )]);
    }
}

#[test]
fn the_plan_phase_refuses_tools_that_change_things() {
    for tool in ["edit", "write", "bash", "apply_patch", "Read"] {
        History::started()
            .running(P1)
            .when(cmd::tool(P1, tool, ToolPhase::Plan, ToolStatus::Completed))
            .then_expect_error(DomainError::ToolNotReadOnly(tool.into()));
    }
}

#[test]
fn the_build_phase_needs_an_approved_plan() {
    let build = || cmd::tool(P1, "edit", ToolPhase::Build, ToolStatus::Completed);
    History::started()
        .running(P1)
        .when(build())
        .then_expect_error(DomainError::PlanNotApproved(P1));
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .when(build())
        .then_expect_error(DomainError::PlanNotApproved(P1));
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .plan_rejected(PLAN1, P1)
        .when(build())
        .then_expect_error(DomainError::PlanNotApproved(P1));
    // Only the prompt's latest plan counts: a new proposal after an approval needs approving too.
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .plan_approved(PLAN1, P1)
        .plan_proposed(PLAN2, P1)
        .when(build())
        .then_expect_error(DomainError::PlanNotApproved(P1));
}

#[test]
fn the_build_phase_runs_after_approval() {
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .plan_approved(PLAN1, P1)
        .when(cmd::tool(P1, "edit", ToolPhase::Build, ToolStatus::Denied))
        .then_expect_events(vec![ev::tool_executed(
            P1,
            "edit",
            ToolPhase::Build,
            ToolStatus::Denied,
        )]);
}

#[test]
fn another_prompts_approval_does_not_count() {
    History::started()
        .running(P1)
        .plan_proposed(PLAN1, P1)
        .plan_approved(PLAN1, P1)
        .prompt_completed(P1)
        .running(P2)
        .when(cmd::tool(
            P2,
            "edit",
            ToolPhase::Build,
            ToolStatus::Completed,
        ))
        .then_expect_error(DomainError::PlanNotApproved(P2));
}

#[test]
fn a_tool_execution_names_its_tool() {
    History::started()
        .running(P1)
        .when(cmd::tool(P1, "", ToolPhase::Plan, ToolStatus::Completed))
        .then_expect_error(DomainError::InvalidCommand("tool"));
}

#[test]
fn the_agent_asks_for_tool_approval() {
    History::started()
        .running(P1)
        .when(cmd::request_tool(REQ1, P1))
        .then_expect_events(vec![ev::tool_requested(REQ1, P1)]);
    let session = History::started()
        .running(P1)
        .tool_requested(REQ1, P1)
        .tool_requested(REQ2, P1)
        .tool_granted(REQ1, P1)
        .state();
    let open: Vec<_> = session.open_tool_approvals().map(|(id, _)| id).collect();
    assert_eq!(open, [REQ2]);
}

#[test]
fn a_request_id_can_be_used_once() {
    History::started()
        .running(P1)
        .tool_requested(REQ1, P1)
        .when(cmd::request_tool(REQ1, P1))
        .then_expect_error(DomainError::DuplicateId("request_id"));
}

#[test]
fn owners_and_admins_grant_tool_approval() {
    for reviewer in [owner(), admin()] {
        History::started()
            .running(P1)
            .tool_requested(REQ1, P1)
            .when(cmd::grant(&reviewer, REQ1))
            .then_expect_events(vec![ev::tool_granted(REQ1, P1, &reviewer)]);
    }
}

#[test]
fn owners_and_admins_deny_tool_approval() {
    History::started()
        .running(P1)
        .tool_requested(REQ1, P1)
        .when(cmd::deny(&owner(), REQ1, Some("not on main")))
        .then_expect_events(vec![
            ToolApprovalDenied {
                request_id: REQ1,
                prompt_id: P1,
                reviewer_id: owner().id,
                reviewer_name: owner().name,
                comment: Some("not on main".into()),
            }
            .into(),
        ]);
    History::started()
        .running(P1)
        .tool_requested(REQ1, P1)
        .when(cmd::deny(&owner(), REQ1, Some("")))
        .then_expect_error(DomainError::InvalidCommand("comment"));
}

#[test]
fn answering_an_unknown_request_is_refused() {
    History::started()
        .running(P1)
        .when(cmd::grant(&owner(), REQ1))
        .then_expect_error(DomainError::ApprovalRequestNotFound(REQ1));
    History::started()
        .running(P1)
        .when(cmd::deny(&owner(), REQ1, None))
        .then_expect_error(DomainError::ApprovalRequestNotFound(REQ1));
}

#[test]
fn a_request_is_answered_once() {
    let granted = History::started()
        .running(P1)
        .tool_requested(REQ1, P1)
        .tool_granted(REQ1, P1);
    granted
        .clone()
        .when(cmd::grant(&owner(), REQ1))
        .then_expect_error(DomainError::ApprovalAlreadyDecided(REQ1));
    granted
        .when(cmd::deny(&admin(), REQ1, None))
        .then_expect_error(DomainError::ApprovalAlreadyDecided(REQ1));
}

#[test]
fn a_request_of_a_finished_prompt_cannot_be_answered() {
    History::started()
        .running(P1)
        .tool_requested(REQ1, P1)
        .prompt_failed(P1)
        .when(cmd::grant(&owner(), REQ1))
        .then_expect_error(DomainError::PromptFinished(P1));
}

#[test]
fn members_cannot_answer_tool_requests() {
    History::started()
        .running(P1)
        .tool_requested(REQ1, P1)
        .when(cmd::grant(&member(), REQ1))
        .then_expect_error(DomainError::Forbidden);
}
