//! Every endpoint and filter on a known scenario, every role, and read-your-writes.

use canopy_domain::Role;

use crate::support::{Stack, runner, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_with_the_scenario() {
    let stack = Stack::start().await;
    let (session, feature, rw) = stack.scenario("Fix login").await;
    let viewer = token(Role::Viewer, "v1", "w1");
    let q = |path: String| {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{path}{sep}consistent_with={rw}")
    };

    let sessions = stack.get(&viewer, &q("/sessions".into())).await.ok();
    assert_eq!(sessions["items"].as_array().unwrap().len(), 1);
    let one = stack
        .get(&viewer, &q(format!("/sessions/{session}")))
        .await
        .ok();
    assert_eq!(
        (
            one["title"].as_str(),
            one["status"].as_str(),
            one["queue_length"].as_i64()
        ),
        (Some("Fix login"), Some("active"), Some(1))
    );
    assert_eq!(one["participant_count"], 2);

    let prompts = stack
        .get(
            &viewer,
            &q(format!("/prompts?session_id={session}&order=asc")),
        )
        .await
        .ok();
    let statuses: Vec<&str> = prompts["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["completed", "queued"]);
    let prompt_id = prompts["items"][0]["prompt_id"].as_str().unwrap();
    assert_eq!(
        stack
            .get(&viewer, &format!("/prompts/{prompt_id}"))
            .await
            .ok()["author_id"],
        "m1"
    );

    let plans = stack
        .get(
            &viewer,
            &q(format!("/plans?session_id={session}&status=approved")),
        )
        .await
        .ok();
    let plan_id = plans["items"][0]["plan_id"].as_str().unwrap();
    assert_eq!(
        stack.get(&viewer, &format!("/plans/{plan_id}")).await.ok()["reviewer_id"],
        "owner"
    );

    let failed = stack
        .get(
            &viewer,
            &q("/tool-executions?tool=bash&status=failed".into()),
        )
        .await
        .ok();
    assert_eq!(failed["items"].as_array().unwrap().len(), 1);
    assert_eq!(failed["items"][0]["approval_status"], "granted");
    let approvals = stack
        .get(&viewer, &q("/tool-approvals?status=granted".into()))
        .await
        .ok();
    assert_eq!(approvals["items"].as_array().unwrap().len(), 1);
    let checkpoints = stack
        .get(&viewer, &q(format!("/checkpoints?session_id={session}")))
        .await
        .ok();
    assert_eq!(checkpoints["items"][0]["commit_sha"], "abcdef12");

    let timeline = stack
        .get(
            &viewer,
            &format!("/sessions/{session}/timeline?order=asc&limit=200&consistent_with={rw}"),
        )
        .await;
    // the timeline projection may trail the sessions one: the token waits for it too
    let timeline = timeline.ok();
    let types: Vec<&str> = timeline["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"SessionStarted"));
    assert_eq!(types.last(), Some(&"PromptCompleted"));
    let only_tools = stack
        .get(
            &viewer,
            &format!("/sessions/{session}/timeline?event_type=ToolExecuted"),
        )
        .await
        .ok();
    assert_eq!(only_tools["items"].as_array().unwrap().len(), 2);

    // the features projection may trail the sessions one: wait for the feature's second event,
    // the one that linked the session
    let features = stack
        .get(
            &viewer,
            &format!("/features?status=active&consistent_with={feature}:2"),
        )
        .await
        .ok();
    assert_eq!(features["items"][0]["feature_id"], feature.to_string());
    let detail = stack
        .get(
            &viewer,
            &format!("/features/{feature}?consistent_with={feature}:2"),
        )
        .await
        .ok();
    assert_eq!(detail["session_ids"][0], session.to_string());

    let tools = stack.get(&viewer, "/analytics/tools").await.ok();
    let bash = tools
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tool"] == "bash")
        .unwrap();
    assert_eq!(
        (
            bash["executions"].as_i64(),
            bash["failures"].as_i64(),
            bash["failure_rate"].as_f64()
        ),
        (Some(1), Some(1), Some(1.0))
    );
    let latency = stack.get(&viewer, "/analytics/plan-latency").await.ok();
    assert_eq!(latency["decisions"], 1);
    assert!(latency["p50_ms"].as_f64().unwrap() >= 0.0);
    let per_day = stack
        .get(&viewer, "/analytics/prompts-per-user-per-day")
        .await
        .ok();
    let counts: Vec<(String, i64)> = per_day
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["user_id"].as_str().unwrap().to_owned(),
                r["prompts"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(counts, [("m1".to_owned(), 1), ("owner".to_owned(), 1)]);
    let by_user = stack
        .get(&viewer, "/analytics/agent-time?group_by=user")
        .await
        .ok();
    assert_eq!(by_user[0]["key"], "m1");
    assert_eq!(by_user[0]["cost_micro_usd"], 2500);
    assert_eq!(by_user[0]["prompts"], 1);
    let by_session = stack.get(&viewer, "/analytics/agent-time").await.ok();
    assert_eq!(by_session[0]["key"], session.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_narrow_and_bad_parameters_are_422() {
    let stack = Stack::start().await;
    let (session, feature, rw) = stack.scenario("A").await;
    let (other, _, rw2) = stack.scenario("B").await;
    let member = token(Role::Member, "m1", "w1");
    stack
        .get(&member, &format!("/sessions?consistent_with={rw}"))
        .await
        .ok();
    stack
        .get(&member, &format!("/sessions?consistent_with={rw2}"))
        .await
        .ok();
    let count = |body: serde_json::Value| body["items"].as_array().unwrap().len();

    assert_eq!(count(stack.get(&member, "/sessions").await.ok()), 2);
    assert_eq!(
        count(
            stack
                .get(&member, &format!("/sessions?feature_id={feature}"))
                .await
                .ok()
        ),
        1
    );
    assert_eq!(
        count(
            stack
                .get(&member, "/sessions?status=active&started_by=m1")
                .await
                .ok()
        ),
        2
    );
    assert_eq!(
        count(stack.get(&member, "/sessions?status=archived").await.ok()),
        0
    );
    assert_eq!(
        count(stack.get(&member, "/sessions?started_by=nobody").await.ok()),
        0
    );
    assert_eq!(
        count(stack.get(&member, "/prompts?author=owner").await.ok()),
        2
    );
    assert_eq!(
        count(
            stack
                .get(
                    &member,
                    &format!("/prompts?session_id={other}&status=queued")
                )
                .await
                .ok()
        ),
        1
    );
    assert_eq!(
        count(
            stack
                .get(&member, "/sessions?from=2999-01-01T00:00:00Z")
                .await
                .ok()
        ),
        0
    );
    assert_eq!(
        count(
            stack
                .get(&member, "/sessions?to=2000-01-01T00:00:00Z")
                .await
                .ok()
        ),
        0
    );
    assert_eq!(
        count(
            stack
                .get(
                    &member,
                    "/sessions?from=2000-01-01T00:00:00Z&to=2999-01-01T00:00:00Z"
                )
                .await
                .ok()
        ),
        2
    );
    assert_eq!(
        count(
            stack
                .get(
                    &member,
                    &format!("/tool-executions?session_id={session}&tool=read")
                )
                .await
                .ok()
        ),
        1
    );

    stack
        .get(&member, "/sessions?status=sleeping")
        .await
        .problem(422, "validation_failed");
    stack
        .get(&member, "/sessions?limit=0")
        .await
        .problem(422, "validation_failed");
    stack
        .get(&member, "/sessions?limit=201")
        .await
        .problem(422, "validation_failed");
    stack
        .get(&member, "/sessions?cursor=zz")
        .await
        .problem(422, "validation_failed");
    // a range that ends before it starts is empty (not a constraint the schema could state)
    let empty = stack
        .get(
            &member,
            "/sessions?from=2020-01-02T00:00:00Z&to=2020-01-01T00:00:00Z",
        )
        .await
        .ok();
    assert_eq!(empty["items"], serde_json::json!([]));
    // values that do not parse are named, as problem+json
    for (query, field) in [
        ("limit=abc", "limit"),
        ("to=", "to"),
        ("order=sideways", "order"),
        ("feature_id=nope", "feature_id"),
        ("started_by=%00", "started_by"),
    ] {
        let answer = stack
            .get(&member, &format!("/sessions?{query}"))
            .await
            .problem(422, "validation_failed");
        assert_eq!(answer.headers["content-type"], "application/problem+json");
        assert_eq!(answer.body["errors"][0]["field"], field, "{query}");
    }
    stack
        .get(&member, "/analytics/agent-time?group_by=planet")
        .await
        .problem(422, "validation_failed");
    stack
        .get(&member, "/sessions?consistent_with=nonsense")
        .await
        .problem(422, "validation_failed");
    stack
        .get(&member, "/nowhere")
        .await
        .problem(404, "route_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_role_reads_the_runner_does_not_and_other_workspaces_see_nothing() {
    let stack = Stack::start().await;
    let (session, feature, rw) = stack.scenario("Scoped").await;
    stack
        .get(
            &token(Role::Owner, "o", "w1"),
            &format!("/sessions/{session}?consistent_with={rw}"),
        )
        .await
        .ok();
    for role in [
        Role::Owner,
        Role::Admin,
        Role::Member,
        Role::Viewer,
        Role::Auditor,
    ] {
        let reader = token(role, "reader", "w1");
        assert_eq!(
            stack
                .get(&reader, &format!("/sessions/{session}"))
                .await
                .status,
            200,
            "{role:?}"
        );
        assert_eq!(stack.get(&reader, "/prompts").await.status, 200, "{role:?}");
        assert_eq!(
            stack.get(&reader, "/analytics/tools").await.status,
            200,
            "{role:?}"
        );
    }
    stack
        .get(&runner(), "/sessions")
        .await
        .problem(403, "forbidden");
    let anonymous = reqwest::get(format!("{}/sessions", stack.query))
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    stack
        .get("not-a-token", "/sessions")
        .await
        .problem(401, "unauthorized");

    let stranger = token(Role::Owner, "stranger", "w2");
    stack
        .get(&stranger, &format!("/sessions/{session}"))
        .await
        .problem(404, "not_found");
    stack
        .get(&stranger, &format!("/features/{feature}"))
        .await
        .problem(404, "not_found");
    stack
        .get(&stranger, &format!("/sessions/{session}/timeline"))
        .await
        .problem(404, "not_found");
    // a malformed id is the request's mistake, named
    let malformed = stack
        .get(&stranger, "/sessions/not-a-uuid")
        .await
        .problem(422, "validation_failed");
    assert_eq!(malformed.body["errors"][0]["field"], "session_id");
    for list in [
        "/sessions",
        "/prompts",
        "/plans",
        "/tool-executions",
        "/tool-approvals",
        "/checkpoints",
        "/features",
    ] {
        let body = stack.get(&stranger, list).await.ok();
        assert!(
            body["items"].as_array().unwrap().is_empty(),
            "{list} leaks: {body}"
        );
    }
    assert!(
        stack
            .get(&stranger, "/analytics/tools")
            .await
            .ok()
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_waits_for_the_projection_and_times_out_with_409() {
    let mut stack = Stack::start_with(false, 300).await;
    let (session, _, rw) = stack.scenario("Later").await;
    let member = token(Role::Member, "m1", "w1");
    let late = stack
        .get(
            &member,
            &format!("/sessions/{session}?consistent_with={rw}"),
        )
        .await;
    let late = late.problem(409, "not_yet_consistent");
    assert!(late.headers.contains_key("retry-after"));
    // without a token the read answers at once, with what is projected (nothing yet)
    stack
        .get(&member, &format!("/sessions/{session}"))
        .await
        .problem(404, "not_found");

    stack.start_projectors().await;
    let mut answer = stack
        .get(
            &member,
            &format!("/sessions/{session}?consistent_with={rw}"),
        )
        .await;
    // the first build of the projections may take longer than one 300 ms wait
    for _ in 0..50 {
        if answer.status == 200 {
            break;
        }
        answer = stack
            .get(
                &member,
                &format!("/sessions/{session}?consistent_with={rw}"),
            )
            .await;
    }
    let version = rw.rsplit_once(':').unwrap().1.parse::<i64>().unwrap();
    assert!(answer.ok()["version"].as_i64().unwrap() >= version);
}
