//! Killing the projector before its write, and after its write but before the ack: no duplicate,
//! no missing row.

use canopy_projectors::{Crash, CrashPoint, Projection, ProjectorError};

use crate::support::{Pipeline, workload};

async fn crash_then_resume(point: CrashPoint) {
    let pipeline = Pipeline::start().await;
    workload(&pipeline.store, 4, 50).await;
    let mut config = pipeline.projectors_config();
    config.crash = Some(Crash { point, after: 37 });
    let crashed = pipeline.run_projectors(config).await;
    let outcome = crashed.task.await.unwrap();
    assert!(
        matches!(outcome, Err(ProjectorError::Crashed)),
        "{outcome:?}"
    );

    // a new process picks up; the unacked message comes back after ack_wait
    let resumed = pipeline.run_projectors(pipeline.projectors_config()).await;
    pipeline.wait_projected().await;
    pipeline
        .assert_every_read_model_equals_its_rebuild(&format!("{point:?}"))
        .await;
    // exactly one timeline row per session event: nothing applied twice, nothing missed
    let (rows, distinct, events): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM read.session_timeline),
                (SELECT count(DISTINCT (session_id, sequence)) FROM read.session_timeline),
                (SELECT count(*) FROM events WHERE aggregate_type = 'session')",
    )
    .fetch_one(pipeline.pool())
    .await
    .unwrap();
    assert_eq!((rows, distinct), (events, events));
    resumed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_write_and_before_the_ack_duplicates_nothing() {
    crash_then_resume(CrashPoint::AfterWriteBeforeAck).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_write_loses_nothing() {
    crash_then_resume(CrashPoint::BeforeWrite).await;
}

/// The case seen in production: a projector dies with a batch in flight while commands keep
/// coming, and JetStream holds the unacknowledged messages back for a whole ack wait (30 s)
/// while the later ones arrive first. The restarted projector neither waits for the
/// redeliveries nor parks anything: later events fill their gaps from the event store, and what
/// was in flight is read back from the stream at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_under_load_later_events_do_not_wait_for_redeliveries() {
    crash_with_events_in_flight(true).await;
}

/// The same when nothing comes after the crash: no later event would fill the gaps, so the
/// messages in flight are read back from the stream at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_in_a_quiet_moment_what_was_in_flight_is_applied_at_once() {
    crash_with_events_in_flight(false).await;
}

async fn crash_with_events_in_flight(writes_continue: bool) {
    let pipeline = Pipeline::start().await;
    // built once, so that the crashing projector consumes real messages instead of rebuilding
    let first = pipeline.run_projectors(pipeline.projectors_config()).await;
    workload(&pipeline.store, 1, 10).await;
    pipeline.wait_projected().await;
    first.stop().await;

    let writer = {
        let store = pipeline.store.clone();
        tokio::spawn(async move { workload(&store, 8, 60).await })
    };
    // let some events pile up, then crash in the middle of them
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
        .fetch_one(pipeline.pool())
        .await
        .unwrap()
        < 150
    {
        assert!(std::time::Instant::now() < deadline, "the writer is stuck");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let writer = if writes_continue {
        Some(writer)
    } else {
        writer.await.unwrap();
        None
    };
    let mut config = pipeline.projectors_config();
    config.ack_wait = std::time::Duration::from_secs(30);
    config.crash = Some(Crash {
        point: CrashPoint::BeforeWrite,
        after: 60,
    });
    let crashed = pipeline.run_projectors(config.clone()).await;
    let outcome = crashed.task.await.unwrap();
    assert!(
        matches!(outcome, Err(ProjectorError::Crashed)),
        "{outcome:?}"
    );
    let stream = pipeline
        .nats
        .jetstream
        .get_stream(pipeline.nats.prefix.to_uppercase())
        .await
        .unwrap();
    let mut in_flight = 0;
    for projection in Projection::ALL {
        in_flight += stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&format!(
                "canopy-projector-{}",
                projection.name()
            ))
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .num_ack_pending;
    }
    assert!(in_flight > 0, "nothing was in flight at the crash");

    config.crash = None;
    let restarted = std::time::Instant::now();
    let resumed = pipeline.run_projectors(config).await;
    if let Some(writer) = writer {
        writer.await.unwrap();
    }
    pipeline.wait_projected().await;
    let caught_up = restarted.elapsed();
    assert!(
        caught_up < std::time::Duration::from_secs(20),
        "caught up {caught_up:?} after the restart: it waited for the redeliveries"
    );
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM read.parked_events")
        .fetch_one(pipeline.pool())
        .await
        .unwrap();
    assert_eq!(parked, 0);
    pipeline
        .assert_every_read_model_equals_its_rebuild("")
        .await;
    resumed.stop().await;
}
