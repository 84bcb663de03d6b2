//! A tool-using turn, followed through the client's typed events and the turn driver.

use canopy_opencode::{
    Agent, CreateSession, Event, Part, PermissionReply, PermissionRequest, ToolState, TurnEnd,
    TurnHandler, run_turn,
};
use canopy_testkit::{Answer, Script, Step};
use serde_json::json;

use crate::support::{Harness, quick_policy};

/// Records the tool part states the event stream shows, in order.
#[derive(Default)]
struct Recorder {
    states: Vec<(String, &'static str)>,
}

impl TurnHandler for Recorder {
    async fn on_permission(&mut self, request: &PermissionRequest) -> PermissionReply {
        panic!("bash is allowed, nothing should ask: {request:?}")
    }

    fn on_event(&mut self, event: &Event) {
        if let Event::MessagePartUpdated {
            part: Part::Tool(tool),
            ..
        } = event
        {
            let state = match tool.state {
                ToolState::Pending { .. } => "pending",
                ToolState::Running { .. } => "running",
                ToolState::Completed { .. } => "completed",
                ToolState::Error { .. } => "error",
                ToolState::Unknown => "unknown",
            };
            if self.states.last() != Some(&(tool.tool.clone(), state)) {
                self.states.push((tool.tool.clone(), state));
            }
        }
    }
}

#[tokio::test]
async fn write_then_bash_yields_the_tool_parts_in_order_and_the_file() {
    let content = "hello from the scripted model\n";
    let script = Script::new()
        .then(Step::tool(
            "write",
            json!({ "filePath": "hello.txt", "content": content }),
        ))
        .then(Step::tool(
            "bash",
            json!({ "command": "cat hello.txt", "description": "Show the file" }),
        ))
        .then(Step::text("Done: wrote and read hello.txt."));
    let h = Harness::start(script).await.unwrap();
    // No title: OpenCode asks the small model for one, which the script answers by rule.
    let session = h
        .client
        .create_session(&CreateSession::default())
        .await
        .unwrap();
    let prompt = h
        .prompt(Agent::Build, "Create hello.txt and show it.")
        .with_system("CANOPY-SYSTEM: you work for job J-1.");
    let mut recorder = Recorder::default();

    let outcome = run_turn(
        &h.client,
        &session.id,
        &prompt,
        &mut recorder,
        &quick_policy(),
    )
    .await
    .unwrap();

    assert_eq!(outcome.end, TurnEnd::Completed);
    let tools = outcome.tool_parts();
    let names: Vec<&str> = tools.iter().map(|tool| tool.tool.as_str()).collect();
    assert_eq!(names, ["write", "bash"]);
    let ToolState::Completed { input, .. } = &tools[0].state else {
        panic!("write did not complete: {:?}", tools[0].state)
    };
    assert_eq!(
        input,
        &json!({ "filePath": "hello.txt", "content": content })
    );
    let ToolState::Completed { input, output, .. } = &tools[1].state else {
        panic!("bash did not complete: {:?}", tools[1].state)
    };
    assert_eq!(input["command"], "cat hello.txt");
    // bash ran after write: it printed what write wrote.
    assert_eq!(output, content);
    assert_eq!(outcome.final_text(), "Done: wrote and read hello.txt.");
    assert_eq!(
        std::fs::read_to_string(h.project().join("hello.txt")).unwrap(),
        content
    );

    // The live events showed each tool go through its states, write finishing before bash ran.
    let position = |tool: &str, state: &str| {
        recorder
            .states
            .iter()
            .position(|(t, s)| t == tool && *s == state)
            .unwrap_or_else(|| panic!("no {tool} {state} event in {:?}", recorder.states))
    };
    assert!(position("write", "running") < position("write", "completed"));
    assert!(position("write", "completed") < position("bash", "running"));
    assert!(position("bash", "running") < position("bash", "completed"));

    // What the model saw: our model and system text on every call, each tool's result on the
    // next, and no request left unscripted (the title request did not eat a step).
    let calls = h.model.scripted_requests();
    assert_eq!(calls.len(), 3);
    for call in &calls {
        assert_eq!(call.body["model"], "scripted");
        assert!(
            call.system_text()
                .ends_with("CANOPY-SYSTEM: you work for job J-1.")
        );
        assert_eq!(call.header("x-session-id"), Some(session.id.as_str()));
    }
    assert_eq!(calls[1].tool_results().len(), 1);
    assert_eq!(
        calls[2].tool_results().last().map(String::as_str),
        Some(content)
    );
    assert_eq!(h.model.steps_left(), 0);
    for request in h.model.requests() {
        assert_ne!(request.answer, Answer::Unscripted);
        if request.answer == Answer::Rule("title".into()) {
            assert!(request.tool_names().is_empty());
        }
    }
}
