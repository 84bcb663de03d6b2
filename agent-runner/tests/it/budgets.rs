//! Budgets at the runner, with the scripted model reporting usage (100 input and 10 output
//! tokens per call): a turn that crosses its session's budget is stopped (the proxy refuses the
//! calls past it), checkpointed and failed with the reason; a workspace's cap on sessions running
//! at once keeps the next session queued until a slot frees.

use std::time::Duration;

use canopy_domain::Role;
use canopy_testkit::{RecordedRequest, Script, Step};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Stack, WORKSPACE, person, write};

const WAIT: Duration = Duration::from_secs(120);

fn plan_then(build: Script) -> Script {
    build.on(
        "plan",
        RecordedRequest::is_plan_request,
        Step::text("Plan: write the files\n1. write them"),
    )
}

async fn session_tokens(stack: &Stack, session: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(tokens), 0)::bigint FROM budget_ledger WHERE scope = $1",
    )
    .bind(format!("session:{session}"))
    .fetch_one(stack.db.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_turn_that_crosses_its_session_budget_is_stopped_checkpointed_and_recorded() {
    let mut build = Script::new();
    for name in ["a", "b", "c", "d", "e", "f"] {
        build = build.then(write(&format!("/workspace/{name}.txt"), name));
    }
    let mut stack = Stack::start(plan_then(build.then_always(Step::text("Done."))))
        .await
        .unwrap();
    stack.start_runner(stack.runner_config()).await.unwrap();
    let member = person("mia", "Mia Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);
    let session = stack.start_session(&member, None).await.unwrap();
    let prompt = stack.prompt(&member, session, "write files").await.unwrap();
    let plan = stack.wait_for(session, "PlanProposed", 1, WAIT).await;

    // what planning used, plus room for two build calls and part of a third
    let planned = session_tokens(&stack, session).await;
    assert!(planned > 0, "the plan turn's usage is in the ledger");
    let limit = planned + 250;
    stack
        .post(
            &admin,
            "/budgets",
            json!({"kind": "session_tokens", "limit": limit}),
        )
        .await
        .unwrap();
    let seen_before_build = stack.model.requests().len();
    let plan_id = plan["plan_id"].as_str().unwrap();
    stack
        .post(
            &admin,
            &format!("/sessions/{session}/plans/{plan_id}/approve"),
            json!({}),
        )
        .await
        .unwrap();

    let failed = stack.wait_for(session, "PromptFailed", 1, WAIT).await;
    assert_eq!(failed["prompt_id"], prompt.to_string());
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("budget_exhausted: the session_tokens budget"),
        "{reason}"
    );
    // the work done before the stop is kept as the prompt's checkpoint
    let events = stack.events(session).await.unwrap();
    let checkpoint = events
        .iter()
        .find(|(t, data, _)| t == "CheckpointTaken" && data["prompt_id"] == prompt.to_string())
        .map(|(_, data, _)| data.clone())
        .unwrap_or_else(|| panic!("no checkpoint of the stopped prompt: {events:?}"));
    let files: Vec<&str> = checkpoint["files_changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        files.contains(&"a.txt") && files.contains(&"b.txt"),
        "{files:?}"
    );
    assert!(!files.contains(&"f.txt"), "the turn ran on: {files:?}");
    let types: Vec<&str> = events.iter().map(|(t, _, _)| t.as_str()).collect();
    assert!(
        types.iter().position(|t| *t == "CheckpointTaken")
            < types.iter().position(|t| *t == "PromptFailed"),
        "{types:?}"
    );
    // the stop held: at most three build calls reached the model (the proxy refuses past the
    // ceiling), so the session is over its limit by at most one call's usage
    let build_calls = stack.model.requests()[seen_before_build..]
        .iter()
        .filter(|r| !r.is_title_request())
        .count();
    assert!(
        build_calls <= 3,
        "{build_calls} build calls reached the model"
    );
    let spent = session_tokens(&stack, session).await;
    assert!(spent >= limit && spent <= limit + 110, "{spent} of {limit}");
    // and the next prompt is refused before it is written
    let (status, code) = stack
        .refused(
            &member,
            &format!("/sessions/{session}/prompts"),
            json!({"text": "more"}),
        )
        .await;
    assert_eq!((status, code.as_str()), (402, "budget_exhausted"));
    stack.stop_runners().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_over_the_workspace_cap_waits_until_a_slot_frees() {
    let mut stack = Stack::start(plan_then(Script::new().then_always(Step::text("Done."))))
        .await
        .unwrap();
    stack.start_runner(stack.runner_config()).await.unwrap();
    let member = person("mia", "Mia Member", Role::Member, None);
    let admin = person("ada", "Ada Admin", Role::Admin, None);
    stack
        .post(
            &admin,
            "/budgets",
            json!({"kind": "concurrent_sessions", "limit": 1}),
        )
        .await
        .unwrap();
    let first = stack.start_session(&member, None).await.unwrap();
    let second = stack.start_session(&member, None).await.unwrap();
    // never more than one lease in the workspace, sampled while both run
    let pool = stack.db.pool().clone();
    let (stop_sampling, mut stopped) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut most = 0;
        while !*stopped.borrow() {
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM runner_leases WHERE workspace_id = $1 AND expires_at > now()",
            )
            .bind(WORKSPACE)
            .fetch_one(&pool)
            .await
            .unwrap();
            most = most.max(held);
            tokio::select! {
                _ = stopped.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        most
    });
    stack.prompt(&member, first, "first").await.unwrap();
    let plan = stack.wait_for(first, "PlanProposed", 1, WAIT).await;
    stack.prompt(&member, second, "second").await.unwrap();

    // the first session holds the slot while it waits for people: the second stays queued,
    // and the runner says so
    let status_url = format!("http://{}/health", stack.runner_addrs[0]);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status: Value = reqwest::get(&status_url)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["queued_by_cap"]
            .as_array()
            .is_some_and(|q| q.iter().any(|s| s == &json!(second.to_string())))
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !stack
            .types(second)
            .await
            .contains(&"PromptStarted".to_owned())
    );

    let plan_id = plan["plan_id"].as_str().unwrap();
    stack
        .post(
            &admin,
            &format!("/sessions/{first}/plans/{plan_id}/approve"),
            json!({}),
        )
        .await
        .unwrap();
    stack.wait_for(first, "PromptCompleted", 1, WAIT).await;
    stack.approve_plan(&admin, second, 1).await;
    stack.wait_for(second, "PromptCompleted", 1, WAIT).await;
    let _ = stop_sampling.send(true);
    assert_eq!(sampler.await.unwrap(), 1, "the cap held");

    // the second started only once the first had finished
    let position = |session: Uuid, event_type: &'static str| {
        let pool = stack.db.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT position FROM events WHERE aggregate_id = $1 AND event_type = $2",
            )
            .bind(session.to_string())
            .bind(event_type)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(position(first, "PromptCompleted").await < position(second, "PromptStarted").await);
    stack.stop_runners().await;
}
