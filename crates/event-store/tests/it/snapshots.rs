//! Snapshots: a long stream loads from its snapshot plus the few events after it.

use canopy_event_store::{AggregateStore, StoreConfig};

use crate::support::{Tally, TallyCommand, meta};

#[tokio::test]
async fn snapshots_are_written_at_multiples_and_used_on_load() {
    let db = canopy_testkit::database().await.unwrap();
    let store = AggregateStore::new(
        db.pool().clone(),
        StoreConfig {
            snapshot_every: 10,
            ..StoreConfig::default()
        },
    );
    for _ in 0..7 {
        store
            .execute::<Tally>(
                "a",
                TallyCommand::Add { n: 2, times: 3 },
                &(),
                &meta(),
                None,
            )
            .await
            .unwrap();
    }
    // 21 events; the append that crossed 20 (18 -> 21) wrote a snapshot at 21
    let loaded = store.load::<Tally>("a").await.unwrap();
    assert_eq!(loaded.version, 21);
    assert_eq!(loaded.snapshot_version, Some(21));
    assert_eq!(loaded.events_replayed, 0);
    // the snapshot holds each event once (cqrs-es 0.5's own snapshot path would apply twice)
    assert_eq!(loaded.aggregate.total, 42);
    assert_eq!(loaded.aggregate.events, 21);

    store
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 1, times: 1 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    let loaded = store.load::<Tally>("a").await.unwrap();
    assert_eq!(
        (
            loaded.version,
            loaded.snapshot_version,
            loaded.events_replayed
        ),
        (22, Some(21), 1)
    );
    assert_eq!(loaded.aggregate.total, 43);
}

