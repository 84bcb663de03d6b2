//! The test kit itself: fresh databases are isolated and migrated, NATS prefixes are unique.

use futures::StreamExt;

#[tokio::test]
async fn each_test_database_is_fresh_and_migrated() {
    let a = canopy_testkit::database().await.unwrap();
    let b = canopy_testkit::database().await.unwrap();
    assert_ne!(a.name, b.name);
    for db in [&a, &b] {
        let applied = canopy_event_store::applied_migrations(db.pool())
            .await
            .unwrap();
        assert_eq!(applied, canopy_event_store::MIGRATOR.iter().count() as i64);
    }
    sqlx::query("CREATE TABLE only_in_a (i int)")
        .execute(a.pool())
        .await
        .unwrap();
    let in_b: Option<String> = sqlx::query_scalar("SELECT to_regclass('only_in_a')::text")
        .fetch_one(b.pool())
        .await
        .unwrap();
    assert_eq!(in_b, None);

    let name = a.name.clone();
    let admin = b.new_pool(1).await.unwrap();
    drop(a);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "a dropped TestDb leaves its database behind");
}

#[tokio::test]
async fn nats_gives_jetstream_and_a_unique_prefix() {
    let a = canopy_testkit::nats().await.unwrap();
    let b = canopy_testkit::nats().await.unwrap();
    assert_ne!(a.prefix, b.prefix);
    let subject = format!("{}.hello", a.prefix);
    let stream = a
        .jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: a.prefix.to_uppercase(),
            subjects: vec![format!("{}.>", a.prefix)],
            ..Default::default()
        })
        .await
        .unwrap();
    a.jetstream
        .publish(subject, "hi".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(stream.cached_info().config.name, a.prefix.to_uppercase());
    let names: Vec<String> = b
        .jetstream
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    assert!(names.contains(&a.prefix.to_uppercase()));

    let name = a.prefix.to_uppercase();
    drop(a);
    let names: Vec<String> = b
        .jetstream
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    assert!(
        !names.contains(&name),
        "a dropped TestNats leaves its streams behind"
    );
}
