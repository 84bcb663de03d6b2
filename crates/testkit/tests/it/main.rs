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

/// The dev stack's and the tests' own servers listen on loopback and require the credentials
/// they generated: an unauthenticated connection is refused.
#[tokio::test]
async fn local_servers_require_the_credentials_they_generate() {
    use sqlx::Connection;
    let dir = canopy_local_servers::fresh_dir("credentials").unwrap();
    let pg = canopy_local_servers::start_postgres(
        &dir.join("postgres"),
        canopy_local_servers::free_port().unwrap(),
        canopy_local_servers::Durability::Throwaway,
    )
    .unwrap();
    let nats = canopy_local_servers::start_nats(
        &dir.join("nats"),
        canopy_local_servers::free_port().unwrap(),
    )
    .unwrap();
    for url in [&pg.url, &nats.url] {
        assert!(
            url.contains("@127.0.0.1:"),
            "not on loopback with credentials: {url}"
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut conn = loop {
        match sqlx::PgConnection::connect(&pg.url).await {
            Ok(conn) => break conn,
            Err(error) if std::time::Instant::now() > deadline => panic!("{error}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    };
    let superuser: bool =
        sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(superuser);
    let (_, host) = pg.url.split_once('@').unwrap();
    let anonymous = format!("postgres://postgres@{host}");
    assert!(
        sqlx::PgConnection::connect(&anonymous).await.is_err(),
        "Postgres trusts a connection without a password"
    );
    let wrong = format!("postgres://postgres:wrong@{host}");
    assert!(sqlx::PgConnection::connect(&wrong).await.is_err());

    let client = loop {
        match canopy_testkit::connect_nats(&nats.url).await {
            Ok(client) => break client,
            Err(error) if std::time::Instant::now() > deadline => panic!("{error}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    };
    client.flush().await.unwrap();
    let (_, host) = nats.url.split_once('@').unwrap();
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        async_nats::connect(format!("nats://{host}")),
    )
    .await
    .map_or(true, |connected| connected.is_err());
    assert!(refused, "nats-server takes a client without credentials");
    pg.signal("INT").unwrap();
    nats.signal("TERM").unwrap();
}