#[tokio::test]
async fn a_snapshot_that_no_longer_decodes_falls_back_to_replay() {
    let db = canopy_testkit::database().await.unwrap();
    let store = AggregateStore::new(
        db.pool().clone(),
        StoreConfig {
            snapshot_every: 2,
            ..StoreConfig::default()
        },
    );
    store
        .execute::<Tally>(
            "a",
            TallyCommand::Add { n: 5, times: 4 },
            &(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    sqlx::query("UPDATE snapshots SET payload = '{\"shape\":\"old\"}'")
        .execute(db.pool())
        .await
        .unwrap();
    let loaded = store.load::<Tally>("a").await.unwrap();
    assert_eq!(
        (
            loaded.version,
            loaded.snapshot_version,
            loaded.events_replayed
        ),
        (4, None, 4)
    );
    assert_eq!(loaded.aggregate.total, 20);
}

/// A session with 10,000 events loads from its snapshot, not by replaying its history, and the
/// snapshot holds exactly the state a full replay gives.
#[tokio::test]
async fn a_session_with_ten_thousand_events_loads_from_its_snapshot() {
    use canopy_domain::session::SessionPolicy;
    use canopy_domain::{Actor, Role, Session, SessionCommand, SessionEvent};
    use cqrs_es::{Aggregate, DomainEvent};
    use uuid::Uuid;

    let db = canopy_testkit::database().await.unwrap();
    let member = Actor::person("u1", "Ada", Role::Member, "w1");
    let session_id = Uuid::new_v4();
    let id = session_id.to_string();

    // Build a valid history in memory with the domain's own rules: start, then prompts that are
    // submitted and cancelled while queued, and one last prompt left in the queue: 9,999 events.
    let mut replayed = Session::default();
    let mut history: Vec<SessionEvent> = Vec::new();
    fn decide(command: SessionCommand, state: &mut Session, history: &mut Vec<SessionEvent>) {
        for event in state.decide(command, &SessionPolicy::default()).unwrap() {
            state.apply(event.clone());
            history.push(event);
        }
    }
    decide(
        SessionCommand::StartSession {
            actor: member.clone(),
            session_id,
            workspace_id: "w1".into(),
            feature_id: None,
            title: "long".into(),
            repository_url: "https://example.invalid/repo.git".into(),
            base_branch: "main".into(),
            session_branch: "canopy/long".into(),
        },
        &mut replayed,
        &mut history,
    );
    let mut last = Uuid::nil();
    for i in 0..4999 {
        last = Uuid::new_v4();
        decide(
            SessionCommand::SubmitPrompt {
                actor: member.clone(),
                prompt_id: last,
                text: format!("prompt {i}"),
            },
            &mut replayed,
            &mut history,
        );
        if i < 4998 {
            decide(
                SessionCommand::CancelPrompt {
                    actor: member.clone(),
                    prompt_id: last,
                },
                &mut replayed,
                &mut history,
            );
        }
    }
    assert_eq!(history.len(), 9_999);

    // Append it in batched transactions straight into the store.
    for (batch, events) in history.chunks(1_000).enumerate() {
        let start = batch * 1_000;
        let sequences: Vec<i64> = (0..events.len()).map(|i| (start + i + 1) as i64).collect();
        let types: Vec<String> = events.iter().map(DomainEvent::event_type).collect();
        let versions: Vec<String> = events.iter().map(DomainEvent::event_version).collect();
        let payloads: Vec<serde_json::Value> = events
            .iter()
            .map(|e| serde_json::to_value(e).unwrap())
            .collect();
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'session', $1, s, t, v, p, $6
               FROM unnest($2::bigint[], $3::text[], $4::text[], $5::jsonb[]) AS e(s, t, v, p)
              ORDER BY s",
        )
        .bind(&id)
        .bind(&sequences)
        .bind(&types)
        .bind(&versions)
        .bind(&payloads)
        .bind(serde_json::to_value(meta().to_map()).unwrap())
        .execute(db.pool())
        .await
        .unwrap();
    }

    let store = AggregateStore::new(db.pool().clone(), StoreConfig::default());
    let before = store.load::<Session>(&id).await.unwrap();
    assert_eq!(
        (before.snapshot_version, before.events_replayed),
        (None, 9_999)
    );

    // The 10,000th event crosses a multiple of 100: the store snapshots it.
    let committed = store
        .execute::<Session>(
            &id,
            SessionCommand::CancelPrompt {
                actor: member.clone(),
                prompt_id: last,
            },
            &SessionPolicy::default(),
            &meta(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(committed.version, 10_000);
    decide(
        SessionCommand::CancelPrompt {
            actor: member,
            prompt_id: last,
        },
        &mut replayed,
        &mut history,
    );

    let loaded = store.load::<Session>(&id).await.unwrap();
    assert_eq!(loaded.version, 10_000);
    assert_eq!(loaded.snapshot_version, Some(10_000));
    assert_eq!(loaded.events_replayed, 0);
    assert_eq!(
        serde_json::to_value(&loaded.aggregate).unwrap(),
        serde_json::to_value(&replayed).unwrap()
    );
    assert!(loaded.aggregate.queue().is_empty());
    // 5,000 prompts in, the snapshot is the size of what the rules decide on (the first
    // layout kept all 5,000 prompts)
    let size: i32 = sqlx::query_scalar(
        "SELECT octet_length(payload::text) FROM snapshots WHERE aggregate_type = 'session' AND aggregate_id = $1",
    )
    .bind(&id)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(size < 16 * 1024, "the snapshot is {size} bytes");
}

/// A session snapshot of the first layout (every prompt kept, no `shape`) is ignored: the
/// session is folded from its events, and the next snapshot replaces it.
#[tokio::test]
async fn a_session_snapshot_of_the_first_layout_is_ignored() {
    use canopy_domain::session::SessionPolicy;
    use canopy_domain::{Actor, Role, Session, SessionCommand};
    use uuid::Uuid;

    let db = canopy_testkit::database().await.unwrap();
    let store = AggregateStore::new(
        db.pool().clone(),
        StoreConfig {
            snapshot_every: 4,
            ..StoreConfig::default()
        },
    );
    let member = Actor::person("u1", "Ada", Role::Member, "w1");
    let session_id = Uuid::new_v4();
    let id = session_id.to_string();
    let (policy, meta) = (SessionPolicy::default(), meta());
    let run = |command| store.execute::<Session>(&id, command, &policy, &meta, None);
    run(SessionCommand::StartSession {
        actor: member.clone(),
        session_id,
        workspace_id: "w1".into(),
        feature_id: None,
        title: "old".into(),
        repository_url: "https://example.invalid/repo.git".into(),
        base_branch: "main".into(),
        session_branch: "canopy/old".into(),
    })
    .await
    .unwrap();
    let prompt = Uuid::new_v4();
    run(SessionCommand::SubmitPrompt {
        actor: member.clone(),
        prompt_id: prompt,
        text: "hi".into(),
    })
    .await
    .unwrap();
    // what the first layout wrote at version 3: it disagrees with the events (an empty queue)
    let ghost = Uuid::new_v4();
    let old = serde_json::json!({
        "status": "active", "session_id": session_id, "workspace_id": "w1", "title": "old",
        "participants": [], "queue": [ghost], "running": null,
        "prompts": {ghost.to_string(): {"author_id": "u1", "status": "queued", "plan_id": null}},
        "plans": {}, "tool_approvals": {}, "checkpoints": [],
    });
    sqlx::query(
        "INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload) \
         VALUES ('session', $1, 3, 1, $2)",
    )
    .bind(&id)
    .bind(&old)
    .execute(db.pool())
    .await
    .unwrap();

    let loaded = store.load::<Session>(&id).await.unwrap();
    assert_eq!((loaded.snapshot_version, loaded.events_replayed), (None, 3));
    assert_eq!(loaded.aggregate.queue(), [prompt]);

    // the append that crosses version 4 writes a snapshot of the current shape over it
    run(SessionCommand::CancelPrompt {
        actor: member,
        prompt_id: prompt,
    })
    .await
    .unwrap();
    let loaded = store.load::<Session>(&id).await.unwrap();
    assert_eq!(
        (loaded.snapshot_version, loaded.events_replayed),
        (Some(4), 0)
    );
    assert!(loaded.aggregate.queue().is_empty());
}
