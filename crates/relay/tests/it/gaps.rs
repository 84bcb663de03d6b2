//! The reason the relay reads below the horizon: a transaction that took its position early
//! and commits late must be published, once, and not overtaken.

use std::time::Duration;

use canopy_relay::measure_lag;
use tokio::time::Instant;

use crate::support::{RunningRelay, assert_stream_is_the_store, config, insert_event};

#[tokio::test]
async fn a_slow_transaction_is_published_once_and_not_skipped() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let config = config(&nats.prefix);
    let relay = RunningRelay::start(config.clone(), db.pool.clone(), nats.client.clone());

    // The slow transaction takes its transaction id and position first...
    let mut slow = db.pool.begin().await?;
    let (slow_id, _) = insert_event(&mut *slow, "slow", 1).await?;
    let held_since = Instant::now();
    // ...then 100 others commit after it.
    let mut last = None;
    for i in 0..100 {
        last = Some(insert_event(&db.pool, &format!("fast-{i}"), 1).await?.1);
    }
    let last = last.expect("100 events");

    // All 100 are committed but wait beyond the horizon, and count as lag.
    let lag = measure_lag(&db.pool, &config.name).await?;
    assert_eq!(lag.events, 100, "{lag:?}");

    tokio::time::sleep_until(held_since + Duration::from_millis(500)).await;
    // Nothing may be published ahead of the open transaction: it would come before them all.
    let published = nats
        .jetstream
        .get_stream(&config.stream_name)
        .await?
        .info()
        .await?
        .state
        .messages;
    assert_eq!(
        published, 0,
        "events were published past an open transaction"
    );
    slow.commit().await?;

    relay.wait_acked(last, Duration::from_secs(10)).await?;
    relay
        .wait_caught_up(&db.pool, Duration::from_secs(10))
        .await?;
    let received =
        assert_stream_is_the_store(&db.pool, &nats.jetstream, &config.stream_name).await?;
    assert_eq!(received.len(), 101);
    assert_eq!(
        received[0].envelope.id, slow_id,
        "the slow event goes first"
    );

    let status = relay.stop().await?;
    assert_eq!(status.published_total, 101);
    assert_eq!(status.duplicates_total, 0);
    assert_eq!(measure_lag(&db.pool, &config.name).await?.events, 0);
    Ok(())
}
