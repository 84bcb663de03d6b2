//! The sender killed with SIGKILL mid-delivery: nothing is lost, and what is sent twice is sent
//! with the same `webhook-id` (at most the one in flight per endpoint).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::support::{Answer, Receiver, Stack};

const ENDPOINTS: usize = 3;
const PLANS: usize = 15;

fn sender(stack: &Stack) -> tokio::process::Child {
    let stream = stack.stream();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_canopy-webhooks"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("CANOPY_DATABASE_URL", &stack.db.url)
        .env("CANOPY_NATS_URL", &stack.nats.url)
        .env("CANOPY_STREAM_NAME", &stream.stream_name)
        .env("CANOPY_SUBJECT_PREFIX", stream.subject_prefix())
        .env("CANOPY_WEBHOOKS_ALLOW_INSECURE", "true")
        .env("CANOPY_WEBHOOKS_POLL", "20ms")
        .env("CANOPY_WEBHOOKS_ACK_WAIT", "1s")
        .env("CANOPY_WEBHOOKS_RETRY_SCHEDULE", "50ms,50ms,50ms")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start canopy-webhooks")
}

#[tokio::test]
async fn a_kill_9_of_the_sender_mid_delivery_loses_nothing_and_repeats_only_the_same_ids() {
    let stack = Stack::start(true).await;
    // every answer takes a while, so deliveries are in flight when the kill comes
    let receiver = Receiver::start(&vec![Answer::Slowly(Duration::from_millis(60)); 200]).await;
    for n in 0..ENDPOINTS {
        stack
            .subscribe(
                &format!("{}?endpoint={n}", receiver.url()),
                &["PlanProposed"],
            )
            .await;
    }
    let mut first = sender(&stack);
    for _ in 0..PLANS {
        stack.propose_plan().await;
    }
    receiver.wait_for(8).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let at_kill = receiver.received().len();
    assert!(
        at_kill < ENDPOINTS * PLANS,
        "killed too late to be mid-delivery"
    );

    let mut second = sender(&stack);
    stack
        .until(
            "every delivery is delivered",
            &format!(
                "SELECT count(*) FILTER (WHERE status = 'delivered') = {}
                    AND count(*) = {} FROM webhook_deliveries",
                ENDPOINTS * PLANS,
                ENDPOINTS * PLANS
            ),
        )
        .await;
    second.start_kill().unwrap();
    second.wait().await.unwrap();

    let expected: BTreeSet<String> =
        sqlx::query_scalar("SELECT message_id FROM webhook_deliveries")
            .fetch_all(stack.db.pool())
            .await
            .unwrap()
            .into_iter()
            .collect();
    let received = receiver.received();
    let mut bodies: HashMap<String, (String, axum::body::Bytes)> = HashMap::new();
    for request in &received {
        let id = request.header("webhook-id").to_owned();
        let event = request.json()["id"].as_str().unwrap().to_owned();
        match bodies.get(&id) {
            // a repeat: the same webhook-id carries the same event
            Some((seen_event, _)) => assert_eq!(seen_event, &event, "{id} carried two events"),
            None => {
                bodies.insert(id, (event, request.body.clone()));
            }
        }
    }
    let delivered: BTreeSet<String> = bodies.keys().cloned().collect();
    assert_eq!(delivered, expected, "every (endpoint, event) arrived");
    let repeats = received.len() - expected.len();
    assert!(
        repeats <= ENDPOINTS,
        "{repeats} repeats: more than the one in flight per endpoint"
    );
}
