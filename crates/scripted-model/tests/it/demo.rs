//! `demo_script()` plays a whole agent loop for OpenCode: it plans in plan mode, and in build
//! mode writes its file, runs bash (asking permission) and finishes.

use std::time::Duration;

use canopy_opencode::{
    Agent, CreateSession, OpenCodeConfig, OpenCodeServer, PermissionAction, PermissionReply,
    PermissionRequest, Prompt, ProviderConfig, ServerConfig, ToolState, TurnEnd, TurnPolicy,
    run_turn,
};
use canopy_scripted_model::{
    Answer, DEMO_DONE, DEMO_FILE, ModelServer, SCRIPTED_MODEL_ID, demo_script,
};

fn policy() -> TurnPolicy {
    TurnPolicy {
        inactivity_timeout: Duration::from_secs(20),
        turn_timeout: Duration::from_secs(90),
        max_model_retries: 0,
        max_truncated_steps: 2,
        max_steps: 10,
        abort_timeout: Duration::from_secs(10),
    }
}

#[tokio::test]
async fn opencode_plans_then_writes_runs_bash_and_finishes_with_the_demo_model() {
    let model = ModelServer::start(demo_script()).await.unwrap();
    let dir = tempfile::Builder::new()
        .prefix("canopy-scripted-model-test-")
        .tempdir()
        .unwrap();
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    // OpenCode snapshots each step with git, as in a real checkout.
    let init = std::process::Command::new("git")
        .args(["init", "-q"])
        .current_dir(&project)
        .status()
        .unwrap();
    assert!(init.success());
    let provider = ProviderConfig {
        provider_id: "demo".to_owned(),
        base_url: model.base_url(),
        api_key: "demo-key".to_owned(),
        model_id: SCRIPTED_MODEL_ID.to_owned(),
    };
    let config = OpenCodeConfig::new(provider.clone()).permission("bash", PermissionAction::Ask);
    let server = OpenCodeServer::start(ServerConfig::new(
        dir.path().join("state"),
        &project,
        config.to_json(),
    ))
    .await
    .unwrap();
    let client = server.client().unwrap();
    // No title: OpenCode asks the small model for one, which the demo answers by rule.
    let session = client
        .create_session(&CreateSession::default())
        .await
        .unwrap();
    let request = "Add a friendly greeting to the README so that new contributors feel welcome";
    let mut asked: Vec<PermissionRequest> = Vec::new();

    // Plan mode: a plan as text, nothing written.
    let planned = run_turn(
        &client,
        &session.id,
        &Prompt::text(Agent::Plan, provider.model(), request),
        &mut |permission: &PermissionRequest| {
            asked.push(permission.clone());
            PermissionReply::Once
        },
        &policy(),
    )
    .await
    .unwrap();
    assert_eq!(planned.end, TurnEnd::Completed);
    let plan = planned.final_text();
    assert!(plan.starts_with("Plan: "), "{plan}");
    let first_60: String = request.chars().take(60).collect();
    assert!(plan.lines().next().unwrap().contains(&first_60), "{plan}");
    assert!(plan.lines().any(|line| line.starts_with("1. ")), "{plan}");
    assert!(planned.tool_parts().is_empty());
    assert!(asked.is_empty(), "{asked:?}");
    assert!(!project.join(DEMO_FILE).exists());

    // Build mode: write the file, run bash (asked, allowed once), finish.
    let built = run_turn(
        &client,
        &session.id,
        &Prompt::text(Agent::Build, provider.model(), "Go ahead"),
        &mut |permission: &PermissionRequest| {
            asked.push(permission.clone());
            PermissionReply::Once
        },
        &policy(),
    )
    .await
    .unwrap();
    assert_eq!(built.end, TurnEnd::Completed);
    let tools = built.tool_parts();
    let names: Vec<&str> = tools.iter().map(|tool| tool.tool.as_str()).collect();
    assert_eq!(names, ["write", "bash"]);
    for tool in &tools {
        assert!(
            matches!(tool.state, ToolState::Completed { .. }),
            "{:?}",
            tool.state
        );
    }
    let ToolState::Completed { output, .. } = &tools[1].state else {
        unreachable!()
    };
    assert!(
        output.contains(DEMO_FILE),
        "ls -la lists the file: {output}"
    );
    let note = std::fs::read_to_string(project.join(DEMO_FILE)).unwrap();
    assert!(note.contains("Go ahead"), "{note}");
    assert_eq!(built.final_text(), DEMO_DONE);
    let asked: Vec<&str> = asked.iter().map(|p| p.permission.as_str()).collect();
    assert_eq!(asked, ["bash"]);

    // Every chat request was answered by a rule of the demo, none by its fallback.
    let answers: Vec<Answer> = model
        .requests()
        .into_iter()
        .filter(|request| request.answer != Answer::NotChat)
        .map(|request| request.answer)
        .collect();
    for rule in ["title", "plan", "write", "bash", "done"] {
        assert!(answers.contains(&Answer::Rule(rule.into())), "{answers:?}");
    }
    assert!(
        answers
            .iter()
            .all(|answer| matches!(answer, Answer::Rule(_))),
        "{answers:?}"
    );

    server.stop().await.unwrap();
    model.shutdown().await;
}
