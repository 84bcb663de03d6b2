//! People's session commands, each through HTTP, with the events they append.

use canopy_domain::Role;
use serde_json::json;

use crate::support::{TestApp, token};

#[tokio::test]
async fn a_session_goes_through_its_lifecycle() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let member = token(Role::Member, "m1");

    let started = app
        .post(
            &owner,
            "/sessions",
            json!({"title": "Fix login", "repository_url": "git@git.example.invalid:app.git", "base_branch": "main", "session_branch": "canopy/fix-login"}),
        )
        .await
        .expect(201);
    let session = started.id();
    assert_eq!(started.body["aggregate_type"], "session");
    assert_eq!(started.body["aggregate_id"], session.to_string());
    assert_eq!(started.body["version"], 2);
    assert_eq!(started.body["event_ids"].as_array().unwrap().len(), 2);

    let joined = app
        .post(&member, &format!("/sessions/{session}/join"), json!({}))
        .await
        .expect(202);
    assert_eq!(joined.body["version"], 3);
    // joining again changes nothing
    let again = app
        .send(&member, &format!("/sessions/{session}/join"), None, &[])
        .await
        .expect(202);
    assert_eq!(again.body["version"], 3);
    assert_eq!(again.body["event_ids"], json!([]));

    let prompt = app.submit_prompt(&member, session).await;
    app.post(
        &member,
        &format!("/sessions/{session}/prompts/{prompt}/cancel"),
        json!({}),
    )
    .await
    .expect(202);
    app.post(
        &member,
        &format!("/sessions/{session}/checkpoints"),
        json!({"label": "wip"}),
    )
    .await
    .expect(202);
    app.post(&owner, &format!("/sessions/{session}/pushes"), json!({}))
        .await
        .expect(202);
    app.post(&member, &format!("/sessions/{session}/leave"), json!({}))
        .await
        .expect(202);
    app.post(&owner, &format!("/sessions/{session}/complete"), json!({}))
        .await
        .expect(202);
    app.post(&owner, &format!("/sessions/{session}/archive"), json!({}))
        .await
        .expect(202);

    assert_eq!(
        app.event_types(session).await,
        [
            "SessionStarted",
            "ParticipantJoined",
            "ParticipantJoined",
            "PromptSubmitted",
            "PromptCancelled",
            "CheckpointRequested",
            "PushRequested",
            "ParticipantLeft",
            "SessionCompleted",
            "SessionArchived"
        ]
    );
    // an archived session accepts nothing
    let before = app.event_count().await;
    app.post(&member, &format!("/sessions/{session}/join"), json!({}))
        .await
        .problem(409, "session_archived");
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn plans_tool_approvals_and_restores_are_decided_by_moderators() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let admin = token(Role::Admin, "admin");

    // reject, then approve a second proposal
    let (session, prompt, plan) = app.with_pending_plan(&token(Role::Member, "m1")).await;
    app.post(
        &admin,
        &format!("/sessions/{session}/plans/{plan}/reject"),
        json!({"comment": "too broad"}),
    )
    .await
    .expect(202);
    let second = app
        .runner(
            &format!("/runner/sessions/{session}/plans"),
            json!({"prompt_id": prompt, "summary": "narrower", "steps": []}),
        )
        .await
        .expect(201)
        .id();
    app.post(
        &owner,
        &format!("/sessions/{session}/plans/{second}/approve"),
        json!({}),
    )
    .await
    .expect(202);
    app.post(
        &owner,
        &format!("/sessions/{session}/plans/{second}/approve"),
        json!({}),
    )
    .await
    .problem(409, "plan_already_decided");

    // grant one tool ask, deny another
    let (session, prompt, request) = app.with_open_tool_request().await;
    app.post(
        &owner,
        &format!("/sessions/{session}/tool-approvals/{request}/grant"),
        json!({}),
    )
    .await
    .expect(202);
    let second = app
        .runner(
            &format!("/runner/sessions/{session}/tool-approvals"),
            json!({"prompt_id": prompt, "call_id": "call_2", "tool": "bash", "input_summary": "curl"}),
        )
        .await
        .expect(201)
        .id();
    app.post(
        &admin,
        &format!("/sessions/{session}/tool-approvals/{second}/deny"),
        json!({"comment": "no network"}),
    )
    .await
    .expect(202);
    let types = app.event_types(session).await;
    assert!(types.ends_with(&[
        "ToolApprovalRequested".to_owned(),
        "ToolApprovalGranted".to_owned(),
        "ToolApprovalRequested".to_owned(),
        "ToolApprovalDenied".to_owned()
    ]));

    // restore a checkpoint of this session, not an unknown one
    let (session, checkpoint) = app.with_checkpoint().await;
    app.post(
        &owner,
        &format!("/sessions/{session}/restores"),
        json!({"checkpoint_id": checkpoint}),
    )
    .await
    .expect(202);
    let before = app.event_count().await;
    app.post(
        &owner,
        &format!("/sessions/{session}/restores"),
        json!({"checkpoint_id": uuid::Uuid::new_v4()}),
    )
    .await
    .problem(404, "checkpoint_not_found");
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn a_session_under_a_feature_needs_that_feature_in_the_workspace() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let feature = app
        .post(&owner, "/features", json!({"title": "Login revamp"}))
        .await
        .expect(201)
        .id();
    let body = |feature_id: uuid::Uuid| json!({"feature_id": feature_id, "title": "t", "repository_url": "https://g.example.invalid/r", "base_branch": "main"});
    app.post(&owner, "/sessions", body(feature))
        .await
        .expect(201);
    let before = app.event_count().await;
    app.post(&owner, "/sessions", body(uuid::Uuid::new_v4()))
        .await
        .problem(422, "feature_not_found");
    let elsewhere = crate::support::token_in(Role::Owner, "o2", "w2");
    app.post(&elsewhere, "/sessions", body(feature))
        .await
        .problem(422, "feature_not_found");
    assert_eq!(app.event_count().await, before);
}
