//! The security issue's command-side items: another workspace's ids answer exactly as ids that
//! do not exist (the server chooses every id a person creates, so none can be squatted or
//! probed), and runner tokens have their own audience and key.

use canopy_auth::Claims;
use canopy_domain::Role;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{SECRET, TestApp, token, token_in};

/// A request body naming `id` as the id of what it creates.
type BodyWithId = Box<dyn Fn(Uuid) -> Value>;

/// A problem body without what differs between any two requests.
fn comparable(mut body: Value) -> Value {
    if let Some(body) = body.as_object_mut() {
        body.remove("request_id");
        body.remove("instance");
    }
    body
}

#[tokio::test]
async fn creating_with_another_workspaces_id_answers_as_with_a_new_id() {
    let app = TestApp::start().await;
    let victim = token(Role::Owner, "victim");
    let session = app.start_session(&victim).await;
    let prompt = app.submit_prompt(&victim, session).await;
    let feature = app
        .post(&victim, "/features", json!({"title": "Login"}))
        .await
        .expect(201)
        .id();
    let intruder = token_in(Role::Owner, "intruder", "w2");
    let own_session = app.start_session(&intruder).await;
    let own_feature = app
        .post(&intruder, "/features", json!({"title": "Mine"}))
        .await
        .expect(201)
        .id();
    let before = app.event_count().await;
    let session_body = |id: Uuid| json!({"session_id": id, "title": "t", "repository_url": "https://g.example.invalid/r", "base_branch": "main"});
    let cases: Vec<(String, BodyWithId, Uuid)> = vec![
        ("/sessions".into(), Box::new(session_body), session),
        (
            "/features".into(),
            Box::new(|id| json!({"feature_id": id, "title": "t"})),
            feature,
        ),
        (
            format!("/sessions/{own_session}/prompts"),
            Box::new(|id| json!({"prompt_id": id, "text": "squat"})),
            prompt,
        ),
        (
            format!("/features/{own_feature}/learnings"),
            Box::new(|id| json!({"learning_id": id, "text": "squat"})),
            Uuid::new_v4(),
        ),
        (
            format!("/features/{own_feature}/decisions"),
            Box::new(|id| json!({"decision_id": id, "title": "t", "rationale": "r"})),
            Uuid::new_v4(),
        ),
    ];
    for (path, body, foreign) in cases {
        let taken = app.post(&intruder, &path, body(foreign)).await;
        let fresh = app.post(&intruder, &path, body(Uuid::new_v4())).await;
        assert_eq!(
            (taken.status, comparable(taken.body.clone())),
            (fresh.status, comparable(fresh.body.clone())),
            "{path}: a foreign id answers unlike a new one"
        );
        assert!(
            taken.status.is_client_error(),
            "{path}: a client chose the id of what it creates: {}",
            taken.status
        );
    }
    assert_eq!(app.event_count().await, before, "a refused create wrote");

    // a create without an id gets one from the server
    let created = app.post(&intruder, "/sessions", json!({"title": "t", "repository_url": "https://g.example.invalid/r", "base_branch": "main"})).await.expect(201);
    assert_ne!(created.id(), session);
}

