//! What the read models say about a small, known scenario.

use std::time::Duration;

use canopy_domain::SessionCommand;
use canopy_domain::session::{ToolPhase, ToolStatus};
use uuid::Uuid;

use crate::support::{Pipeline, member, owner, runner, session};

/// A session in workspace `w1` started by member 1.
async fn start_session(store: &canopy_event_store::AggregateStore, title: &str) -> Uuid {
    let id = Uuid::new_v4();
    session(
        store,
        id,
        SessionCommand::StartSession {
            actor: member(1),
            session_id: id,
            workspace_id: "w1".into(),
            feature_id: None,
            title: title.into(),
            repository_url: "https://g.example.invalid/r".into(),
            base_branch: "main".into(),
            session_branch: format!("canopy/{}", title.to_lowercase()),
        },
    )
    .await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_plans_tools_and_usage_are_projected() {
    let pipeline = Pipeline::start().await;
    let projectors = pipeline.run_projectors(pipeline.projectors_config()).await;
    let store = &pipeline.store;
    let id = start_session(store, "Known").await;
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

/// Says where the queue's rows and the session's count differ from the definition: positions
/// 1..n over the queued prompts in submission order, none on any other prompt, and the session's
/// `queue_length` the number queued.
async fn queue_mismatches(pipeline: &Pipeline, session_id: Uuid) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM read.prompts p
              JOIN (SELECT prompt_id, row_number() OVER (ORDER BY submitted_sequence) AS n
                      FROM read.prompts WHERE session_id = $1 AND status = 'queued') q
             USING (prompt_id)
             WHERE p.queue_position IS DISTINCT FROM q.n),
           (SELECT count(*) FROM read.prompts
             WHERE session_id = $1 AND status <> 'queued' AND queue_position IS NOT NULL),
           (SELECT count(*) FROM read.prompts WHERE session_id = $1 AND status = 'queued')
             - (SELECT queue_length FROM read.sessions WHERE session_id = $1)",
    )
    .bind(session_id)
    .fetch_one(pipeline.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_queue_keeps_its_positions_through_cancels_starts_and_failures() {
    let pipeline = Pipeline::start().await;
    let projectors = pipeline.run_projectors(pipeline.projectors_config()).await;
    let store = &pipeline.store;
    let id = start_session(store, "Queue").await;
    let submit = |n: usize| {
        let prompt = Uuid::new_v4();
        (
            prompt,
            SessionCommand::SubmitPrompt {
                actor: member(1 + n % 3),
                prompt_id: prompt,
                text: format!("prompt {n}"),
            },
        )
    };
    let mut prompts = Vec::new();
    for n in 0..40 {
        let (prompt, command) = submit(n);
        session(store, id, command).await;
        prompts.push(prompt);
    }
    pipeline.wait_projected().await;
    assert_eq!(queue_mismatches(&pipeline, id).await, (0, 0, 0));

    // cancelled from the middle and the end of the queue
    for n in [5, 17, 39] {
        session(
            store,
            id,
            SessionCommand::CancelPrompt {
                actor: owner(),
                prompt_id: prompts[n],
            },
        )
        .await;
    }
    pipeline.wait_projected().await;
    assert_eq!(queue_mismatches(&pipeline, id).await, (0, 0, 0));
    let position: Option<i32> =
        sqlx::query_scalar("SELECT queue_position FROM read.prompts WHERE prompt_id = $1")
            .bind(prompts[20])
            .fetch_one(pipeline.pool())
            .await
            .unwrap();
    assert_eq!(position, Some(19), "prompt 20 is behind two cancelled ones");

    // the head starts and fails, the next starts and is cancelled while running, the head after
    // it is cancelled while queued; then more arrive
    for command in [
        SessionCommand::StartPrompt {
            actor: runner(),
            prompt_id: prompts[0],
        },
        SessionCommand::FailPrompt {
            actor: runner(),
            prompt_id: prompts[0],
            reason: "down".into(),
        },
        SessionCommand::StartPrompt {
            actor: runner(),
            prompt_id: prompts[1],
        },
        SessionCommand::CancelPrompt {
            actor: owner(),
            prompt_id: prompts[1],
        },
        SessionCommand::CancelPrompt {
            actor: owner(),
            prompt_id: prompts[2],
        },
    ] {
        session(store, id, command).await;
        pipeline.wait_projected().await;
        assert_eq!(queue_mismatches(&pipeline, id).await, (0, 0, 0));
    }
    for n in 40..43 {
        let (prompt, command) = submit(n);
        session(store, id, command).await;
        prompts.push(prompt);
    }
    pipeline.wait_projected().await;
    assert_eq!(queue_mismatches(&pipeline, id).await, (0, 0, 0));
    let (queued, length): (i64, i32) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM read.prompts WHERE session_id = $1 AND status = 'queued'),
                queue_length FROM read.sessions WHERE session_id = $1",
    )
    .bind(id)
    .fetch_one(pipeline.pool())
    .await
    .unwrap();
    // 43 submitted; 3 cancelled from the queue, 0 and 1 left by starting, 2 cancelled
    assert_eq!((queued, length), (37, 37));

    let report = canopy_projectors::rebuild(
        pipeline.pool(),
        canopy_projectors::Projection::Sessions,
        &canopy_projectors::RebuildOptions {
            batch_size: 7,
            swap: false,
        },
    )
    .await
    .unwrap();
    assert!(report.events > 0);
    let differences = canopy_projectors::compare_with_shadow(
        pipeline.pool(),
        canopy_projectors::Projection::Sessions,
    )
    .await
    .unwrap();
    assert!(differences.is_empty(), "{differences:?}");
    projectors.stop().await;
}
