//! After a mixed workload, every read model equals its rebuild from the event store, row for row;
//! and a rebuild swapped in while the projectors run leaves them consistent.

use canopy_projectors::{Projection, RebuildOptions, compare_with_shadow, rebuild};

use crate::support::{Pipeline, workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_model_equals_its_rebuild_after_5000_events_over_50_sessions() {
    let pipeline = Pipeline::start().await;
    let projectors = pipeline.run_projectors(pipeline.projectors_config()).await;
    let (_, sessions) = workload(&pipeline.store, 50, 100).await;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pipeline.pool())
        .await
        .unwrap();
    assert!(events >= 5000, "the workload wrote only {events} events");
    assert!(
        !projectors.task.is_finished(),
        "the projectors stopped: {:?}",
        projectors.task.await
    );
    pipeline.wait_projected().await;

    let projected: i64 = sqlx::query_scalar("SELECT count(*) FROM read.sessions")
        .fetch_one(pipeline.pool())
        .await
        .unwrap();
    assert_eq!(projected, sessions.len() as i64);
    for projection in Projection::ALL {
        let report = rebuild(
            pipeline.pool(),
            projection,
            &RebuildOptions {
                batch_size: 500,
                swap: false,
            },
        )
        .await
        .unwrap();
        assert!(report.events > 0);
        let differences = compare_with_shadow(pipeline.pool(), projection)
            .await
            .unwrap();
        assert!(
            differences.is_empty(),
            "{}: live and rebuilt differ: {differences:?}",
            projection.name()
        );
    }
    projectors.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_swapped_in_while_events_flow_loses_nothing() {
    let pipeline = Pipeline::start().await;
    let projectors = pipeline.run_projectors(pipeline.projectors_config()).await;
    workload(&pipeline.store, 6, 60).await;
    pipeline.wait_projected().await;
    // rebuild and swap while more events arrive
    let store = pipeline.store.clone();
    let writer = tokio::spawn(async move { workload(&store, 4, 60).await });
    for projection in Projection::ALL {
        rebuild(pipeline.pool(), projection, &RebuildOptions::default())
            .await
            .unwrap();
    }
    writer.await.unwrap();
    pipeline.wait_projected().await;
    pipeline
        .assert_every_read_model_equals_its_rebuild("")
        .await;
    // the swapped-in tables keep the services' and analysts' rights
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'read'")
            .fetch_all(pipeline.pool())
            .await
            .unwrap();
    for (role, privilege) in [
        ("canopy_reader", "SELECT"),
        ("canopy_analyst", "SELECT"),
        ("canopy_writer", "INSERT"),
    ] {
        for table in &tables {
            let granted: bool = sqlx::query_scalar("SELECT has_table_privilege($1, $2, $3)")
                .bind(role)
                .bind(format!("read.{table}"))
                .bind(privilege)
                .fetch_one(pipeline.pool())
                .await
                .unwrap();
            assert!(
                granted,
                "{role} lost {privilege} on read.{table} in the swap"
            );
        }
    }
    projectors.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_added_after_events_exist_backfills_from_the_start() {
    let pipeline = Pipeline::start().await;
    // events exist before any projector ran; JetStream would have them too, but the backfill
    // comes from the event store: forget the stream's copies
    workload(&pipeline.store, 3, 40).await;
    sqlx::query("DELETE FROM read.projection_state")
        .execute(pipeline.pool())
        .await
        .unwrap();
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM read.session_timeline")
        .fetch_one(pipeline.pool())
        .await
        .unwrap();
    assert_eq!(before, 0);
    // The backfill reads below the cluster-wide snapshot horizon (the consumers bring the rest),
    // and any test's open transaction in any database holds that back for a moment: wait until
    // every event is below it, so the backfill alone must account for all of them.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let below: bool = sqlx::query_scalar(
            "SELECT coalesce(max(transaction_id), '0'::xid8) < pg_snapshot_xmin(pg_current_snapshot())
               FROM events",
        )
        .fetch_one(pipeline.pool())
        .await
        .unwrap();
        if below {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the horizon never passed the events"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    canopy_projectors::ensure_built(pipeline.pool(), Projection::Timeline)
        .await
        .unwrap();
    let (rows, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM read.session_timeline), (SELECT count(*) FROM events WHERE aggregate_type = 'session')",
    )
    .fetch_one(pipeline.pool())
    .await
    .unwrap();
    assert_eq!(rows, events);
    let state: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM read.projection_state WHERE projection = 'timeline'",
    )
    .fetch_one(pipeline.pool())
    .await
    .unwrap();
    assert_eq!(state, 1);
    // and the consumers then skip what the backfill applied
    let projectors = pipeline.run_projectors(pipeline.projectors_config()).await;
    pipeline.wait_projected().await;
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM read.session_timeline")
        .fetch_one(pipeline.pool())
        .await
        .unwrap();
    assert_eq!(after, events);
    projectors.stop().await;
}
