//! The prompt queue's bound (`CANOPY_MAX_QUEUED_PROMPTS`), and prompts and ids that stay
//! refused after the session's state has forgotten them.

use canopy_domain::Role;
use canopy_domain::session::{RECENT_CHECKPOINTS, RECENT_FINISHED_PROMPTS};
use serde_json::json;
use uuid::Uuid;

use crate::support::{TestApp, token};

#[tokio::test]
async fn a_full_queue_answers_429_until_a_prompt_starts() {
    let app = TestApp::start_with(|config| config.max_queued_prompts = 2).await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let first = app.submit_prompt(&owner, session).await;
    app.submit_prompt(&owner, session).await;
    let before = app.event_count().await;

    let path = format!("/sessions/{session}/prompts");
    let body = json!({"text": "one too many"});
    let key = Uuid::new_v4().to_string();
    let full = app
        .send(
            &owner,
            &path,
            Some(body.clone()),
            &[("idempotency-key", &key)],
        )
        .await
        .problem(429, "prompt_queue_full");
    let retry: u64 = full.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert_eq!(app.event_count().await, before);

    // the running prompt leaves the queue; the same request, same key, now goes through: the
    // refusal was not remembered as the key's answer
    app.runner(
        &format!("/runner/sessions/{session}/prompts/{first}/start"),
        json!({}),
    )
    .await
    .expect(202);
    app.send(&owner, &path, Some(body), &[("idempotency-key", &key)])
        .await
        .expect(201);
}

#[tokio::test]
async fn a_prompt_the_session_has_forgotten_takes_no_more_events() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let mut prompts = Vec::new();
    for _ in 0..=RECENT_FINISHED_PROMPTS {
        let prompt = app.submit_prompt(&owner, session).await;
        for step in ["start", "complete"] {
            app.runner(
                &format!("/runner/sessions/{session}/prompts/{prompt}/{step}"),
                json!({}),
            )
            .await
            .expect(202);
        }
        prompts.push(prompt);
    }
    let before = app.event_count().await;

    // the first prompt fell out of the state's window of finished prompts...
    app.runner(
        &format!("/runner/sessions/{session}/prompts/{}/complete", prompts[0]),
        json!({}),
    )
    .await
    .problem(404, "prompt_not_found");
    // ...and the last one is still known as finished
    app.runner(
        &format!(
            "/runner/sessions/{session}/prompts/{}/complete",
            prompts[RECENT_FINISHED_PROMPTS]
        ),
        json!({}),
    )
    .await
    .problem(409, "prompt_finished");
    assert_eq!(app.event_count().await, before);
}

/// People's ids are chosen by the server; the runner still names the checkpoints it reports.
/// Once the session's state has forgotten a checkpoint, its id stays taken all the same.
#[tokio::test]
async fn a_checkpoint_id_the_session_has_forgotten_is_still_a_duplicate() {
    let app = TestApp::start().await;
    let owner = token(Role::Owner, "owner");
    let session = app.start_session(&owner).await;
    let path = format!("/runner/sessions/{session}/checkpoints");
    let checkpoint = |id: Uuid| {
        json!({"checkpoint_id": id, "commit_sha": "0123456789abcdef0123456789abcdef01234567",
               "files_changed": [], "trigger": "manual"})
    };
    let first = Uuid::new_v4();
    app.runner(&path, checkpoint(first)).await.expect(201);
    // while the state remembers it, the state refuses it
    app.runner(&path, checkpoint(first))
        .await
        .problem(409, "duplicate_id");
    for _ in 0..RECENT_CHECKPOINTS {
        app.runner(&path, checkpoint(Uuid::new_v4()))
            .await
            .expect(201);
    }
    let before = app.event_count().await;

    // the first fell out of the state's window: the event store's unique index refuses it
    app.runner(&path, checkpoint(first))
        .await
        .problem(409, "duplicate_id");
    assert_eq!(app.event_count().await, before);
}