#[tokio::test]
async fn acting_on_another_workspaces_ids_answers_as_on_ids_that_do_not_exist() {
    let app = TestApp::start().await;
    let victim = token(Role::Owner, "victim");
    let session = app.start_session(&victim).await;
    let prompt = app.submit_prompt(&victim, session).await;
    let feature = app
        .post(&victim, "/features", json!({"title": "Login"}))
        .await
        .expect(201)
        .id();
    let intruder = token_in(Role::Owner, "intruder", "w2");
    let own_feature = app
        .post(&intruder, "/features", json!({"title": "Mine"}))
        .await
        .expect(201)
        .id();
    let before = app.event_count().await;
    let none = Uuid::new_v4();
    let paths = |session: Uuid, prompt: Uuid, feature: Uuid| {
        vec![
            (format!("/sessions/{session}/join"), json!({})),
            (
                format!("/sessions/{session}/prompts"),
                json!({"text": "hi"}),
            ),
            (
                format!("/sessions/{session}/prompts/{prompt}/cancel"),
                json!({}),
            ),
            (format!("/sessions/{session}/archive"), json!({})),
            (
                format!("/features/{feature}/decisions"),
                json!({"title": "t", "rationale": "r"}),
            ),
            (
                format!("/features/{own_feature}/sessions"),
                json!({"session_id": session}),
            ),
            (
                "/sessions".into(),
                json!({"feature_id": feature, "title": "t", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}),
            ),
        ]
    };
    for ((path, body), (none_path, none_body)) in paths(session, prompt, feature)
        .into_iter()
        .zip(paths(none, none, none))
    {
        let foreign = app.post(&intruder, &path, body).await;
        let missing = app.post(&intruder, &none_path, none_body).await;
        assert!(
            foreign.status.is_client_error(),
            "{path}: {:?}",
            foreign.body
        );
        assert_eq!(
            (
                foreign.status,
                comparable(foreign.body.clone())
                    .to_string()
                    .replace(&session.to_string(), "X")
                    .replace(&feature.to_string(), "X")
            ),
            (
                missing.status,
                comparable(missing.body.clone())
                    .to_string()
                    .replace(&none.to_string(), "X")
            ),
            "{path}"
        );
    }
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn runner_tokens_have_their_own_audience_and_key() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let prompt = app.submit_prompt(&owner, session).await;
    let path = format!("/runner/sessions/{session}/prompts/{prompt}/start");
    // the trust root of people's tokens signs no runner token
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims::runner("agent-runner", chrono::Duration::hours(1)),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let key = Uuid::new_v4().to_string();
    app.send(
        &forged,
        &path,
        Some(json!({})),
        &[("idempotency-key", &key)],
    )
    .await
    .problem(401, "unauthorized");
    // nor a person's token with no audience
    let mut claims = serde_json::to_value(Claims::user(
        "u",
        "U",
        "w1",
        Role::Owner,
        chrono::Duration::hours(1),
    ))
    .unwrap();
    claims.as_object_mut().unwrap().remove("aud");
    let unaudienced = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    app.post(
        &unaudienced,
        &format!("/sessions/{session}/join"),
        json!({}),
    )
    .await
    .problem(401, "unauthorized");
    // the runner's own token still works
    app.runner(&path, json!({})).await.expect(202);
}

#[tokio::test]
async fn command_api_serves_as_canopy_writer_which_changes_no_schema() {
    let admin = canopy_testkit::database().await.unwrap();
    let role = format!("test_{}", Uuid::new_v4().simple());
    sqlx::query(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{role}' IN ROLE canopy_writer"
    ))
    .execute(admin.pool())
    .await
    .unwrap();
    let as_role = |url: &str| {
        let (scheme, rest) = url.split_once("://").unwrap();
        let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{role}:{role}@{rest}")
    };
    let app = TestApp::start_with(|config| {
        let url = config.database.url().unwrap();
        config.database = canopy_config::DatabaseArgs::new(as_role(&url));
    })
    .await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let key = Uuid::new_v4().to_string();
    let path = format!("/sessions/{session}/prompts");
    let first = app
        .send(
            &owner,
            &path,
            Some(json!({"text": "hi"})),
            &[("idempotency-key", &key)],
        )
        .await
        .expect(201);
    let again = app
        .send(
            &owner,
            &path,
            Some(json!({"text": "hi"})),
            &[("idempotency-key", &key)],
        )
        .await
        .expect(201);
    assert_eq!(first.id(), again.id());

    let pool = sqlx::PgPool::connect(&as_role(&app.db.url)).await.unwrap();
    for statement in [
        "CREATE TABLE mine (id int)",
        "CREATE TABLE read.mine (id int)",
        "ALTER TABLE events DISABLE TRIGGER USER",
        "DROP TABLE idempotency_keys",
        "DELETE FROM _sqlx_migrations",
    ] {
        assert!(
            sqlx::query(statement).execute(&pool).await.is_err(),
            "canopy_writer may: {statement}"
        );
    }
}

#[tokio::test]
async fn a_nul_in_a_prompt_is_422_not_500() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    app.post(
        &owner,
        &format!("/sessions/{session}/prompts"),
        json!({"text": "before\u{0}after"}),
    )
    .await
    .problem(422, "validation_failed");
}
