//! Live subscriptions: many clients, resume, catch-up races, slow clients, presence, auth and
//! scoping over SSE and WebSocket, and shutdown.

use std::time::Duration;

use canopy_domain::Role;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Stack, runner, token};

type Events = std::pin::Pin<Box<dyn futures::Stream<Item = eventsource_stream::Event> + Send>>;

/// Opens a session's SSE stream (after `after` when given).
async fn open(stack: &Stack, bearer: &str, session: Uuid, after: Option<i64>) -> Events {
    let mut request = reqwest::Client::new()
        .get(format!("{}/sessions/{session}/stream", stack.query))
        .bearer_auth(bearer);
    if let Some(after) = after {
        request = request.header("last-event-id", after.to_string());
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .filter_map(|e| async move { e.ok() }),
    )
}

/// Reads until the event with sequence `until`; returns the sequences of the session events.
async fn read_until(events: &mut Events, until: i64) -> Vec<i64> {
    let mut sequences = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while sequences.last().copied() != Some(until) {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("events stopped coming")
            .expect("the stream ended");
        if event.event == "message" {
            let body: Value = serde_json::from_str(&event.data).unwrap();
            let sequence = body["sequence"].as_i64().unwrap();
            assert_eq!(event.id, sequence.to_string(), "the SSE id is the sequence");
            assert!(body["id"].is_string(), "each message carries its event id");
            sequences.push(sequence);
        }
    }
    sequences
}

/// Reads up to the first presence message (the client has read its history and is live);
/// returns the sequences of the history.
async fn until_live(events: &mut Events) -> Vec<i64> {
    let mut sequences = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .unwrap()
            .unwrap();
        match event.event.as_str() {
            "presence" => return sequences,
            "message" => sequences.push(
                serde_json::from_str::<Value>(&event.data).unwrap()["sequence"]
                    .as_i64()
                    .unwrap(),
            ),
            _ => {}
        }
    }
}

