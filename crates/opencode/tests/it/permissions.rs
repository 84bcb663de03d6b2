//! The plan agent's refusal, and permission requests answered `once` and `reject` with a
//! message.

use std::collections::VecDeque;

use canopy_opencode::{
    Agent, PermissionAction, PermissionReply, PermissionRequest, ToolState, TurnEnd, run_turn,
};
use canopy_testkit::{Script, Step};
use serde_json::json;

use crate::support::{Harness, Setup, quick_policy};

fn ask_for_bash() -> Setup {
    Setup {
        bash: PermissionAction::Ask,
        ..Setup::default()
    }
}

#[tokio::test]
async fn the_plan_agent_refuses_an_edit_without_asking() {
    let script = Script::new()
        .then(Step::tool(
            "write",
            json!({ "filePath": "plan.txt", "content": "x\n" }),
        ))
        .then(Step::text("I may not edit in plan mode."));
    let h = Harness::start_with(script, ask_for_bash()).await.unwrap();
    let session = h.titled_session("plan").await.unwrap();
    let mut asked = Vec::new();
    let mut handler = |request: &PermissionRequest| {
        asked.push(request.clone());
        PermissionReply::Once
    };

    let outcome = run_turn(
        &h.client,
        &session.id,
        &h.prompt(Agent::Plan, "Write plan.txt."),
        &mut handler,
        &quick_policy(),
    )
    .await
    .unwrap();

    assert!(asked.is_empty(), "plan denies edits by rule: {asked:?}");
    assert_eq!(outcome.end, TurnEnd::Completed);
    let tools = outcome.tool_parts();
    assert_eq!(tools.len(), 1);
    let ToolState::Error { error, input, .. } = &tools[0].state else {
        panic!("the write was not refused: {:?}", tools[0].state)
    };
    assert_eq!(input["filePath"], "plan.txt");
    assert!(
        error.contains("prevents you from using this specific tool call"),
        "{error}"
    );
    assert!(!h.project().join("plan.txt").exists());
    assert!(
        outcome
            .assistant_messages()
            .all(|message| message.info.agent.as_deref() == Some("plan"))
    );
    // The refusal went back to the model as the tool's result, and the turn went on.
    let calls = h.model.scripted_requests();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].tool_results(), std::slice::from_ref(error));
    assert_eq!(outcome.final_text(), "I may not edit in plan mode.");
}

#[tokio::test]
async fn a_bash_permission_is_answered_once_then_rejected_with_a_message() {
    let h = Harness::start_with(Script::new(), ask_for_bash())
        .await
        .unwrap();
    let session = h.titled_session("permissions").await.unwrap();
    let feedback = "Do not write files; explain instead.";
    let mut replies = VecDeque::from([
        PermissionReply::Once,
        PermissionReply::reject_with(feedback),
    ]);
    let mut asked = Vec::new();
    let mut handler = |request: &PermissionRequest| {
        asked.push(request.clone());
        replies.pop_front().expect("only two permission requests")
    };

    // Once: the command runs.
    h.model.push([
        Step::tool(
            "bash",
            json!({ "command": "echo hi > once.txt", "description": "Write once.txt" }),
        ),
        Step::text("Ran it."),
    ]);
    let first = run_turn(
        &h.client,
        &session.id,
        &h.prompt(Agent::Build, "Write once.txt with bash."),
        &mut handler,
        &quick_policy(),
    )
    .await
    .unwrap();
    assert_eq!(first.end, TurnEnd::Completed);
    assert_eq!(first.permissions.len(), 1);
    let request = &first.permissions[0].request;
    assert_eq!(request.permission, "bash");
    assert_eq!(request.patterns, ["echo hi > once.txt"]);
    let tools = first.tool_parts();
    assert_eq!(tools.len(), 1);
    assert_eq!(request.tool.as_ref().unwrap().call_id, tools[0].call_id);
    assert!(
        matches!(tools[0].state, ToolState::Completed { .. }),
        "{:?}",
        tools[0].state
    );
    assert_eq!(
        std::fs::read_to_string(h.project().join("once.txt")).unwrap(),
        "hi\n"
    );
    assert_eq!(first.final_text(), "Ran it.");

    // Reject with a message: the command does not run, the model hears why, the turn goes on.
    h.model.push([
        Step::tool(
            "bash",
            json!({ "command": "echo no > rejected.txt", "description": "Write rejected.txt" }),
        ),
        Step::text("Understood, I will explain instead."),
    ]);
    let second = run_turn(
        &h.client,
        &session.id,
        &h.prompt(Agent::Build, "Write rejected.txt with bash."),
        &mut handler,
        &quick_policy(),
    )
    .await
    .unwrap();
    assert_eq!(second.end, TurnEnd::Completed);
    assert_eq!(second.permissions.len(), 1);
    assert_eq!(
        second.permissions[0].reply,
        PermissionReply::reject_with(feedback)
    );
    let tools = second.tool_parts();
    assert_eq!(tools.len(), 1, "only this turn's tool calls");
    let ToolState::Error { error, .. } = &tools[0].state else {
        panic!("the rejected command ran: {:?}", tools[0].state)
    };
    assert!(error.contains(feedback), "{error}");
    assert!(!h.project().join("rejected.txt").exists());
    assert_eq!(second.final_text(), "Understood, I will explain instead.");
    let last_call = h.model.scripted_requests().pop().unwrap();
    assert!(last_call.tool_results().last().unwrap().contains(feedback));

    assert_eq!(asked.len(), 2);
    assert!(replies.is_empty());
}
