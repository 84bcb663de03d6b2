//! The security issue's read-side items: `consistent_with` scoped to the reader's workspace and
//! bounded per person; stream tickets bound to one stream and to their bearer's life; streams
//! that end with `reauth` when their token expires; bounded WebSocket messages; and dates
//! PostgreSQL cannot hold refused as bad input.

use std::time::{Duration, Instant};

use canopy_auth::Claims;
use canopy_domain::Role;
use eventsource_stream::Eventsource;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{SECRET, Stack, token};

async fn start_session(stack: &Stack, workspace: &str) -> (Uuid, i64) {
    let answer = stack
        .command(&token(Role::Member, "m1", workspace), "/sessions", json!({"title": "s", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await;
    (
        answer["id"].as_str().unwrap().parse().unwrap(),
        answer["version"].as_i64().unwrap(),
    )
}

/// A person's token that expires in `seconds`.
fn short_token(seconds: i64) -> String {
    let claims = Claims::user(
        "brief",
        "Brief",
        "w1",
        Role::Viewer,
        chrono::Duration::seconds(seconds),
    );
    canopy_auth::mint_hs256(SECRET, &claims).unwrap()
}

async fn ticket(stack: &Stack, bearer: &str, session: Option<Uuid>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{}/stream-tickets", stack.query))
        .bearer_auth(bearer);
    if let Some(session) = session {
        request = request.query(&[("session_id", session)]);
    }
    request.send().await.unwrap()
}

async fn ticket_for(stack: &Stack, bearer: &str, session: Option<Uuid>) -> (String, i64) {
    let answer = ticket(stack, bearer, session).await;
    assert_eq!(answer.status().as_u16(), 200);
    let answer: Value = answer.json().await.unwrap();
    (
        answer["ticket"].as_str().unwrap().to_owned(),
        answer["expires_in_seconds"].as_i64().unwrap(),
    )
}

async fn status(url: String) -> u16 {
    reqwest::Client::new()
        .get(url)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_with_tells_nothing_of_another_workspace() {
    // no projectors: nothing is ever consistent, so only scoping decides the answers
    let stack = Stack::start_with(false, 2000).await;
    let (theirs, version) = start_session(&stack, "w2").await;
    let reader = token(Role::Viewer, "v", "w1");
    let mut answers = Vec::new();
    for aggregate in [theirs, Uuid::new_v4()] {
        let started = Instant::now();
        let answer = stack
            .get(
                &reader,
                &format!("/sessions?consistent_with={aggregate}:{version}"),
            )
            .await
            .problem(409, "not_yet_consistent");
        answers.push((answer.status, started.elapsed() < Duration::from_secs(1)));
    }
    assert_eq!(
        answers,
        [(409, true), (409, true)],
        "another workspace's aggregate answers as one that does not exist, without waiting"
    );
    // once projected, the other workspace's aggregate still answers the same
    let mut stack = stack;
    stack.start_projectors().await;
    crate::support::wait_projected(&stack).await;
    stack
        .get(
            &reader,
            &format!("/sessions?consistent_with={theirs}:{version}"),
        )
        .await
        .problem(409, "not_yet_consistent");
    stack
        .get(
            &token(Role::Viewer, "v2", "w2"),
            &format!("/sessions?consistent_with={theirs}:{version}"),
        )
        .await
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_person_may_have_only_so_many_reads_waiting() {
    let stack = Stack::start_with(false, 2000).await;
    let (ours, version) = start_session(&stack, "w1").await;
    let reader = token(Role::Viewer, "v", "w1");
    let path = format!("/sessions?consistent_with={ours}:{version}");
    let waits = (0..12).map(|_| stack.get(&reader, &path));
    let answers = futures::future::join_all(waits).await;
    let refused = answers
        .iter()
        .filter(|a| a.status == 429 && a.body["code"] == "too_many_waits")
        .count();
    let waited = answers
        .iter()
        .filter(|a| a.status == 409 && a.body["code"] == "not_yet_consistent")
        .count();
    assert_eq!((refused, waited), (4, 8), "the default share is 8");
    // another person is not held back by the first
    stack
        .get(&token(Role::Viewer, "other", "w1"), &path)
        .await
        .problem(409, "not_yet_consistent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_opens_only_the_stream_it_was_minted_for_and_not_presence() {
    let stack = Stack::start().await;
    let (session, _) = start_session(&stack, "w1").await;
    let (other, _) = start_session(&stack, "w1").await;
    let viewer = token(Role::Viewer, "v", "w1");
    let (for_session, _) = ticket_for(&stack, &viewer, Some(session)).await;
    let stream =
        |id: Uuid, ticket: &str| format!("{}/sessions/{id}/stream?ticket={ticket}", stack.query);
    assert_eq!(status(stream(session, &for_session)).await, 200);
    assert_eq!(
        status(stream(session, &for_session)).await,
        200,
        "EventSource reconnects with the same URL"
    );
    assert_eq!(
        status(stream(other, &for_session)).await,
        401,
        "one ticket streamed two sessions"
    );
    assert_eq!(
        status(format!("{}/stream?ticket={for_session}", stack.query)).await,
        401
    );
    assert_eq!(
        status(format!(
            "{}/sessions/{session}/presence?ticket={for_session}",
            stack.query
        ))
        .await,
        401,
        "a ticket is accepted on /presence"
    );
    let (for_workspace, _) = ticket_for(&stack, &viewer, None).await;
    assert_eq!(
        status(format!("{}/stream?ticket={for_workspace}", stack.query)).await,
        200
    );
    assert_eq!(status(stream(session, &for_workspace)).await, 401);
    // another workspace's session gets no ticket, exactly as one that does not exist
    let intruder = token(Role::Owner, "o", "w2");
    let foreign = ticket(&stack, &intruder, Some(session)).await;
    let missing = ticket(&stack, &intruder, Some(Uuid::new_v4())).await;
    assert_eq!(
        (foreign.status().as_u16(), missing.status().as_u16()),
        (404, 404)
    );
    // a ticket never outlives its bearer
    let (_, expires_in) = ticket_for(&stack, &short_token(5), Some(session)).await;
    assert!(
        expires_in <= 5,
        "the ticket outlives its bearer: {expires_in} s"
    );
}

/// Reads an SSE stream until its ending event; returns its name and data, and how long it took.
async fn ending_of(url: String, bearer: Option<&str>) -> (String, Value, Duration) {
    let started = Instant::now();
    let mut request = reqwest::Client::new().get(url);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut events = response.bytes_stream().eventsource();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("the stream outlived its token")
            .expect("the stream ended without a message")
            .unwrap();
        if !["message", "presence", "change"].contains(&event.event.as_str()) {
            return (
                event.event,
                serde_json::from_str(&event.data).unwrap(),
                started.elapsed(),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_with_reauth_when_their_token_expires() {
    let stack = Stack::start().await;
    let (session, version) = start_session(&stack, "w1").await;
    let url = format!("{}/sessions/{session}/stream", stack.query);
    let (kind, body, took) = ending_of(url.clone(), Some(&short_token(3))).await;
    assert_eq!(kind, "reauth");
    assert_eq!(body["resume_after"], version);
    assert!(took < Duration::from_secs(10), "{took:?}");

    // a ticket's stream ends with its bearer, not with the ticket's minute
    let (for_session, _) = ticket_for(&stack, &short_token(3), Some(session)).await;
    let (kind, _, _) = ending_of(format!("{url}?ticket={for_session}"), None).await;
    assert_eq!(kind, "reauth");

    // the workspace stream too
    let (kind, body, _) = ending_of(format!("{}/stream", stack.query), Some(&short_token(3))).await;
    assert_eq!(
        (kind.as_str(), &body["resume_after"]),
        ("reauth", &Value::Null)
    );

    // and a WebSocket gets a `reauth` frame
    let ws = format!(
        "{}/sessions/{session}/ws?ticket={}",
        stack.query.replace("http://", "ws://"),
        ticket_for(&stack, &short_token(3), Some(session)).await.0
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    let ending = loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("the socket outlived its token")
            .unwrap()
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame {
            let body: Value = serde_json::from_str(&text).unwrap();
            if body["kind"] != "event" && body["kind"] != "presence" {
                break body;
            }
        }
    };
    assert_eq!(ending, json!({"kind": "reauth", "resume_after": version}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_may_not_send_big_messages() {
    let stack = Stack::start().await;
    let (session, _) = start_session(&stack, "w1").await;
    let ws = format!(
        "{}/sessions/{session}/ws?ticket={}",
        stack.query.replace("http://", "ws://"),
        ticket_for(&stack, &token(Role::Viewer, "v", "w1"), Some(session))
            .await
            .0
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    let big = "x".repeat(1024 * 1024);
    // The server may close the connection while the client is still writing the message: a
    // broken pipe or a reset is the refusal seen from the sending side. Anything else fails.
    if let Err(error) = socket
        .send(tokio_tungstenite::tungstenite::Message::Text(big.into()))
        .await
    {
        use tokio_tungstenite::tungstenite::Error;
        match &error {
            Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => {}
            Error::ConnectionClosed | Error::AlreadyClosed => {}
            other => panic!("sending the big message failed unexpectedly: {other:?}"),
        }
        return;
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a 1 MiB client message was taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dates_postgres_cannot_hold_are_422() {
    let stack = Stack::start().await;
    let reader = token(Role::Viewer, "v", "w1");
    for path in [
        "/sessions",
        "/prompts",
        "/analytics/tools",
        "/analytics/prompts-per-user-per-day",
    ] {
        for bound in [
            "from=-100000-01-01T00:00:00Z",
            "to=+275760-09-13T00:00:00Z",
            "from=0000-01-01T00:00:00Z",
        ] {
            stack
                .get(&reader, &format!("{path}?{bound}"))
                .await
                .problem(422, "validation_failed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_on_the_bus_cannot_move_a_session_into_another_workspace() {
    let stack = Stack::start().await;
    let mut bus = stack
        .nats
        .client
        .subscribe(format!("{}.events.session.>", stack.nats.prefix))
        .await
        .unwrap();
    let response = reqwest::Client::new()
        .get(format!("{}/stream", stack.query))
        .bearer_auth(token(Role::Viewer, "v2", "w2"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut changes = response.bytes_stream().eventsource();

    // a real SessionStarted of w2, to forge from
    let (decoy, _) = start_session(&stack, "w2").await;
    let started = loop {
        let message = tokio::time::timeout(Duration::from_secs(20), bus.next())
            .await
            .unwrap()
            .unwrap();
        if message
            .subject
            .ends_with(&format!("{decoy}.SessionStarted"))
        {
            break message.payload;
        }
    };
    let (victim, _) = start_session(&stack, "w1").await;
    let mut forged: Value = serde_json::from_slice(&started).unwrap();
    forged["aggregate_id"] = json!(victim.to_string());
    forged["id"] = json!(Uuid::new_v4());
    // after the decoy's own in relay order, so that no stream skips it as already sent
    forged["position"] = json!(forged["position"].as_i64().unwrap() + 1_000_000);
    stack
        .nats
        .client
        .publish(
            format!(
                "{}.events.session.{victim}.SessionStarted",
                stack.nats.prefix
            ),
            serde_json::to_vec(&forged).unwrap().into(),
        )
        .await
        .unwrap();
    stack.nats.client.flush().await.unwrap();
    stack
        .command(
            &token(Role::Member, "m1", "w1"),
            &format!("/sessions/{victim}/prompts"),
            json!({"text": "private"}),
        )
        .await;
    let (marker, _) = start_session(&stack, "w2").await;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), changes.next())
            .await
            .expect("the marker never came")
            .unwrap()
            .unwrap();
        if event.event != "change" {
            continue;
        }
        let body: Value = serde_json::from_str(&event.data).unwrap();
        assert_ne!(
            body["session_id"],
            json!(victim.to_string()),
            "a forged message moved w1's session into w2's stream"
        );
        if body["session_id"] == json!(marker.to_string()) {
            break;
        }
    }
}

/// `url` with `role` as its user (the test server trusts local connections).
fn as_role(url: &str, role: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{role}:{role}@{rest}")
}

/// A login role in `group` (roles are cluster-wide: a fresh name per test).
async fn login_role(group: &str) -> String {
    let admin = canopy_testkit::database().await.unwrap();
    let role = format!("test_{}", Uuid::new_v4().simple());
    sqlx::query(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{role}' IN ROLE {group}"
    ))
    .execute(admin.pool())
    .await
    .unwrap();
    role
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_api_changes_no_schema_and_serves_as_canopy_reader() {
    // on a database nobody migrated, query-api waits and gives up; it applies nothing
    let admin = canopy_testkit::database().await.unwrap();
    let empty = format!("empty_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {empty}"))
        .execute(admin.pool())
        .await
        .unwrap();
    let empty_url = admin.url.rsplit_once('/').unwrap().0.to_owned() + "/" + &empty;
    let mut config = canopy_query_api::Config::for_database(empty_url.clone());
    config.tokens.secret = canopy_config::JwtSecretArgs::new(SECRET);
    config.settings.migrations_wait = Duration::from_millis(300);
    let refused = canopy_query_api::build(config).await;
    assert!(
        refused.is_err(),
        "query-api started on an unmigrated database"
    );
    let empty_pool = sqlx::PgPool::connect(&empty_url).await.unwrap();
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname IN ('public', 'read')")
            .fetch_one(&empty_pool)
            .await
            .unwrap();
    assert_eq!(tables, 0, "query-api changed the schema");
    empty_pool.close().await;

    // as a member of canopy_reader it serves reads, read-your-writes and live streams
    let role = login_role("canopy_reader").await;
    let stack = Stack::start_configured(true, 5000, |query| {
        let url = query.database.url().unwrap();
        query.database = canopy_config::DatabaseArgs::new(as_role(&url, &role));
    })
    .await;
    let answer = stack
        .command(&token(Role::Member, "m1", "w1"), "/sessions", json!({"title": "s", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await;
    let (session, version) = (
        answer["id"].as_str().unwrap().to_owned(),
        answer["version"].as_i64().unwrap(),
    );
    let reader = token(Role::Viewer, "v", "w1");
    stack
        .get(
            &reader,
            &format!("/sessions/{session}?consistent_with={session}:{version}"),
        )
        .await
        .ok();
    let (kind, _, _) = ending_of(
        format!("{}/sessions/{session}/stream", stack.query),
        Some(&short_token(2)),
    )
    .await;
    assert_eq!(kind, "reauth");

    // and the role may change nothing
    let pool = sqlx::PgPool::connect(&as_role(&stack.db.url, &role))
        .await
        .unwrap();
    for statement in [
        "CREATE TABLE mine (id int)",
        "CREATE TABLE read.mine (id int)",
        "DELETE FROM read.sessions",
        "INSERT INTO relay_checkpoints (name, position) VALUES ('x', 1)",
        "UPDATE idempotency_keys SET state = 'completed'",
    ] {
        assert!(
            sqlx::query(statement).execute(&pool).await.is_err(),
            "canopy_reader may: {statement}"
        );
    }
}
