//! Every error class: the status, the stable code, problem+json, and nothing written.

use canopy_domain::Role;
use reqwest::Method;
use serde_json::json;

use crate::support::{SECRET, TestApp, runner, token, token_in};

#[tokio::test]
async fn malformed_and_invalid_bodies_are_refused_without_writing() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let prompts = format!("/sessions/{session}/prompts");
    let before = app.event_count().await;

    // 400: not JSON
    let post = |body: &'static str, content_type: &'static str| {
        app.request(Method::POST, &prompts)
            .bearer_auth(&owner)
            .header("content-type", content_type)
            .body(body)
    };
    app.raw(post("{\"text\": ", "application/json"))
        .await
        .problem(400, "malformed_json");
    // 415: not declared as JSON
    app.raw(post("{\"text\": \"x\"}", "text/plain"))
        .await
        .problem(415, "unsupported_media_type");
    // 422: an unknown field, named
    let unknown = app
        .post(&owner, &prompts, json!({"text": "x", "priority": 1}))
        .await
        .problem(422, "validation_failed");
    assert!(
        unknown.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("priority")
    );
    // 422: a wrong type, with its path
    let typed = app
        .post(&owner, &prompts, json!({"text": 5}))
        .await
        .problem(422, "validation_failed");
    assert_eq!(typed.body["errors"][0]["field"], "text");
    // 422: a body that is not an object
    app.raw(post("[1]", "application/json"))
        .await
        .problem(422, "validation_failed");
    // 422: every invalid field is listed
    let listed = app
        .post(
            &owner,
            "/sessions",
            json!({"title": " ", "repository_url": "not a url", "base_branch": "a..b", "session_branch": "-x"}),
        )
        .await
        .problem(422, "validation_failed");
    let fields: Vec<&str> = listed.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["title", "repository_url", "base_branch", "session_branch"]
    );
    // 422: a runner report with an invalid commit id and too many files
    let files: Vec<String> = (0..1001).map(|i| format!("f{i}")).collect();
    let report = app
        .runner(
            &format!("/runner/sessions/{session}/checkpoints"),
            json!({"commit_sha": "xyz", "files_changed": files, "trigger": "auto"}),
        )
        .await
        .problem(422, "validation_failed");
    assert_eq!(report.body["errors"].as_array().unwrap().len(), 2);

    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn oversized_bodies_and_prompts_are_413() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let before = app.event_count().await;
    let prompts = format!("/sessions/{session}/prompts");
    let big = "x".repeat(64 * 1024 + 1);
    app.post(&owner, &prompts, json!({"text": big}))
        .await
        .problem(413, "prompt_too_large");
    let huge = "x".repeat(1024 * 1024 + 1);
    app.post(&owner, &prompts, json!({"text": huge}))
        .await
        .problem(413, "payload_too_large");
    // exactly at the limit is fine
    app.post(&owner, &prompts, json!({"text": "x".repeat(64 * 1024)}))
        .await
        .expect(201);
    assert_eq!(app.event_count().await, before + 1);
}

