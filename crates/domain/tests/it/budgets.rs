//! The budget aggregate: who may set and clear a workspace's limits, what a limit may be, and
//! the session's budget warning.

use canopy_domain::prelude::*;
use cqrs_es::test::{AggregateResultValidator, TestFramework};

use crate::support::*;

fn when(given: Vec<BudgetEvent>, command: BudgetCommand) -> AggregateResultValidator<Budget> {
    TestFramework::<Budget>::with(()).given(given).when(command)
}

fn set(actor: Actor, kind: BudgetKind, limit: u64) -> BudgetCommand {
    BudgetCommand::SetBudget {
        actor,
        workspace_id: WS.into(),
        kind,
        limit,
    }
}

fn was_set(kind: BudgetKind, limit: u64) -> BudgetEvent {
    BudgetSet {
        workspace_id: WS.into(),
        kind,
        limit,
        set_by: owner().id,
    }
    .into()
}

#[test]
fn owners_and_admins_set_a_budget() {
    for actor in [owner(), admin()] {
        let id = actor.id.clone();
        when(
            vec![],
            set(actor, BudgetKind::WorkspaceMonthlyCost, 5_000_000),
        )
        .then_expect_events(vec![
            BudgetSet {
                workspace_id: WS.into(),
                kind: BudgetKind::WorkspaceMonthlyCost,
                limit: 5_000_000,
                set_by: id,
            }
            .into(),
        ]);
    }
}

#[test]
fn members_viewers_auditors_and_the_runner_may_not_set_budgets() {
    for actor in [member(), viewer(), auditor()] {
        when(vec![], set(actor, BudgetKind::SessionTokens, 10))
            .then_expect_error(DomainError::Forbidden);
    }
    // the runner belongs to no workspace: another workspace's budgets look absent
    when(vec![], set(runner(), BudgetKind::SessionTokens, 10))
        .then_expect_error(DomainError::NotFound);
}

#[test]
fn another_workspace_is_not_found() {
    let command = BudgetCommand::SetBudget {
        actor: outsider(),
        workspace_id: WS.into(),
        kind: BudgetKind::SessionCost,
        limit: 1,
    };
    when(vec![], command).then_expect_error(DomainError::NotFound);
}

#[test]
fn a_limit_is_at_least_one_and_fits_the_ledger() {
    when(vec![], set(owner(), BudgetKind::SessionCost, 0))
        .then_expect_error(DomainError::InvalidCommand("limit"));
    when(vec![], set(owner(), BudgetKind::SessionCost, u64::MAX))
        .then_expect_error(DomainError::InvalidCommand("limit"));
}

#[test]
fn setting_the_same_limit_again_records_nothing_and_a_new_one_replaces_it() {
    let given = vec![was_set(BudgetKind::ConcurrentSessions, 2)];
    when(
        given.clone(),
        set(owner(), BudgetKind::ConcurrentSessions, 2),
    )
    .then_expect_events(vec![]);
    when(given, set(owner(), BudgetKind::ConcurrentSessions, 3))
        .then_expect_events(vec![was_set(BudgetKind::ConcurrentSessions, 3)]);
}

#[test]
fn clearing_removes_a_limit_and_clearing_nothing_records_nothing() {
    let clear = |kind| BudgetCommand::ClearBudget {
        actor: admin(),
        workspace_id: WS.into(),
        kind,
    };
    when(
        vec![was_set(BudgetKind::PersonDailyCost, 9)],
        clear(BudgetKind::PersonDailyCost),
    )
    .then_expect_events(vec![
        BudgetCleared {
            workspace_id: WS.into(),
            kind: BudgetKind::PersonDailyCost,
            cleared_by: admin().id,
        }
        .into(),
    ]);
    when(vec![], clear(BudgetKind::PersonDailyCost)).then_expect_events(vec![]);
}

#[test]
fn the_state_keeps_the_current_limits() {
    use cqrs_es::Aggregate;
    let mut budget = Budget::default();
    budget.apply(was_set(BudgetKind::SessionTokens, 100));
    budget.apply(was_set(BudgetKind::SessionCost, 7));
    budget.apply(
        BudgetCleared {
            workspace_id: WS.into(),
            kind: BudgetKind::SessionCost,
            cleared_by: owner().id,
        }
        .into(),
    );
    assert_eq!(budget.limit(BudgetKind::SessionTokens), Some(100));
    assert_eq!(budget.limit(BudgetKind::SessionCost), None);
    assert_eq!(budget.workspace_id(), WS);
}

fn threshold(workspace_id: &str) -> BudgetThresholdReached {
    BudgetThresholdReached {
        workspace_id: workspace_id.into(),
        budget: BudgetKind::SessionTokens,
        scope: format!("session:{SESSION}"),
        period: String::new(),
        percent: 80,
        limit: 1000,
        spent: 812,
    }
}

#[test]
fn the_runner_records_a_budget_warning_on_the_session() {
    History::started()
        .running(P1)
        .when(SessionCommand::RecordBudgetThreshold {
            actor: runner(),
            threshold: threshold(WS),
        })
        .then_expect_events(vec![threshold(WS).into()]);
}

#[test]
fn only_the_runner_records_a_budget_warning_and_only_for_the_session_s_workspace() {
    History::started()
        .when(SessionCommand::RecordBudgetThreshold {
            actor: owner(),
            threshold: threshold(WS),
        })
        .then_expect_error(DomainError::Forbidden);
    History::started()
        .when(SessionCommand::RecordBudgetThreshold {
            actor: runner(),
            threshold: threshold(OTHER_WS),
        })
        .then_expect_error(DomainError::NotFound);
}
