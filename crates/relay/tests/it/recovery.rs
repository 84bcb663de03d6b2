//! A stream that lost events: found at start-up and refilled; and `republish` on demand.

use std::time::Duration;

use canopy_relay::{Cursor, RelayConfig, republish};

use crate::support::{
    RunningRelay, append_events, assert_stream_is_the_store, config, stored_events,
};

async fn publish_all(
    db: &canopy_testkit::TestDb,
    config: &RelayConfig,
    client: &async_nats::Client,
) -> anyhow::Result<()> {
    let relay = RunningRelay::start(config.clone(), db.pool.clone(), client.clone());
    relay
        .wait_caught_up(&db.pool, Duration::from_secs(20))
        .await?;
    relay.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_deleted_stream_is_recreated_and_refilled_from_the_start() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let config = config(&nats.prefix);
    append_events(&db.pool, 50).await?;
    publish_all(&db, &config, &nats.client).await?;

    nats.jetstream.delete_stream(&config.stream_name).await?;
    let relay = RunningRelay::start(config.clone(), db.pool.clone(), nats.client.clone());
    relay
        .wait_caught_up(&db.pool, Duration::from_secs(20))
        .await?;
    let status = relay.stop().await?;
    assert_eq!(status.stream_behind_total, 1, "{status:?}");
    assert_eq!(status.published_total, 50);
    assert_stream_is_the_store(&db.pool, &nats.jetstream, &config.stream_name).await?;
    Ok(())
}

/// The stream kept events 1..20 but the checkpoint says 50 (the server lost acknowledged
/// writes): the relay resumes from the stream's last event, not from its checkpoint.
#[tokio::test]
async fn a_stream_that_lost_its_tail_is_refilled_from_its_last_event() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let config = config(&nats.prefix);
    append_events(&db.pool, 20).await?;
    publish_all(&db, &config, &nats.client).await?;
    append_events(&db.pool, 30).await?;
    sqlx::query(
        "UPDATE relay_checkpoints SET (transaction_id, position) = \
           (SELECT transaction_id, position FROM events ORDER BY transaction_id DESC, position DESC LIMIT 1) \
          WHERE name = $1",
    )
    .bind(&config.name)
    .execute(&db.pool)
    .await?;

    let relay = RunningRelay::start(config.clone(), db.pool.clone(), nats.client.clone());
    relay
        .wait_caught_up(&db.pool, Duration::from_secs(20))
        .await?;
    let status = relay.stop().await?;
    assert_eq!(status.stream_behind_total, 1, "{status:?}");
    assert_eq!(
        status.published_total, 30,
        "only the lost tail is published"
    );
    assert_eq!(status.duplicates_total, 0);
    assert_stream_is_the_store(&db.pool, &nats.jetstream, &config.stream_name).await?;
    Ok(())
}

#[tokio::test]
async fn republish_from_a_position_sends_that_suffix_again() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let config = config(&nats.prefix);
    append_events(&db.pool, 40).await?;
    publish_all(&db, &config, &nats.client).await?;
    let from: i64 =
        sqlx::query_scalar("SELECT position FROM events ORDER BY position OFFSET 10 LIMIT 1")
            .fetch_one(&db.pool)
            .await?;

    // inside the duplicate window every copy is dropped
    let report = republish(&db.pool, &nats.client, &config, from).await?;
    assert_eq!(report.events, 30, "{report:?}");
    assert_eq!(report.duplicates, 30);
    assert_eq!(report.stored, 0);
    assert_stream_is_the_store(&db.pool, &nats.jetstream, &config.stream_name).await?;

    // into a new stream: everything from the start is stored, in relay order
    nats.jetstream.delete_stream(&config.stream_name).await?;
    let report = republish(&db.pool, &nats.client, &config, 0).await?;
    assert_eq!(report.stored, 40, "{report:?}");
    assert_eq!(report.retries, 0);
    let last: (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position FROM events \
          ORDER BY transaction_id DESC, position DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        report.last,
        Some(Cursor {
            transaction_id: u64::try_from(last.0)?,
            position: last.1
        })
    );
    assert_eq!(stored_events(&db.pool).await?.len(), 40);
    assert_stream_is_the_store(&db.pool, &nats.jetstream, &config.stream_name).await?;
    Ok(())
}
