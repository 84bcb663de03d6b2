//! Appends: what each one records, and concurrent writers to one stream.

use std::sync::Arc;

use canopy_event_store::{AggregateStore, ExecuteError, RetryPolicy, StoreConfig};
use uuid::Uuid;

use crate::support::{Tally, TallyCommand, count_events, meta, store};

#[tokio::test]
async fn an_append_records_id_position_transaction_and_time() {
    let db = canopy_testkit::database().await.unwrap();
    let store = store(db.pool());
    let first = store
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 3 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    let second = store
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 2, times: 1 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(first.version, 3);
    assert_eq!(second.version, 4);
    assert_eq!(
        first.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    let rows: Vec<(
        Uuid,
        i64,
        String,
        chrono::DateTime<chrono::Utc>,
        serde_json::Value,
    )> = sqlx::query_as(
        "SELECT event_id, position, transaction_id::text, recorded_at, metadata
               FROM events ORDER BY sequence",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 4);
    let reported: Vec<Uuid> = first
        .events
        .iter()
        .chain(&second.events)
        .map(|e| e.event_id)
        .collect();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), reported);
    // positions grow; one command, one transaction; a later command, a later transaction
    assert!(rows.windows(2).all(|w| w[0].1 < w[1].1));
    let xids: Vec<u64> = rows.iter().map(|r| r.2.parse().unwrap()).collect();
    assert_eq!(xids[0], xids[1]);
    assert_eq!(xids[1], xids[2]);
    assert!(xids[3] > xids[2]);
    assert!(rows.iter().all(|r| r.3 <= chrono::Utc::now()));
    assert_eq!(rows[0].4["actor_id"], "u1");
    assert_eq!(rows[0].4["actor_kind"], "user");
}

#[tokio::test]
async fn a_refused_command_writes_nothing() {
    let db = canopy_testkit::database().await.unwrap();
    let store = store(db.pool());
    let result = store
        .execute::<Tally>("a", TallyCommand::Refuse, &(), &meta(), None)
        .await;
    assert!(matches!(result, Err(ExecuteError::Domain(_))));
    assert_eq!(count_events(db.pool()).await, 0);
}

#[tokio::test]
async fn if_match_on_a_stale_version_writes_nothing() {
    let db = canopy_testkit::database().await.unwrap();
    let store = store(db.pool());
    store
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 2 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    let stale = store
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 1 },
            &(),
            &meta(),
            Some(1),
        )
        .await;
    assert!(matches!(
        stale,
        Err(ExecuteError::VersionMismatch {
            expected: 1,
            actual: 2
        })
    ));
    let current = store
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 1 },
            &(),
            &meta(),
            Some(2),
        )
        .await
        .unwrap();
    assert_eq!(current.version, 3);
    assert_eq!(count_events(db.pool()).await, 3);
}

/// Two stores on two pools behave like two processes: their in-process locks do not see each
/// other, so they race on the primary key. Without retries every loss is a clean conflict and
/// the stream stays contiguous with exactly the winners' events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_to_one_stream_conflict_cleanly() {
    let db = canopy_testkit::database().await.unwrap();
    let no_retry = StoreConfig {
        retry: RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        },
        ..StoreConfig::default()
    };
    let stores = [
        Arc::new(AggregateStore::new(
            db.new_pool(4).await.unwrap(),
            no_retry.clone(),
        )),
        Arc::new(AggregateStore::new(db.new_pool(4).await.unwrap(), no_retry)),
    ];
    let mut tasks = Vec::new();
    for i in 0..60 {
        let store = stores[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            store
                .execute::<Tally>(
                    "s",
                    TallyCommand::Add { n: 1, times: 2 },
                    &(),
                    &meta(),
                    None,
                )
                .await
        }));
    }
    let mut committed = 0;
    let mut conflicts = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(c) => {
                assert_eq!(c.events.len(), 2);
                committed += 1;
            }
            Err(ExecuteError::Conflict { .. }) => conflicts += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(committed + conflicts, 60);
    assert!(
        conflicts > 0,
        "two processes never raced: the test proves nothing"
    );
    let sequences: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM events WHERE aggregate_id = 's' ORDER BY sequence",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(sequences, (1..=2 * committed).collect::<Vec<i64>>());
}

/// With retries, the same race ends with every command appended exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_conflicts_land_every_command_once() {
    let db = canopy_testkit::database().await.unwrap();
    let patient = StoreConfig {
        retry: RetryPolicy {
            max_attempts: 50,
            ..RetryPolicy::default()
        },
        ..StoreConfig::default()
    };
    let stores = [
        Arc::new(AggregateStore::new(
            db.new_pool(4).await.unwrap(),
            patient.clone(),
        )),
        Arc::new(AggregateStore::new(db.new_pool(4).await.unwrap(), patient)),
    ];
    let mut tasks = Vec::new();
    for i in 0..40i64 {
        let store = stores[(i % 2) as usize].clone();
        tasks.push(tokio::spawn(async move {
            store
                .execute::<Tally>(
                    "s",
                    TallyCommand::Add { n: i, times: 1 },
                    &(),
                    &meta(),
                    None,
                )
                .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let loaded = stores[0].load::<Tally>("s").await.unwrap();
    assert_eq!(loaded.version, 40);
    assert_eq!(loaded.aggregate.total, (0..40).sum::<i64>());
}
