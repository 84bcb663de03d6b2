//! Idempotency keys: identical replays, reuse with another body, in-flight duplicates, takeovers
//! after the lease, and one append per key when the database stalls past the lease or the
//! answer fails after the commit.

use std::time::Duration;

use canopy_domain::Role;
use serde_json::json;

use crate::support::{Answer, TestApp, token};

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

/// The database stalls the first request's append past its lease; a retry on another process
/// takes the key over. Whatever order the two appends reach the database in, the key's events
/// are appended once.
#[tokio::test]
async fn a_database_stall_longer_than_the_lease_appends_once() {
    let app = TestApp::start_with(|config| config.idempotency_lease = Duration::from_secs(1)).await;
    let other = app.another_process().await;
    let member = token(Role::Member, "m1");
    let session = app.start_session(&member).await;
    let path = format!("/sessions/{session}/prompts");
    // no prompt id: a second append would be a second prompt, not a refused duplicate
    let body = json!({"text": "slow database"});

    // The stall: inserts into events wait for this lock; reads go on.
    let mut blocker = app.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let first = spawn_send(&app, &member, &path, &body, "stall");
    wait_for_appends_waiting(&app, 1).await;
    wait_until(&app, "the first request's lease never ran out", || {
        sqlx::query_scalar(
            "SELECT coalesce(bool_and(locked_until < now()), false) FROM idempotency_keys
              WHERE key = 'stall'",
        )
    })
    .await;
    // the retry takes the key over and is stuck behind the same stall
    let second = spawn_send(&other, &member, &path, &body, "stall");
    wait_for_appends_waiting(&app, 2).await;
    blocker.rollback().await.unwrap();

    let answers = [first.await.unwrap(), second.await.unwrap()];
    let accepted: Vec<&Answer> = answers.iter().filter(|a| a.status == 201).collect();
    assert!(!accepted.is_empty(), "no request was accepted: {answers:?}");
    let original = accepted[0].body.clone();
    for answer in &answers {
        match answer.status.as_u16() {
            201 => assert_eq!(answer.body, original, "both answers name the same events"),
            409 => assert_eq!(answer.code(), "idempotency_key_in_flight"),
            _ => panic!("unexpected answer: {answer:?}"),
        }
    }
    let later = app
        .send(&member, &path, Some(body), &[("idempotency-key", "stall")])
        .await
        .expect(201);
    assert_eq!(later.body, original);
    assert_eq!(later.headers["idempotent-replayed"], "true");
    assert_eq!(events_with_key(&app, "stall").await, event_ids(&original));
}

/// The append commits but its acknowledgement never reaches command-api (the database
/// connection is cut right after COMMIT): the request fails with a 5xx, and its retry gets the
/// original answer instead of appending again.
#[tokio::test]
async fn an_answer_that_fails_after_the_commit_is_replayed_not_appended_again() {
    let (app, cutter) = TestApp::start_through_commit_cutter(|_| {}).await;
    let member = token(Role::Member, "m1");
    let session = app.start_session(&member).await;
    let path = format!("/sessions/{session}/prompts");
    let body = json!({"text": "lost acknowledgement"});
    let key = [("idempotency-key", "cut")];

    cutter.arm();
    let failed = app.send(&member, &path, Some(body.clone()), &key).await;
    assert_eq!(cutter.cuts(), 1, "the append's commit was not cut");
    assert!(
        failed.status.is_server_error(),
        "unexpected answer: {failed:?}"
    );
    let committed = events_with_key(&app, "cut").await;
    assert_eq!(committed.len(), 1, "the append committed before the cut");

    let count = app.event_count().await;
    for _ in 0..2 {
        let retry = app
            .send(&member, &path, Some(body.clone()), &key)
            .await
            .expect(201);
        assert_eq!(retry.headers["idempotent-replayed"], "true");
        assert_eq!(event_ids(&retry.body), committed);
        assert_eq!(retry.body["aggregate_id"], session.to_string());
        assert!(retry.body["id"].is_string(), "the created prompt's id");
    }
    assert_eq!(app.event_count().await, count);
    assert_eq!(events_with_key(&app, "cut").await, committed);
}

/// A request that died in flight before appending holds its key until its lease ends; then the
/// same request runs (once), another request under that key is still refused.
#[tokio::test]
async fn a_key_whose_request_died_before_appending_is_taken_over_after_its_lease() {
    let app = TestApp::start().await;
    let member = token(Role::Member, "m1");
    let session = app.start_session(&member).await;
    let path = format!("/sessions/{session}/prompts");
    let body = json!({"text": "orphaned"});
    // the claim a request leaves when it dies before its append: in flight, lease running
    app.send(
        &member,
        &path,
        Some(body.clone()),
        &[("idempotency-key", "probe")],
    )
    .await
    .expect(201);
    sqlx::query(
        "INSERT INTO idempotency_keys (caller, key, request_hash, state, claim_token, locked_until, expires_at)
         SELECT caller, 'died', request_hash, 'in_flight', gen_random_uuid(), now() + interval '1 hour',
                now() + interval '1 day'
           FROM idempotency_keys WHERE key = 'probe'",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let key = [("idempotency-key", "died")];
    app.send(&member, &path, Some(body.clone()), &key)
        .await
        .problem(409, "idempotency_key_in_flight");

    sqlx::query(
        "UPDATE idempotency_keys SET locked_until = now() - interval '1 second' WHERE key = 'died'",
    )
    .execute(app.pool())
    .await
    .unwrap();
    app.send(&member, &path, Some(json!({"text": "other"})), &key)
        .await
        .problem(422, "idempotency_key_reused");
    let taken_over = app
        .send(&member, &path, Some(body.clone()), &key)
        .await
        .expect(201);
    assert!(!taken_over.headers.contains_key("idempotent-replayed"));
    assert_eq!(
        events_with_key(&app, "died").await,
        event_ids(&taken_over.body)
    );
    let replay = app.send(&member, &path, Some(body), &key).await.expect(201);
    assert_eq!(replay.body, taken_over.body);
}

fn spawn_send(
    app: &TestApp,
    token: &str,
    path: &str,
    body: &serde_json::Value,
    key: &str,
) -> tokio::task::JoinHandle<Answer> {
    let request = app
        .request(reqwest::Method::POST, path)
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(body);
    tokio::spawn(async move { crate::support::answer(request.send().await.unwrap()).await })
}

/// Waits until `count` appends wait for a lock on the events table.
async fn wait_for_appends_waiting(app: &TestApp, count: i64) {
    wait_until(app, "the appends never reached the stalled table", || {
        sqlx::query_scalar(
            "SELECT count(*) >= $1 FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'
                AND query LIKE '%INSERT INTO events%'",
        )
        .bind(count)
    })
    .await;
}

async fn wait_until<'q, F>(app: &TestApp, failure: &str, query: F)
where
    F: Fn() -> sqlx::query::QueryScalar<'q, sqlx::Postgres, bool, sqlx::postgres::PgArguments>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !query().fetch_one(app.pool()).await.unwrap() {
        assert!(tokio::time::Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ids of the events appended under `key`, in order.
async fn events_with_key(app: &TestApp, key: &str) -> Vec<uuid::Uuid> {
    sqlx::query_scalar(
        "SELECT event_id FROM events WHERE metadata ->> 'idempotency_key' = $1
          ORDER BY position",
    )
    .bind(key)
    .fetch_all(app.pool())
    .await
    .unwrap()
}

fn event_ids(answer: &serde_json::Value) -> Vec<uuid::Uuid> {
    serde_json::from_value(answer["event_ids"].clone()).unwrap()
}
