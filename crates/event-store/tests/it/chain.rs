//! The hash chain: correct over a stream, visibly broken by an edit made behind the store's back.

use canopy_event_store::{ProblemKind, verify_chain};

use crate::support::{Tally, TallyCommand, meta, store};

async fn tamper(pool: &sqlx::PgPool, statement: &str) {
    // A superuser can switch triggers off; the chain is what still tells.
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(statement).execute(&mut *conn).await.unwrap();
    sqlx::query("SET session_replication_role = origin")
        .execute(&mut *conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_chain_verifies_and_breaks_where_a_payload_was_altered() {
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

    // The first event's prev_hash is zero and each later one links to its predecessor.
    let links: Vec<(Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT prev_hash, hash FROM events ORDER BY sequence")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(links[0].0, vec![0u8; 32]);
    assert!(links.windows(2).all(|w| w[1].0 == w[0].1));

    tamper(
        db.pool(),
        "UPDATE events SET payload = '{\"Added\":{\"n\":1000}}' WHERE sequence = 7",
    )
    .await;
    let report = verify_chain(db.pool(), "tally", "a").await.unwrap();
    assert_eq!(report.problems.len(), 1, "{report:?}");
    assert_eq!(report.problems[0].sequence, 7);
    assert_eq!(report.problems[0].kind, ProblemKind::PayloadAltered);

    // Covering the edit by rewriting the recorded digest breaks the event digest and the hash.
    tamper(
        db.pool(),
        "UPDATE events SET payload_digest = canopy_payload_digest(payload) WHERE sequence = 7",
    )
    .await;
    let report = verify_chain(db.pool(), "tally", "a").await.unwrap();
    let kinds: Vec<_> = report
        .problems
        .iter()
        .map(|p| (p.sequence, p.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (7, ProblemKind::EventAltered),
            (7, ProblemKind::HashMismatch)
        ]
    );

    // Another stream is untouched.
    store
        .execute::<Tally>(
            "b",
            TallyCommand::Add { n: 1, times: 1 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    assert!(
        verify_chain(db.pool(), "tally", "b")
            .await
            .unwrap()
            .is_intact()
    );
}

#[tokio::test]
async fn a_deleted_event_shows_as_a_gap_and_a_broken_link() {
    let db = canopy_testkit::database().await.unwrap();
    store(db.pool())
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 5 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    tamper(db.pool(), "DELETE FROM events WHERE sequence = 3").await;
    let report = verify_chain(db.pool(), "tally", "a").await.unwrap();
    let kinds: Vec<_> = report
        .problems
        .iter()
        .map(|p| (p.sequence, p.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (4, ProblemKind::SequenceGap),
            (4, ProblemKind::PrevHashMismatch)
        ]
    );
}
