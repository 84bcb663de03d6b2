//! Delivery to local receivers: signed and verifiable, retried until it succeeds and then no
//! more, a hanging endpoint delaying no other, dead letters, suspension and redelivery by hand.

use std::time::Duration;

use canopy_domain::Role;
use serde_json::json;

use crate::support::{Answer, Receiver, Stack, token, token_in};

#[tokio::test]
async fn a_plan_proposal_reaches_the_receiver_signed_and_verifiable() {
    let mut stack = Stack::start(true).await;
    let receiver = Receiver::start(&[]).await;
    let (webhook, secret) = stack
        .subscribe(&receiver.url(), &["PlanProposed", "ToolApprovalRequested"])
        .await;
    stack.start_webhooks(true, |_| {}).await;
    let (session, plan) = stack.propose_plan().await;

    let got = receiver.wait_for(1).await;
    let request = &got[0];
    let now = chrono::Utc::now().timestamp();
    canopy_webhook::verify(
        &secret,
        request.header("webhook-id"),
        request.header("webhook-timestamp"),
        request.header("webhook-signature"),
        &request.body,
        now,
        300,
    )
    .expect("the delivery verifies with the secret the API returned");
    let other = canopy_webhook::generate_secret();
    assert!(
        canopy_webhook::verify(
            &other,
            request.header("webhook-id"),
            request.header("webhook-timestamp"),
            request.header("webhook-signature"),
            &request.body,
            now,
            300,
        )
        .is_err()
    );
    let body = request.json();
    assert_eq!(body["type"], "PlanProposed");
    assert_eq!(body["aggregate_id"], session.to_string());
    assert_eq!(body["data"]["plan_id"], plan.to_string());
    assert_eq!(
        body["links"]["session"],
        format!("https://query.example/sessions/{session}")
    );
    assert_eq!(
        body["links"]["approve"],
        format!("https://command.example/sessions/{session}/plans/{plan}/approve")
    );
    assert_eq!(
        body["links"]["reject"],
        format!("https://command.example/sessions/{session}/plans/{plan}/reject")
    );
    assert!(request.header("webhook-id").starts_with("msg_"));

    // the attempt is logged, and the secret is in no event
    stack
        .until(
            "the delivery is recorded as delivered",
            &format!(
                "SELECT EXISTS (SELECT 1 FROM webhook_deliveries d JOIN webhook_attempts a USING (webhook_id, event_id)
                  WHERE d.webhook_id = '{webhook}' AND d.status = 'delivered' AND a.status_code = 200
                    AND a.outcome = 'delivered')"
            ),
        )
        .await;
    let leaked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE payload::text LIKE '%' || $1 || '%'")
            .bind(secret.trim_start_matches("whsec_"))
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(leaked, 0, "the signing secret is in an event");
    // only the subscribed type was sent: the session's other events were not
    assert_eq!(receiver.received().len(), 1);
}

#[tokio::test]
async fn a_receiver_failing_three_times_gets_the_event_once_more_and_then_no_more() {
    let mut stack = Stack::start(true).await;
    let receiver = Receiver::start(&[
        Answer::Status(500),
        Answer::Status(500),
        Answer::Status(500),
    ])
    .await;
    let (webhook, _) = stack.subscribe(&receiver.url(), &["PlanProposed"]).await;
    stack.start_webhooks(true, |_| {}).await;
    stack.propose_plan().await;
    let got = receiver.wait_for(4).await;
    let id = got[0].header("webhook-id").to_owned();
    assert!(
        got.iter().all(|r| r.header("webhook-id") == id),
        "one webhook-id for every retry"
    );
    assert!(
        got.iter().all(|r| r.body == got[0].body),
        "the same body every time"
    );

    // a later event through the same endpoint is the barrier: the first is not sent again
    stack.propose_plan().await;
    let got = receiver.wait_for(5).await;
    assert_ne!(got[4].header("webhook-id"), id);
    let attempts: Vec<(i32, Option<i32>, String)> = sqlx::query_as(
        "SELECT attempt, status_code, outcome FROM webhook_attempts
          WHERE webhook_id = $1 AND event_id = (SELECT event_id FROM webhook_deliveries
                                                 WHERE message_id = $2)
          ORDER BY id",
    )
    .bind(webhook)
    .bind(&id)
    .fetch_all(stack.db.pool())
    .await
    .unwrap();
    assert_eq!(
        attempts,
        vec![
            (1, Some(500), "failed".to_owned()),
            (2, Some(500), "failed".to_owned()),
            (3, Some(500), "failed".to_owned()),
            (4, Some(200), "delivered".to_owned()),
        ]
    );
    assert_eq!(
        receiver
            .received()
            .iter()
            .filter(|r| r.header("webhook-id") == id)
            .count(),
        4
    );
}

