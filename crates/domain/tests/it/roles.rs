//! The role table, cell by cell: every role against every command of every class, each set up so
//! that it would succeed if the role allowed it.

use canopy_domain::prelude::*;

use crate::support::*;

/// The expected table, written out independently of `Role`'s methods.
struct Row {
    role: Role,
    read: bool,
    prompt: bool,
    moderate: bool,
    audit: bool,
    /// Leaving a session: any person, whatever the role.
    leave: bool,
    runner: bool,
}

const TABLE: [Row; 6] = [
    row(Role::Owner, [true, true, true, true, true, false]),
    row(Role::Admin, [true, true, true, true, true, false]),
    row(Role::Member, [true, true, false, false, true, false]),
    row(Role::Viewer, [true, false, false, false, true, false]),
    row(Role::Auditor, [true, false, false, true, true, false]),
    row(Role::Runner, [false, false, false, false, false, true]),
];

const fn row(role: Role, cells: [bool; 6]) -> Row {
    let [read, prompt, moderate, audit, leave, runner] = cells;
    Row {
        role,
        read,
        prompt,
        moderate,
        audit,
        leave,
        runner,
    }
}

/// Builds the history and the command for one case, given the acting actor.
type Case = (&'static str, fn(&Actor) -> (History, SessionCommand));

fn prompt_cases() -> Vec<Case> {
    vec![
        ("start session", |a| {
            (History::none(), cmd::start_session(a))
        }),
        ("join", |a| (History::started(), cmd::join(a))),
        ("submit prompt", |a| {
            (History::started(), cmd::submit(a, P1, "hi"))
        }),
        ("cancel own queued prompt", |a| {
            (History::started().submitted(P1, a), cmd::cancel(a, P1))
        }),
        ("cancel own running prompt", |a| {
            let history = History::started().submitted(P1, a).prompt_started(P1);
            (history, cmd::cancel(a, P1))
        }),
        ("request checkpoint", |a| {
            (History::started(), cmd::request_checkpoint(a, None))
        }),
        ("complete session", |a| {
            (History::started(), cmd::complete_session(a))
        }),
    ]
}

fn moderate_cases() -> Vec<Case> {
    vec![
        ("approve plan", |a| {
            let history = History::started().running(P1).plan_proposed(PLAN1, P1);
            (history, cmd::approve(a, PLAN1))
        }),
        ("reject plan", |a| {
            let history = History::started().running(P1).plan_proposed(PLAN1, P1);
            (history, cmd::reject(a, PLAN1, "no"))
        }),
        ("grant tool approval", |a| {
            let history = History::started().running(P1).tool_requested(REQ1, P1);
            (history, cmd::grant(a, REQ1))
        }),
        ("deny tool approval", |a| {
            let history = History::started().running(P1).tool_requested(REQ1, P1);
            (history, cmd::deny(a, REQ1, None))
        }),
        ("cancel someone else's queued prompt", |a| {
            let history = History::started().submitted(P1, &other_member());
            (history, cmd::cancel(a, P1))
        }),
        ("cancel someone else's running prompt", |a| {
            let history = History::started()
                .submitted(P1, &other_member())
                .prompt_started(P1);
            (history, cmd::cancel(a, P1))
        }),
        ("request restore", |a| {
            (
                History::started().checkpoint(CP1),
                cmd::request_restore(a, CP1),
            )
        }),
        ("request push", |a| {
            (History::started(), cmd::request_push(a, None))
        }),
        ("archive", |a| (History::started(), cmd::archive(a))),
    ]
}

fn leave_cases() -> Vec<Case> {
    vec![("leave", |a| (History::started().joined(a), cmd::leave(a)))]
}

fn runner_cases() -> Vec<Case> {
    vec![
        ("start prompt", |a| {
            let history = History::started().submitted(P1, &member());
            (history, cmd::as_actor(cmd::start_prompt(P1), a))
        }),
        ("propose plan", |a| {
            let history = History::started().running(P1);
            (history, cmd::as_actor(cmd::propose(PLAN1, P1), a))
        }),
        ("request tool approval", |a| {
            let history = History::started().running(P1);
            (history, cmd::as_actor(cmd::request_tool(REQ1, P1), a))
        }),
        ("record tool execution", |a| {
            let history = History::started().running(P1);
            let command = cmd::tool(P1, "read", ToolPhase::Plan, ToolStatus::Completed);
            (history, cmd::as_actor(command, a))
        }),
        ("record agent message", |a| {
            let history = History::started().running(P1);
            (history, cmd::as_actor(cmd::message(P1, "hi"), a))
        }),
        ("record usage", |a| {
            let history = History::started().running(P1);
            (history, cmd::as_actor(cmd::usage(P1), a))
        }),
        ("record checkpoint", |a| {
            let command = cmd::record_checkpoint(CP1, None);
            (History::started(), cmd::as_actor(command, a))
        }),
        ("record restore", |a| {
            let history = History::started().checkpoint(CP1);
            (history, cmd::as_actor(cmd::record_restore(CP1), a))
        }),
        ("record branch pushed", |a| {
            let command = cmd::branch_pushed(BRANCH, "abc");
            (History::started(), cmd::as_actor(command, a))
        }),
        ("record sandbox started", |a| {
            let command = cmd::sandbox_started(SANDBOX);
            (History::started(), cmd::as_actor(command, a))
        }),
        ("record sandbox stopped", |a| {
            let history = History::started().sandbox(SANDBOX);
            (history, cmd::as_actor(cmd::sandbox_stopped(SANDBOX), a))
        }),
        ("complete prompt", |a| {
            let history = History::started().running(P1);
            (history, cmd::as_actor(cmd::complete_prompt(P1, None), a))
        }),
        ("fail prompt", |a| {
            let history = History::started().running(P1);
            (history, cmd::as_actor(cmd::fail_prompt(P1, "x"), a))
        }),
        ("fail session", |a| {
            let command = cmd::fail_session("x");
            (History::started(), cmd::as_actor(command, a))
        }),
    ]
}

/// Runs every case for every role and lists each cell that disagrees with `allowed`.
fn check(cases: Vec<Case>, allowed: fn(&Row) -> bool) {
    let mut wrong = Vec::new();
    for row in &TABLE {
        let actor = actor_for(row.role);
        for (name, case) in &cases {
            let (history, command) = case(&actor);
            let result = outcome(history, command);
            let expected_allowed = allowed(row);
            let ok = match &result {
                Ok(_) => expected_allowed,
                Err(DomainError::Forbidden) => !expected_allowed,
                Err(_) => false,
            };
            if !ok {
                let expected = if expected_allowed {
                    "allowed"
                } else {
                    "forbidden"
                };
                wrong.push(format!(
                    "{} / {name}: expected {expected}, got {result:?}",
                    row.role
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "role table mismatch:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn prompting_commands_follow_the_table() {
    check(prompt_cases(), |row| row.prompt);
}

#[test]
fn moderating_commands_follow_the_table() {
    check(moderate_cases(), |row| row.moderate);
}

#[test]
fn leaving_is_open_to_every_person() {
    check(leave_cases(), |row| row.leave);
}

#[test]
fn runner_commands_are_for_the_runner_only() {
    check(runner_cases(), |row| row.runner);
}

#[test]
fn role_methods_follow_the_table() {
    for row in &TABLE {
        let role = row.role;
        assert_eq!(role.can_read(), row.read, "{role} read");
        assert_eq!(role.can_prompt(), row.prompt, "{role} prompt");
        assert_eq!(role.can_moderate(), row.moderate, "{role} moderate");
        assert_eq!(role.can_audit(), row.audit, "{role} audit");
        assert_eq!(role.is_runner(), row.runner, "{role} runner");
        assert_eq!(role.allows(Permission::Read), row.read, "{role} read");
        assert_eq!(role.allows(Permission::Audit), row.audit, "{role} audit");
        assert_eq!(role.allows(Permission::Person), row.leave, "{role} person");
    }
    assert_eq!(TABLE.len(), Role::ALL.len());
}

#[test]
fn every_session_command_declares_a_permission_matching_its_class() {
    let actor = owner();
    let class_of = |cases: Vec<Case>, permission: Permission| {
        for (name, case) in cases {
            // Cancelling needs only Prompt up front; moderation is checked against the author.
            let permission = if name.starts_with("cancel") {
                Permission::Prompt
            } else {
                permission
            };
            assert_eq!(case(&actor).1.permission(), permission, "{name}");
        }
    };
    class_of(prompt_cases(), Permission::Prompt);
    class_of(moderate_cases(), Permission::Moderate);
    class_of(leave_cases(), Permission::Person);
    class_of(runner_cases(), Permission::Runner);
}

#[test]
fn a_runner_posing_with_a_workspace_is_still_only_a_runner() {
    let mut runner = runner();
    runner.workspace_id = Some(WS.into());
    History::started()
        .when(cmd::submit(&runner, P1, "hi"))
        .then_expect_error(DomainError::Forbidden);
}

#[test]
fn viewers_and_auditors_only_watch() {
    for watcher in [viewer(), auditor()] {
        History::started()
            .when(cmd::submit(&watcher, P1, "hi"))
            .then_expect_error(DomainError::Forbidden);
        History::started()
            .when(cmd::join(&watcher))
            .then_expect_error(DomainError::Forbidden);
    }
}
