//! The role table, cell by cell: every role against every kind of command, through HTTP.
//! A refused cell is 403 `forbidden` and writes nothing.

use canopy_domain::Role;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{TestApp, runner, token};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    StartSession,
    JoinSession,
    SubmitPrompt,
    CancelOwnPrompt,
    RequestCheckpoint,
    CompleteSession,
    CreateFeature,
    ApprovePlan,
    RejectPlan,
    GrantToolApproval,
    DenyToolApproval,
    CancelAnyPrompt,
    RequestRestore,
    RequestPush,
    ArchiveSession,
    CompleteFeature,
    RunnerReport,
}

const CASES: [Case; 17] = [
    Case::StartSession,
    Case::JoinSession,
    Case::SubmitPrompt,
    Case::CancelOwnPrompt,
    Case::RequestCheckpoint,
    Case::CompleteSession,
    Case::CreateFeature,
    Case::ApprovePlan,
    Case::RejectPlan,
    Case::GrantToolApproval,
    Case::DenyToolApproval,
    Case::CancelAnyPrompt,
    Case::RequestRestore,
    Case::RequestPush,
    Case::ArchiveSession,
    Case::CompleteFeature,
    Case::RunnerReport,
];

/// The role table from "Workspace, domain model and event schemas".
fn allowed(role: Role, case: Case) -> bool {
    use Case::*;
    let prompt_tier = matches!(
        case,
        StartSession
            | JoinSession
            | SubmitPrompt
            | CancelOwnPrompt
            | RequestCheckpoint
            | CompleteSession
            | CreateFeature
    );
    let moderate_tier = matches!(
        case,
        ApprovePlan
            | RejectPlan
            | GrantToolApproval
            | DenyToolApproval
            | CancelAnyPrompt
            | RequestRestore
            | RequestPush
            | ArchiveSession
            | CompleteFeature
    );
    match role {
        Role::Owner | Role::Admin => prompt_tier || moderate_tier,
        Role::Member => prompt_tier,
        Role::Viewer | Role::Auditor => false,
        Role::Runner => case == RunnerReport,
    }
}

/// Sets up what the case needs (as other people) and returns the request to send.
async fn prepare(app: &TestApp, case: Case, tester: &str) -> (String, Value) {
    let owner = token(Role::Owner, "owner");
    let session = || app.start_session(&owner);
    match case {
        Case::StartSession => (
            "/sessions".into(),
            json!({"title": "t", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}),
        ),
        Case::JoinSession => (format!("/sessions/{}/join", session().await), json!({})),
        Case::SubmitPrompt => (
            format!("/sessions/{}/prompts", session().await),
            json!({"text": "hi"}),
        ),
        Case::CancelOwnPrompt | Case::CancelAnyPrompt => {
            let s = session().await;
            let author = if case == Case::CancelOwnPrompt {
                tester
            } else {
                "someone-else"
            };
            let prompt = app.submit_prompt(&token(Role::Member, author), s).await;
            (format!("/sessions/{s}/prompts/{prompt}/cancel"), json!({}))
        }
        Case::RequestCheckpoint => (
            format!("/sessions/{}/checkpoints", session().await),
            json!({}),
        ),
        Case::CompleteSession => (format!("/sessions/{}/complete", session().await), json!({})),
        Case::CreateFeature => ("/features".into(), json!({"title": "F"})),
        Case::ApprovePlan | Case::RejectPlan => {
            let (s, _, plan) = app
                .with_pending_plan(&token(Role::Member, "someone-else"))
                .await;
            if case == Case::ApprovePlan {
                (format!("/sessions/{s}/plans/{plan}/approve"), json!({}))
            } else {
                (
                    format!("/sessions/{s}/plans/{plan}/reject"),
                    json!({"comment": "no"}),
                )
            }
        }
        Case::GrantToolApproval | Case::DenyToolApproval => {
            let (s, _, request) = app.with_open_tool_request().await;
            let verb = if case == Case::GrantToolApproval {
                "grant"
            } else {
                "deny"
            };
            (
                format!("/sessions/{s}/tool-approvals/{request}/{verb}"),
                json!({}),
            )
        }
        Case::RequestRestore => {
            let (s, checkpoint) = app.with_checkpoint().await;
            (
                format!("/sessions/{s}/restores"),
                json!({"checkpoint_id": checkpoint}),
            )
        }
        Case::RequestPush => (format!("/sessions/{}/pushes", session().await), json!({})),
        Case::ArchiveSession => (format!("/sessions/{}/archive", session().await), json!({})),
        Case::CompleteFeature => {
            let feature = app
                .post(&owner, "/features", json!({"title": "F"}))
                .await
                .expect(201)
                .id();
            (format!("/features/{feature}/complete"), json!({}))
        }
        Case::RunnerReport => (
            format!("/runner/sessions/{}/sandbox/started", session().await),
            json!({"sandbox_id": "sb", "opencode_session_id": "ses_1"}),
        ),
    }
}

#[tokio::test]
async fn the_role_table_holds_cell_by_cell() {
    let app = TestApp::start().await;
    let mut wrong = Vec::new();
    for role in Role::ALL {
        for case in CASES {
            let tester = format!("tester-{}", role.as_str());
            let (path, body) = prepare(&app, case, &tester).await;
            let caller = match role {
                Role::Runner => runner(),
                _ => token(role, &tester),
            };
            let before = app.event_count().await;
            let key = Uuid::new_v4().to_string();
            let answer = app
                .send(&caller, &path, Some(body), &[("idempotency-key", &key)])
                .await;
            let written = app.event_count().await - before;
            let expected = allowed(role, case);
            let ok = if expected {
                answer.status.is_success() && written > 0
            } else {
                answer.status.as_u16() == 403 && answer.code() == "forbidden" && written == 0
            };
            if !ok {
                wrong.push(format!(
                    "{role:?} {case:?}: expected {}, got {} {} ({written} events)",
                    if expected { "allowed" } else { "403" },
                    answer.status,
                    answer.code()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "role table violated:\n{}",
        wrong.join("\n")
    );
}
