//! Budgets: who sets them, a prompt over a spent budget is refused and writes nothing, prompts
//! at a budget's edge cannot together overspend (the store decides, across processes), and the
//! 80% warning is recorded once.

use canopy_domain::Role;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{TestApp, token};

fn owner() -> String {
    token(Role::Owner, "owner")
}

async fn set(app: &TestApp, kind: &str, limit: u64) {
    app.post(&owner(), "/budgets", json!({"kind": kind, "limit": limit}))
        .await
        .expect(202);
}

async fn count_of(app: &TestApp, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1")
        .bind(event_type)
        .fetch_one(app.pool())
        .await
        .unwrap()
}

async fn reservations(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM budget_reservations")
        .fetch_one(app.pool())
        .await
        .unwrap()
}

/// Starts `prompt`, reports `tokens` (in and out) and `cost`, and completes it.
async fn run_prompt(app: &TestApp, session: Uuid, prompt: Uuid, usage: &[(u64, u64, u64)]) {
    let base = format!("/runner/sessions/{session}");
    app.runner(&format!("{base}/prompts/{prompt}/start"), json!({}))
        .await
        .expect(202);
    for (tokens_in, tokens_out, cost) in usage {
        app.runner(
            &format!("{base}/usage"),
            json!({"prompt_id": prompt, "tokens_in": tokens_in, "tokens_out": tokens_out, "cost_micro_usd": cost}),
        )
        .await
        .expect(202);
    }
    app.runner(&format!("{base}/prompts/{prompt}/complete"), json!({}))
        .await
        .expect(202);
}

#[tokio::test]
async fn only_owners_and_admins_set_budgets_and_bad_ones_write_nothing() {
    let app = TestApp::start().await;
    app.post(
        &token(Role::Admin, "admin"),
        "/budgets",
        json!({"kind": "session_tokens", "limit": 10}),
    )
    .await
    .expect(202);
    let before = app.event_count().await;
    for role in [Role::Member, Role::Viewer, Role::Auditor] {
        app.post(
            &token(role, "someone"),
            "/budgets",
            json!({"kind": "session_tokens", "limit": 5}),
        )
        .await
        .problem(403, "forbidden");
        app.post(
            &token(role, "someone"),
            "/budgets/clear",
            json!({"kind": "session_tokens"}),
        )
        .await
        .problem(403, "forbidden");
    }
    for body in [
        json!({"kind": "session_tokens", "limit": 0}),
        json!({"kind": "session_tokens", "limit": 9_223_372_036_854_775_808_u64}),
        json!({"kind": "galaxy_brains", "limit": 5}),
        json!({"kind": "session_tokens"}),
    ] {
        app.post(&owner(), "/budgets", body)
            .await
            .problem(422, "validation_failed");
    }
    // the runner has no workspace: there are no budgets of its to set
    app.runner("/budgets", json!({"kind": "session_tokens", "limit": 5}))
        .await
        .problem(404, "not_found");
    assert_eq!(app.event_count().await, before);

    // the same limit again changes nothing; clearing removes it
    app.post(
        &owner(),
        "/budgets",
        json!({"kind": "session_tokens", "limit": 10}),
    )
    .await
    .expect(202);
    assert_eq!(app.event_count().await, before);
    app.post(
        &owner(),
        "/budgets/clear",
        json!({"kind": "session_tokens"}),
    )
    .await
    .expect(202);
    let limits: i64 = sqlx::query_scalar("SELECT count(*) FROM budget_limits")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(limits, 0);
}

