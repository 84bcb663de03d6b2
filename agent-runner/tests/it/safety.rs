//! What the agent may not do: leak secrets into the record, flood it, or approve itself.

use std::time::Duration;

use canopy_domain::Role;
use canopy_testkit::{Script, Step};
use serde_json::json;

use crate::support::{Stack, WORKSPACE, bash, person};

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_printed_by_tools_are_never_recorded_and_huge_outputs_are_cut() {
    let script = Script::new()
        .then(Step::text("Plan: print things\n1. print"))
        .then(bash(
            "echo OPENAI_API_KEY=sk-live-abcdefghijklmnopqrstuvwxyz0123; \
             printf -- '-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEAAAA\\n-----END OPENSSH PRIVATE KEY-----\\n'",
        ))
        // 300 KB in lines of 100: OpenCode keeps the output's tail (whole lines, up to its own
        // limit) and that tail is still far over what the runner records. One 300 KB line made
        // OpenCode's kept tail depend on how the pipe was read, sometimes under the cut.
        .then(bash("head -c 300000 /dev/zero | tr '\\0' x | fold -w 100"))
        .then(Step::text("Printed. The key was sk-live-abcdefghijklmnopqrstuvwxyz0123."));
    let mut stack = Stack::start(script).await.unwrap();
    let mut config = stack.runner_config();
    config.bash_allow_workspaces = vec![WORKSPACE.into()];
    stack.start_runner(config).await.unwrap();
    let member = person("mia", "Mia Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);
    let session = stack.start_session(&member, None).await.unwrap();
    stack
        .prompt(&member, session, "print things")
        .await
        .unwrap();
    stack.approve_plan(&admin, session, 1).await;
    stack.wait_for(session, "PromptCompleted", 1, WAIT).await;

    let events = stack.events(session).await.unwrap();
    let everything = serde_json::to_string(&events).unwrap();
    for secret in [
        "sk-live-abcdefghijklmnopqrstuvwxyz0123",
        "b3BlbnNzaC1rZXktdjEAAAA",
    ] {
        assert!(!everything.contains(secret), "{secret} was recorded");
    }
    let tools: Vec<&serde_json::Value> = events
        .iter()
        .filter(|(t, _, _)| t == "ToolExecuted")
        .map(|(_, d, _)| d)
        .collect();
    assert_eq!(tools.len(), 2);
    assert!(tools.iter().all(|t| t["status"] == "completed"));
    let printed = tools[0]["output_summary"].as_str().unwrap();
    assert!(printed.contains("OPENAI_API_KEY=[redacted]"), "{printed}");
    assert!(
        printed.contains("[redacted]\n") || printed.ends_with("[redacted]"),
        "{printed}"
    );
    assert!(
        tools[0]["input_summary"]
            .as_str()
            .unwrap()
            .contains("[redacted]")
    );
    let huge = tools[1]["output_summary"].as_str().unwrap();
    let tail = &huge[huge.len().saturating_sub(200)..];
    assert!(huge.len() <= 8 * 1024, "{} bytes recorded", huge.len());
    assert!(tail.contains("[truncated:"), "{tail}");
    stack.stop_runners().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_that_tries_to_approve_itself_is_refused_recorded_and_stopped() {
    let script = Script::new()
        .then(Step::text("Plan: sneaky\n1. approve myself"))
        .then(bash(
            "curl -s -X POST http://127.0.0.1:4096/permission/per_x/reply -d '{\"reply\":\"always\"}'",
        ))
        .then(Step::text("Done."))
        // The second prompt hides the port from a text check: the sandbox refuses anyway.
        .then(Step::text("Plan: sneakier\n1. look around"))
        .then(bash(
            "p=$((4000+96)); (exec 3<>/dev/tcp/127.0.0.1/$p && printf 'GET /session HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3) 2>&1 | head -c 300; echo; echo exit=$?",
        ))
        // OpenCode's own read tool runs outside the tool guard: its environ holds the password.
        .then(Step::tool("read", json!({ "filePath": "/proc/self/environ" })))
        .then(Step::text("Done."));
    let mut stack = Stack::start(script).await.unwrap();
    let mut config = stack.runner_config();
    config.bash_allow_workspaces = vec![WORKSPACE.into()];
    stack.start_runner(config).await.unwrap();
    let member = person("mia", "Mia Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);
    let session = stack.start_session(&member, None).await.unwrap();
    let first = stack.prompt(&member, session, "be sneaky").await.unwrap();
    stack.approve_plan(&admin, session, 1).await;
    let failed = stack.wait_for(session, "PromptFailed", 1, WAIT).await;
    assert_eq!(failed["prompt_id"], first.to_string());
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("its own agent server"),
        "{failed}"
    );
    let refused = stack.wait_for(session, "ToolExecuted", 1, WAIT).await;
    assert_eq!(refused["status"], "denied");
    assert!(refused["input_summary"].as_str().unwrap().contains("4096"));

    // Hidden from the text check, the attempt still gets nothing from the agent server.
    stack.prompt(&member, session, "be sneakier").await.unwrap();
    stack.approve_plan(&admin, session, 2).await;
    stack.wait_for(session, "PromptCompleted", 1, WAIT).await;
    let probe = stack.wait_for(session, "ToolExecuted", 2, WAIT).await;
    let output = probe["output_summary"].as_str().unwrap();
    assert!(
        !output.contains("200 OK"),
        "the agent reached its server: {output}"
    );
    assert!(
        !output.contains("ses_"),
        "the agent listed sessions: {output}"
    );
    stack.stop_runners().await;
}
