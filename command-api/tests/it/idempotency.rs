//! Idempotency keys: identical replays, reuse with another body, in-flight duplicates, and the
//! recovery of a request that died after appending.

use canopy_domain::Role;
use serde_json::json;

use crate::support::{TestApp, token};

#[tokio::test]
async fn a_retry_gets_the_first_response_and_writes_nothing() {
    let app = TestApp::start().await;
    let member = token(Role::Member, "m1");
    let session = app.start_session(&member).await;
    let path = format!("/sessions/{session}/prompts");
    let key = [("idempotency-key", "prompt-1")];

    let first = app
        .send(&member, &path, Some(json!({"text": "add a test"})), &key)
        .await
        .expect(201);
    let count = app.event_count().await;
    let retry = app
        .send(&member, &path, Some(json!({"text": "add a test"})), &key)
        .await
        .expect(201);
    assert_eq!(
        retry.body, first.body,
        "a replay answers exactly as the first time"
    );
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(app.event_count().await, count);

    // the same JSON with other whitespace and key order is the same request
    let spaced = app
        .request(reqwest::Method::POST, &path)
        .bearer_auth(&member)
        .header("idempotency-key", "prompt-1")
        .header("content-type", "application/json")
        .body("{ \"text\" :  \"add a test\" }");
    assert_eq!(app.raw(spaced).await.expect(201).body, first.body);

    // another body under the same key is refused
    app.send(
        &member,
        &path,
        Some(json!({"text": "something else"})),
        &key,
    )
    .await
    .problem(422, "idempotency_key_reused");
    // keys are per caller: another person may use the same key
    app.send(
        &token(Role::Member, "m2"),
        &path,
        Some(json!({"text": "add a test"})),
        &key,
    )
    .await
    .expect(201);
    assert_eq!(app.event_count().await, count + 2);
}

#[tokio::test]
async fn a_refusal_is_remembered_too_but_a_conflict_is_not() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let path = format!("/sessions/{session}/complete");
    let prompt = app.submit_prompt(&owner, session).await;
    let refused = app
        .send(&owner, &path, None, &[("idempotency-key", "done")])
        .await
        .problem(409, "prompts_outstanding");
    // the state changed, but the key's answer stays the refusal
    app.post(
        &owner,
        &format!("/sessions/{session}/prompts/{prompt}/cancel"),
        json!({}),
    )
    .await
    .expect(202);
    let replay = app
        .send(&owner, &path, None, &[("idempotency-key", "done")])
        .await;
    assert_eq!(
        (replay.status, &replay.body),
        (refused.status, &refused.body)
    );
    // a new key runs the command against the new state
    app.send(&owner, &path, None, &[("idempotency-key", "fresh")])
        .await
        .expect(202);
}

#[tokio::test]
async fn a_duplicate_while_the_first_is_in_flight_is_409_with_retry_after() {
    let app = TestApp::start().await;
    let member = token(Role::Member, "m1");
    let session = app.start_session(&member).await;
    let path = format!("/sessions/{session}/prompts");
    let body = json!({"text": "slow one"});

    // Hold the first request in flight: it claims its key, then its append waits on a lock that
    // keeps inserts out of the events table until we let go.
    let mut blocker = app.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN SHARE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let first = {
        let app_base = app
            .request(reqwest::Method::POST, &path)
            .bearer_auth(&member)
            .header("idempotency-key", "slow")
            .json(&body);
        tokio::spawn(async move { app_base.send().await.unwrap() })
    };
    // wait until the first request holds its claim
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let claimed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE key = 'slow'")
                .fetch_one(app.pool())
                .await
                .unwrap();
        if claimed == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first request never claimed its key"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let duplicate = app
        .send(
            &member,
            &path,
            Some(body.clone()),
            &[("idempotency-key", "slow")],
        )
        .await
        .problem(409, "idempotency_key_in_flight");
    assert!(duplicate.headers.contains_key("retry-after"));

    blocker.rollback().await.unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status().as_u16(), 201);
    let first: serde_json::Value = first.json().await.unwrap();
    let after = app
        .send(&member, &path, Some(body), &[("idempotency-key", "slow")])
        .await
        .expect(201);
    assert_eq!(after.body, first);
    let prompts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'PromptSubmitted'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(prompts, 1);
}

#[tokio::test]
async fn a_request_that_died_after_appending_is_answered_from_its_events() {
    let app = TestApp::start().await;
    let member = token(Role::Member, "m1");
    let session = app.start_session(&member).await;
    let path = format!("/sessions/{session}/prompts");
    let body = json!({"prompt_id": uuid::Uuid::new_v4(), "text": "crashy"});
    let first = app
        .send(
            &member,
            &path,
            Some(body.clone()),
            &[("idempotency-key", "crash")],
        )
        .await
        .expect(201);
    // simulate the crash: the answer was never recorded and the lease ran out
    sqlx::query(
        "UPDATE idempotency_keys SET state = 'in_flight', response_status = NULL,
                response_body = jsonb_build_object('status', 201, 'aggregate_type', 'session',
                                                   'aggregate_id', $1::text, 'id', $2::text),
                locked_until = now() - interval '1 second'
          WHERE key = 'crash'",
    )
    .bind(session.to_string())
    .bind(first.body["id"].as_str().unwrap())
    .execute(app.pool())
    .await
    .unwrap();
    let count = app.event_count().await;
    let recovered = app
        .send(&member, &path, Some(body), &[("idempotency-key", "crash")])
        .await
        .expect(201);
    assert_eq!(recovered.body, first.body);
    assert_eq!(app.event_count().await, count);
}
