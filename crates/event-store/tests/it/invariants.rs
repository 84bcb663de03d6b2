//! Rules the database enforces for every writer, whatever code path appended.

use crate::support::{Tally, TallyCommand, meta, store};

const INSERT: &str = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
    event_version, payload, metadata) VALUES ('tally', $1, $2, 'Added', '1', '{\"Added\":{\"n\":1}}', \
    '{\"actor_id\":\"u\",\"actor_name\":\"U\",\"actor_kind\":\"user\",\"correlation_id\":\"c\",\"request_id\":\"r\"}')";

fn hint(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
        .and_then(|e| e.hint().map(str::to_owned))
}

/// Invariant: the event insert is the first write of its transaction, so no appending
/// transaction holds a transaction id from before it loaded the aggregate.
#[tokio::test]
async fn an_event_insert_after_another_write_in_its_transaction_is_refused() {
    let db = canopy_testkit::database().await.unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("CREATE TEMP TABLE scratch (i int)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let error = sqlx::query(INSERT)
        .bind("a")
        .bind(1i64)
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert_eq!(
        hint(&error).as_deref(),
        Some("canopy_event_not_first_write")
    );
    tx.rollback().await.unwrap();

    // taking a transaction id early counts as a write too
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx)
        .await
        .unwrap();
    let error = sqlx::query(INSERT)
        .bind("a")
        .bind(1i64)
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert_eq!(
        hint(&error).as_deref(),
        Some("canopy_event_not_first_write")
    );
    tx.rollback().await.unwrap();

    // several events in one transaction are fine: the first one took the transaction id
    let mut tx = db.pool().begin().await.unwrap();
    for sequence in 1..=3i64 {
        sqlx::query(INSERT)
            .bind("a")
            .bind(sequence)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_sequence_gap_is_refused() {
    let db = canopy_testkit::database().await.unwrap();
    let error = sqlx::query(INSERT)
        .bind("a")
        .bind(2i64)
        .execute(db.pool())
        .await
        .unwrap_err();
    assert_eq!(hint(&error).as_deref(), Some("canopy_event_sequence_gap"));
}

#[tokio::test]
async fn events_are_append_only() {
    let db = canopy_testkit::database().await.unwrap();
    store(db.pool())
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 2 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    for statement in [
        "UPDATE events SET payload = '{}' WHERE sequence = 1",
        "DELETE FROM events WHERE sequence = 2",
        "TRUNCATE events",
    ] {
        let error = sqlx::query(statement).execute(db.pool()).await.unwrap_err();
        assert_eq!(
            hint(&error).as_deref(),
            Some("canopy_events_append_only"),
            "{statement}"
        );
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn an_event_without_the_required_metadata_is_refused() {
    let db = canopy_testkit::database().await.unwrap();
    let error = sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('tally', 'a', 1, 'Added', '1', '{}', '{\"actor_id\":\"u\"}')",
    )
    .execute(db.pool())
    .await
    .unwrap_err();
    assert_eq!(
        error.as_database_error().and_then(|e| e.constraint()),
        Some("events_metadata_complete")
    );
}
