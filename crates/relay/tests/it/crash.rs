//! A relay that dies after JetStream acknowledged events but before it wrote its checkpoint
//! publishes them again on restart; `Nats-Msg-Id` keeps the stream free of copies.

use std::time::Duration;

use canopy_relay::{Cursor, headers, measure_lag};

use crate::support::{
    RunningRelay, Writers, append_events, assert_stream_is_the_store, config, eventually,
};

/// The state such a crash leaves, made exactly: everything acknowledged, checkpoint behind.
#[tokio::test]
async fn restart_after_puback_without_checkpoint_stores_no_copy() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let config = config(&nats.prefix);
    append_events(&db.pool, 300).await?;

    let first = RunningRelay::start(config.clone(), db.pool.clone(), nats.client.clone());
    first
        .wait_caught_up(&db.pool, Duration::from_secs(20))
        .await?;
    first.stop().await?;
    // The crash: the PubAcks arrived, the checkpoint write did not.
    sqlx::query("UPDATE relay_checkpoints SET transaction_id = '0', position = 0 WHERE name = $1")
        .bind(&config.name)
        .execute(&db.pool)
        .await?;
    assert_eq!(measure_lag(&db.pool, &config.name).await?.events, 300);

    let second = RunningRelay::start(config.clone(), db.pool.clone(), nats.client.clone());
    second
        .wait_caught_up(&db.pool, Duration::from_secs(20))
        .await?;
    let status = second.stop().await?;
    assert_eq!(status.duplicates_total, 300, "{status:?}");
    assert_eq!(status.stream_behind_total, 0);

    let received =
        assert_stream_is_the_store(&db.pool, &nats.jetstream, &config.stream_name).await?;
    assert_eq!(received.len(), 300);
    Ok(())
}

/// Real crashes: the relay task is aborted while it has acknowledged events beyond its
/// checkpoint, again and again, with writers appending throughout.
#[tokio::test]
async fn aborting_the_relay_between_puback_and_checkpoint_loses_and_copies_nothing()
-> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let config = canopy_relay::RelayConfig {
        batch_size: 200,
        ..config(&nats.prefix)
    };
    let writers = Writers::start(&db.pool, 2, Duration::from_millis(2));

    let mut crashes_with_stream_ahead = 0;
    let mut duplicates = 0;
    for _ in 0..5 {
        // a backlog, so the relay is mid-way through batches when it dies
        append_events(&db.pool, 600).await?;
        let client = canopy_testkit::connect_nats(&nats.url).await?;
        let relay = RunningRelay::start(config.clone(), db.pool.clone(), client.clone());
        let mut acked = relay.relay.watch_acked();
        let checkpoint_of = |relay: &RunningRelay| relay.status().checkpoint;
        // die as soon as an acknowledged event is not yet in the checkpoint
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                acked.changed().await?;
                let now = *acked.borrow_and_update();
                if now.is_some() && checkpoint_of(&relay).is_some_and(|c| Some(c) < now) {
                    return anyhow::Ok(());
                }
            }
        })
        .await??;
        duplicates += relay.abort().await.duplicates_total;
        drop(client);

        let checkpoint = measure_lag(&db.pool, &config.name).await?.checkpoint;
        let stream = nats.jetstream.get_stream(&config.stream_name).await?;
        let last = stream.cached_info().state.last_sequence;
        let message = stream.get_raw_message(last).await?;
        let stream_last = Cursor {
            transaction_id: message
                .headers
                .get(headers::TRANSACTION_ID)
                .unwrap()
                .as_str()
                .parse()?,
            position: message
                .headers
                .get(headers::POSITION)
                .unwrap()
                .as_str()
                .parse()?,
        };
        if stream_last > checkpoint {
            crashes_with_stream_ahead += 1;
        }
    }
    assert!(
        crashes_with_stream_ahead >= 3,
        "only {crashes_with_stream_ahead} of 5 crashes left the stream ahead of the checkpoint"
    );

    writers.stop().await?;
    let last = RunningRelay::start(config.clone(), db.pool.clone(), nats.client.clone());
    last.wait_caught_up(&db.pool, Duration::from_secs(30))
        .await?;
    duplicates += last.stop().await?.duplicates_total;
    assert!(
        duplicates > 0,
        "no restarted relay republished an acknowledged event"
    );
    eventually(Duration::from_secs(5), || async {
        Ok(measure_lag(&db.pool, &config.name).await?.events == 0)
    })
    .await?;
    assert_stream_is_the_store(&db.pool, &nats.jetstream, &config.stream_name).await?;
    Ok(())
}
