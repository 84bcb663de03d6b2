//! The relay's wake-up: a notification on `canopy_events`, delivered when the append commits.

use std::time::Duration;

use sqlx::postgres::PgListener;

#[tokio::test]
async fn notify_fires_on_commit_and_not_before() {
    let db = canopy_testkit::database().await.unwrap();
    let mut listener = PgListener::connect_with(db.pool()).await.unwrap();
    listener.listen("canopy_events").await.unwrap();

    let mut tx = db.pool().begin().await.unwrap();
    for sequence in 1..=3i64 {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
             payload, metadata) VALUES ('tally', 'a', $1, 'Added', '1', '{\"Added\":{\"n\":1}}', \
             '{\"actor_id\":\"u\",\"actor_name\":\"U\",\"actor_kind\":\"user\",\"correlation_id\":\"c\",\"request_id\":\"r\"}')",
        )
        .bind(sequence)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    let early = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(early.is_err(), "a notification arrived before commit");

    tx.commit().await.unwrap();
    let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("no notification after commit")
        .unwrap();
    assert_eq!(notification.channel(), "canopy_events");
    // identical notifications of one transaction fold into one
    let extra = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(extra.is_err(), "one transaction woke the relay twice");
}