async fn session(stack: &Stack) -> Uuid {
    stack
        .command(&token(Role::Member, "m1", "w1"), "/sessions", json!({"title": "live", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Appends `n` prompts; returns the session's version after them.
async fn prompts(stack: &Stack, session: Uuid, n: usize, text: &str) -> i64 {
    let mut version = 0;
    for _ in 0..n {
        let answer = stack
            .command(
                &token(Role::Member, "m1", "w1"),
                &format!("/sessions/{session}/prompts"),
                json!({"text": text}),
            )
            .await;
        version = answer["version"].as_i64().unwrap();
    }
    version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sse_clients_receive_every_event_in_order() {
    let stack = Stack::start().await;
    let session = session(&stack).await;
    // twenty people with ten streams each (a person may have sixteen)
    let viewers: Vec<String> = (0..20)
        .map(|i| token(Role::Viewer, &format!("v{i}"), "w1"))
        .collect();
    let mut clients = Vec::new();
    for i in 0..200 {
        let mut events = open(&stack, &viewers[i % 20], session, None).await;
        let history = until_live(&mut events).await;
        clients.push((history, events));
    }
    let last = prompts(&stack, session, 30, "hello").await;
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(history, mut events)| {
            tokio::spawn(async move {
                history
                    .into_iter()
                    .chain(read_until(&mut events, last).await)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.unwrap(), (1..=last).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_drops_and_resumes_sees_the_whole_stream_once() {
    let stack = Stack::start().await;
    let session = session(&stack).await;
    let viewer = token(Role::Viewer, "v", "w1");
    prompts(&stack, session, 10, "before").await;
    let mut events = open(&stack, &viewer, session, None).await;
    let first = read_until(&mut events, 7).await;
    drop(events);
    let last = prompts(&stack, session, 10, "while away").await;
    let mut events = open(&stack, &viewer, session, Some(*first.last().unwrap())).await;
    let rest = read_until(&mut events, last).await;
    let whole: Vec<i64> = first.into_iter().chain(rest).collect();
    assert_eq!(whole, (1..=last).collect::<Vec<_>>());
}

/// Reads concurrently with the writes, as a real client does: every sequence until the one
/// `last` will name, reconnecting from the position an `overflow` names (a loaded machine can
/// make even a reading client fall behind).
fn follow(
    stack: std::sync::Arc<Stack>,
    bearer: String,
    session: Uuid,
    mut events: Events,
    mut last: tokio::sync::watch::Receiver<Option<i64>>,
) -> tokio::task::JoinHandle<Vec<i64>> {
    tokio::spawn(async move {
        let mut sequences: Vec<i64> = Vec::new();
        loop {
            let target = *last.borrow();
            if target.is_some() && sequences.last().copied() == target {
                return sequences;
            }
            tokio::select! {
                event = events.next() => {
                    let event = event.expect("the stream ended");
                    match event.event.as_str() {
                        "message" => sequences.push(
                            serde_json::from_str::<Value>(&event.data).unwrap()["sequence"].as_i64().unwrap(),
                        ),
                        "overflow" => {
                            let resume = serde_json::from_str::<Value>(&event.data).unwrap()["resume_after"]
                                .as_i64()
                                .unwrap();
                            assert_eq!(resume, sequences.last().copied().unwrap_or(0), "overflow names the last event sent");
                            events = open(&stack, &bearer, session, Some(resume)).await;
                        }
                        _ => {}
                    }
                }
                _ = last.changed() => {}
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_appended_during_catch_up_are_delivered_once_in_order() {
    let stack = std::sync::Arc::new(Stack::start().await);
    let session = session(&stack).await;
    let viewer = token(Role::Viewer, "v", "w1");
    let writer = {
        let stack = stack.clone();
        tokio::spawn(async move { prompts(&stack, session, 120, "racing").await })
    };
    // clients join from the start of the history at different moments of the writes
    let (last_tx, last_rx) = tokio::sync::watch::channel(None);
    let mut readers = Vec::new();
    for _ in 0..6 {
        readers.push(follow(
            stack.clone(),
            viewer.clone(),
            session,
            open(&stack, &viewer, session, Some(0)).await,
            last_rx.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let last = writer.await.unwrap();
    last_tx.send(Some(last)).unwrap();
    for reader in readers {
        let sequences = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sequences, (1..=last).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_with_a_resumable_position_and_slows_no_one() {
    // a small buffer, so that the client that never reads overflows quickly
    let stack = std::sync::Arc::new(Stack::start_full(true, 2000, 32).await);
    let session = session(&stack).await;
    let viewer = token(Role::Viewer, "v", "w1");
    // the slow client connects and then never reads its body
    let slow = reqwest::Client::new()
        .get(format!("{}/sessions/{session}/stream", stack.query))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    // a client that reads while the events are written
    let fast = open(&stack, &viewer, session, None).await;
    let (last_tx, last_rx) = tokio::sync::watch::channel(None);
    let fast_reader = follow(stack.clone(), viewer.clone(), session, fast, last_rx);
    let big = "x".repeat(60 * 1024);
    let last = prompts(&stack, session, 200, &big).await;
    last_tx.send(Some(last)).unwrap();
    let fast = tokio::time::timeout(Duration::from_secs(30), fast_reader)
        .await
        .expect("the reading client was slowed")
        .unwrap();
    assert_eq!(fast, (1..=last).collect::<Vec<_>>());

    // when it finally reads, its stream ends with where to resume
    let mut slow: Events = Box::pin(
        slow.bytes_stream()
            .eventsource()
            .filter_map(|e| async move { e.ok() }),
    );
    let mut seen = Vec::new();
    let mut resume_after = None;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), slow.next())
        .await
        .unwrap()
    {
        match event.event.as_str() {
            "message" => seen.push(
                serde_json::from_str::<Value>(&event.data).unwrap()["sequence"]
                    .as_i64()
                    .unwrap(),
            ),
            "overflow" => {
                resume_after =
                    serde_json::from_str::<Value>(&event.data).unwrap()["resume_after"].as_i64();
                break;
            }
            _ => {}
        }
    }
    let resume_after = resume_after.expect("no overflow message");
    assert!(resume_after < last, "the slow client was not closed early");
    assert_eq!(seen, (1..=resume_after).collect::<Vec<_>>());
    // and it can resume from there
    let mut resumed = open(&stack, &viewer, session, Some(resume_after)).await;
    assert_eq!(
        read_until(&mut resumed, last).await,
        (resume_after + 1..=last).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_workspace_scoping_hold_for_sse_and_websocket() {
    let stack = Stack::start().await;
    let session = session(&stack).await;
    let status = |path: String, bearer: Option<String>| async move {
        let mut request = reqwest::Client::new().get(path);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        request.send().await.unwrap().status().as_u16()
    };
    let sse = format!("{}/sessions/{session}/stream", stack.query);
    assert_eq!(status(sse.clone(), None).await, 401);
    assert_eq!(status(sse.clone(), Some("bad".into())).await, 401);
    assert_eq!(status(sse.clone(), Some(runner())).await, 403);
    assert_eq!(
        status(sse.clone(), Some(token(Role::Owner, "o", "w2"))).await,
        404
    );
    assert_eq!(
        status(
            format!("{}/sessions/{}/stream", stack.query, Uuid::new_v4()),
            Some(token(Role::Viewer, "v", "w1"))
        )
        .await,
        404
    );

    // a ticket opens the stream from a URL; it is neither a bearer token nor mintable without one
    let ticket = reqwest::Client::new()
        .post(format!("{}/stream-tickets", stack.query))
        .bearer_auth(token(Role::Auditor, "a", "w1"))
        .query(&[("session_id", session)])
        .send()
        .await
        .unwrap();
    assert_eq!(ticket.status().as_u16(), 200);
    let ticket: Value = ticket.json().await.unwrap();
    let ticket = ticket["ticket"].as_str().unwrap().to_owned();
    assert_eq!(status(format!("{sse}?ticket={ticket}"), None).await, 200);
    assert_eq!(
        status(format!("{}/sessions", stack.query), Some(ticket.clone())).await,
        401
    );
    assert_eq!(
        status(
            format!("{sse}?ticket={}", token(Role::Viewer, "v", "w1")),
            None
        )
        .await,
        401
    );
    // another workspace gets no ticket for the session, as for one that does not exist
    let elsewhere = reqwest::Client::new()
        .post(format!("{}/stream-tickets", stack.query))
        .bearer_auth(token(Role::Viewer, "v2", "w2"))
        .query(&[("session_id", session)])
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status().as_u16(), 404);

    // WebSocket: the same rules, and the events themselves
    let ws = format!(
        "{}/sessions/{session}/ws",
        stack.query.replace("http://", "ws://")
    );
    let refused = |url: String, bearer: Option<String>| async move {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().unwrap();
        if let Some(bearer) = bearer {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {bearer}").parse().unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                response.status().as_u16()
            }
            Err(other) => panic!("{other}"),
            Ok(_) => 101,
        }
    };
    assert_eq!(refused(ws.clone(), None).await, 401);
    assert_eq!(refused(ws.clone(), Some(runner())).await, 403);
    assert_eq!(
        refused(ws.clone(), Some(token(Role::Member, "x", "w2"))).await,
        404
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("{ws}?ticket={ticket}&after=1"))
        .await
        .unwrap();
    let last = prompts(&stack, session, 3, "over ws").await;
    let mut sequences = Vec::new();
    while sequences.last().copied() != Some(last) {
        let frame = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame {
            let body: Value = serde_json::from_str(&text).unwrap();
            if body["kind"] == "event" {
                sequences.push(body["event"]["sequence"].as_i64().unwrap());
            }
        }
    }
    assert_eq!(sequences, (2..=last).collect::<Vec<_>>());
    socket.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_shows_who_is_connected_and_updates_on_the_stream() {
    let stack = Stack::start().await;
    let session = session(&stack).await;
    let presence = |who: String| {
        let url = format!("{}/sessions/{session}/presence", stack.query);
        async move {
            let body: Value = reqwest::Client::new()
                .get(url)
                .bearer_auth(who)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body.as_array()
                .unwrap()
                .iter()
                .map(|p| p["user_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let mut ada = open(&stack, &token(Role::Viewer, "ada", "w1"), session, None).await;
    until_live(&mut ada).await;
    let grace = open(&stack, &token(Role::Member, "grace", "w1"), session, None).await;
    // ada's stream says grace arrived
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), ada.next())
            .await
            .unwrap()
            .unwrap();
        if event.event == "presence" && event.data.contains("grace") {
            break;
        }
    }
    assert_eq!(
        presence(token(Role::Auditor, "x", "w1")).await,
        ["ada", "grace"]
    );
    drop(grace);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while presence(token(Role::Auditor, "x", "w1")).await != ["ada"] {
        assert!(tokio::time::Instant::now() < deadline, "grace never left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = reqwest::Client::new()
        .get(format!("{}/sessions/{session}/presence", stack.query))
        .bearer_auth(token(Role::Owner, "o", "w2"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_clients_are_told_to_reconnect_with_their_position() {
    let mut stack = Stack::start().await;
    let session = session(&stack).await;
    let last = prompts(&stack, session, 3, "before shutdown").await;
    let mut events = open(&stack, &token(Role::Viewer, "v", "w1"), session, None).await;
    read_until(&mut events, last).await;
    let query_api = stack.stops.remove(1);
    let _ = query_api.send(());
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap()
            .unwrap();
        if event.event == "reconnect" {
            let body: Value = serde_json::from_str(&event.data).unwrap();
            assert_eq!(body["resume_after"].as_i64(), Some(last));
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workspace_stream_shows_changes_to_its_sessions_only() {
    let stack = Stack::start().await;
    let response = reqwest::Client::new()
        .get(format!("{}/stream", stack.query))
        .bearer_auth(token(Role::Viewer, "v", "w1"))
        .send()
        .await
        .unwrap();
    let mut changes: Events = Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .filter_map(|e| async move { e.ok() }),
    );
    let elsewhere = stack
        .command(&token(Role::Member, "m", "w2"), "/sessions", json!({"title": "other", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mine = session(&stack).await;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), changes.next())
            .await
            .unwrap()
            .unwrap();
        if event.event != "change" {
            continue;
        }
        let body: Value = serde_json::from_str(&event.data).unwrap();
        assert_ne!(body["session_id"], elsewhere, "another workspace leaked");
        if body["session_id"] == mine.to_string() {
            assert_eq!(body["event_type"], "SessionStarted");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workspace_stream_resumes_after_its_last_event_id() {
    let stack = Stack::start().await;
    let viewer = token(Role::Viewer, "v", "w1");
    let connect = |last_event_id: Option<String>| {
        let mut request = reqwest::Client::new()
            .get(format!("{}/stream", stack.query))
            .bearer_auth(&viewer);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            Box::pin(
                response
                    .bytes_stream()
                    .eventsource()
                    .filter_map(|e| async move { e.ok() }),
            ) as Events
        }
    };
    let mut changes = connect(None).await;
    let first = session(&stack).await;
    let (first_id, body) = next_change(&mut changes).await;
    assert_eq!(
        (body["session_id"].as_str(), body["sequence"].as_i64()),
        (Some(first.to_string().as_str()), Some(1))
    );
    drop(changes);

    // while away: the rest of the first session's start, and a second session with a prompt
    let second = session(&stack).await;
    let last = prompts(&stack, second, 1, "while away").await;
    let mut changes = connect(Some(first_id.clone())).await;
    let mut seen = Vec::new();
    let mut ids = vec![first_id];
    while seen.last() != Some(&(second.to_string(), last)) {
        let (id, body) = next_change(&mut changes).await;
        ids.push(id);
        seen.push((
            body["session_id"].as_str().unwrap().to_owned(),
            body["sequence"].as_i64().unwrap(),
        ));
    }
    assert_eq!(
        seen,
        vec![
            (first.to_string(), 2),
            (second.to_string(), 1),
            (second.to_string(), 2),
            (second.to_string(), 3)
        ],
        "every change after the resume point, once, in order"
    );
    let parsed: Vec<(u64, i64)> = ids
        .iter()
        .map(|id| {
            let (x, p) = id.split_once('.').unwrap();
            (x.parse().unwrap(), p.parse().unwrap())
        })
        .collect();
    assert!(
        parsed.windows(2).all(|w| w[0] < w[1]),
        "ids follow the relay's order: {ids:?}"
    );
    let refused = reqwest::Client::new()
        .get(format!("{}/stream", stack.query))
        .bearer_auth(&viewer)
        .header("last-event-id", "garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 422);
}

async fn next_change(events: &mut Events) -> (String, Value) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .unwrap()
            .unwrap();
        if event.event == "change" {
            let body: Value = serde_json::from_str(&event.data).unwrap();
            return (event.id, body);
        }
    }
}

/// A stack whose live streams read the store in small pages: at most `events` events and
/// `bytes` of payload text each.
async fn paging_stack(events: usize, bytes: usize) -> Stack {
    Stack::start_configured(true, 2000, |query| {
        query.settings.live_history_page = events;
        query.settings.live_history_page_bytes = bytes;
    })
    .await
}

/// Reads a WebSocket stream until the event with sequence `until`.
async fn ws_read_until(url: String, until: i64) -> Vec<i64> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut sequences = Vec::new();
    while sequences.last().copied() != Some(until) {
        let frame = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("frames stopped coming")
            .expect("the socket ended")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame {
            let body: Value = serde_json::from_str(&text).unwrap();
            assert!(
                body["kind"] == "event" || body["kind"] == "presence",
                "{body}"
            );
            if body["kind"] == "event" {
                sequences.push(body["event"]["sequence"].as_i64().unwrap());
            }
        }
    }
    sequences
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_of_many_pages_arrives_once_and_in_order() {
    // pages of at most 7 events or 3,000 bytes: cut by count, by size, and one event alone
    // larger than a page
    let stack = paging_stack(7, 3000).await;
    let session = session(&stack).await;
    let mut last = 0;
    for round in 0..12 {
        prompts(&stack, session, 2, "small").await;
        last = prompts(&stack, session, 1, &"x".repeat(1200)).await;
        if round % 4 == 0 {
            last = prompts(&stack, session, 1, &"y".repeat(5000)).await;
        }
    }
    assert!(last > 40, "the history spans many pages: {last}");
    let viewer = token(Role::Viewer, "v", "w1");

    let mut from_zero = open(&stack, &viewer, session, Some(0)).await;
    assert_eq!(
        until_live(&mut from_zero).await,
        (1..=last).collect::<Vec<_>>()
    );
    let mut from_start = open(&stack, &viewer, session, None).await;
    assert_eq!(
        until_live(&mut from_start).await,
        (1..=last).collect::<Vec<_>>()
    );
    let mut resumed = open(&stack, &viewer, session, Some(13)).await;
    assert_eq!(
        until_live(&mut resumed).await,
        (14..=last).collect::<Vec<_>>()
    );
    let ws = format!(
        "{}/sessions/{session}/ws?after=0",
        stack.query.replace("http://", "ws://")
    );
    let ticket: Value = reqwest::Client::new()
        .post(format!("{}/stream-tickets", stack.query))
        .bearer_auth(&viewer)
        .query(&[("session_id", session)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ws = format!("{ws}&ticket={}", ticket["ticket"].as_str().unwrap());
    assert_eq!(
        ws_read_until(ws, last).await,
        (1..=last).collect::<Vec<_>>()
    );

    // and live events after the paged history, once
    let more = prompts(&stack, session, 3, "after").await;
    assert_eq!(
        read_until(&mut from_zero, more).await,
        (last + 1..=more).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_live_feed_is_filled_from_the_store_a_page_at_a_time() {
    let mut stack = paging_stack(4, 1024 * 1024).await;
    // without the relay nothing reaches the live feed but what this test publishes
    let relay = stack.stops.remove(2);
    let _ = relay.send(());
    let session = session(&stack).await;
    let before = prompts(&stack, session, 9, "before").await;
    let mut events = open(&stack, &token(Role::Viewer, "v", "w1"), session, None).await;
    assert_eq!(
        until_live(&mut events).await,
        (1..=before).collect::<Vec<_>>()
    );

    // 19 events the live feed never brings, then one it does
    let last = prompts(&stack, session, 20, "while the feed is down").await;
    let row: canopy_relay::StoredEvent = sqlx::query_as(
        "SELECT event_id, aggregate_type, aggregate_id, sequence, event_type, event_version,
                payload, metadata, position, transaction_id::text::bigint AS transaction_id,
                recorded_at
           FROM events WHERE aggregate_type = 'session' AND aggregate_id = $1 AND sequence = $2",
    )
    .bind(session.to_string())
    .bind(last)
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    let envelope = canopy_relay::Envelope::from_stored(row).unwrap();
    let subject = canopy_relay::subject(
        &format!("{}.events", stack.nats.prefix),
        "session",
        &session.to_string(),
        &envelope.event_type,
    );
    stack
        .nats
        .client
        .publish(subject, serde_json::to_vec(&envelope).unwrap().into())
        .await
        .unwrap();
    stack.nats.client.flush().await.unwrap();
    assert_eq!(
        read_until(&mut events, last).await,
        (before + 1..=last).collect::<Vec<_>>()
    );
}

/// Opens a session's SSE stream and answers its status and, when refused, its problem body.
async fn try_open(
    stack: &Stack,
    bearer: &str,
    session: Uuid,
) -> (u16, Option<Value>, Option<Events>) {
    let response = reqwest::Client::new()
        .get(format!("{}/sessions/{session}/stream", stack.query))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    if status != 200 {
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(content_type, "application/problem+json");
        return (status, Some(response.json().await.unwrap()), None);
    }
    let events: Events = Box::pin(
        response
            .bytes_stream()
            .eventsource()
            .filter_map(|e| async move { e.ok() }),
    );
    (status, None, Some(events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_may_have_only_their_share_of_streams_open() {
    let stack = Stack::start_configured(true, 2000, |query| {
        query.settings.live_max_streams_per_person = 3;
    })
    .await;
    let session = session(&stack).await;
    let viewer = token(Role::Viewer, "v", "w1");
    // three streams of every kind: two of the session's, the workspace's
    let first = open(&stack, &viewer, session, None).await;
    let _second = open(&stack, &viewer, session, None).await;
    let workspace = reqwest::Client::new()
        .get(format!("{}/stream", stack.query))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(workspace.status().as_u16(), 200);

    // a fourth is refused, whichever way it comes
    let (status, problem, _) = try_open(&stack, &viewer, session).await;
    assert_eq!(status, 429);
    let problem = problem.unwrap();
    assert_eq!(problem["code"], "too_many_streams", "{problem}");
    assert_eq!(problem["status"], 429, "{problem}");
    let refused = reqwest::Client::new()
        .get(format!("{}/stream", stack.query))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    let ticket: Value = reqwest::Client::new()
        .post(format!("{}/stream-tickets", stack.query))
        .bearer_auth(&viewer)
        .query(&[("session_id", session)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ws = format!(
        "{}/sessions/{session}/ws?ticket={}",
        stack.query.replace("http://", "ws://"),
        ticket["ticket"].as_str().unwrap()
    );
    match tokio_tungstenite::connect_async(ws).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 429);
        }
        other => panic!("the WebSocket was not refused: {:?}", other.map(|_| ())),
    }
    // someone else is not
    let (status, _, _other) = try_open(&stack, &token(Role::Member, "m1", "w1"), session).await;
    assert_eq!(status, 200);

    // once a stream closes, its place is free again (when the server notices: at the latest at
    // its next keep-alive)
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut reopened = loop {
        match try_open(&stack, &viewer, session).await {
            (200, _, Some(events)) => break events,
            (429, _, _) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the closed stream's place was never freed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (status, problem, _) => panic!("{status}: {problem:?}"),
        }
    };
    assert!(!until_live(&mut reopened).await.is_empty());
}

/// Appends a copy of the session's event `sequence` as event `sequence + 1` straight into the
/// event store (as SQL typed by hand would: the triggers give it its place and hash), with
/// `metadata` merged into its metadata (a copied prompt gets an id of its own: a prompt id is used
/// once per session, events_prompt_id_once).
async fn append_copy(stack: &Stack, session: Uuid, sequence: i64, metadata: Value) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT aggregate_type, aggregate_id, sequence + 1, event_type, event_version,
                jsonb_set(payload, '{PromptSubmitted,prompt_id}', to_jsonb(gen_random_uuid())), metadata || $3
           FROM events WHERE aggregate_type = 'session' AND aggregate_id = $1 AND sequence = $2",
    )
    .bind(session.to_string())
    .bind(sequence)
    .bind(metadata)
    .execute(stack.db.pool())
    .await
    .unwrap();
}

/// Reads until the stream ends; answers the sequences of its events and its last message.
async fn read_to_end(events: &mut Events) -> (Vec<i64>, eventsource_stream::Event) {
    let mut sequences = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("events stopped coming")
            .expect("the stream ended without saying why");
        match event.event.as_str() {
            "message" => sequences.push(
                serde_json::from_str::<Value>(&event.data).unwrap()["sequence"]
                    .as_i64()
                    .unwrap(),
            ),
            "presence" => {}
            _ => {
                assert!(
                    tokio::time::timeout(Duration::from_secs(10), events.next())
                        .await
                        .expect("the stream did not end")
                        .is_none(),
                    "the stream went on after {}",
                    event.event
                );
                return (sequences, event);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_event_that_does_not_decode_ends_the_stream_instead_of_being_skipped() {
    let stack = paging_stack(2, 1024 * 1024).await;
    let session = session(&stack).await;
    let last = prompts(&stack, session, 4, "fine").await;
    let viewer = token(Role::Viewer, "v", "w1");
    let mut live = open(&stack, &viewer, session, None).await;
    assert_eq!(until_live(&mut live).await, (1..=last).collect::<Vec<_>>());

    // the metadata CHECK wants the keys; an actor id that is not a string passes it
    append_copy(&stack, session, last, json!({"actor_id": 42})).await;
    // a good event after it: the live client finds the gap the broken one left
    append_copy(&stack, session, last + 1, json!({"actor_id": "m1"})).await;

    let (sequences, ending) = read_to_end(&mut live).await;
    assert_eq!(
        sequences,
        Vec::<i64>::new(),
        "an event after the broken one was sent"
    );
    assert_eq!(ending.event, "unreadable");
    let body: Value = serde_json::from_str(&ending.data).unwrap();
    assert_eq!(body, json!({"resume_after": last, "sequence": last + 1}));

    // from the history too: everything before it, then the same end
    let mut events = open(&stack, &viewer, session, Some(0)).await;
    let (sequences, ending) = read_to_end(&mut events).await;
    assert_eq!(sequences, (1..=last).collect::<Vec<_>>());
    assert_eq!(ending.event, "unreadable");
    let body: Value = serde_json::from_str(&ending.data).unwrap();
    assert_eq!(body, json!({"resume_after": last, "sequence": last + 1}));

    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", stack.query))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = metrics
        .lines()
        .find(|l| l.starts_with("canopy_live_unreadable_total{source=\"store\"}"))
        .unwrap_or_else(|| panic!("not counted:\n{metrics}"));
    let count: f64 = counted.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 2.0, "{counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workspace_stream_replays_many_pages_once_and_in_relay_order() {
    let stack = paging_stack(3, 1024 * 1024).await;
    let viewer = token(Role::Viewer, "v", "w1");
    let connect = |last_event_id: Option<String>| {
        let mut request = reqwest::Client::new()
            .get(format!("{}/stream", stack.query))
            .bearer_auth(&viewer);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            Box::pin(
                response
                    .bytes_stream()
                    .eventsource()
                    .filter_map(|e| async move { e.ok() }),
            ) as Events
        }
    };
    let mut changes = connect(None).await;
    let first = session(&stack).await;
    let (first_id, _) = next_change(&mut changes).await;
    drop(changes);

    // while away: sessions of both workspaces, and prompts
    for _ in 0..3 {
        stack
            .command(&token(Role::Member, "m", "w2"), "/sessions", json!({"title": "other", "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
            .await;
        let mine = session(&stack).await;
        prompts(&stack, mine, 2, "while away").await;
    }
    prompts(&stack, first, 2, "while away").await;
    let expected: Vec<(String, i64)> = sqlx::query_as(
        "SELECT e.aggregate_id, e.sequence FROM events e
           JOIN events s ON s.aggregate_type = 'session' AND s.aggregate_id = e.aggregate_id AND s.sequence = 1
          WHERE e.aggregate_type = 'session' AND s.payload -> 'SessionStarted' ->> 'workspace_id' = 'w1'
          ORDER BY e.transaction_id, e.position",
    )
    .fetch_all(stack.db.pool())
    .await
    .unwrap();
    let expected = expected[1..].to_vec();
    assert!(expected.len() > 9, "the replay spans pages");

    let mut changes = connect(Some(first_id)).await;
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let (_, body) = next_change(&mut changes).await;
        seen.push((
            body["session_id"].as_str().unwrap().to_owned(),
            body["sequence"].as_i64().unwrap(),
        ));
    }
    assert_eq!(seen, expected);
}
