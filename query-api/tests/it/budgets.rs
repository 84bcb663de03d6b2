//! The budgets as every member reads them: each limit with spent, reserved and remaining, from
//! the same ledger command-api admits prompts by; and spend by workspace, person and session.

use canopy_domain::Role;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Stack, runner, token};

fn find<'a>(budgets: &'a Value, kind: &str) -> &'a Value {
    budgets["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {budgets}"))
}

#[tokio::test]
async fn every_member_reads_each_budget_with_spent_reserved_and_remaining() {
    let stack = Stack::start_with(false, 0).await;
    let owner = token(Role::Owner, "owner", "w1");
    let member = token(Role::Member, "m1", "w1");
    let viewer = token(Role::Viewer, "v1", "w1");
    for (kind, limit) in [
        ("workspace_monthly_cost", 1_000),
        ("session_tokens", 500),
        ("person_daily_cost", 2_000),
        ("concurrent_sessions", 2),
    ] {
        stack
            .command(&owner, "/budgets", json!({"kind": kind, "limit": limit}))
            .await;
    }
    let session: Uuid = stack
        .command(&member, "/sessions", json!({"title": "t", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await["id"].as_str().unwrap().parse().unwrap();
    let prompt = stack
        .command(
            &member,
            &format!("/sessions/{session}/prompts"),
            json!({"text": "go"}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("/runner/sessions/{session}");
    stack
        .command(
            &runner(),
            &format!("{base}/prompts/{prompt}/start"),
            json!({}),
        )
        .await;
    stack
        .command(
            &runner(),
            &format!("{base}/usage"),
            json!({"prompt_id": prompt, "tokens_in": 100, "tokens_out": 50, "cost_micro_usd": 300}),
        )
        .await;

    let path = format!("/budgets?session_id={session}&user_id=m1");
    let budgets = stack.get(&viewer, &path).await.ok();
    assert_eq!(budgets["workspace_id"], "w1");
    assert_eq!(budgets["budgets"].as_array().unwrap().len(), 4);
    // the running prompt reserved all that was left of the month (less than the estimate);
    // what it used is spent, the rest still reserved
    let month = find(&budgets, "workspace_monthly_cost");
    assert_eq!(month["scope"], "workspace");
    assert_eq!(month["period"], budgets["month"]);
    assert_eq!(
        (&month["spent"], &month["reserved"], &month["remaining"]),
        (&json!(300), &json!(700), &json!(0))
    );
    let tokens = find(&budgets, "session_tokens");
    assert_eq!(tokens["scope"], format!("session:{session}"));
    assert_eq!(
        (&tokens["spent"], &tokens["reserved"], &tokens["remaining"]),
        (&json!(150), &json!(350), &json!(0))
    );
    assert_eq!(tokens["used_percent"], 30.0);
    let day = find(&budgets, "person_daily_cost");
    assert_eq!(day["scope"], "person:m1");
    assert_eq!(day["spent"], 300);
    assert_eq!(find(&budgets, "concurrent_sessions")["unit"], "sessions");

    // the prompt's end releases its reservation
    stack
        .command(
            &runner(),
            &format!("{base}/prompts/{prompt}/complete"),
            json!({}),
        )
        .await;
    let budgets = stack.get(&member, &path).await.ok();
    let month = find(&budgets, "workspace_monthly_cost");
    assert_eq!(
        (&month["spent"], &month["reserved"], &month["remaining"]),
        (&json!(300), &json!(0), &json!(700))
    );
    assert_eq!(find(&budgets, "session_tokens")["remaining"], 350);

    // spend by person and by session
    let by_user = stack
        .get(&viewer, "/analytics/spend?group_by=user")
        .await
        .ok();
    assert_eq!(by_user[0]["key"], "m1");
    assert_eq!(by_user[0]["cost_micro_usd"], 300);
    assert_eq!(by_user[0]["period"], budgets["day"]);
    let by_session = stack
        .get(&viewer, "/analytics/spend?group_by=session")
        .await
        .ok();
    assert_eq!(by_session[0]["key"], session.to_string());
    assert_eq!(by_session[0]["tokens"], 150);
    assert!(by_session[0]["agent_ms"].as_i64().unwrap() >= 0);
    let by_month = stack.get(&viewer, "/analytics/spend").await.ok();
    assert_eq!(by_month[0]["key"], budgets["month"]);
}

#[tokio::test]
async fn another_workspace_s_session_answers_as_one_that_does_not_exist() {
    let stack = Stack::start_with(false, 0).await;
    let other = token(Role::Owner, "o2", "w2");
    let session: Uuid = stack
        .command(&other, "/sessions", json!({"title": "t", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await["id"].as_str().unwrap().parse().unwrap();
    let reader = token(Role::Member, "m1", "w1");
    let theirs = stack
        .get(&reader, &format!("/budgets?session_id={session}"))
        .await
        .problem(404, "not_found");
    let nobody = stack
        .get(&reader, &format!("/budgets?session_id={}", Uuid::new_v4()))
        .await
        .problem(404, "not_found");
    assert_eq!(theirs.body["detail"], nobody.body["detail"]);
    // budgets of w2 are not w1's
    stack
        .command(
            &other,
            "/budgets",
            json!({"kind": "session_cost", "limit": 5}),
        )
        .await;
    let mine = stack.get(&reader, "/budgets").await.ok();
    assert_eq!(mine["budgets"], json!([]));
    stack
        .get(&runner(), "/budgets")
        .await
        .problem(403, "forbidden");
}

type Events = std::pin::Pin<Box<dyn futures::Stream<Item = eventsource_stream::Event> + Send>>;

async fn sse(stack: &Stack, bearer: &str, path: &str) -> Events {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;
    let response = reqwest::Client::new()
        .get(format!("{}{path}", stack.query))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .filter_map(|e| async move { e.ok() }),
    )
}

/// The data of the first SSE event named `name` whose `field` is `value`.
async fn first(events: &mut Events, name: &str, field: &str, value: &str) -> Value {
    use futures::StreamExt;
    loop {
        let event = tokio::time::timeout(std::time::Duration::from_secs(30), events.next())
            .await
            .expect("events stopped coming")
            .expect("the stream ended");
        if event.event != name {
            continue;
        }
        let body: Value = serde_json::from_str(&event.data).unwrap();
        if body[field] == value {
            return body;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_80_percent_warning_reaches_the_session_s_and_the_workspace_s_live_streams() {
    let stack = Stack::start_with(false, 0).await;
    let owner = token(Role::Owner, "owner", "w1");
    let viewer = token(Role::Viewer, "v1", "w1");
    stack
        .command(
            &owner,
            "/budgets",
            json!({"kind": "session_tokens", "limit": 100}),
        )
        .await;
    let session: Uuid = stack
        .command(&owner, "/sessions", json!({"title": "t", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await["id"].as_str().unwrap().parse().unwrap();
    let mut workspace = sse(&stack, &viewer, "/stream").await;
    let mut live = sse(&stack, &viewer, &format!("/sessions/{session}/stream")).await;
    let prompt = stack
        .command(
            &owner,
            &format!("/sessions/{session}/prompts"),
            json!({"text": "go"}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("/runner/sessions/{session}");
    stack
        .command(
            &runner(),
            &format!("{base}/prompts/{prompt}/start"),
            json!({}),
        )
        .await;
    stack
        .command(
            &runner(),
            &format!("{base}/usage"),
            json!({"prompt_id": prompt, "tokens_in": 80, "tokens_out": 5, "cost_micro_usd": 0}),
        )
        .await;

    let warning = first(&mut live, "message", "type", "BudgetThresholdReached").await;
    let data = &warning["data"];
    assert_eq!(data["budget"], "session_tokens", "{warning}");
    assert_eq!((&data["spent"], &data["limit"]), (&json!(85), &json!(100)));
    let change = first(
        &mut workspace,
        "change",
        "event_type",
        "BudgetThresholdReached",
    )
    .await;
    assert_eq!(change["session_id"], session.to_string());
}