#[tokio::test]
async fn a_prompt_over_the_workspace_budget_is_refused_and_writes_nothing() {
    let app = TestApp::start().await;
    set(&app, "workspace_monthly_tokens", 1000).await;
    let session = app.start_session(&owner()).await;
    let first = app.submit_prompt(&owner(), session).await;
    run_prompt(&app, session, first, &[(600, 300, 40), (150, 50, 10)]).await;
    assert_eq!(
        reservations(&app).await,
        0,
        "a finished prompt reserves nothing"
    );

    let before = app.event_count().await;
    let refused = app
        .post(
            &owner(),
            &format!("/sessions/{session}/prompts"),
            json!({"text": "one more"}),
        )
        .await
        .problem(402, "budget_exhausted");
    assert_eq!(refused.body["budget"], "workspace_monthly_tokens");
    assert_eq!(refused.body["scope"], "workspace");
    assert_eq!(refused.body["unit"], "tokens");
    assert_eq!(refused.body["limit"], 1000);
    assert_eq!(refused.body["spent"], 1100);
    assert_eq!(refused.body["reserved"], 0);
    assert_eq!(refused.body["remaining"], 0);
    assert_eq!(app.event_count().await, before, "a refusal writes nothing");
    assert_eq!(reservations(&app).await, 0);

    // another session of the workspace draws on the same month
    let other = app.start_session(&owner()).await;
    app.post(
        &owner(),
        &format!("/sessions/{other}/prompts"),
        json!({"text": "elsewhere"}),
    )
    .await
    .problem(402, "budget_exhausted");

    // a refusal is not remembered under an idempotency key: once the limit is raised, the
    // same request with the same key is admitted
    let key = Uuid::new_v4().to_string();
    let path = format!("/sessions/{session}/prompts");
    let body = json!({"text": "with a key"});
    let before = app.event_count().await;
    app.send(
        &owner(),
        &path,
        Some(body.clone()),
        &[("idempotency-key", &key)],
    )
    .await
    .problem(402, "budget_exhausted");
    assert_eq!(app.event_count().await, before);
    set(&app, "workspace_monthly_tokens", 5000).await;
    app.send(&owner(), &path, Some(body), &[("idempotency-key", &key)])
        .await
        .expect(201);
    assert_eq!(reservations(&app).await, 1, "the admitted prompt reserves");
}

#[tokio::test]
async fn a_person_s_daily_budget_stops_their_prompts_and_nobody_else_s() {
    let app = TestApp::start().await;
    set(&app, "person_daily_cost", 1_000).await;
    let alice = token(Role::Member, "alice");
    let bob = token(Role::Member, "bob");
    let session = app.start_session(&alice).await;
    let prompt = app.submit_prompt(&alice, session).await;
    run_prompt(&app, session, prompt, &[(10, 10, 1_000)]).await;

    let refused = app
        .post(
            &alice,
            &format!("/sessions/{session}/prompts"),
            json!({"text": "again"}),
        )
        .await
        .problem(402, "budget_exhausted");
    assert_eq!(refused.body["scope"], "person:alice");
    app.submit_prompt(&bob, session).await;
}

#[tokio::test]
async fn concurrent_prompts_at_the_edge_of_a_budget_do_not_overspend() {
    // each admitted prompt reserves 300 of the 1000 tokens (the last one what is left, 100):
    // four pass, whatever the interleaving, across two command-api processes
    let configure = |config: &mut canopy_command_api::Config| {
        config.budget_prompt_reserve_tokens = 300;
    };
    let app = TestApp::start_with(configure).await;
    let second = app.another_process_with(configure).await;
    set(&app, "workspace_monthly_tokens", 1000).await;
    let mut sessions = Vec::new();
    for _ in 0..12 {
        sessions.push(app.start_session(&owner()).await);
    }
    let before = app.event_count().await;
    let owner = owner();
    let answers = futures::future::join_all(sessions.iter().enumerate().map(|(i, session)| {
        let target = if i % 2 == 0 { &app } else { &second };
        let owner = &owner;
        async move {
            target
                .post(
                    owner,
                    &format!("/sessions/{session}/prompts"),
                    json!({"text": "race"}),
                )
                .await
        }
    }))
    .await;
    let admitted = answers.iter().filter(|a| a.status == 201).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.status == 402).collect();
    assert_eq!(admitted, 4, "{answers:?}");
    assert_eq!(refused.len(), 8, "{answers:?}");
    for answer in refused {
        assert_eq!(answer.code(), "budget_exhausted");
        assert_eq!(answer.body["reserved"], 1000);
    }
    let reserved: i64 = sqlx::query_scalar("SELECT sum(tokens)::bigint FROM budget_reservations")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(reserved, 1000, "never more than the limit is reserved");
    // each admitted prompt appended its PromptSubmitted, nothing else was written
    assert_eq!(app.event_count().await, before + 4);
    second.shutdown().await;
}

