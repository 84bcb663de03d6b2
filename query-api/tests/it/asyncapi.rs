//! The live protocol's AsyncAPI document (`openapi/live.asyncapi.json`) is current, and tells
//! the truth: every frame a running query-api sends on its SSE streams and its WebSocket (events,
//! presence, keep-alives, and the endings `overflow`, `reconnect` and `unreadable`) is one of the
//! channel's documented messages and validates against that message's JSON Schema.

use std::time::Duration;

use canopy_domain::Role;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

use crate::support::{Stack, token};

#[test]
fn checked_in_asyncapi_document_is_current() {
    canopy_http::contract::assert_checked_in(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/live.asyncapi.json"),
        &canopy_query_api::asyncapi(),
        "cargo test -p canopy-query-api asyncapi",
    );
}

#[test]
fn every_message_schema_compiles_and_every_reference_resolves() {
    let document = canopy_query_api::asyncapi();
    assert_eq!(document["asyncapi"], "3.0.0");
    let channels = document["channels"].as_object().unwrap();
    for (name, channel) in channels {
        for (key, message) in channel["messages"].as_object().unwrap() {
            let pointer = message["$ref"].as_str().unwrap().trim_start_matches('#');
            let message = document
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{name}.{key}: {pointer} is not defined"));
            Frames::validator(&document, &format!("{pointer}/payload"));
            assert!(message["name"].is_string(), "{name}.{key} has no name");
        }
    }
    for operation in document["operations"].as_object().unwrap().values() {
        for reference in operation["messages"].as_array().unwrap() {
            let pointer = reference["$ref"].as_str().unwrap().trim_start_matches('#');
            assert!(document.pointer(pointer).is_some(), "{pointer}");
        }
    }
}

/// What one stream received, checked against its channel's messages.
struct Frames {
    document: Value,
    channel: &'static str,
    /// The message keys (of the channel) received, in order.
    seen: Vec<String>,
}

impl Frames {
    fn new(channel: &'static str) -> Self {
        Self {
            document: canopy_query_api::asyncapi(),
            channel,
            seen: Vec::new(),
        }
    }

    fn validator(document: &Value, pointer: &str) -> jsonschema::Validator {
        // the AsyncAPI schema dialect is JSON Schema draft 7 (plus annotations)
        let root = json!({"$ref": format!("#{pointer}"), "components": document["components"]});
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft7)
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("{pointer} does not compile: {e}"))
    }

    /// Checks a frame that is the channel's message `key` (the SSE event name, or the WebSocket
    /// frame's kind) with this payload.
    #[track_caller]
    fn check(&mut self, key: &str, payload: &Value) {
        let messages = &self.document["channels"][self.channel]["messages"];
        let reference = messages[key]["$ref"].as_str().unwrap_or_else(|| {
            panic!(
                "{}: `{key}` is not a documented message (documented: {:?})",
                self.channel,
                messages.as_object().map(|m| m.keys().collect::<Vec<_>>())
            )
        });
        let pointer = format!("{}/payload", reference.trim_start_matches('#'));
        let validator = Self::validator(&self.document, &pointer);
        let errors: Vec<String> = validator
            .iter_errors(payload)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{}: `{key}` does not match its schema: {errors:?}\n{payload}",
            self.channel
        );
        self.seen.push(key.to_owned());
    }

    /// Checks an SSE item: the event's name picks the message (`message` is SSE's default, the
    /// channel's `event`; a comment is `keepAlive`).
    #[track_caller]
    fn check_sse(&mut self, item: &SseItem) {
        match item {
            SseItem::Comment(text) => self.check("keepAlive", &json!(text)),
            SseItem::Event { event, id, data } => {
                let payload: Value = serde_json::from_str(data)
                    .unwrap_or_else(|e| panic!("`{event}` data is not JSON ({e}): {data}"));
                let key = match event.as_str() {
                    "message" => "event",
                    other => other,
                };
                self.check(key, &payload);
                match key {
                    "event" => assert_eq!(
                        id.as_deref(),
                        Some(payload["sequence"].to_string().as_str()),
                        "an event's SSE id is its sequence"
                    ),
                    "change" => assert!(
                        id.as_deref().is_some_and(|id| id.split_once('.').is_some()),
                        "a change's SSE id is its relay order: {id:?}"
                    ),
                    _ => {}
                }
            }
        }
    }

    #[track_caller]
    fn check_ws(&mut self, frame: &Message) {
        match frame {
            Message::Text(text) => {
                let payload: Value = serde_json::from_str(text).unwrap();
                let kind = payload["kind"].as_str().unwrap_or("(no kind)").to_owned();
                self.check(&kind, &payload);
            }
            Message::Ping(payload) => {
                self.check("keepAlive", &json!(String::from_utf8_lossy(payload)));
            }
            Message::Close(_) | Message::Pong(_) => {}
            other => panic!("{}: an undocumented frame: {other:?}", self.channel),
        }
    }

    fn has(&self, key: &str) -> bool {
        self.seen.iter().any(|k| k == key)
    }
}

