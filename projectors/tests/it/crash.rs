//! Killing the projector before its write, and after its write but before the ack: no duplicate,
//! no missing row.

use canopy_projectors::{
    Crash, CrashPoint, Projection, ProjectorError, RebuildOptions, compare_with_shadow, rebuild,
};

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
    for projection in Projection::ALL {
        rebuild(
            pipeline.pool(),
            projection,
            &RebuildOptions {
                batch_size: 500,
                swap: false,
            },
        )
        .await
        .unwrap();
        let differences = compare_with_shadow(pipeline.pool(), projection)
            .await
            .unwrap();
        assert!(
            differences.is_empty(),
            "{point:?} {}: {differences:?}",
            projection.name()
        );
    }
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
