//! Many writers on one session: serialized within a process, retried or refused cleanly across
//! processes, and every accepted command in the store exactly once.

use std::collections::HashSet;

use canopy_domain::Role;
use serde_json::json;
use uuid::Uuid;

use crate::support::{TestApp, token};

async fn sequences(app: &TestApp, session: Uuid) -> Vec<i64> {
    sqlx::query_scalar("SELECT sequence FROM events WHERE aggregate_id = $1 ORDER BY sequence")
        .bind(session.to_string())
        .fetch_all(app.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_prompts_through_one_process_all_land() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let app = app.clone();
        let owner = owner.clone();
        tasks.push(tokio::spawn(async move {
            app.post(
                &owner,
                &format!("/sessions/{session}/prompts"),
                json!({"text": format!("prompt {i}")}),
            )
            .await
        }));
    }
    let mut versions = HashSet::new();
    for task in tasks {
        let answer = task.await.unwrap().expect(201);
        versions.insert(answer.body["version"].as_u64().unwrap());
    }
    // 2 events from the start, then one per prompt: contiguous, each version reported once
    assert_eq!(versions, (3..=52).collect());
    assert_eq!(
        sequences(&app, session).await,
        (1..=52).collect::<Vec<i64>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_load_over_two_processes_gives_only_201_and_409_and_no_duplicates() {
    let first = TestApp::start_with(|config| config.command_attempts = 2).await;
    let second = first.another_process().await;
    let owner = token(Role::Owner, "owner");
    let session = first.start_session(&owner).await;
    let apps = [std::sync::Arc::new(first), std::sync::Arc::new(second)];
    let mut tasks = Vec::new();
    for i in 0..50 {
        let app = apps[i % 2].clone();
        let owner = owner.clone();
        tasks.push(tokio::spawn(async move {
            app.post(
                &owner,
                &format!("/sessions/{session}/prompts"),
                json!({"text": format!("p{i}")}),
            )
            .await
        }));
    }
    let mut accepted = HashSet::new();
    let mut conflicts = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status.as_u16() {
            201 => {
                accepted.insert(answer.id());
            }
            409 => {
                assert_eq!(answer.code(), "concurrency_conflict");
                assert!(answer.headers.contains_key("retry-after"));
                conflicts += 1;
            }
            other => panic!("unexpected {other}: {:?}", answer.body),
        }
    }
    assert_eq!(accepted.len() + conflicts, 50);
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT payload -> 'PromptSubmitted' ->> 'prompt_id' FROM events
          WHERE aggregate_id = $1 AND event_type = 'PromptSubmitted'",
    )
    .bind(session.to_string())
    .fetch_all(apps[0].pool())
    .await
    .unwrap();
    let stored_set: HashSet<Uuid> = stored.iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(stored.len(), stored_set.len(), "a prompt was stored twice");
    assert_eq!(
        stored_set, accepted,
        "every 201 is in the store exactly once, and nothing else"
    );
    let expected: Vec<i64> = (1..=(2 + accepted.len() as i64)).collect();
    assert_eq!(sequences(&apps[0], session).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let db = app.db.clone();

    // Hold a request in flight: its append waits for a lock on the events table.
    let mut blocker = db.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN SHARE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let request = app
        .request(
            reqwest::Method::POST,
            &format!("/sessions/{session}/prompts"),
        )
        .bearer_auth(&owner)
        .json(&json!({"text": "last one"}));
    let in_flight = tokio::spawn(async move { request.send().await.unwrap().status().as_u16() });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request never reached its append"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Shut down while it waits, then let it go: it completes, and only then does the app stop.
    let stopping = tokio::spawn(app.shutdown());
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        !stopping.is_finished(),
        "shutdown did not wait for the in-flight request"
    );
    blocker.rollback().await.unwrap();
    assert_eq!(in_flight.await.unwrap(), 201);
    stopping.await.unwrap();
    let prompts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'PromptSubmitted'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(prompts, 1);
}
