//! Aborting a running turn from outside the driver.

use std::time::Duration;

use canopy_opencode::{
    Agent, Event, Part, PermissionReply, PermissionRequest, ToolState, TurnEnd, TurnHandler,
    run_turn,
};
use canopy_testkit::{Script, Step};
use serde_json::json;
use tokio::sync::mpsc;

use crate::support::{Harness, quick_policy};

/// Reports when a bash command starts running.
struct BashStarted(mpsc::UnboundedSender<()>);

impl TurnHandler for BashStarted {
    async fn on_permission(&mut self, request: &PermissionRequest) -> PermissionReply {
        panic!("bash is allowed, nothing should ask: {request:?}")
    }

    fn on_event(&mut self, event: &Event) {
        if let Event::MessagePartUpdated {
            part: Part::Tool(tool),
            ..
        } = event
            && tool.tool == "bash"
            && matches!(tool.state, ToolState::Running { .. })
        {
            let _ = self.0.send(());
        }
    }
}

#[tokio::test]
async fn abort_stops_a_running_turn_and_the_session_stays_usable() {
    let script = Script::new()
        .then(Step::tool(
            "bash",
            json!({ "command": "sleep 30 && echo late > late.txt", "description": "Take long" }),
        ))
        .then(Step::text("After the abort."));
    let h = Harness::start(script).await.unwrap();
    let session = h.titled_session("abort").await.unwrap();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let mut policy = quick_policy();
    // The sleeping command sends nothing; only the abort may end this turn.
    policy.inactivity_timeout = Duration::from_secs(60);

    let turn = {
        let client = h.client.clone();
        let session_id = session.id.clone();
        let prompt = h.prompt(Agent::Build, "Run the long command.");
        let policy = policy.clone();
        tokio::spawn(async move {
            let mut handler = BashStarted(started_tx);
            run_turn(&client, &session_id, &prompt, &mut handler, &policy).await
        })
    };
    tokio::time::timeout(Duration::from_secs(30), started.recv())
        .await
        .expect("bash started")
        .expect("the turn is still running");
    assert!(h.client.abort(&session.id).await.unwrap());

    let outcome = tokio::time::timeout(Duration::from_secs(15), turn)
        .await
        .expect("the aborted turn ends")
        .unwrap()
        .unwrap();
    assert_eq!(outcome.end, TurnEnd::Aborted);
    assert!(
        outcome.elapsed < Duration::from_secs(20),
        "{:?}",
        outcome.elapsed
    );
    let tools = outcome.tool_parts();
    assert_eq!(tools.len(), 1);
    // OpenCode closes the interrupted command as completed, with no exit code and a note.
    let ToolState::Completed {
        output, metadata, ..
    } = &tools[0].state
    else {
        panic!("the command was not closed: {:?}", tools[0].state)
    };
    assert!(output.contains("User aborted the command"), "{output}");
    assert!(metadata.as_ref().unwrap()["exit"].is_null());
    assert!(!h.project().join("late.txt").exists());
    assert!(
        !h.client
            .session_statuses()
            .await
            .unwrap()
            .contains_key(&session.id)
    );

    // The same session takes the next prompt.
    let mut handler = |_: &PermissionRequest| PermissionReply::Once;
    let next = run_turn(
        &h.client,
        &session.id,
        &h.prompt(Agent::Build, "Are you there?"),
        &mut handler,
        &quick_policy(),
    )
    .await
    .unwrap();
    assert_eq!(next.end, TurnEnd::Completed);
    assert_eq!(next.final_text(), "After the abort.");
    assert!(next.tool_parts().is_empty());
}
