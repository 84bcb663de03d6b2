//! A fake model provider that records every request it gets (path, key, body), and raw HTTP
//! over a unix socket: a sandbox speaks to the model proxy in bytes, not through a client that
//! would normalise its paths first.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as the fake provider received it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) method: String,
    /// Path and query, as sent.
    pub(crate) target: String,
    pub(crate) authorization: Option<String>,
    pub(crate) body: Bytes,
}

impl Seen {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// How the fake answers one request.
pub(crate) type Answer = Box<dyn Fn(&Seen) -> Response + Send + Sync>;

pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Answer,
}

impl Upstream {
    pub(crate) async fn start(answer: impl Fn(&Seen) -> Response + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared {
            seen: seen.clone(),
            answer: Box::new(answer),
        });
        let app = axum::Router::new().fallback(record).with_state(shared);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, seen, task }
    }

    /// The base URL a provider is configured with.
    pub(crate) fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let seen = Seen {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_default(),
        authorization: header_text(&parts.headers, header::AUTHORIZATION),
        body,
    };
    shared.seen.lock().unwrap().push(seen.clone());
    (shared.answer)(&seen)
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

/// The usage every completion of [`completions`] reports.
pub(crate) const TOKENS_PER_CALL: u64 = 110;

/// Answers a chat completion the way providers do: one JSON body, or SSE chunks ending with a
/// usage chunk when the request asked for usage (`stream_options.include_usage`), then `[DONE]`.
pub(crate) fn completions(seen: &Seen) -> Response {
    let body = seen.json();
    let usage =
        json!({ "prompt_tokens": 100, "completion_tokens": 10, "total_tokens": TOKENS_PER_CALL });
    if body["stream"] != json!(true) {
        return axum::Json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "m",
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": "hi" }, "finish_reason": "stop" }],
            "usage": usage,
        }))
        .into_response();
    }
    let mut frames = vec![
        json!({ "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
                "choices": [{ "index": 0, "delta": { "role": "assistant", "content": "hi" }, "finish_reason": null }] }),
        json!({ "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
                "choices": [{ "index": 0, "delta": {}, "finish_reason": "stop" }] }),
    ];
    if body["stream_options"]["include_usage"] == json!(true) {
        frames.push(
            json!({ "id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
                            "choices": [], "usage": usage }),
        );
    }
    let mut text: String = frames
        .iter()
        .map(|frame| format!("data: {frame}\n\n"))
        .collect();
    text.push_str("data: [DONE]\n\n");
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from(text),
    )
        .into_response()
}

/// Writes one HTTP/1.1 request to the unix socket `socket` exactly as given (the target is not
/// normalised) with the sandbox's placeholder key, and returns the status and the raw rest.
pub(crate) async fn raw_request(
    socket: &Path,
    method: &str,
    target: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n\
         authorization: Bearer sandbox-has-no-key\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    (status, answer)
}
