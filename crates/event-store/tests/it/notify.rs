//! The relay's wake-up: a notification on `canopy_events`, sent by the store after an append has
//! committed, from a transaction of its own; the appending transaction itself notifies nothing
//! (a NOTIFY there would serialize every append's commit).

use std::time::Duration;

use canopy_event_store::{AggregateStore, NOTIFY_CHANNEL, StoreConfig};
use sqlx::postgres::PgListener;

use crate::support::{Tally, TallyCommand, meta};

#[tokio::test]
async fn the_store_notifies_after_its_append_commits() {
    let db = canopy_testkit::database().await.unwrap();
    let mut listener = PgListener::connect_with(db.pool()).await.unwrap();
    listener.listen(NOTIFY_CHANNEL).await.unwrap();
    let store = AggregateStore::new(db.pool().clone(), StoreConfig::default());

    store
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 3 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("no notification after commit")
        .unwrap();
    assert_eq!(notification.channel(), NOTIFY_CHANNEL);
}

#[tokio::test]
async fn an_appending_transaction_notifies_nothing() {
    let db = canopy_testkit::database().await.unwrap();
    let mut listener = PgListener::connect_with(db.pool()).await.unwrap();
    listener.listen(NOTIFY_CHANNEL).await.unwrap();

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
    tx.commit().await.unwrap();
    // a writer other than the store is found by the relay's poll
    let woke = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(woke.is_err(), "a plain insert notified: {woke:?}");
}
