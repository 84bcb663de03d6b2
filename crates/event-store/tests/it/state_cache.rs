//! The store keeps the state a command left, so the next command to that aggregate reads only
//! what was appended since; it never keeps a state that is ahead of what was committed.

use canopy_event_store::{Committed, ExecuteError, Fence, PgConnection};

use crate::support::{Tally, TallyCommand, meta, store};

async fn add(store: &canopy_event_store::AggregateStore, n: i64) -> Committed {
    store
        .execute::<Tally>("a", TallyCommand::Add { n, times: 1 }, &(), &meta(), None)
        .await
        .unwrap()
}

/// An event behind the cached state is not read again: even one that no longer decodes does
/// not stop the next command (a store without the cache would replay it and fail).
#[tokio::test]
async fn the_next_command_reads_only_the_events_after_the_cached_state() {
    let db = canopy_testkit::database().await.unwrap();
    let store = store(db.pool());
    add(&store, 1).await;
    add(&store, 2).await;
    db.tamper("UPDATE events SET payload = '{\"Unknown\":{}}' WHERE sequence = 1")
        .await
        .unwrap();
    assert_eq!(add(&store, 3).await.version, 3);
    // a fresh load replays from the start and trips over the event
    assert!(store.load::<Tally>("a").await.is_err());
}

/// Another process's appends reach a cached state before the next command decides.
#[tokio::test]
async fn a_cached_state_catches_up_with_another_process() {
    let db = canopy_testkit::database().await.unwrap();
    let (here, there) = (store(db.pool()), store(db.pool()));
    add(&here, 1).await;
    add(&there, 10).await;
    add(&there, 100).await;
    assert_eq!(add(&here, 1000).await.version, 4);
    let loaded = here.load::<Tally>("a").await.unwrap();
    assert_eq!((loaded.aggregate.total, loaded.aggregate.events), (1111, 4));
    // and the state `here` keeps is that one: its next command appends at 5
    assert_eq!(add(&here, 1).await.version, 5);
}

struct Refuse;

impl Fence for Refuse {
    async fn check(&self, _: &mut PgConnection, _: &Committed) -> Result<bool, sqlx::Error> {
        Ok(false)
    }
}

/// A command whose append rolled back applied its events in memory; that state is dropped.
#[tokio::test]
async fn a_state_whose_append_rolled_back_is_not_kept() {
    let db = canopy_testkit::database().await.unwrap();
    let store = store(db.pool());
    add(&store, 1).await;
    let fenced = store
        .execute_fenced::<Tally, _>(
            "a",
            TallyCommand::Add { n: 50, times: 2 },
            &(),
            &meta(),
            None,
            &Refuse,
        )
        .await;
    assert!(matches!(fenced, Err(ExecuteError::Fenced)));
    assert_eq!(add(&store, 2).await.version, 2);
    let refused = store
        .execute::<Tally>("a", TallyCommand::Refuse, &(), &meta(), None)
        .await;
    assert!(matches!(refused, Err(ExecuteError::Domain(_))));
    assert_eq!(add(&store, 4).await.version, 3);
    let loaded = store.load::<Tally>("a").await.unwrap();
    assert_eq!(loaded.aggregate.total, 7);
}
