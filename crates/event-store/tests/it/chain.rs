//! The hash chain: correct over a stream, visibly broken by an edit made behind the store's back,
//! and named at the right sequence for every kind of tampering (the same cases run against
//! query-api's verify endpoint and the offline `canopy audit verify`).

use canopy_event_store::chain;
use canopy_event_store::{ProblemKind, audit, verify_chain};

use crate::support::{Tally, TallyCommand, meta, store};

/// Runs `statement` as the table owner with every trigger switched off (a superuser can), the
/// way an attacker with database access would.
async fn ten_events(pool: &sqlx::PgPool) {
    store(pool)
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 10 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
}

async fn first_problem(pool: &sqlx::PgPool) -> Option<(i64, ProblemKind)> {
    let report = verify_chain(pool, "tally", "a").await.unwrap();
    report.first_problem().map(|p| (p.sequence, p.kind))
}

#[tokio::test]
async fn an_untouched_chain_verifies_in_rust_and_links_each_event_to_the_one_before() {
    let db = canopy_testkit::database().await.unwrap();
    let store = store(db.pool());
    for n in 0..10 {
        store
            .execute::<Tally>("a", TallyCommand::Add { n, times: 2 }, &(), &meta(), None)
            .await
            .unwrap();
    }
    let report = verify_chain(db.pool(), "tally", "a").await.unwrap();
    assert_eq!(report.events_checked, 20);
    assert!(report.is_intact(), "{report:?}");

    // The Rust digests are the database's, byte for byte.
    let records = audit::read_stream(db.pool(), "tally", "a", 0, 100)
        .await
        .unwrap();
    for record in &records {
        assert_eq!(
            hex::encode(chain::payload_digest(&record.payload)),
            record.payload_digest
        );
        assert_eq!(
            hex::encode(chain::event_digest(record, &record.payload_digest)),
            record.event_digest
        );
    }
    assert_eq!(records[0].prev_hash, "0".repeat(64));
    assert!(records.windows(2).all(|w| w[1].prev_hash == w[0].hash));

    // The head outside the events table follows every append.
    let head = audit::read_head(db.pool(), "tally", "a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head.sequence, 20);
    assert_eq!(head.hash, records[19].hash);
}

#[tokio::test]
async fn digests_match_the_database_for_metadata_that_needs_escaping() {
    let db = canopy_testkit::database().await.unwrap();
    let mut metadata = meta();
    metadata.actor_name = "Ada \"Q\" \\ Lovelace\n\t\u{1} é 日本".to_owned();
    store(db.pool())
        .execute::<Tally>(
            "a\"b",
            TallyCommand::Add { n: 1, times: 1 },
            &(),
            &metadata,
            None,
        )
        .await
        .unwrap();
    let report = verify_chain(db.pool(), "tally", "a\"b").await.unwrap();
    assert!(report.is_intact(), "{report:?}");
}

#[tokio::test]
async fn an_altered_payload_is_named_at_its_sequence() {
    let db = canopy_testkit::database().await.unwrap();
    ten_events(db.pool()).await;
    db.tamper("UPDATE events SET payload = '{\"Added\":{\"n\":1000}}' WHERE sequence = 7")
        .await
        .unwrap();
    assert_eq!(
        first_problem(db.pool()).await,
        Some((7, ProblemKind::PayloadAltered))
    );
}

#[tokio::test]
async fn altered_metadata_alone_is_named_at_its_sequence() {
    let db = canopy_testkit::database().await.unwrap();
    ten_events(db.pool()).await;
    db.tamper(
        "UPDATE events SET metadata = jsonb_set(metadata, '{actor_id}', '\"mallory\"') \
          WHERE sequence = 4",
    )
    .await
    .unwrap();
    assert_eq!(
        first_problem(db.pool()).await,
        Some((4, ProblemKind::EventAltered))
    );
}

#[tokio::test]
async fn a_deleted_middle_event_is_named_as_missing() {
    let db = canopy_testkit::database().await.unwrap();
    ten_events(db.pool()).await;
    db.tamper("DELETE FROM events WHERE sequence = 5")
        .await
        .unwrap();
    let report = verify_chain(db.pool(), "tally", "a").await.unwrap();
    let kinds: Vec<_> = report
        .problems
        .iter()
        .map(|p| (p.sequence, p.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (5, ProblemKind::SequenceGap),
            (6, ProblemKind::PrevHashMismatch)
        ]
    );
}

#[tokio::test]
async fn a_deleted_newest_event_is_named_by_the_head() {
    let db = canopy_testkit::database().await.unwrap();
    ten_events(db.pool()).await;
    db.tamper("DELETE FROM events WHERE sequence = 10")
        .await
        .unwrap();
    assert_eq!(
        first_problem(db.pool()).await,
        Some((10, ProblemKind::HeadMismatch))
    );
}

#[tokio::test]
async fn two_swapped_events_are_named_at_the_first() {
    let db = canopy_testkit::database().await.unwrap();
    ten_events(db.pool()).await;
    db.tamper(
        "UPDATE events SET sequence = 1003 WHERE sequence = 3;
         UPDATE events SET sequence = 3 WHERE sequence = 6;
         UPDATE events SET sequence = 6 WHERE sequence = 1003;",
    )
    .await
    .unwrap();
    assert_eq!(
        first_problem(db.pool()).await,
        Some((3, ProblemKind::EventAltered))
    );
}

#[tokio::test]
async fn a_chain_rehashed_after_an_edit_is_caught_by_the_head() {
    let db = canopy_testkit::database().await.unwrap();
    ten_events(db.pool()).await;
    db.tamper(REHASH_FROM_7).await.unwrap();
    // The table agrees with itself again: only the head outside it tells.
    let records = audit::read_stream(db.pool(), "tally", "a", 0, 100)
        .await
        .unwrap();
    let alone = chain::verify_records("tally", "a", &records, [], None);
    assert!(alone.is_intact(), "{alone:?}");
    assert_eq!(
        first_problem(db.pool()).await,
        Some((10, ProblemKind::HeadMismatch))
    );
}

#[tokio::test]
async fn a_payload_forged_under_the_erasure_flag_is_refused_and_caught() {
    let db = canopy_testkit::database().await.unwrap();
    ten_events(db.pool()).await;
    // Through the guard: refused.
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL canopy.erasure = 'on'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let refused = sqlx::query(
        "UPDATE events SET payload = '{\"Added\":{\"n\":1000}}', erased_at = now() \
          WHERE sequence = 7",
    )
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("append-only"), "{refused}");
    drop(tx);
    // Behind the guard's back: caught at its sequence.
    db.tamper("SET canopy.erasure = 'on';
         UPDATE events SET payload = '{\"Added\":{\"n\":1000}}', erased_at = now() WHERE sequence = 7;
         RESET canopy.erasure;").await.unwrap();
    assert_eq!(
        first_problem(db.pool()).await,
        Some((7, ProblemKind::PayloadAltered))
    );
}

/// Edits event 7's payload and recomputes every digest and link from there on, as an attacker
/// who knows the scheme would.
pub(crate) const REHASH_FROM_7: &str = "
UPDATE events SET payload = '{\"Added\":{\"n\":1000}}' WHERE sequence = 7;
DO $$
DECLARE r record; previous bytea;
BEGIN
  FOR r IN SELECT * FROM events WHERE sequence >= 7 ORDER BY aggregate_type, aggregate_id, sequence LOOP
    SELECT hash INTO previous FROM events e WHERE e.aggregate_type = r.aggregate_type
       AND e.aggregate_id = r.aggregate_id AND e.sequence = r.sequence - 1;
    UPDATE events SET payload_digest = canopy_payload_digest(payload) WHERE event_id = r.event_id;
    UPDATE events SET event_digest = canopy_event_digest(event_id, aggregate_type, aggregate_id,
        sequence, event_type, event_version, recorded_at, payload_digest, metadata),
        prev_hash = previous WHERE event_id = r.event_id;
    UPDATE events SET hash = sha256(prev_hash || event_digest) WHERE event_id = r.event_id;
  END LOOP;
END $$;";

#[tokio::test]
async fn a_head_only_moves_forward_with_an_append() {
    let db = canopy_testkit::database().await.unwrap();
    ten_events(db.pool()).await;
    for statement in [
        "DELETE FROM event_heads",
        "TRUNCATE event_heads",
        "UPDATE event_heads SET sequence = 9, hash = (SELECT hash FROM events WHERE sequence = 9)",
        "UPDATE event_heads SET sequence = 11",
    ] {
        let refused = sqlx::query(statement).execute(db.pool()).await.unwrap_err();
        assert!(
            refused.to_string().contains("only move forward"),
            "{statement}: {refused}"
        );
    }
    // Appending in one transaction moves it once, to the newest event.
    store(db.pool())
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 3 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    let head = audit::read_head(db.pool(), "tally", "a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head.sequence, 13);
    assert!(
        verify_chain(db.pool(), "tally", "a")
            .await
            .unwrap()
            .is_intact()
    );
}

/// The digests the append trigger computes are the ones the first migration's functions
/// computed (values taken from those functions), whatever was done since to make them cheaper;
/// and the planner can inline the functions (STABLE, not STRICT), which is what makes them cheap.
#[tokio::test]
async fn the_append_digests_are_unchanged_and_inlinable() {
    let db = canopy_testkit::database().await.unwrap();
    let (payload_digest, event_digest, hash): (String, String, String) = sqlx::query_as(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata, event_id, recorded_at) VALUES ('tally', 'a', 1, 'Added', '1', \
         '{\"Added\":{\"n\":1}}', \
         '{\"actor_id\":\"u\",\"actor_name\":\"U\",\"actor_kind\":\"user\",\"correlation_id\":\"c\",\"request_id\":\"r\"}', \
         '00000000-0000-0000-0000-000000000001', '2026-11-30 01:02:03.456789+00') \
         RETURNING encode(payload_digest, 'hex'), encode(event_digest, 'hex'), encode(hash, 'hex')",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        payload_digest,
        "d8397ffef5fe1810205a4c832161b24d96726f34db7f87af59141480f8b6f9f9"
    );
    assert_eq!(
        event_digest,
        "35fee7856081c82eab56c3c2e08196f59c0ef015f926940d8de4d4ac12ba6dd7"
    );
    let expected: String = sqlx::query_scalar(
        "SELECT encode(sha256(decode(repeat('00', 32), 'hex') || decode($1, 'hex')), 'hex')",
    )
    .bind(&event_digest)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(hash, expected);

    let functions: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT proname::text, provolatile::text, proisstrict FROM pg_proc \
         WHERE proname IN ('canopy_event_digest', 'canopy_payload_digest') ORDER BY 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        functions,
        [
            ("canopy_event_digest".to_owned(), "s".to_owned(), false),
            ("canopy_payload_digest".to_owned(), "s".to_owned(), false),
        ]
    );
}