#[tokio::test]
async fn a_hanging_endpoint_does_not_delay_another() {
    let mut stack = Stack::start(true).await;
    let hanging = Receiver::start(&[Answer::Hang]).await;
    let healthy = Receiver::start(&[]).await;
    stack.subscribe(&hanging.url(), &["PlanProposed"]).await;
    stack.subscribe(&healthy.url(), &["PlanProposed"]).await;
    // far longer than the test: the hanging request is still open when the other arrives
    stack
        .start_webhooks(true, |s| s.request_timeout = Duration::from_secs(120))
        .await;
    stack.propose_plan().await;
    hanging.wait_for(1).await;
    let started = std::time::Instant::now();
    // a second event: the healthy endpoint gets both while the other still hangs on the first
    stack.propose_plan().await;
    let got = healthy.wait_for(2).await;
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        hanging.received().len(),
        1,
        "the hanging endpoint holds its own order"
    );
    assert!(got[1].at > hanging.received()[0].at);
}

#[tokio::test]
async fn dead_letters_suspend_a_failing_endpoint_and_redelivery_by_hand_sends_the_same_id() {
    let mut stack = Stack::start(true).await;
    // 2 attempts per delivery (one retry), two deliveries die: 4 failures
    let receiver = Receiver::start(&vec![Answer::Status(503); 4]).await;
    let (webhook, _) = stack.subscribe(&receiver.url(), &["PlanProposed"]).await;
    stack
        .start_webhooks(true, |s| {
            s.retry_schedule = vec![Duration::from_millis(20)];
            s.suspend_after = 2;
        })
        .await;
    stack.propose_plan().await;
    stack.propose_plan().await;
    let got = receiver.wait_for(4).await;
    let first = got[0].header("webhook-id").to_owned();
    stack
        .until(
            "the endpoint is suspended",
            &format!(
                "SELECT suspended_at IS NOT NULL AND dead_streak = 2 FROM webhook_subscriptions
                  WHERE webhook_id = '{webhook}'"
            ),
        )
        .await;
    let dead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1 AND status = 'dead'",
    )
    .bind(webhook)
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    assert_eq!(dead, 2);

    // a third event is queued, not sent, while suspended
    stack.propose_plan().await;
    stack
        .until(
            "the third event is queued",
            &format!("SELECT count(*) = 3 FROM webhook_deliveries WHERE webhook_id = '{webhook}'"),
        )
        .await;
    assert_eq!(receiver.received().len(), 4);

    // by hand: the first delivery again, then resume; it comes with the same webhook-id, in
    // order before the queued third
    let event_id: uuid::Uuid =
        sqlx::query_scalar("SELECT event_id FROM webhook_deliveries WHERE message_id = $1")
            .bind(&first)
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    let owner = token(Role::Owner, "olive");
    let (status, body) = stack
        .post(
            &owner,
            &format!("/webhooks/{webhook}/deliveries/{event_id}/redeliver"),
            json!({}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    // another workspace's owner sees no such delivery
    let (status, _) = stack
        .post(
            &token_in(Role::Owner, "oscar", "w2"),
            &format!("/webhooks/{webhook}/deliveries/{event_id}/redeliver"),
            json!({}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, body) = stack
        .post(&owner, &format!("/webhooks/{webhook}/resume"), json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    let got = receiver.wait_for(6).await;
    assert_eq!(got[4].header("webhook-id"), first);
    assert_ne!(got[5].header("webhook-id"), first);
    stack
        .until(
            "the redelivery is a second series",
            &format!(
                "SELECT EXISTS (SELECT 1 FROM webhook_attempts WHERE webhook_id = '{webhook}'
                                   AND event_id = '{event_id}' AND series = 2
                                   AND outcome = 'delivered')"
            ),
        )
        .await;
}

#[tokio::test]
async fn subscriptions_and_the_delivery_log_are_readable_in_query_api_by_owners_and_admins() {
    let mut stack = Stack::start(true).await;
    let query = stack.start_query_api().await;
    let receiver = Receiver::start(&[Answer::Status(500)]).await;
    let (webhook, secret) = stack.subscribe(&receiver.url(), &["PlanProposed"]).await;
    stack.start_webhooks(true, |_| {}).await;
    stack.propose_plan().await;
    receiver.wait_for(2).await;
    stack
        .until(
            "delivered",
            &format!(
                "SELECT EXISTS (SELECT 1 FROM webhook_deliveries WHERE webhook_id = '{webhook}'
                                   AND status = 'delivered')"
            ),
        )
        .await;

    let admin = token(Role::Admin, "ada");
    let (status, list) = stack.get(&query, &admin, "/webhooks").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let listed = &list["items"][0];
    assert_eq!(listed["webhook_id"], webhook.to_string());
    assert_eq!(listed["url"], receiver.url());
    assert_eq!(listed["status"], "active");
    assert_eq!(
        listed["secret_fingerprint"],
        canopy_webhook::fingerprint(&secret)
    );
    assert!(listed.get("secret").is_none());

    let (status, page) = stack
        .get(&query, &admin, &format!("/webhooks/{webhook}/deliveries"))
        .await;
    assert_eq!(status, 200, "{page}");
    let delivery = &page["items"][0];
    assert_eq!(delivery["event_type"], "PlanProposed");
    assert_eq!(delivery["status"], "delivered");
    assert_eq!(delivery["attempts"], 2);
    let log = delivery["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(
        (log[0]["status_code"].as_i64(), log[0]["outcome"].as_str()),
        (Some(500), Some("failed"))
    );
    assert_eq!(
        (log[1]["status_code"].as_i64(), log[1]["outcome"].as_str()),
        (Some(200), Some("delivered"))
    );
    assert!(log[1]["latency_ms"].as_i64().unwrap() >= 0);
    let (status, page) = stack
        .get(
            &query,
            &admin,
            &format!("/webhooks/{webhook}/deliveries?status=dead"),
        )
        .await;
    assert_eq!(
        (status, page["items"].as_array().map(Vec::len)),
        (200, Some(0))
    );

    // members may not read it; another workspace sees nothing
    let (status, _) = stack
        .get(&query, &token(Role::Member, "m"), "/webhooks")
        .await;
    assert_eq!(status, 403);
    let stranger = token_in(Role::Owner, "oscar", "w2");
    let (status, list) = stack.get(&query, &stranger, "/webhooks").await;
    assert_eq!(
        (status, list["items"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let (status, _) = stack
        .get(
            &query,
            &stranger,
            &format!("/webhooks/{webhook}/deliveries"),
        )
        .await;
    assert_eq!(status, 404);

    // query-api's role reads the log and the subscriptions, never the secrets
    let (reads_log, reads_secrets): (bool, bool) = sqlx::query_as(
        "SELECT has_table_privilege('canopy_reader', 'webhook_attempts', 'SELECT'),
                has_table_privilege('canopy_reader', 'webhook_secrets', 'SELECT')",
    )
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    assert_eq!((reads_log, reads_secrets), (true, false));
}

#[tokio::test]
async fn a_redirect_is_a_failure_and_is_not_followed() {
    let mut stack = Stack::start(true).await;
    let elsewhere = Receiver::start(&[]).await;
    let receiver = Receiver::start(&[Answer::Redirect(elsewhere.url())]).await;
    let (webhook, _) = stack.subscribe(&receiver.url(), &["PlanProposed"]).await;
    stack.start_webhooks(true, |_| {}).await;
    stack.propose_plan().await;
    receiver.wait_for(2).await;
    stack
        .until(
            "the retry is delivered",
            &format!(
                "SELECT array_agg(status_code ORDER BY id) = ARRAY[302, 200]
                   FROM webhook_attempts WHERE webhook_id = '{webhook}'"
            ),
        )
        .await;
    assert!(elsewhere.received().is_empty(), "the redirect was followed");
}