#[tokio::test]
async fn the_80_percent_warning_is_recorded_once_per_budget() {
    let app = TestApp::start().await;
    set(&app, "session_tokens", 1000).await;
    set(&app, "workspace_monthly_cost", 10_000).await;
    let session = app.start_session(&owner()).await;
    let prompt = app.submit_prompt(&owner(), session).await;
    let base = format!("/runner/sessions/{session}");
    app.runner(&format!("{base}/prompts/{prompt}/start"), json!({}))
        .await
        .expect(202);
    let usage = |tokens: u64, cost: u64| json!({"prompt_id": prompt, "tokens_in": tokens, "tokens_out": 0, "cost_micro_usd": cost});
    app.runner(&format!("{base}/usage"), usage(700, 100))
        .await
        .expect(202);
    assert_eq!(count_of(&app, "BudgetThresholdReached").await, 0);
    app.runner(&format!("{base}/usage"), usage(150, 100))
        .await
        .expect(202);
    assert_eq!(count_of(&app, "BudgetThresholdReached").await, 1);
    for _ in 0..3 {
        app.runner(&format!("{base}/usage"), usage(50, 100))
            .await
            .expect(202);
    }
    let warnings: Vec<Value> = sqlx::query_scalar(
        "SELECT payload -> 'BudgetThresholdReached' FROM events
          WHERE event_type = 'BudgetThresholdReached' AND aggregate_id = $1",
    )
    .bind(session.to_string())
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["budget"], "session_tokens");
    assert_eq!(warnings[0]["scope"], format!("session:{session}"));
    assert_eq!(warnings[0]["limit"], 1000);
    assert_eq!(warnings[0]["spent"], 850);
    assert_eq!(warnings[0]["percent"], 80);
}

#[tokio::test]
async fn concurrent_usage_crossing_a_workspace_budget_warns_once() {
    let app = TestApp::start().await;
    let mut running = Vec::new();
    for _ in 0..6 {
        let session = app.start_session(&owner()).await;
        let prompt = app.submit_prompt(&owner(), session).await;
        app.runner(
            &format!("/runner/sessions/{session}/prompts/{prompt}/start"),
            json!({}),
        )
        .await
        .expect(202);
        running.push((session, prompt));
    }
    // set once the prompts run (admitting six would have needed more than 1000)
    set(&app, "workspace_monthly_cost", 1_000).await;
    // six reports of 150 each: 900, past 80% of 1000, reached by whichever lands fifth or sixth
    let app = &app;
    futures::future::join_all(running.iter().map(|(session, prompt)| async move {
        app.runner(
            &format!("/runner/sessions/{session}/usage"),
            json!({"prompt_id": prompt, "tokens_in": 1, "tokens_out": 1, "cost_micro_usd": 150}),
        )
        .await
    }))
    .await
    .into_iter()
    .for_each(|answer| assert_eq!(answer.status, 202, "{answer:?}"));
    assert_eq!(count_of(app, "BudgetThresholdReached").await, 1);
    let spent: i64 =
        sqlx::query_scalar("SELECT cost_micro_usd FROM budget_ledger WHERE scope = 'workspace'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(spent, 900, "the ledger is the sum of the recorded usage");
}
