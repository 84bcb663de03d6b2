//! A poisoned event is parked with its error, visible in the table and in metrics; its
//! aggregate's later events wait behind it; every other aggregate goes on; a retry resolves it.

use std::time::Duration;

use canopy_domain::SessionCommand;
use canopy_projectors::{Projection, RebuildOptions, compare_with_shadow, parked, rebuild};
use metrics_exporter_prometheus::PrometheusBuilder;
use uuid::Uuid;

use crate::support::{Pipeline, member, session, workload};

async fn wait_parked(pipeline: &Pipeline, expected: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let open = parked::open_count(pipeline.pool(), Projection::Sessions)
            .await
            .unwrap();
        if open == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} parked, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_event_is_parked_and_the_stream_goes_on() {
    let metrics = PrometheusBuilder::new().install_recorder().unwrap();
    let pipeline = Pipeline::start().await;
    let mut config = pipeline.projectors_config();
    config.max_deliveries = 3;
    let projectors = pipeline.run_projectors(config).await;

    // A message in the stream whose data the projection cannot read, then its successor.
    let poisoned = Uuid::new_v4();
    let subject =
        |event: &str| format!("{}.events.session.{poisoned}.{event}", pipeline.nats.prefix);
    let envelope = |sequence: i64, event: &str, data: serde_json::Value| {
        serde_json::json!({
            "id": Uuid::new_v4(), "type": event, "version": "1", "aggregate_type": "session",
            "aggregate_id": poisoned.to_string(), "sequence": sequence, "position": 0, "transaction_id": 0,
            "recorded_at": "2026-01-01T00:00:00Z",
            "metadata": {"actor_id": "x", "actor_name": "X", "actor_kind": "user", "correlation_id": "c", "request_id": "r"},
            "data": data
        })
    };
    // wait for the relay to have created the stream
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while pipeline
        .nats
        .jetstream
        .get_stream(pipeline.nats.prefix.to_uppercase())
        .await
        .is_err()
    {
        assert!(tokio::time::Instant::now() < deadline, "no stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (sequence, event, data) in [
        (1, "SessionStarted", serde_json::json!({"title": 42})),
        (
            2,
            "ParticipantJoined",
            serde_json::json!({"user_id": "u", "name": "U", "role": "member"}),
        ),
    ] {
        pipeline
            .nats
            .jetstream
            .publish(
                subject(event),
                serde_json::to_vec(&envelope(sequence, event, data))
                    .unwrap()
                    .into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    // real sessions keep flowing meanwhile
    workload(&pipeline.store, 3, 40).await;
    pipeline.wait_projected().await;
    wait_parked(&pipeline, 2).await;

    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT sequence, event_type, error FROM read.parked_events
          WHERE projection = 'sessions' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(poisoned.to_string())
    .fetch_all(pipeline.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].0, rows[0].1.as_str()), (1, "SessionStarted"));
    assert!(rows[0].2.contains("does not decode"), "{}", rows[0].2);
    assert!(
        rows[1].2.contains("blocked behind parked event #1"),
        "{}",
        rows[1].2
    );
    let exposition = metrics.render();
    assert!(
        exposition.contains("canopy_projection_parked_events{projection=\"sessions\"} 2"),
        "{exposition}"
    );
    // nothing of the poisoned aggregate reached the read model
    let leaked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM read.sessions WHERE session_id = $1")
            .bind(poisoned)
            .fetch_one(pipeline.pool())
            .await
            .unwrap();
    assert_eq!(leaked, 0);
    projectors.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_event_whose_cause_is_fixed_is_resolved_by_a_retry() {
    let pipeline = Pipeline::start().await;
    // a fault in the read model: prompts saying "poison" cannot be stored
    sqlx::query("ALTER TABLE read.prompts ADD CONSTRAINT no_poison CHECK (text_preview NOT LIKE '%poison%')")
        .execute(pipeline.pool())
        .await
        .unwrap();
    let mut config = pipeline.projectors_config();
    config.max_deliveries = 2;
    let projectors = pipeline.run_projectors(config).await;

    let (_, sessions) = workload(&pipeline.store, 2, 30).await;
    let victim = sessions[0];

    session(
        &pipeline.store,
        victim,
        SessionCommand::SubmitPrompt {
            actor: member(0),
            prompt_id: Uuid::new_v4(),
            text: "poison pill".into(),
        },
    )
    .await;
    session(
        &pipeline.store,
        victim,
        SessionCommand::SubmitPrompt {
            actor: member(0),
            prompt_id: Uuid::new_v4(),
            text: "after the pill".into(),
        },
    )
    .await;
    wait_parked(&pipeline, 2).await;
    // the other session is fully projected regardless
    let other_version: i64 =
        sqlx::query_scalar("SELECT version FROM read.sessions WHERE session_id = $1")
            .bind(sessions[1])
            .fetch_one(pipeline.pool())
            .await
            .unwrap();
    let other_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
            .bind(sessions[1].to_string())
            .fetch_one(pipeline.pool())
            .await
            .unwrap();
    assert_eq!(other_version, other_events);

    sqlx::query("ALTER TABLE read.prompts DROP CONSTRAINT no_poison")
        .execute(pipeline.pool())
        .await
        .unwrap();
    let report = parked::retry(pipeline.pool(), Projection::Sessions)
        .await
        .unwrap();
    assert_eq!((report.resolved, report.still_parked), (2, 0));
    pipeline.wait_projected().await;
    rebuild(
        pipeline.pool(),
        Projection::Sessions,
        &RebuildOptions {
            batch_size: 500,
            swap: false,
        },
    )
    .await
    .unwrap();
    let differences = compare_with_shadow(pipeline.pool(), Projection::Sessions)
        .await
        .unwrap();
    assert!(differences.is_empty(), "{differences:?}");
    projectors.stop().await;
}
