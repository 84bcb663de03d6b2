//! The model failing (500s, cut streams, hangs) and a runner dying mid-build.

use std::time::Duration;

use canopy_domain::Role;
use canopy_testkit::{RecordedRequest, Script, Step};
use serde_json::json;

use crate::support::{Stack, WORKSPACE, person};

const WAIT: Duration = Duration::from_secs(120);

fn asks(marker: &'static str) -> impl Fn(&RecordedRequest) -> bool + Send + Sync + 'static {
    move |request: &RecordedRequest| request.last_user_request().contains(marker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_errors_cut_streams_and_hangs_fail_the_prompt_and_the_queue_goes_on() {
    let script = Script::new()
        .on(
            "500",
            asks("model-500"),
            Step::fail(500, "upstream exploded"),
        )
        .on("cut", asks("model-cut"), Step::cut("Plan: half a pl", 3))
        .on("hang", asks("model-hang"), Step::Hang)
        .then_always(Step::text("Plan: fine\n1. all good"));
    let mut stack = Stack::start(script).await.unwrap();
    let mut config = stack.runner_config();
    config.inactivity_timeout = Duration::from_secs(5);
    stack.start_runner(config).await.unwrap();
    let member = person("mia", "Mia Member", Role::Member, None);
    let session = stack.start_session(&member, None).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut prompts = Vec::new();
    for text in ["model-500", "model-cut", "model-hang", "all good"] {
        prompts.push(stack.prompt(&member, session, text).await.unwrap());
    }
    for (nth, prompt) in prompts.iter().take(3).enumerate() {
        let failed = stack.wait_for(session, "PromptFailed", nth + 1, WAIT).await;
        assert_eq!(failed["prompt_id"], prompt.to_string(), "{failed}");
        assert!(!failed["reason"].as_str().unwrap().is_empty());
    }
    let plan = stack.wait_for(session, "PlanProposed", 1, WAIT).await;
    assert_eq!(plan["prompt_id"], prompts[3].to_string());
    // Within the limits: OpenCode alone would retry the 500 for about 70 s and the cut stream forever.
    assert!(
        started.elapsed() < Duration::from_secs(100),
        "{:?}",
        started.elapsed()
    );
    let reasons: Vec<String> = stack
        .events(session)
        .await
        .unwrap()
        .into_iter()
        .filter(|(t, _, _)| t == "PromptFailed")
        .map(|(_, d, _)| d["reason"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        reasons[0].contains("ModelRetrying") || reasons[0].contains("model failed"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("StreamTruncated"), "{reasons:?}");
    assert!(reasons[2].contains("Inactive"), "{reasons:?}");
    stack.stop_runners().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_killed_mid_build_is_taken_over_after_its_lease_and_nothing_is_recorded_twice() {
    let script = Script::new()
        .on(
            "build",
            |r: &RecordedRequest| {
                !r.is_plan_request()
                    && r.last_user_request().contains("long build")
                    && r.tool_results_since_last_user().is_empty()
            },
            Step::tool(
                "write",
                json!({ "filePath": "half.txt", "content": "half done\n" }),
            ),
        )
        .on(
            "hang",
            |r: &RecordedRequest| {
                !r.is_plan_request() && r.last_user_request().contains("long build")
            },
            Step::Hang,
        )
        .then_always(Step::text(
            "Plan: step by step\n1. write half.txt\n2. finish",
        ));
    let mut stack = Stack::start(script).await.unwrap();
    let member = person("mia", "Mia Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);
    let session = stack.start_session(&member, None).await.unwrap();

    // Runner A: its own process, killed with SIGKILL once the build has written half.txt.
    let config = stack.runner_config();
    let connections = stack.connections();
    let mut runner_a = tokio::process::Command::new(env!("CARGO_BIN_EXE_canopy-agent-runner"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("CANOPY_RUNNER_ID", "runner-a")
        .env("CANOPY_RUNNER_ADDR", "127.0.0.1:0")
        .env("CANOPY_DATABASE_URL", &connections.database_url)
        .env("CANOPY_NATS_URL", &connections.nats_url)
        .env("CANOPY_STREAM_NAME", &connections.stream_name)
        .env("CANOPY_SUBJECT_PREFIX", &connections.subject_prefix)
        .env("CANOPY_COMMAND_API_URL", &connections.command_api_url)
        .env("CANOPY_RUNNER_TOKEN", &connections.runner_token)
        .env("CANOPY_RUNNER_CONSUMER", &config.consumer_name)
        .env(
            "CANOPY_MODEL_BASE_URL",
            config.model_base_url.clone().unwrap(),
        )
        .env("CANOPY_MODEL_API_KEY", &config.model_api_key)
        .env("CANOPY_SANDBOX_ROOT", config.sandbox_root.clone().unwrap())
        .env("CANOPY_RUNNER_GIT_SCHEMES", "https,file")
        .env(
            "CANOPY_RUNNER_LEASE",
            format!("{}ms", config.lease.as_millis()),
        )
        .env("CANOPY_RUNNER_BASH_ALLOW_WORKSPACES", WORKSPACE)
        .env(
            "CANOPY_OPENCODE_BIN",
            canopy_opencode::opencode_binary().unwrap(),
        )
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let first = stack.prompt(&member, session, "long build").await.unwrap();
    let second = stack.prompt(&member, session, "next one").await.unwrap();
    stack.approve_plan(&admin, session, 1).await;
    let written = stack.wait_for(session, "ToolExecuted", 1, WAIT).await;
    assert_eq!(written["tool"], "write");
    let owner: (String,) = sqlx::query_as("SELECT owner FROM runner_leases WHERE session_id = $1")
        .bind(session.to_string())
        .fetch_one(stack.db.pool())
        .await
        .unwrap();
    assert_eq!(owner.0, "runner-a");
    runner_a.start_kill().unwrap();
    runner_a.wait().await.unwrap();
    // A renewed its lease last at some moment before the kill; nobody may take over before the
    // expiry that renewal set (read now that A can renew no more, on the database's clock).
    let (a_expires,): (chrono::DateTime<chrono::Utc>,) =
        sqlx::query_as("SELECT expires_at FROM runner_leases WHERE session_id = $1")
            .bind(session.to_string())
            .fetch_one(stack.db.pool())
            .await
            .unwrap();

    // Runner B takes the session over once A's lease has expired.
    stack.start_runner(stack.runner_config()).await.unwrap();
    let failed = stack.wait_for(session, "PromptFailed", 1, WAIT).await;
    assert_eq!(failed["prompt_id"], first.to_string());
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("stopped before it finished"),
        "{failed}"
    );
    let (failed_at,): (chrono::DateTime<chrono::Utc>,) = sqlx::query_as(
        "SELECT recorded_at FROM events WHERE aggregate_type = 'session' AND aggregate_id = $1 \
          AND event_type = 'PromptFailed'",
    )
    .bind(session.to_string())
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    assert!(
        failed_at >= a_expires,
        "B took the session over at {failed_at}, before A's lease expired at {a_expires}"
    );
    let plan = stack.wait_for(session, "PlanProposed", 2, WAIT).await;
    assert_eq!(plan["prompt_id"], second.to_string());

    let events = stack.events(session).await.unwrap();
    let types: Vec<&str> = events.iter().map(|(t, _, _)| t.as_str()).collect();
    // A's sandbox is recorded as stopped before B's starts.
    let stopped = types
        .iter()
        .position(|t| *t == "SandboxStopped")
        .expect("A's sandbox stop");
    let restarted = types.iter().rposition(|t| *t == "SandboxStarted").unwrap();
    assert!(stopped < restarted, "{types:?}");
    let mut keys: Vec<&str> = events
        .iter()
        .filter_map(|(_, _, m)| m["idempotency_key"].as_str())
        .collect();
    let all = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), all, "an event was recorded twice: {types:?}");
    assert_eq!(
        types.iter().filter(|t| **t == "ToolExecuted").count(),
        1,
        "{types:?}"
    );
    stack.stop_runners().await;
}
