//! The core loop through the public APIs: prompt, plan, approval, tools, checkpoint, completion.

use std::time::Duration;

use canopy_domain::Role;
use canopy_testkit::{Script, Step};
use serde_json::{Value, json};

use crate::support::{Stack, bash, git, person, write};

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prompt_is_planned_approved_built_checkpointed_and_completed() {
    let mut stack = Stack::start(canopy_scripted_model::demo_script())
        .await
        .unwrap();
    stack.start_runner(stack.runner_config()).await.unwrap();
    let member = person("mia", "Mia Member", Role::Member, Some("mia@example.com"));
    let admin = person("ada", "Ada Admin", Role::Admin, None);

    let session = stack.start_session(&member, None).await.unwrap();
    let watcher = stack.watch(&member, session, "PromptCompleted");
    let prompt = stack
        .prompt(&member, session, "Add a note about the release")
        .await
        .unwrap();

    let plan = stack.wait_for(session, "PlanProposed", 1, WAIT).await;
    assert_eq!(plan["prompt_id"], prompt.to_string());
    assert!(
        plan["summary"].as_str().unwrap().contains("Add a note"),
        "{plan}"
    );
    assert!(!plan["steps"].as_array().unwrap().is_empty(), "{plan}");
    let plan_id = plan["plan_id"].as_str().unwrap();

    // A member may not approve; an admin may.
    let (status, code) = stack
        .refused(
            &member,
            &format!("/sessions/{session}/plans/{plan_id}/approve"),
            json!({}),
        )
        .await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    stack
        .post(
            &admin,
            &format!("/sessions/{session}/plans/{plan_id}/approve"),
            json!({}),
        )
        .await
        .unwrap();

    // The bash call asks (the default policy): an admin grants it.
    let ask = stack
        .wait_for(session, "ToolApprovalRequested", 1, WAIT)
        .await;
    assert_eq!(ask["tool"], "bash");
    assert!(
        ask["input_summary"].as_str().unwrap().contains("ls -la"),
        "{ask}"
    );
    let request = ask["request_id"].as_str().unwrap();
    stack
        .post(
            &admin,
            &format!("/sessions/{session}/tool-approvals/{request}/grant"),
            json!({}),
        )
        .await
        .unwrap();

    stack.wait_for(session, "PromptCompleted", 1, WAIT).await;
    let events = stack.events(session).await.unwrap();
    let types: Vec<&str> = events.iter().map(|(t, _, _)| t.as_str()).collect();
    let position = |t: &str| {
        types
            .iter()
            .position(|x| *x == t)
            .unwrap_or_else(|| panic!("no {t} in {types:?}"))
    };
    let tools: Vec<&Value> = events
        .iter()
        .filter(|(t, _, _)| t == "ToolExecuted")
        .map(|(_, data, _)| data)
        .collect();
    let names: Vec<&str> = tools.iter().map(|t| t["tool"].as_str().unwrap()).collect();
    assert_eq!(names, ["write", "bash"], "{types:?}");
    assert!(
        tools
            .iter()
            .all(|t| t["status"] == "completed" && t["phase"] == "build")
    );
    assert!(
        tools[1]["output_summary"]
            .as_str()
            .unwrap()
            .contains("canopy-demo.txt")
    );
    assert!(position("PromptStarted") < position("PlanProposed"));
    assert!(position("PlanApproved") < position("ToolExecuted"));
    assert!(position("ToolExecuted") < position("CheckpointTaken"));
    assert!(position("CheckpointTaken") < position("PromptCompleted"));
    assert!(types.contains(&"SandboxStarted"));
    assert!(types.contains(&"UsageRecorded"));
    assert!(types.contains(&"AgentMessageRecorded"));
    // Nothing recorded twice: every runner event carries its own idempotency key.
    let mut keys: Vec<&str> = events
        .iter()
        .filter_map(|(_, _, m)| m["idempotency_key"].as_str())
        .collect();
    let all = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), all);

    // The checkpoint is a real commit with the file, authored as the prompting member.
    let checkpoint = &events[position("CheckpointTaken")].1;
    let sha = checkpoint["commit_sha"].as_str().unwrap();
    assert_eq!(checkpoint["files_changed"], json!(["canopy-demo.txt"]));
    let workspace = stack.workspace_of(session);
    let author = git(&workspace, &["log", "-1", "--format=%an <%ae>", sha]).unwrap();
    assert_eq!(author, "Mia Member <mia@example.com>");
    let content = git(&workspace, &["show", &format!("{sha}:canopy-demo.txt")]).unwrap();
    assert!(
        content.contains("Add a note about the release"),
        "{content}"
    );

    // An SSE watcher saw the same story in the same order.
    let seen = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let order = [
        "PromptSubmitted",
        "PlanProposed",
        "PlanApproved",
        "ToolExecuted",
        "CheckpointTaken",
        "PromptCompleted",
    ];
    let mut at = 0;
    for t in &seen {
        if at < order.len() && t == order[at] {
            at += 1;
        }
    }
    assert_eq!(at, order.len(), "the stream showed {seen:?}");
    stack.stop_runners().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejection_comment_brings_a_revised_plan_and_feature_learnings_reach_the_model() {
    let script = Script::new()
        .then(Step::text("Plan: first idea\n1. do the first thing"))
        .then(Step::text("Plan: second idea\n1. do the second thing"))
        .then(write("second.txt", "second\n"))
        .then(Step::text("Done."));
    let mut stack = Stack::start(script).await.unwrap();
    let mut config = stack.runner_config();
    config.sandbox_idle_timeout = Duration::from_secs(2);
    stack.start_runner(config).await.unwrap();
    let member = person("mia", "Mia Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);

    let feature = stack
        .post(
            &member,
            "/features",
            json!({ "title": "Release notes", "description": "" }),
        )
        .await
        .unwrap()["aggregate_id"]
        .as_str()
        .unwrap()
        .to_owned();
    stack
        .post(
            &member,
            &format!("/features/{feature}/learnings"),
            json!({ "text": "The changelog lives in docs/CHANGES.md" }),
        )
        .await
        .unwrap();
    let session = stack
        .start_session(&member, Some(feature.parse().unwrap()))
        .await
        .unwrap();
    stack
        .prompt(&member, session, "Write the notes")
        .await
        .unwrap();

    let first = stack.wait_for(session, "PlanProposed", 1, WAIT).await;
    assert_eq!(first["summary"], "first idea");
    let plan = first["plan_id"].as_str().unwrap();
    stack
        .post(
            &admin,
            &format!("/sessions/{session}/plans/{plan}/reject"),
            json!({ "comment": "prefer the second idea" }),
        )
        .await
        .unwrap();
    let second = stack.wait_for(session, "PlanProposed", 2, WAIT).await;
    assert_eq!(second["summary"], "second idea");
    let plan = second["plan_id"].as_str().unwrap();
    stack
        .post(
            &admin,
            &format!("/sessions/{session}/plans/{plan}/approve"),
            json!({}),
        )
        .await
        .unwrap();
    stack.wait_for(session, "PromptCompleted", 1, WAIT).await;

    let requests = stack.model.scripted_requests();
    // Every request carries the feature's learning in its system text.
    assert!(
        requests
            .iter()
            .all(|r| r.system_text().contains("docs/CHANGES.md"))
    );
    assert!(requests[0].system_text().contains("Mia Member (member)"));
    // The revision request names the rejection and its comment.
    assert!(
        requests[1]
            .last_user_request()
            .contains("prefer the second idea"),
        "{}",
        requests[1].last_user_request()
    );
    assert!(requests[1].is_plan_request());
    // The build request carries the approved plan.
    assert!(requests[2].last_user_request().contains("second idea"));
    assert!(!requests[2].is_plan_request());
    // With nothing left to do the sandbox idles out, and that is recorded.
    let stopped = stack.wait_for(session, "SandboxStopped", 1, WAIT).await;
    assert_eq!(stopped["reason"], "idle");
    stack.stop_runners().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_last_round_a_prompt_ends_and_the_next_members_prompt_runs() {
    let script = Script::new()
        .then(Step::text("Plan: one\n1. a"))
        .then(Step::text("Plan: two\n1. b"))
        .then(Step::text("Plan: for the second prompt\n1. c"));
    let mut stack = Stack::start(script).await.unwrap();
    let mut config = stack.runner_config();
    config.max_plan_rounds = 2;
    stack.start_runner(config).await.unwrap();
    let mia = person("mia", "Mia Member", Role::Member, None);
    let max = person("max", "Max Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);
    let session = stack.start_session(&mia, None).await.unwrap();
    let first = stack.prompt(&mia, session, "first").await.unwrap();
    let second = stack.prompt(&max, session, "second").await.unwrap();

    for round in 1..=2 {
        let plan = stack.wait_for(session, "PlanProposed", round, WAIT).await;
        assert_eq!(plan["prompt_id"], first.to_string());
        let id = plan["plan_id"].as_str().unwrap();
        stack
            .post(
                &admin,
                &format!("/sessions/{session}/plans/{id}/reject"),
                json!({ "comment": format!("no {round}") }),
            )
            .await
            .unwrap();
    }
    let failed = stack.wait_for(session, "PromptFailed", 1, WAIT).await;
    assert_eq!(failed["prompt_id"], first.to_string());
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("rejected 2 times"),
        "{failed}"
    );
    // The queue goes on with the second member's prompt.
    let started = stack.wait_for(session, "PromptStarted", 2, WAIT).await;
    assert_eq!(started["prompt_id"], second.to_string());
    let plan = stack.wait_for(session, "PlanProposed", 3, WAIT).await;
    assert_eq!(plan["prompt_id"], second.to_string());
    stack.stop_runners().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tool_ask_is_granted_and_one_denied_with_a_comment_the_model_reads() {
    let script = Script::new()
        .then(Step::text("Plan: two commands\n1. one\n2. two"))
        .then(bash("echo one > one.txt"))
        .then(bash("rm -rf docs"))
        .then(Step::text("Done."));
    let mut stack = Stack::start(script).await.unwrap();
    stack.start_runner(stack.runner_config()).await.unwrap();
    let member = person("mia", "Mia Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);
    let session = stack.start_session(&member, None).await.unwrap();
    stack
        .prompt(&member, session, "two commands")
        .await
        .unwrap();
    stack.approve_plan(&admin, session, 1).await;

    let ask = stack
        .wait_for(session, "ToolApprovalRequested", 1, WAIT)
        .await;
    assert!(ask["input_summary"].as_str().unwrap().contains("echo one"));
    let request = ask["request_id"].as_str().unwrap();
    // A member may not answer; an admin may.
    let (status, _) = stack
        .refused(
            &member,
            &format!("/sessions/{session}/tool-approvals/{request}/grant"),
            json!({}),
        )
        .await;
    assert_eq!(status, 403);
    stack
        .post(
            &admin,
            &format!("/sessions/{session}/tool-approvals/{request}/grant"),
            json!({}),
        )
        .await
        .unwrap();
    let ask = stack
        .wait_for(session, "ToolApprovalRequested", 2, WAIT)
        .await;
    assert!(
        ask["input_summary"]
            .as_str()
            .unwrap()
            .contains("rm -rf docs")
    );
    let request = ask["request_id"].as_str().unwrap();
    stack
        .post(
            &admin,
            &format!("/sessions/{session}/tool-approvals/{request}/deny"),
            json!({ "comment": "keep the docs" }),
        )
        .await
        .unwrap();
    stack.wait_for(session, "PromptCompleted", 1, WAIT).await;

    let events = stack.events(session).await.unwrap();
    let tools: Vec<(String, String)> = events
        .iter()
        .filter(|(t, _, _)| t == "ToolExecuted")
        .map(|(_, d, _)| {
            (
                d["input_summary"].as_str().unwrap().to_owned(),
                d["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        tools,
        [
            ("echo one > one.txt".to_owned(), "completed".to_owned()),
            ("rm -rf docs".to_owned(), "denied".to_owned())
        ]
    );
    // The model read the reviewer's comment as the command's result.
    let last = stack.model.scripted_requests().pop().unwrap();
    assert!(
        last.tool_results()
            .iter()
            .any(|r| r.contains("keep the docs")),
        "{:?}",
        last.tool_results()
    );
    assert!(stack.workspace_of(session).join("one.txt").exists());
    stack.stop_runners().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_building_prompt_aborts_the_agent_and_the_queue_goes_on() {
    let script = Script::new()
        .then(Step::text("Plan: slow\n1. think a long time"))
        .then(Step::Hang)
        .then(Step::text("Plan: quick\n1. be quick"));
    let mut stack = Stack::start(script).await.unwrap();
    stack.start_runner(stack.runner_config()).await.unwrap();
    let mia = person("mia", "Mia Member", Role::Member, None);
    let max = person("max", "Max Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);
    let session = stack.start_session(&mia, None).await.unwrap();
    let first = stack.prompt(&mia, session, "slow work").await.unwrap();
    let second = stack.prompt(&max, session, "quick work").await.unwrap();
    stack.approve_plan(&admin, session, 1).await;
    // The build's model call is in flight (and hangs).
    let deadline = tokio::time::Instant::now() + WAIT;
    while stack.model.scripted_requests().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the build never called the model"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack
        .post(
            &mia,
            &format!("/sessions/{session}/prompts/{first}/cancel"),
            json!({}),
        )
        .await
        .unwrap();
    let cancelled = stack.wait_for(session, "PromptCancelled", 1, WAIT).await;
    assert_eq!(cancelled["was_running"], true);
    let plan = stack.wait_for(session, "PlanProposed", 2, WAIT).await;
    assert_eq!(plan["prompt_id"], second.to_string());
    let types = stack.types(session).await;
    assert!(!types.contains(&"PromptFailed".to_owned()), "{types:?}");
    assert!(!types.contains(&"PromptCompleted".to_owned()), "{types:?}");
    stack.stop_runners().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unanswered_tool_ask_fails_the_prompt_after_the_approval_timeout() {
    let script = Script::new()
        .then(Step::text("Plan: one command\n1. run it"))
        .then(bash("echo waiting"))
        .then(Step::text("Done."));
    let mut stack = Stack::start(script).await.unwrap();
    let mut config = stack.runner_config();
    config.approval_timeout = Duration::from_secs(6);
    stack.start_runner(config).await.unwrap();
    let member = person("mia", "Mia Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);
    let session = stack.start_session(&member, None).await.unwrap();
    let prompt = stack.prompt(&member, session, "one command").await.unwrap();
    stack.approve_plan(&admin, session, 1).await;
    stack
        .wait_for(session, "ToolApprovalRequested", 1, WAIT)
        .await;
    let asked = tokio::time::Instant::now();
    let failed = stack.wait_for(session, "PromptFailed", 1, WAIT).await;
    assert_eq!(failed["prompt_id"], prompt.to_string());
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("no one answered"),
        "{failed}"
    );
    assert!(asked.elapsed() < Duration::from_secs(30));
    let types = stack.types(session).await;
    assert!(!types.contains(&"PromptCompleted".to_owned()), "{types:?}");
    stack.stop_runners().await;
}

/// A runner forced rootless (as any user): its status says so, and a prompt runs to completion
/// in a sandbox of the runner's own uid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rootless_runner_says_so_and_runs_a_prompt_to_completion() {
    let mut stack = Stack::start(canopy_scripted_model::demo_script())
        .await
        .unwrap();
    let mut config = stack.runner_config();
    config.sandbox_rootless = true;
    config.bash_allow_workspaces = vec![crate::support::WORKSPACE.to_owned()];
    stack.start_runner(config).await.unwrap();
    let status: Value = reqwest::get(format!("http://{}/health", stack.runner_addrs[0]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["sandbox"]["mode"], "rootless", "{status}");
    assert!(status["sandbox"]["cgroups"].is_boolean(), "{status}");
    assert_eq!(status["sandbox"]["disk_quota_hard"], false, "{status}");
    let member = person("mia", "Mia Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);

    let session = stack.start_session(&member, None).await.unwrap();
    stack
        .prompt(&member, session, "Add a note about the release")
        .await
        .unwrap();
    let plan = stack.wait_for(session, "PlanProposed", 1, WAIT).await;
    let plan_id = plan["plan_id"].as_str().unwrap();
    stack
        .post(
            &admin,
            &format!("/sessions/{session}/plans/{plan_id}/approve"),
            json!({}),
        )
        .await
        .unwrap();
    stack.wait_for(session, "PromptCompleted", 1, WAIT).await;

    let written = stack.workspace_of(session).join("canopy-demo.txt");
    assert!(written.is_file(), "the demo agent wrote its file");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&written).unwrap()),
        rustix::process::geteuid().as_raw(),
        "rootless: the workspace is the runner's own user's"
    );
    stack.stop_runners().await;
}
