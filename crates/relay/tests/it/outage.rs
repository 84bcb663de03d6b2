//! NATS goes away under load and comes back: the relay backs off, catches up and loses nothing.

use std::time::Duration;

use canopy_testkit::OwnedNats;

use crate::support::{RunningRelay, Writers, assert_stream_is_the_store, config, eventually};

#[tokio::test]
async fn nats_down_for_ten_seconds_under_load_loses_nothing() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let mut nats = OwnedNats::start().await?;
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let config = config(&prefix);
    let relay = RunningRelay::start(config.clone(), db.pool.clone(), nats.connect().await?);
    let writers = Writers::start(&db.pool, 4, Duration::from_millis(5));

    // publishing under load before the outage
    eventually(Duration::from_secs(10), || async {
        Ok(relay.status().published_total >= 200)
    })
    .await?;

    nats.stop().await?;
    let errors_before = relay.status().publish_errors_total;
    // the outage lasts 10 s while the writers keep appending
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = relay.status();
    assert!(
        during.publish_errors_total > errors_before,
        "the relay did not notice the outage: {during:?}"
    );
    nats.start_again().await?;

    // load goes on after the restart, then stops
    let published_at_restart = relay.status().published_total;
    eventually(Duration::from_secs(30), || async {
        Ok(relay.status().published_total >= published_at_restart + 200)
    })
    .await?;
    let written = writers.stop().await?;

    relay
        .wait_caught_up(&db.pool, Duration::from_secs(60))
        .await?;
    let status = relay.stop().await?;
    let client = nats.connect().await?;
    let js = async_nats::jetstream::new(client);
    let received = assert_stream_is_the_store(&db.pool, &js, &config.stream_name).await?;
    assert_eq!(received.len() as u64, written);
    assert!(status.publish_errors_total > 0);
    Ok(())
}
