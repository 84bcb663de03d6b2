//! What the read models say about a small, known scenario.

use std::time::Duration;

use canopy_domain::SessionCommand;
use canopy_domain::session::{ToolPhase, ToolStatus};
use uuid::Uuid;

use crate::support::{Pipeline, member, owner, runner, session};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_plans_tools_and_usage_are_projected() {
    let pipeline = Pipeline::start().await;
    let projectors = pipeline.run_projectors(pipeline.projectors_config()).await;
    let store = &pipeline.store;
    let id = Uuid::new_v4();
    session(
        store,
        id,
        SessionCommand::StartSession {
            actor: member(1),
            session_id: id,
            workspace_id: "w1".into(),
            feature_id: None,
            title: "Known".into(),
            repository_url: "https://g.example.invalid/r".into(),
            base_branch: "main".into(),
            session_branch: "canopy/known".into(),
        },
    )
    .await;
    let prompts: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, prompt) in prompts.iter().enumerate() {
        session(
            store,
            id,
            SessionCommand::SubmitPrompt {
                actor: member(1 + i % 2),
                prompt_id: *prompt,
                text: format!("prompt {i}"),
            },
        )
        .await;
    }
    session(
        store,
        id,
        SessionCommand::StartPrompt {
            actor: runner(),
            prompt_id: prompts[0],
        },
    )
    .await;
    let plan = Uuid::new_v4();
    session(
        store,
        id,
        SessionCommand::ProposePlan {
            actor: runner(),
            plan_id: plan,
            prompt_id: prompts[0],
            summary: "s".into(),
            steps: vec![],
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    session(
        store,
        id,
        SessionCommand::ApprovePlan {
            actor: owner(),
            plan_id: plan,
        },
    )
    .await;
    let request = Uuid::new_v4();
    session(
        store,
        id,
        SessionCommand::RequestToolApproval {
            actor: runner(),
            request_id: request,
            prompt_id: prompts[0],
            call_id: "call_x".into(),
            tool: "bash".into(),
            input_summary: "ls".into(),
        },
    )
    .await;
    session(
        store,
        id,
        SessionCommand::GrantToolApproval {
            actor: owner(),
            request_id: request,
        },
    )
    .await;
    session(
        store,
        id,
        SessionCommand::RecordToolExecution {
            actor: runner(),
            prompt_id: prompts[0],
            call_id: "call_x".into(),
            tool: "bash".into(),
            phase: ToolPhase::Build,
            input_summary: "ls".into(),
            output_summary: "a b".into(),
            status: ToolStatus::Completed,
            duration_ms: 40,
        },
    )
    .await;
    for _ in 0..2 {
        session(
            store,
            id,
            SessionCommand::RecordUsage {
                actor: runner(),
                prompt_id: prompts[0],
                tokens_in: 100,
                tokens_out: 10,
                cost_micro_usd: 7,
            },
        )
        .await;
    }
    session(
        store,
        id,
        SessionCommand::CancelPrompt {
            actor: member(2),
            prompt_id: prompts[1],
        },
    )
    .await;
    pipeline.wait_projected().await;

    let (status, queue_length, running, participants, prompt_count, tools): (String, i32, Option<Uuid>, i32, i32, i32) = sqlx::query_as(
        "SELECT status, queue_length, running_prompt_id, participant_count, prompt_count, tool_execution_count
           FROM read.sessions WHERE session_id = $1",
    )
    .bind(id)
    .fetch_one(pipeline.pool())
    .await
    .unwrap();
    assert_eq!(
        (
            status.as_str(),
            queue_length,
            running,
            participants,
            prompt_count,
            tools
        ),
        ("active", 1, Some(prompts[0]), 2, 3, 1)
    );

    let queue: Vec<(Uuid, String, Option<i32>)> = sqlx::query_as(
        "SELECT prompt_id, status, queue_position FROM read.prompts WHERE session_id = $1 ORDER BY submitted_sequence",
    )
    .bind(id)
    .fetch_all(pipeline.pool())
    .await
    .unwrap();
    assert_eq!(
        queue,
        vec![
            (prompts[0], "running".to_owned(), None),
            (prompts[1], "cancelled".to_owned(), None),
            (prompts[2], "queued".to_owned(), Some(1)),
        ]
    );

    let (plan_status, latency): (String, i64) =
        sqlx::query_as("SELECT status, time_to_decision_ms FROM read.plans WHERE plan_id = $1")
            .bind(plan)
            .fetch_one(pipeline.pool())
            .await
            .unwrap();
    assert_eq!(plan_status, "approved");
    assert!(latency >= 30, "latency {latency} ms");

    let (approval, approval_status): (Option<Uuid>, Option<String>) =
        sqlx::query_as("SELECT approval_request_id, approval_status FROM read.tool_executions WHERE session_id = $1")
            .bind(id)
            .fetch_one(pipeline.pool())
            .await
            .unwrap();
    assert_eq!(
        (approval, approval_status.as_deref()),
        (Some(request), Some("granted"))
    );

    let usage: (String, i64, i64, i64) = sqlx::query_as(
        "SELECT user_id, tokens_in, tokens_out, cost_micro_usd FROM read.usage_daily WHERE session_id = $1",
    )
    .bind(id)
    .fetch_one(pipeline.pool())
    .await
    .unwrap();
    assert_eq!(usage, ("member-1".to_owned(), 200, 20, 14));

    let timeline: Vec<String> = sqlx::query_scalar(
        "SELECT summary FROM read.session_timeline WHERE session_id = $1 ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(pipeline.pool())
    .await
    .unwrap();
    assert_eq!(timeline[0], "Member 1 started \"Known\" on canopy/known");
    assert!(
        timeline
            .iter()
            .any(|line| line == "Olive Owner approved the plan")
    );
    projectors.stop().await;
}
