//! A poisoned event is parked with its error, visible in the table and in metrics; its
//! aggregate's later events wait behind it (not parked themselves); every other aggregate goes
//! on; the projectors' own retries resolve it once its cause is fixed, and bring the events that
//! waited from the store.

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
        if tokio::time::Instant::now() >= deadline {
            // say what is parked and what the database is waiting on, not only how many
            let parked: Vec<(String, i64, String, i32, String)> = sqlx::query_as(
                "SELECT aggregate_id, sequence, error, attempts,
                        (next_attempt_at - now())::text
                   FROM read.parked_events WHERE resolved_at IS NULL",
            )
            .fetch_all(pipeline.pool())
            .await
            .unwrap_or_default();
            let waiting: Vec<(String, String)> = sqlx::query_as(
                "SELECT coalesce(wait_event_type, '') || ':' || coalesce(wait_event, ''), query
                   FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()
                    AND state <> 'idle'",
            )
            .fetch_all(pipeline.pool())
            .await
            .unwrap_or_default();
            panic!(
                "{open} parked, expected {expected}; parked (aggregate, sequence, error, \
                 attempts, next attempt in): {parked:?}; busy connections: {waiting:?}"
            );
        }
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
    let publish = |sequence: i64, event: &'static str, data: serde_json::Value| {
        let subject = subject(event);
        let body = serde_json::to_vec(&envelope(sequence, event, data)).unwrap();
        let jetstream = pipeline.nats.jetstream.clone();
        async move {
            jetstream
                .publish(subject, body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish(1, "SessionStarted", serde_json::json!({"title": 42})).await;
    // real sessions keep flowing meanwhile
    workload(&pipeline.store, 3, 40).await;
    wait_parked(&pipeline, 1).await;
    // its successor waits behind it: acknowledged, neither applied nor parked
    publish(
        2,
        "ParticipantJoined",
        serde_json::json!({"user_id": "u", "name": "U", "role": "member"}),
    )
    .await;
    workload(&pipeline.store, 1, 20).await;
    pipeline.wait_projected().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = pipeline
            .nats
            .jetstream
            .get_stream(pipeline.nats.prefix.to_uppercase())
            .await
            .unwrap()
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                "canopy-projector-sessions",
            )
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        if (info.num_pending, info.num_ack_pending) == (0, 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the successor was not acknowledged: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT sequence, event_type, error FROM read.parked_events
          WHERE projection = 'sessions' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(poisoned.to_string())
    .fetch_all(pipeline.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].0, rows[0].1.as_str()), (1, "SessionStarted"));
    // parked with its error, which the first automatic retry (a second later) may already have
    // replaced by its own finding
    assert!(
        rows[0].2.contains("does not decode") || rows[0].2.contains("not in the event store"),
        "{}",
        rows[0].2
    );
    let exposition = metrics.render();
    assert!(
        exposition.contains("canopy_projection_parked_events{projection=\"sessions\"} 1"),
        "{exposition}"
    );
    // the automatic retries find the event is not in the event store and keep it parked
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (attempts, error): (i32, String) = sqlx::query_as(
            "SELECT attempts, error FROM read.parked_events WHERE aggregate_id = $1",
        )
        .bind(poisoned.to_string())
        .fetch_one(pipeline.pool())
        .await
        .unwrap();
        if attempts > 0 {
            assert!(error.contains("not in the event store"), "{error}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    config.parked_retry_max = Duration::from_secs(1);
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
    // only the pill is parked; the prompt after it waits behind it
    wait_parked(&pipeline, 1).await;
    // the other session is fully projected regardless (its events may still be applying one by
    // one when the pill is parked: wait for them, but not for ever)
    let other_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
            .bind(sessions[1].to_string())
            .fetch_one(pipeline.pool())
            .await
            .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let other_version: Option<i64> =
            sqlx::query_scalar("SELECT version FROM read.sessions WHERE session_id = $1")
                .bind(sessions[1])
                .fetch_optional(pipeline.pool())
                .await
                .unwrap();
        if other_version == Some(other_events) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other session stopped at {other_version:?} of {other_events} events"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // a retry by hand while the cause is still there fails again and keeps it parked
    let report = parked::retry(
        pipeline.pool(),
        Projection::Sessions,
        parked::Due::All,
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    assert_eq!((report.resolved, report.still_parked), (0, 1), "{report:?}");
    let victim_version: i64 =
        sqlx::query_scalar("SELECT version FROM read.sessions_positions WHERE aggregate_id = $1")
            .bind(victim.to_string())
            .fetch_one(pipeline.pool())
            .await
            .unwrap();

    sqlx::query("ALTER TABLE read.prompts DROP CONSTRAINT no_poison")
        .execute(pipeline.pool())
        .await
        .unwrap();
    // no operator step: the projectors' own retries apply it and the prompt that waited
    wait_parked(&pipeline, 0).await;
    pipeline.wait_projected().await;
    let caught_up: i64 =
        sqlx::query_scalar("SELECT version FROM read.sessions_positions WHERE aggregate_id = $1")
            .bind(victim.to_string())
            .fetch_one(pipeline.pool())
            .await
            .unwrap();
    assert_eq!(caught_up, victim_version + 2);
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
