//! The runner's reports, each through HTTP, and what they append.

use canopy_domain::Role;
use serde_json::json;

use crate::support::{TestApp, token};

#[tokio::test]
async fn the_runner_records_a_whole_prompt() {
    let app = TestApp::start().await;
    let (session, prompt, request) = app.with_open_tool_request().await;
    app.post(
        &token(Role::Owner, "owner"),
        &format!("/sessions/{session}/tool-approvals/{request}/grant"),
        json!({}),
    )
    .await
    .expect(202);
    let base = format!("/runner/sessions/{session}");
    app.runner(
        &format!("{base}/sandbox/started"),
        json!({"sandbox_id": "sb-1", "opencode_session_id": "ses_abc"}),
    )
    .await
    .expect(202);
    app.runner(
        &format!("{base}/tool-executions"),
        json!({"prompt_id": prompt, "call_id": "call_1", "tool": "bash", "phase": "build",
               "input_summary": "cargo test", "output_summary": "ok", "status": "completed", "duration_ms": 1200}),
    )
    .await
    .expect(202);
    app.runner(
        &format!("{base}/messages"),
        json!({"prompt_id": prompt, "message_id": "msg_1", "text": "done"}),
    )
    .await
    .expect(202);
    app.runner(
        &format!("{base}/usage"),
        json!({"prompt_id": prompt, "tokens_in": 1000, "tokens_out": 200, "cost_micro_usd": 4500}),
    )
    .await
    .expect(202);
    let checkpoint = app
        .runner(
            &format!("{base}/checkpoints"),
            json!({"prompt_id": prompt, "commit_sha": "abcdef0", "files_changed": ["a.rs", "b.rs"], "trigger": "auto"}),
        )
        .await
        .expect(201)
        .id();
    app.runner(
        &format!("{base}/prompts/{prompt}/complete"),
        json!({"summary": "fixed"}),
    )
    .await
    .expect(202);
    app.runner(
        &format!("{base}/restores"),
        json!({"checkpoint_id": checkpoint}),
    )
    .await
    .expect(202);
    app.runner(
        &format!("{base}/pushes"),
        json!({"branch": "canopy/fix", "commit_sha": "abcdef0123"}),
    )
    .await
    .expect(202);
    app.runner(
        &format!("{base}/sandbox/stopped"),
        json!({"sandbox_id": "sb-1", "reason": "idle"}),
    )
    .await
    .expect(202);

    let types = app.event_types(session).await;
    assert!(
        types.ends_with(&[
            "ToolApprovalGranted".into(),
            "SandboxStarted".into(),
            "ToolExecuted".into(),
            "AgentMessageRecorded".into(),
            "UsageRecorded".into(),
            "CheckpointTaken".into(),
            "PromptCompleted".into(),
            "CheckpointRestored".into(),
            "BranchPushed".into(),
            "SandboxStopped".into(),
        ]),
        "{types:?}"
    );

    // metadata says the runner service did it, under its idempotency key
    let meta: serde_json::Value = sqlx::query_scalar(
        "SELECT metadata FROM events WHERE aggregate_id = $1 AND event_type = 'ToolExecuted'",
    )
    .bind(session.to_string())
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(meta["actor_kind"], "service");
    assert_eq!(meta["actor_id"], "agent-runner");
    assert!(meta["idempotency_key"].is_string());
    assert!(meta["request_id"].is_string());
}

#[tokio::test]
async fn a_prompt_fails_and_a_session_fails() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let first = app.submit_prompt(&owner, session).await;
    let second = app.submit_prompt(&owner, session).await;
    let base = format!("/runner/sessions/{session}");
    app.runner(&format!("{base}/prompts/{first}/start"), json!({}))
        .await
        .expect(202);
    app.runner(
        &format!("{base}/prompts/{first}/fail"),
        json!({"reason": "model unreachable"}),
    )
    .await
    .expect(202);
    app.runner(&format!("{base}/prompts/{second}/start"), json!({}))
        .await
        .expect(202);
    app.runner(&format!("{base}/fail"), json!({"reason": "sandbox lost"}))
        .await
        .expect(202);
    let types = app.event_types(session).await;
    assert!(
        types.ends_with(&[
            "PromptFailed".into(),
            "PromptStarted".into(),
            "PromptFailed".into(),
            "SessionFailed".into()
        ]),
        "{types:?}"
    );
}

#[tokio::test]
async fn build_phase_tools_need_an_approved_plan_and_plan_phase_tools_must_be_read_only() {
    let app = TestApp::start().await;
    let (session, prompt, _plan) = app.with_pending_plan(&token(Role::Member, "m1")).await;
    let tool = |phase: &str, tool: &str| {
        json!({"prompt_id": prompt, "call_id": "c", "tool": tool, "phase": phase,
               "input_summary": "", "output_summary": "", "status": "completed", "duration_ms": 1})
    };
    let path = format!("/runner/sessions/{session}/tool-executions");
    let before = app.event_count().await;
    app.runner(&path, tool("build", "edit"))
        .await
        .problem(409, "plan_not_approved");
    app.runner(&path, tool("plan", "edit"))
        .await
        .problem(422, "tool_not_read_only");
    assert_eq!(app.event_count().await, before);
    app.runner(&path, tool("plan", "grep")).await.expect(202);
}

/// JSON Schema's `integer` (what the document says of these fields) is any number without a
/// fraction: `1000.0` is the integer 1000. A fraction, a negative number or text is still 422,
/// naming the field, and writes nothing.
#[tokio::test]
async fn whole_numbers_written_with_a_zero_fraction_are_integers_and_fractions_are_refused() {
    let app = TestApp::start().await;
    let (session, prompt, _) = app.with_open_tool_request().await;
    let usage = format!("/runner/sessions/{session}/usage");
    app.runner(
        &usage,
        json!({"prompt_id": prompt, "tokens_in": 1000.0, "tokens_out": 2e2, "cost_micro_usd": 4500}),
    )
    .await
    .expect(202);
    let before = app.event_count().await;
    for (field, value) in [
        ("tokens_in", json!(1.5)),
        ("tokens_out", json!(-1)),
        ("cost_micro_usd", json!(1.8446744073709552e19)),
        ("tokens_in", json!("10")),
    ] {
        let mut body =
            json!({"prompt_id": prompt, "tokens_in": 1, "tokens_out": 1, "cost_micro_usd": 1});
        body[field] = value.clone();
        let answer = app
            .runner(&usage, body)
            .await
            .problem(422, "validation_failed");
        assert_eq!(
            answer.body["errors"][0]["field"], field,
            "{field} = {value}: {:?}",
            answer.body
        );
    }
    app.runner(
        &format!("/runner/sessions/{session}/tool-executions"),
        json!({"prompt_id": prompt, "call_id": "call_9", "tool": "read", "phase": "build",
               "input_summary": "", "output_summary": "", "status": "completed", "duration_ms": 12.5}),
    )
    .await
    .problem(422, "validation_failed");
    assert_eq!(app.event_count().await, before, "a refusal writes nothing");
}
