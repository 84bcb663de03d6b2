//! Feature commands through HTTP.

use canopy_domain::Role;
use serde_json::json;

use crate::support::{TestApp, token, token_in};

#[tokio::test]
async fn a_feature_collects_sessions_learnings_and_decisions() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let member = token(Role::Member, "m1");
    let feature = app
        .post(
            &member,
            "/features",
            json!({"title": "Login revamp", "description": "OAuth"}),
        )
        .await
        .expect(201)
        .id();
    let session = app.start_session(&member).await;
    app.post(
        &member,
        &format!("/features/{feature}/sessions"),
        json!({"session_id": session}),
    )
    .await
    .expect(202);
    app.post(
        &member,
        &format!("/features/{feature}/sessions"),
        json!({"session_id": session}),
    )
    .await
    .problem(409, "session_already_attached");
    app.post(
        &member,
        &format!("/features/{feature}/learnings"),
        json!({"session_id": session, "text": "tokens expire"}),
    )
    .await
    .expect(201);
    app.post(
        &member,
        &format!("/features/{feature}/decisions"),
        json!({"title": "Use PKCE", "rationale": "public clients"}),
    )
    .await
    .expect(201);
    app.post(&member, &format!("/features/{feature}/complete"), json!({}))
        .await
        .problem(403, "forbidden");
    app.post(&owner, &format!("/features/{feature}/complete"), json!({}))
        .await
        .expect(202);
    assert_eq!(
        app.event_types(feature).await,
        [
            "FeatureCreated",
            "SessionAttached",
            "LearningShared",
            "DecisionRecorded",
            "FeatureCompleted"
        ]
    );
    let before = app.event_count().await;
    app.post(
        &member,
        &format!("/features/{feature}/decisions"),
        json!({"title": "x", "rationale": "y"}),
    )
    .await
    .problem(409, "feature_completed");
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn only_sessions_of_the_same_workspace_can_be_attached() {
    let app = TestApp::start().await;
    let feature = app
        .post(
            &token(Role::Member, "m1"),
            "/features",
            json!({"title": "F"}),
        )
        .await
        .expect(201)
        .id();
    let foreign = app.start_session(&token_in(Role::Owner, "o2", "w2")).await;
    let before = app.event_count().await;
    app.post(
        &token(Role::Member, "m1"),
        &format!("/features/{feature}/sessions"),
        json!({"session_id": foreign}),
    )
    .await
    .problem(422, "session_not_found");
    // and another workspace cannot see the feature at all
    app.post(
        &token_in(Role::Owner, "o2", "w2"),
        &format!("/features/{feature}/learnings"),
        json!({"text": "x"}),
    )
    .await
    .problem(404, "not_found");
    assert_eq!(app.event_count().await, before);
}