#[tokio::test]
async fn missing_bad_expired_and_forged_tokens_are_401() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let before = app.event_count().await;
    let path = format!("/sessions/{session}/join");

    let no_token = app.raw(app.request(Method::POST, &path)).await;
    let no_token = no_token.problem(401, "unauthorized");
    assert!(no_token.body.get("detail").is_some());
    app.send("not-a-jwt", &path, None, &[])
        .await
        .problem(401, "unauthorized");
    let expired =
        canopy_auth::Claims::user("u", "U", "w1", Role::Owner, chrono::Duration::hours(-2));
    app.send(
        &canopy_auth::mint_hs256(SECRET, &expired).unwrap(),
        &path,
        None,
        &[],
    )
    .await
    .problem(401, "unauthorized");
    let forged = canopy_auth::Claims::user("u", "U", "w1", Role::Owner, chrono::Duration::hours(1));
    app.send(
        &canopy_auth::mint_hs256("some-other-secret-0123456789", &forged).unwrap(),
        &path,
        None,
        &[],
    )
    .await
    .problem(401, "unauthorized");
    // a bad path with no token is still 401 first
    app.raw(app.request(Method::POST, "/sessions/not-a-uuid/join"))
        .await
        .problem(401, "unauthorized");
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn wrong_role_is_403_and_another_workspace_is_404() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let before = app.event_count().await;
    app.post(
        &token(Role::Viewer, "v"),
        &format!("/sessions/{session}/prompts"),
        json!({"text": "hi"}),
    )
    .await
    .problem(403, "forbidden");
    app.post(&token(Role::Auditor, "a"), "/sessions", json!({"title": "t", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await
        .problem(403, "forbidden");
    app.post(
        &token_in(Role::Owner, "intruder", "w2"),
        &format!("/sessions/{session}/prompts"),
        json!({"text": "hi"}),
    )
    .await
    .problem(404, "not_found");
    app.post(
        &owner,
        &format!("/sessions/{}/join", uuid::Uuid::new_v4()),
        json!({}),
    )
    .await
    .problem(404, "not_found");
    // a malformed id is the request's mistake, named
    let malformed = app
        .post(&owner, "/sessions/not-a-uuid/join", json!({}))
        .await
        .problem(422, "validation_failed");
    assert_eq!(malformed.body["errors"][0]["field"], "session_id");
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn domain_refusals_are_409_or_422_with_the_rule_code() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    app.submit_prompt(&owner, session).await;
    let second = app.submit_prompt(&owner, session).await;
    let before = app.event_count().await;
    app.runner(
        &format!("/runner/sessions/{session}/prompts/{second}/start"),
        json!({}),
    )
    .await
    .problem(409, "prompt_not_at_head");
    app.post(&owner, &format!("/sessions/{session}/complete"), json!({}))
        .await
        .problem(409, "prompts_outstanding");
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn headers_are_checked_and_if_match_makes_a_command_conditional() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let before = app.event_count().await;
    let path = format!("/sessions/{session}/prompts");
    let body = Some(json!({"text": "hi"}));
    app.send(&owner, &path, body.clone(), &[("if-match", "abc")])
        .await
        .problem(400, "invalid_header");
    let long = "k".repeat(256);
    app.send(&owner, &path, body.clone(), &[("idempotency-key", &long)])
        .await
        .problem(400, "invalid_header");
    let stale = app
        .send(&owner, &path, body.clone(), &[("if-match", "\"1\"")])
        .await
        .problem(409, "version_mismatch");
    assert!(stale.headers.get("retry-after").is_none());
    // the runner must send an idempotency key
    app.send(
        &runner(),
        &format!("/runner/sessions/{session}/sandbox/started"),
        Some(json!({"sandbox_id": "s", "opencode_session_id": "o"})),
        &[],
    )
    .await
    .problem(400, "idempotency_key_required");
    assert_eq!(app.event_count().await, before);
    let current = app
        .send(&owner, &path, body, &[("if-match", "\"2\"")])
        .await
        .expect(201);
    assert_eq!(current.body["version"], 3);
}

#[tokio::test]
async fn people_are_rate_limited_with_retry_after() {
    let app = TestApp::start_with(|config| {
        config.rate_limit_per_second = 1;
        config.rate_limit_burst = 3;
    })
    .await;
    let member = token(Role::Member, "m1");
    let session = app.start_session(&member).await;
    app.submit_prompt(&member, session).await;
    app.submit_prompt(&member, session).await;
    let before = app.event_count().await;
    let limited = app
        .post(
            &member,
            &format!("/sessions/{session}/prompts"),
            json!({"text": "one more"}),
        )
        .await
        .problem(429, "rate_limited");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert_eq!(app.event_count().await, before);
    // another person is not limited by the first one's use
    app.submit_prompt(&token(Role::Member, "m2"), session).await;
}

#[tokio::test]
async fn the_runner_is_not_held_to_the_per_person_rate_limit() {
    let app = TestApp::start_with(|config| {
        config.rate_limit_per_second = 1;
        config.rate_limit_burst = 3;
    })
    .await;
    let member = token(Role::Member, "m1");
    let session = app.start_session(&member).await;
    let prompt = app.submit_prompt(&member, session).await;
    app.runner(
        &format!("/runner/sessions/{session}/prompts/{prompt}/start"),
        json!({}),
    )
    .await
    .expect(202);
    // Far past a person's burst: an agent reports every tool call and message.
    for n in 0..40 {
        app.runner(
            &format!("/runner/sessions/{session}/messages"),
            json!({"prompt_id": prompt, "message_id": format!("msg_{n}"), "text": "working"}),
        )
        .await
        .expect(202);
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems_and_5xx_hide_internals() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    app.raw(app.request(Method::GET, "/nowhere"))
        .await
        .problem(404, "route_not_found");
    app.raw(app.request(Method::GET, "/sessions"))
        .await
        .problem(405, "method_not_allowed");
    app.raw(app.request(Method::GET, "/healthz"))
        .await
        .expect(200);
    app.raw(app.request(Method::GET, "/readyz"))
        .await
        .expect(200);

    // started by another process, so this one has no state of it in memory and reads the snapshots
    let other = app.another_process().await;
    let session = other.start_session(&owner).await;
    other.shutdown().await;
    // break storage under the app: the answer is an opaque 500 with a request id
    sqlx::query("DROP TABLE snapshots")
        .execute(app.pool())
        .await
        .unwrap();
    let before = app.event_count().await;
    let failed = app
        .send(
            &owner,
            &format!("/sessions/{session}/join"),
            None,
            &[("x-request-id", "req-42")],
        )
        .await
        .problem(500, "internal");
    assert_eq!(failed.body["request_id"], "req-42");
    assert!(
        failed.body.get("detail").is_none(),
        "a 5xx leaks: {:?}",
        failed.body
    );
    assert!(!failed.body.to_string().contains("snapshots"));
    assert_eq!(app.event_count().await, before);

    let metrics = app
        .raw(app.request(Method::GET, "/metrics"))
        .await
        .expect(200);
    assert!(
        metrics
            .body
            .as_str()
            .unwrap()
            .contains("canopy_http_requests_total")
    );
}
