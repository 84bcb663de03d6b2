//! The relay wakes within milliseconds of an append's commit, though appends no longer notify
//! inside their transaction: the store notifies after commit, coalesced.

use std::time::Duration;

use canopy_event_store::{AggregateStore, StoreConfig};
use tokio::time::Instant;

use crate::support::{Add, RunningRelay, Tally, config, last_cursor, meta};

#[tokio::test]
async fn the_relay_wakes_on_a_store_commit_without_waiting_for_its_poll() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let mut config = config(&nats.prefix);
    // any publish below must come from a wake-up, not from the safety-net poll
    config.poll_interval = Duration::from_secs(60);
    let relay = RunningRelay::start(config, db.pool.clone(), nats.client.clone());
    let store = AggregateStore::new(db.pool.clone(), StoreConfig::default());
    // the relay leads (and LISTENs) once it has acknowledged a first append
    store
        .execute::<Tally>("warm-up", Add { n: 1, times: 1 }, &(), &meta(), None)
        .await?;
    relay
        .wait_acked(last_cursor(&db.pool).await?, Duration::from_secs(10))
        .await?;

    for round in 0..20 {
        let committed = Instant::now();
        store
            .execute::<Tally>("a", Add { n: 1, times: 2 }, &(), &meta(), None)
            .await?;
        relay
            .wait_acked(last_cursor(&db.pool).await?, Duration::from_secs(5))
            .await?;
        let took = committed.elapsed();
        assert!(took < Duration::from_secs(1), "round {round}: {took:?}");
    }
    relay.stop().await?;
    Ok(())
}

#[tokio::test]
async fn an_append_no_longer_notifies_inside_its_transaction() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let triggers: Vec<String> = sqlx::query_scalar(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'events'::regclass AND NOT tgisinternal ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await?;
    assert!(
        !triggers.iter().any(|t| t == "events_notify"),
        "{triggers:?}"
    );
    Ok(())
}
