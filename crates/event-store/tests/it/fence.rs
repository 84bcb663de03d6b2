//! Fences: what a caller writes in the append's transaction commits with the events, or
//! neither does.

use canopy_event_store::{Committed, ExecuteError, Fence, PgConnection};
use uuid::Uuid;

use crate::support::{Tally, TallyCommand, count_events, meta, store};

/// Records what it was shown, with its transaction id, and agrees or not.
struct Recorder {
    agree: bool,
}

impl Fence for Recorder {
    async fn check(
        &self,
        conn: &mut PgConnection,
        committed: &Committed,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query(
            "INSERT INTO fence_log (version, event_ids, positions, xid)
             VALUES ($1, $2, $3, pg_current_xact_id()::text)",
        )
        .bind(i64::try_from(committed.version).unwrap())
        .bind(
            committed
                .events
                .iter()
                .map(|e| e.event_id)
                .collect::<Vec<_>>(),
        )
        .bind(
            committed
                .events
                .iter()
                .map(|e| e.position)
                .collect::<Vec<_>>(),
        )
        .execute(conn)
        .await?;
        Ok(self.agree)
    }
}

type Logged = (i64, Vec<Uuid>, Vec<i64>, String);

async fn fence_log(pool: &sqlx::PgPool) -> Vec<Logged> {
    sqlx::query_as("SELECT version, event_ids, positions, xid FROM fence_log ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn with_fence_log() -> canopy_testkit::TestDb {
    let db = canopy_testkit::database().await.unwrap();
    sqlx::query(
        "CREATE TABLE fence_log (version bigint, event_ids uuid[], positions bigint[], xid text)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    db
}

#[tokio::test]
async fn a_fence_writes_in_the_appending_transaction_and_sees_what_it_commits() {
    let db = with_fence_log().await;
    let committed = store(db.pool())
        .execute_fenced::<Tally, _>(
            "a",
            TallyCommand::Add { n: 1, times: 2 },
            &(),
            &meta(),
            None,
            &Recorder { agree: true },
        )
        .await
        .unwrap();
    let rows: Vec<(Uuid, i64, String)> = sqlx::query_as(
        "SELECT event_id, position, transaction_id::text FROM events ORDER BY sequence",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let logged = fence_log(db.pool()).await;
    assert_eq!(logged.len(), 1);
    let (version, event_ids, positions, xid) = &logged[0];
    assert_eq!(*version, 2);
    assert_eq!(*event_ids, rows.iter().map(|r| r.0).collect::<Vec<_>>());
    assert_eq!(*positions, rows.iter().map(|r| r.1).collect::<Vec<_>>());
    assert!(rows.iter().all(|r| r.2 == *xid), "one transaction");
    assert_eq!(
        committed
            .events
            .iter()
            .map(|e| e.event_id)
            .collect::<Vec<_>>(),
        *event_ids
    );
}

#[tokio::test]
async fn a_fence_that_refuses_rolls_the_append_back() {
    let db = with_fence_log().await;
    let store = store(db.pool());
    let result = store
        .execute_fenced::<Tally, _>(
            "a",
            TallyCommand::Add { n: 1, times: 2 },
            &(),
            &meta(),
            None,
            &Recorder { agree: false },
        )
        .await;
    assert!(matches!(result, Err(ExecuteError::Fenced)), "{result:?}");
    assert_eq!(count_events(db.pool()).await, 0);
    assert!(
        fence_log(db.pool()).await.is_empty(),
        "its write is gone too"
    );
    // the stream is untouched: the next append is sequence 1
    let next = store
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 1 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(next.version, 1);
}

#[tokio::test]
async fn a_command_that_appends_nothing_still_runs_its_fence() {
    let db = with_fence_log().await;
    let store = store(db.pool());
    store
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 3 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    let committed = store
        .execute_fenced::<Tally, _>(
            "a",
            TallyCommand::Add { n: 1, times: 0 },
            &(),
            &meta(),
            None,
            &Recorder { agree: true },
        )
        .await
        .unwrap();
    assert_eq!((committed.version, committed.events.len()), (3, 0));
    let logged = fence_log(db.pool()).await;
    assert_eq!(logged.len(), 1);
    assert_eq!((logged[0].0, logged[0].1.len()), (3, 0));

    let refused = store
        .execute_fenced::<Tally, _>(
            "a",
            TallyCommand::Add { n: 1, times: 0 },
            &(),
            &meta(),
            None,
            &Recorder { agree: false },
        )
        .await;
    assert!(matches!(refused, Err(ExecuteError::Fenced)), "{refused:?}");
    assert_eq!(fence_log(db.pool()).await.len(), 1);
}

/// A refused command never reaches its fence.
#[tokio::test]
async fn a_refused_command_does_not_run_its_fence() {
    let db = with_fence_log().await;
    let result = store(db.pool())
        .execute_fenced::<Tally, _>(
            "a",
            TallyCommand::Refuse,
            &(),
            &meta(),
            None,
            &Recorder { agree: true },
        )
        .await;
    assert!(matches!(result, Err(ExecuteError::Domain(_))));
    assert!(fence_log(db.pool()).await.is_empty());
}