/// An item of an SSE stream, as the wire has it.
#[derive(Debug)]
enum SseItem {
    Comment(String),
    Event {
        event: String,
        id: Option<String>,
        data: String,
    },
}

/// A minimal SSE reader that also yields comments (EventSource libraries drop them).
struct Sse {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = Vec<u8>> + Send>>,
    buffer: String,
    event: Option<String>,
    id: Option<String>,
    data: Vec<String>,
}

impl Sse {
    fn new(body: impl futures::Stream<Item = Vec<u8>> + Send + 'static) -> Self {
        Self {
            body: Box::pin(body),
            buffer: String::new(),
            event: None,
            id: None,
            data: Vec::new(),
        }
    }

    async fn open(stack: &Stack, bearer: &str, path: &str) -> Self {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", stack.query))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Self::new(
            response
                .bytes_stream()
                .filter_map(|chunk| async move { chunk.ok().map(|b| b.to_vec()) }),
        )
    }

    /// The next item, or `None` when the stream ended.
    async fn next(&mut self) -> Option<SseItem> {
        loop {
            while let Some(end) = self.buffer.find('\n') {
                let line: String = self.buffer.drain(..=end).collect();
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if self.data.is_empty() && self.event.is_none() {
                        continue;
                    }
                    return Some(SseItem::Event {
                        event: self.event.take().unwrap_or_else(|| "message".to_owned()),
                        id: self.id.take(),
                        data: std::mem::take(&mut self.data).join("\n"),
                    });
                }
                if let Some(comment) = line.strip_prefix(':') {
                    return Some(SseItem::Comment(
                        comment.strip_prefix(' ').unwrap_or(comment).to_owned(),
                    ));
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                match field {
                    "event" => self.event = Some(value),
                    "id" => self.id = Some(value),
                    "data" => self.data.push(value),
                    _ => {}
                }
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.body.next())
                .await
                .expect("the stream went quiet")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

async fn session(stack: &Stack, title: &str) -> Uuid {
    stack
        .command(&token(Role::Member, "m1", "w1"), "/sessions", json!({"title": title, "repository_url": "https://g.example.invalid/r", "base_branch": "main"}))
        .await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn prompt(stack: &Stack, session: Uuid, text: &str) -> i64 {
    stack
        .command(
            &token(Role::Member, "m1", "w1"),
            &format!("/sessions/{session}/prompts"),
            json!({"text": text}),
        )
        .await["version"]
        .as_i64()
        .unwrap()
}

async fn websocket(
    stack: &Stack,
    bearer: &str,
    session: Uuid,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!(
        "{}/sessions/{session}/ws",
        stack.query.replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {bearer}").parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

async fn next_frame<S>(socket: &mut S) -> Option<Message>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(60), socket.next())
        .await
        .expect("the socket went quiet")
        .and_then(Result::ok)
}

/// A client that connects with a tiny receive buffer and does not read (so that it falls
/// behind), over HTTP/1.0 so that the body is the raw stream.
async fn stalled(stack: &Stack, bearer: &str, path: &str) -> tokio::net::TcpStream {
    let address: std::net::SocketAddr = stack.query.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(address).await.unwrap();
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.0\r\nHost: {address}\r\nAuthorization: Bearer {bearer}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

/// Everything a stalled client was sent, once it reads: the SSE items after the headers.
async fn drain(mut stream: tokio::net::TcpStream) -> Vec<SseItem> {
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut bytes))
        .await
        .expect("the stalled stream did not end")
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let mut sse = Sse::new(futures::stream::iter([body.as_bytes().to_vec()]));
    let mut items = Vec::new();
    while let Some(item) = sse.next().await {
        items.push(item);
    }
    items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_live_frame_matches_the_asyncapi_document() {
    // keep-alives every 100 ms; a small buffer so that a client that does not read falls behind
    let stack = Stack::start_configured(true, 2000, |query| {
        query.settings.keep_alive = Duration::from_millis(100);
        query.settings.live_buffer = 4;
    })
    .await;
    let viewer = token(Role::Viewer, "v", "w1");

    // events, presence and keep-alives on each channel
    let first = session(&stack, "frames").await;
    let last = prompt(&stack, first, "history").await;
    let mut workspace = Sse::open(&stack, &viewer, "/stream").await;
    let mut sse = Sse::open(&stack, &viewer, &format!("/sessions/{first}/stream")).await;
    let mut ws = websocket(&stack, &viewer, first).await;
    let mut sse_frames = Frames::new("sessionEvents");
    let mut ws_frames = Frames::new("sessionSocket");
    let mut workspace_frames = Frames::new("workspaceChanges");
    while !(sse_frames.has("presence") && sse_frames.has("keepAlive")) {
        sse_frames.check_sse(&sse.next().await.expect("the stream ended"));
    }
    while !(ws_frames.has("presence") && ws_frames.has("keepAlive")) {
        ws_frames.check_ws(&next_frame(&mut ws).await.expect("the socket ended"));
    }
    assert!(
        sse_frames.has("event") && ws_frames.has("event"),
        "no history"
    );
    // a live event reaches all three
    let live = prompt(&stack, first, "live").await;
    assert!(live > last);
    let sequence_of = |item: &SseItem| match item {
        SseItem::Event { data, .. } => serde_json::from_str::<Value>(data).unwrap()["sequence"]
            .as_i64()
            .unwrap_or(0),
        SseItem::Comment(_) => 0,
    };
    loop {
        let item = sse.next().await.expect("the stream ended");
        sse_frames.check_sse(&item);
        if sequence_of(&item) == live {
            break;
        }
    }
    loop {
        let frame = next_frame(&mut ws).await.expect("the socket ended");
        ws_frames.check_ws(&frame);
        if let Message::Text(text) = &frame
            && serde_json::from_str::<Value>(text).unwrap()["event"]["sequence"] == live
        {
            break;
        }
    }
    while !(workspace_frames.has("change") && workspace_frames.has("keepAlive")) {
        workspace_frames.check_sse(&workspace.next().await.expect("the stream ended"));
    }

    // overflow: clients that do not read fall behind and are closed with where to resume
    let slow = session(&stack, "slow").await;
    let stalled_sse = stalled(&stack, &viewer, &format!("/sessions/{slow}/stream")).await;
    let url = format!(
        "{}/sessions/{slow}/ws",
        stack.query.replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {viewer}").parse().unwrap());
    let address: std::net::SocketAddr = stack.query.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(address).await.unwrap();
    let (stalled_ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let big = "x".repeat(60 * 1024);
    for _ in 0..120 {
        prompt(&stack, slow, &big).await;
    }
    let mut overflowed = Frames::new("sessionEvents");
    for item in drain(stalled_sse).await {
        overflowed.check_sse(&item);
    }
    assert_eq!(
        overflowed.seen.last().map(String::as_str),
        Some("overflow"),
        "the stalled SSE client was not closed with `overflow`"
    );
    let mut overflowed = Frames::new("sessionSocket");
    let mut stalled_ws = stalled_ws;
    let mut ending = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), stalled_ws.next())
            .await
            .expect("the socket went quiet")
        {
            Some(Ok(frame)) => overflowed.check_ws(&frame),
            Some(Err(error)) => {
                ending = Some(error.to_string());
                break;
            }
            None => break,
        }
    }
    assert!(
        overflowed.has("overflow"),
        "the stalled WebSocket client was not closed with `overflow`: {} frames, last {:?}, ending {ending:?}",
        overflowed.seen.len(),
        overflowed.seen.last()
    );

    // unreadable: a stored event that does not decode ends the streams
    let broken = session(&stack, "broken").await;
    let version = prompt(&stack, broken, "fine").await;
    let mut broken_sse = Sse::open(&stack, &viewer, &format!("/sessions/{broken}/stream")).await;
    let mut broken_ws = websocket(&stack, &viewer, broken).await;
    let mut broken_sse_frames = Frames::new("sessionEvents");
    let mut broken_ws_frames = Frames::new("sessionSocket");
    while !broken_sse_frames.has("presence") {
        broken_sse_frames.check_sse(&broken_sse.next().await.unwrap());
    }
    while !broken_ws_frames.has("presence") {
        broken_ws_frames.check_ws(&next_frame(&mut broken_ws).await.unwrap());
    }
    // the metadata CHECK wants the keys; an actor id that is not a string passes it (each copy
    // a prompt of its own: a prompt id is used once per session, events_prompt_id_once)
    for (sequence, actor) in [(version, json!(42)), (version + 1, json!("m1"))] {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT aggregate_type, aggregate_id, sequence + 1, event_type, event_version,
                    jsonb_set(payload, '{PromptSubmitted,prompt_id}', to_jsonb(gen_random_uuid())),
                    metadata || jsonb_build_object('actor_id', $3::jsonb)
               FROM events WHERE aggregate_type = 'session' AND aggregate_id = $1 AND sequence = $2",
        )
        .bind(broken.to_string())
        .bind(sequence)
        .bind(actor)
        .execute(stack.db.pool())
        .await
        .unwrap();
    }
    while let Some(item) = broken_sse.next().await {
        broken_sse_frames.check_sse(&item);
    }
    assert_eq!(
        broken_sse_frames.seen.last().map(String::as_str),
        Some("unreadable")
    );
    while let Some(frame) = next_frame(&mut broken_ws).await {
        broken_ws_frames.check_ws(&frame);
    }
    assert!(broken_ws_frames.has("unreadable"));

    // reconnect: the server stops
    let mut sse = Sse::open(&stack, &viewer, &format!("/sessions/{first}/stream")).await;
    let mut ws = websocket(&stack, &viewer, first).await;
    let mut workspace = Sse::open(&stack, &viewer, "/stream").await;
    let mut sse_frames = Frames::new("sessionEvents");
    let mut ws_frames = Frames::new("sessionSocket");
    let mut workspace_frames = Frames::new("workspaceChanges");
    while !sse_frames.has("presence") {
        sse_frames.check_sse(&sse.next().await.unwrap());
    }
    while !ws_frames.has("presence") {
        ws_frames.check_ws(&next_frame(&mut ws).await.unwrap());
    }
    while !workspace_frames.has("keepAlive") {
        workspace_frames.check_sse(&workspace.next().await.unwrap());
    }
    let mut stack = stack;
    let query = stack.stops.remove(1);
    query.send(()).unwrap();
    while let Some(item) = sse.next().await {
        sse_frames.check_sse(&item);
    }
    assert_eq!(
        sse_frames.seen.last().map(String::as_str),
        Some("reconnect")
    );
    while let Some(frame) = next_frame(&mut ws).await {
        ws_frames.check_ws(&frame);
    }
    assert!(ws_frames.has("reconnect"));
    while let Some(item) = workspace.next().await {
        workspace_frames.check_sse(&item);
    }
    assert_eq!(
        workspace_frames.seen.last().map(String::as_str),
        Some("reconnect")
    );
}
