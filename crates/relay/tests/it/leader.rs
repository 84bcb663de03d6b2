//! One publisher at a time: the advisory lock elects a leader, and a standby takes over when
//! the leader's process or connection dies.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::{RunningRelay, Writers, assert_stream_is_the_store, config, eventually};

#[tokio::test]
async fn the_standby_takes_over_within_seconds_without_gap_or_copy() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let config = config(&nats.prefix);
    // two "processes": their own pools and NATS connections
    let relays = [
        RunningRelay::start(
            config.clone(),
            db.new_pool(4).await?,
            canopy_testkit::connect_nats(&nats.url).await?,
        ),
        RunningRelay::start(
            config.clone(),
            db.new_pool(4).await?,
            canopy_testkit::connect_nats(&nats.url).await?,
        ),
    ];
    let writers = Writers::start(&db.pool, 3, Duration::from_millis(5));

    eventually(Duration::from_secs(10), || async {
        Ok(relays.iter().any(|r| r.status().published_total >= 300))
    })
    .await?;
    let [a, b] = relays;
    let (leader, standby) = if a.status().is_leader { (a, b) } else { (b, a) };
    let standby_status = standby.status();
    assert!(leader.status().is_leader);
    assert!(!standby_status.is_leader, "two leaders: {standby_status:?}");
    assert_eq!(standby_status.published_total, 0, "the standby published");
    assert_eq!(standby_status.terms, 0);

    // the leader's process dies: its task and its lock connection go
    let killed_at = Instant::now();
    leader.abort().await;
    eventually(Duration::from_secs(5), || async {
        Ok(standby.status().is_leader)
    })
    .await?;
    let takeover = killed_at.elapsed();
    assert!(
        takeover < Duration::from_secs(5),
        "takeover took {takeover:?}"
    );
    let published_at_takeover = standby.status().published_total;
    eventually(Duration::from_secs(10), || async {
        Ok(standby.status().published_total >= published_at_takeover + 200)
    })
    .await?;

    let written = writers.stop().await?;
    standby
        .wait_caught_up(&db.pool, Duration::from_secs(30))
        .await?;
    standby.stop().await?;
    let received =
        assert_stream_is_the_store(&db.pool, &nats.jetstream, &config.stream_name).await?;
    assert_eq!(received.len() as u64, written);
    Ok(())
}

/// The leader's connection is cut by the server (an admin, a failover, a network fault): it
/// stops publishing, and a relay (it or the standby) leads again without loss.
#[tokio::test]
async fn a_leader_whose_lock_connection_is_killed_steps_down() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let config = config(&nats.prefix);
    let relays = [
        RunningRelay::start(config.clone(), db.new_pool(4).await?, nats.client.clone()),
        RunningRelay::start(config.clone(), db.new_pool(4).await?, nats.client.clone()),
    ];
    let writers = Writers::start(&db.pool, 2, Duration::from_millis(5));
    eventually(Duration::from_secs(10), || async {
        Ok(relays.iter().any(|r| r.status().published_total >= 100))
    })
    .await?;
    let leader = relays
        .iter()
        .position(|r| r.status().is_leader)
        .expect("a leader");

    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
          WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(format!("canopy-relay {}", config.name))
    .fetch_all(&db.pool)
    .await?;
    assert!(!terminated.is_empty(), "no relay connection found");
    eventually(Duration::from_secs(10), || async {
        Ok(!relays[leader].status().is_leader || relays[leader].status().terms >= 2)
    })
    .await?;
    eventually(Duration::from_secs(10), || async {
        Ok(relays.iter().any(|r| r.status().is_leader))
    })
    .await?;

    writers.stop().await?;
    let [a, b] = relays;
    let current = if a.status().is_leader { &a } else { &b };
    current
        .wait_caught_up(&db.pool, Duration::from_secs(30))
        .await?;
    a.stop().await?;
    b.stop().await?;
    assert_stream_is_the_store(&db.pool, &nats.jetstream, &config.stream_name).await?;
    Ok(())
}
