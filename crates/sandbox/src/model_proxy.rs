//! The host-side model proxy: the only way out of a sandbox to its model.
//!
//! OpenCode in the sandbox talks to `127.0.0.1:8080`, which a bridge in the sandbox forwards to
//! `model.sock` in a read-only host directory. This proxy listens on that socket, adds the
//! provider's API key and streams the answer (SSE included) back. The key lives in this process
//! only; the sandbox sees a placeholder. Anything in the sandbox can connect to the socket, so
//! the proxy treats every request as hostile:
//!
//! - **Endpoints.** Exactly what OpenCode calls: `POST /v1/chat/completions` and `GET /v1/models`.
//!   The request's path is checked as sent: a percent-escape of `.`, `/`, `\` or `%`, an empty,
//!   `.` or `..` segment (a trailing slash included) is refused with 403, any other path with
//!   404, another method with 405, and none of them reaches the provider. The upstream URL is
//!   built from the endpoint's own name, never from the request's path; the query is dropped.
//! - **Redirects** are never followed: a 3xx from the provider becomes a 502 for the sandbox
//!   (the key never goes to a `Location`).
//! - **Budget.** Each sandbox has a [`ModelUsage`] that counts the tokens the provider reports
//!   in `usage` (the JSON answer, or the last SSE chunk carrying it: the proxy asks for it in
//!   every streamed call, `stream_options.include_usage`). Once it reaches
//!   [`ModelProxyLimits::token_budget`], further calls get 429 without reaching the provider.
//!   Calls already running finish, so the budget can be overshot by what they use. A successful
//!   completion without usage is counted as a quarter of its request and answer bytes. The
//!   runner also sets a ceiling of its own per sandbox ([`ModelUsage::set_ceiling`]: what the
//!   workspace's budgets leave the session, `docs/budgets.md`), answered the same way with
//!   `budget_exhausted`.
//! - **Bounds.** A request body is read up to [`ModelProxyLimits::max_request_bytes`] (413
//!   beyond), and at most [`ModelProxyLimits::max_concurrent_calls`] calls per sandbox are
//!   upstream at once (more wait).
//!
//! Refusals are OpenAI-style JSON errors (`{"error":{"message","type","code"}}`), which OpenCode
//! shows as the model call's error.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::Error;
use crate::socket::remove_stale;

/// Where the proxy forwards to, with the key it adds.
#[derive(Clone)]
pub struct ModelUpstream {
    /// Up to and including `/v1`, like `https://api.example.com/v1`.
    pub base_url: String,
    pub api_key: String,
}

impl std::fmt::Debug for ModelUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelUpstream")
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

/// What a sandbox's model calls may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelProxyLimits {
    /// Tokens (as the provider reports them) a sandbox may use over its life; `None`: no limit.
    pub token_budget: Option<u64>,
    /// The largest request body the sandbox may send.
    pub max_request_bytes: usize,
    /// Calls of one sandbox upstream at once; more wait for a slot.
    pub max_concurrent_calls: usize,
}

impl Default for ModelProxyLimits {
    fn default() -> Self {
        Self {
            token_budget: None,
            max_request_bytes: 32 << 20,
            max_concurrent_calls: 8,
        }
    }
}

/// What one sandbox's model calls used and what the proxy refused. Shared by every proxy the
/// sandbox has (one per start), so a stop and resume does not reset the budget.
#[derive(Debug, Default)]
pub struct ModelUsage {
    tokens: AtomicU64,
    calls: AtomicU64,
    refused: AtomicU64,
    last_refusal: Mutex<Option<String>>,
    /// The most tokens the sandbox may have used before a call, set by the runner from the
    /// workspace's budgets; `None`: only the configured budget applies.
    ceiling: Mutex<Option<u64>>,
}

impl ModelUsage {
    /// Refuses calls once the sandbox's tokens reach `ceiling` (`None`: no ceiling). The runner
    /// sets it from what the budgets leave the session, and to the tokens used so far to
    /// refuse every further call.
    pub fn set_ceiling(&self, ceiling: Option<u64>) {
        *self.ceiling.lock().unwrap_or_else(|p| p.into_inner()) = ceiling;
    }

    /// The ceiling the runner set, if any.
    pub fn ceiling(&self) -> Option<u64> {
        *self.ceiling.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tokens counted so far (reported by the provider, or estimated when it reported none).
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    /// Calls sent to the provider (refused ones are not).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Requests refused (path, method, size, budget) or answered with a redirect.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn last_refusal(&self) -> Option<String> {
        self.last_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn refuse(&self, reason: &str) {
        tracing::warn!(reason, "sandbox model call refused");
        self.refused.fetch_add(1, Ordering::Relaxed);
        *self.last_refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_owned());
    }
}

/// A running proxy on one unix socket. Dropping it stops it and removes the socket.
#[derive(Debug)]
pub struct ModelProxy {
    path: PathBuf,
    usage: Arc<ModelUsage>,
    task: JoinHandle<()>,
}

struct Forwarder {
    upstream: ModelUpstream,
    limits: ModelProxyLimits,
    usage: Arc<ModelUsage>,
    calls: Arc<Semaphore>,
    http: reqwest::Client,
}

/// Request headers passed upstream; everything else (authorization, host, cookies) is dropped.
const PASSED_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::ACCEPT, header::USER_AGENT];
/// How much of a JSON answer is kept to read its usage; the answer itself is streamed whole.
const JSON_USAGE_SCAN: usize = 8 << 20;
/// The longest SSE line read for usage (usage chunks are a few hundred bytes).
const SSE_LINE_SCAN: usize = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl ModelProxy {
    /// Listens on `path`, connectable only by `uid` (owner, mode 0600), with the default
    /// limits (no token budget) and a usage of its own.
    pub fn start(path: &Path, uid: u32, upstream: ModelUpstream) -> Result<Self, Error> {
        Self::start_with(
            path,
            uid,
            upstream,
            ModelProxyLimits::default(),
            Arc::default(),
        )
    }

    /// Listens on `path`, connectable only by `uid`, counting calls in `usage` against
    /// `limits`.
    pub fn start_with(
        path: &Path,
        uid: u32,
        upstream: ModelUpstream,
        limits: ModelProxyLimits,
        usage: Arc<ModelUsage>,
    ) -> Result<Self, Error> {
        remove_stale(path)?;
        let prepare = |source| Error::Prepare {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(prepare)?;
        crate::mode::chown_to(path, uid).map_err(prepare)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(prepare)?;
        let http = reqwest::Client::builder()
            .no_proxy()
            // A redirect would carry the key (same host) or the call (elsewhere) where the
            // provider's URL did not say: never follow one.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|error| prepare(std::io::Error::other(error)))?;
        let state = Arc::new(Forwarder {
            upstream,
            calls: Arc::new(Semaphore::new(limits.max_concurrent_calls.max(1))),
            limits,
            usage: usage.clone(),
            http,
        });
        let app = axum::Router::new().fallback(forward).with_state(state);
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(%error, "model proxy stopped");
            }
        });
        Ok(Self {
            path: path.to_owned(),
            usage,
            task,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn usage(&self) -> &Arc<ModelUsage> {
        &self.usage
    }
}

impl Drop for ModelProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The provider endpoints a sandbox may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    ChatCompletions,
    Models,
}

impl Endpoint {
    /// The path under the base URL, which is all the upstream URL is built from.
    fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat/completions",
            Self::Models => "models",
        }
    }

    fn method(self) -> Method {
        match self {
            Self::ChatCompletions => Method::POST,
            Self::Models => Method::GET,
        }
    }

    /// [`Self::method`] for an `Allow` header.
    fn allow(self) -> &'static str {
        match self {
            Self::ChatCompletions => "POST",
            Self::Models => "GET",
        }
    }
}

/// Why a request path names no endpoint.
#[derive(Debug, PartialEq, Eq)]
enum PathRefusal {
    /// Escaped separators or dots, or segments a server or client would normalise away.
    Forbidden(&'static str),
    NotFound,
}

/// The endpoint the raw request path names. Nothing is normalised: a path that would need it is
/// refused.
fn endpoint_of(raw_path: &str) -> Result<Endpoint, PathRefusal> {
    let decoded = percent_decode(raw_path)?;
    let Some(rest) = decoded.strip_prefix('/') else {
        return Err(PathRefusal::NotFound);
    };
    let segments: Vec<&str> = rest.split('/').collect();
    if segments
        .iter()
        .any(|segment| segment.is_empty() || *segment == "." || *segment == "..")
    {
        return Err(PathRefusal::Forbidden(
            "the path has an empty, '.' or '..' segment",
        ));
    }
    match segments.as_slice() {
        ["v1", "chat", "completions"] => Ok(Endpoint::ChatCompletions),
        ["v1", "models"] => Ok(Endpoint::Models),
        _ => Err(PathRefusal::NotFound),
    }
}

/// Decodes `%XX` escapes, refusing escaped dots, slashes, backslashes, percent signs and control
/// characters (they exist only to get past a check like this one), malformed escapes, and raw
/// backslashes.
fn percent_decode(raw: &str) -> Result<String, PathRefusal> {
    const ENCODED: PathRefusal =
        PathRefusal::Forbidden("the path has an encoded dot, slash, backslash or percent sign");
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(ENCODED)?;
                let hex = std::str::from_utf8(hex).map_err(|_| ENCODED)?;
                let byte = u8::from_str_radix(hex, 16).map_err(|_| ENCODED)?;
                if matches!(byte, b'.' | b'/' | b'\\' | b'%') || byte.is_ascii_control() {
                    return Err(ENCODED);
                }
                decoded.push(byte);
                i += 3;
            }
            b'\\' => return Err(PathRefusal::Forbidden("the path has a backslash")),
            byte => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).map_err(|_| PathRefusal::NotFound)
}

/// An OpenAI-style error answer, counted as a refusal.
fn refuse(usage: &ModelUsage, status: StatusCode, code: &str, message: String) -> Response {
    usage.refuse(&message);
    error_answer(status, code, &message)
}

fn error_answer(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({
        "error": { "message": message, "type": "canopy_model_proxy", "code": code },
    });
    (status, axum::Json(body)).into_response()
}

async fn forward(State(proxy): State<Arc<Forwarder>>, request: Request) -> Response {
    let usage = &proxy.usage;
    let path = request.uri().path().to_owned();
    let endpoint = match endpoint_of(&path) {
        Ok(endpoint) => endpoint,
        Err(PathRefusal::Forbidden(why)) => {
            return refuse(
                usage,
                StatusCode::FORBIDDEN,
                "path_not_allowed",
                format!("{why}: {path}"),
            );
        }
        Err(PathRefusal::NotFound) => {
            return refuse(
                usage,
                StatusCode::NOT_FOUND,
                "endpoint_not_allowed",
                format!(
                    "{path} is not proxied; only POST /v1/chat/completions and GET /v1/models are"
                ),
            );
        }
    };
    if request.method() != endpoint.method() {
        let mut answer = refuse(
            usage,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} {path} is not proxied", request.method()),
        );
        answer
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(endpoint.allow()));
        return answer;
    }
    let (parts, body) = request.into_parts();
    let body = match endpoint {
        Endpoint::ChatCompletions => {
            match read_body(body, &parts.headers, proxy.limits.max_request_bytes).await {
                Ok(body) => body,
                Err(BodyError::TooLarge) => {
                    return refuse(
                        usage,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request_too_large",
                        format!(
                            "the request body is larger than {} bytes",
                            proxy.limits.max_request_bytes
                        ),
                    );
                }
                Err(BodyError::Read(error)) => {
                    tracing::debug!(%error, "reading a sandbox's model request");
                    return error_answer(
                        StatusCode::BAD_REQUEST,
                        "request_unreadable",
                        "the request body could not be read",
                    );
                }
            }
        }
        Endpoint::Models => Bytes::new(),
    };
    let body = match endpoint {
        Endpoint::ChatCompletions => match with_usage_requested(body) {
            Ok(body) => body,
            Err(reason) => {
                return refuse(usage, StatusCode::BAD_REQUEST, "invalid_request", reason);
            }
        },
        Endpoint::Models => body,
    };
    let Ok(slot) = proxy.calls.clone().acquire_owned().await else {
        return error_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "proxy_stopping",
            "the model proxy is stopping",
        );
    };
    // Checked once the call has its slot: calls that were running may have spent the rest.
    if let Some(budget) = proxy.limits.token_budget {
        let used = usage.tokens();
        if used >= budget {
            return refuse(
                usage,
                StatusCode::TOO_MANY_REQUESTS,
                "token_budget_exhausted",
                format!(
                    "this sandbox used {used} model tokens of its budget of {budget}; \
                     no further model calls are allowed"
                ),
            );
        }
    }
    if let Some(ceiling) = usage.ceiling() {
        let used = usage.tokens();
        if used >= ceiling {
            return refuse(
                usage,
                StatusCode::TOO_MANY_REQUESTS,
                "budget_exhausted",
                format!(
                    "the workspace's budgets leave this session no more model tokens \
                     ({used} used, ceiling {ceiling}); no further model calls are allowed"
                ),
            );
        }
    }
    let url = format!(
        "{}/{}",
        proxy.upstream.base_url.trim_end_matches('/'),
        endpoint.path()
    );
    let mut upstream = proxy
        .http
        .request(endpoint.method(), url)
        .bearer_auth(&proxy.upstream.api_key);
    for name in PASSED_HEADERS {
        if let Some(value) = parts.headers.get(&name) {
            upstream = upstream.header(name, value);
        }
    }
    let request_bytes = body.len() as u64;
    if endpoint == Endpoint::ChatCompletions {
        upstream = upstream.body(body);
    }
    usage.calls.fetch_add(1, Ordering::Relaxed);
    let answer = match upstream.send().await {
        Ok(answer) => answer,
        Err(error) => {
            tracing::warn!(%error, "model upstream unreachable");
            return error_answer(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                "model upstream unreachable",
            );
        }
    };
    let status = answer.status();
    if status.is_redirection() {
        let location = answer
            .headers()
            .get(header::LOCATION)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        tracing::warn!(%status, ?location, "the model provider answered with a redirect");
        return refuse(
            usage,
            StatusCode::BAD_GATEWAY,
            "upstream_redirect",
            format!("the model provider answered {status}; the proxy follows no redirect"),
        );
    }
    let mut response = Response::builder().status(status);
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(value) = answer.headers().get(&name) {
            response = response.header(name, value);
        }
    }
    let streamed = answer
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.contains("text/event-stream"));
    let mut meter = Meter {
        usage: usage.clone(),
        scan: if streamed {
            Scan::Sse {
                line: Vec::new(),
                skipping: false,
            }
        } else {
            Scan::Json {
                body: Vec::new(),
                overflow: false,
            }
        },
        reported: None,
        request_bytes,
        answer_bytes: 0,
        estimate: endpoint == Endpoint::ChatCompletions && status.is_success(),
        _slot: slot,
    };
    let body = answer.bytes_stream().map(move |chunk| {
        if let Ok(bytes) = &chunk {
            meter.feed(bytes);
        }
        chunk
    });
    response
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

enum BodyError {
    TooLarge,
    Read(axum::Error),
}

/// The whole request body, refused past `limit` bytes (by its length header when it has one).
async fn read_body(
    body: Body,
    headers: &axum::http::HeaderMap,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut data = body.into_data_stream();
    let mut whole = Vec::new();
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(BodyError::Read)?;
        if whole.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        whole.extend_from_slice(&chunk);
    }
    Ok(whole.into())
}

/// The chat request with `stream_options.include_usage` set when it streams: without it a
/// streamed answer reports no usage and the budget could not count it. Unchanged otherwise.
fn with_usage_requested(body: Bytes) -> Result<Bytes, String> {
    let mut request: Value = serde_json::from_slice(&body)
        .map_err(|error| format!("the request body is not JSON: {error}"))?;
    let Some(fields) = request.as_object_mut() else {
        return Err("the request body is not a JSON object".to_owned());
    };
    if fields.get("stream") != Some(&Value::Bool(true))
        || fields
            .get("stream_options")
            .and_then(|options| options.get("include_usage"))
            == Some(&Value::Bool(true))
    {
        return Ok(body);
    }
    let options = fields.entry("stream_options").or_insert_with(|| json!({}));
    if !options.is_object() {
        *options = json!({});
    }
    options["include_usage"] = Value::Bool(true);
    serde_json::to_vec(&request)
        .map(Bytes::from)
        .map_err(|error| format!("the request body could not be rewritten: {error}"))
}

/// Reads the usage of one answer as it streams to the sandbox, and counts it when the answer
/// ends (or the sandbox hangs up): on drop, so every call is counted once.
struct Meter {
    usage: Arc<ModelUsage>,
    scan: Scan,
    /// The latest usage the answer reported (a streamed answer's last usage chunk is the total).
    reported: Option<u64>,
    request_bytes: u64,
    answer_bytes: u64,
    /// Whether an answer without usage is counted by its size (a successful completion).
    estimate: bool,
    /// The call's slot among the sandbox's concurrent calls, held until the answer is over.
    _slot: OwnedSemaphorePermit,
}

enum Scan {
    /// Server-sent events: the current line, or skipping the rest of one too long to matter.
    Sse { line: Vec<u8>, skipping: bool },
    /// One JSON body, kept up to [`JSON_USAGE_SCAN`].
    Json { body: Vec<u8>, overflow: bool },
}

impl Meter {
    fn feed(&mut self, mut chunk: &[u8]) {
        self.answer_bytes += chunk.len() as u64;
        match &mut self.scan {
            Scan::Json { body, overflow } => {
                if *overflow || body.len() + chunk.len() > JSON_USAGE_SCAN {
                    *overflow = true;
                    body.clear();
                } else {
                    body.extend_from_slice(chunk);
                }
            }
            Scan::Sse { line, skipping } => loop {
                let end = chunk.iter().position(|byte| *byte == b'\n');
                let part = &chunk[..end.unwrap_or(chunk.len())];
                if *skipping || line.len() + part.len() > SSE_LINE_SCAN {
                    *skipping = true;
                    line.clear();
                } else {
                    line.extend_from_slice(part);
                }
                let Some(end) = end else { break };
                if !*skipping
                    && let Some(data) = line.strip_prefix(b"data:")
                    && let Some(tokens) = tokens_in(data)
                {
                    self.reported = Some(tokens);
                }
                line.clear();
                *skipping = false;
                chunk = &chunk[end + 1..];
            },
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if let Scan::Json {
            body,
            overflow: false,
        } = &self.scan
            && let Some(tokens) = tokens_in(body)
        {
            self.reported = Some(tokens);
        }
        let tokens = match self.reported {
            Some(tokens) => tokens,
            None if self.estimate => {
                let guess = (self.request_bytes + self.answer_bytes).div_ceil(4);
                tracing::warn!(
                    tokens = guess,
                    "the model provider reported no usage; counting an estimate"
                );
                guess
            }
            None => 0,
        };
        self.usage.tokens.fetch_add(tokens, Ordering::Relaxed);
    }
}

/// The tokens a JSON object's `usage` reports: `total_tokens`, else input plus output.
fn tokens_in(json: &[u8]) -> Option<u64> {
    const USAGE: &[u8] = b"\"usage\"";
    if !json.windows(USAGE.len()).any(|window| window == USAGE) {
        return None;
    }
    let value: Value = serde_json::from_slice(json.trim_ascii()).ok()?;
    let usage = value.get("usage").filter(|usage| usage.is_object())?;
    if let Some(total) = usage.get("total_tokens").and_then(Value::as_u64) {
        return Some(total);
    }
    let count = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|name| usage.get(*name).and_then(Value::as_u64))
    };
    let input = count(["prompt_tokens", "input_tokens"]);
    let output = count(["completion_tokens", "output_tokens"]);
    (input.is_some() || output.is_some()).then(|| input.unwrap_or(0) + output.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_endpoint_paths_are_accepted() {
        assert_eq!(
            endpoint_of("/v1/chat/completions"),
            Ok(Endpoint::ChatCompletions)
        );
        assert_eq!(endpoint_of("/v1/models"), Ok(Endpoint::Models));
        // An escape of an ordinary letter is only a letter.
        assert_eq!(endpoint_of("/v1/%6dodels"), Ok(Endpoint::Models));
        for forbidden in [
            "/v1/%2e%2e/%2e%2e/secret",
            "/v1/%2E%2e/secret",
            "/v1/chat%2fcompletions",
            "/v1/chat%2Fcompletions",
            "/v1/%5c../secret",
            "/v1\\..\\secret",
            "/v1/%252e%252e/secret",
            "/v1/%00/models",
            "/v1/%zz/models",
            "/v1/models%",
            "/v1/../secret",
            "/v1/./models",
            "/v1//models",
            "/v1/models/",
            "//v1/models",
            "/",
        ] {
            assert!(
                matches!(endpoint_of(forbidden), Err(PathRefusal::Forbidden(_))),
                "{forbidden}: {:?}",
                endpoint_of(forbidden)
            );
        }
        for unknown in [
            "/v1/files",
            "/v1/batches",
            "/v1/models/m",
            "/v1/completions",
            "/v2/chat/completions",
            "/chat/completions",
            "",
            "/v1/%ff",
        ] {
            assert_eq!(
                endpoint_of(unknown),
                Err(PathRefusal::NotFound),
                "{unknown}"
            );
        }
    }

    #[test]
    fn streamed_requests_are_made_to_report_usage() {
        let rewritten = |body: &str| -> Value {
            serde_json::from_slice(&with_usage_requested(Bytes::from(body.to_owned())).unwrap())
                .unwrap()
        };
        assert_eq!(
            rewritten(r#"{"stream":true,"model":"m"}"#)["stream_options"],
            json!({ "include_usage": true })
        );
        assert_eq!(
            rewritten(r#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#)["stream_options"],
            json!({ "include_usage": true, "x": 1 })
        );
        assert_eq!(
            rewritten(r#"{"stream":true,"stream_options":"no"}"#)["stream_options"],
            json!({ "include_usage": true })
        );
        // Untouched, byte for byte, when there is nothing to add.
        for body in [
            r#"{"stream":false,"model":"m"}"#,
            r#"{"model":"m"}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
        ] {
            assert_eq!(
                with_usage_requested(Bytes::from(body.to_owned())).unwrap(),
                body.as_bytes()
            );
        }
        assert!(with_usage_requested(Bytes::from_static(b"[1]")).is_err());
        assert!(with_usage_requested(Bytes::from_static(b"not json")).is_err());
    }

    #[test]
    fn usage_is_read_from_json_and_sse_answers() {
        assert_eq!(
            tokens_in(
                br#"{"usage":{"prompt_tokens":100,"completion_tokens":10,"total_tokens":110}}"#
            ),
            Some(110)
        );
        assert_eq!(
            tokens_in(br#"{"usage":{"input_tokens":7,"output_tokens":3}}"#),
            Some(10)
        );
        assert_eq!(tokens_in(br#" {"usage":null} "#), None);
        assert_eq!(tokens_in(br#"{"choices":[]}"#), None);
        assert_eq!(tokens_in(b"[DONE]"), None);

        let usage = Arc::new(ModelUsage::default());
        let slots = Arc::new(Semaphore::new(1));
        let mut meter = Meter {
            usage: usage.clone(),
            scan: Scan::Sse {
                line: Vec::new(),
                skipping: false,
            },
            reported: None,
            request_bytes: 1000,
            answer_bytes: 0,
            estimate: true,
            _slot: slots.clone().try_acquire_owned().unwrap(),
        };
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"total_tokens\":42}}\r\n\r\n",
            "data: [DONE]\n\n"
        );
        // Split inside the usage line: lines are joined across chunks.
        let (first, second) = stream.split_at(70);
        meter.feed(first.as_bytes());
        meter.feed(second.as_bytes());
        drop(meter);
        assert_eq!(usage.tokens(), 42);
        assert_eq!(slots.available_permits(), 1, "the slot is back");

        // No usage at all: a quarter of the bytes.
        let meter = Meter {
            usage: usage.clone(),
            scan: Scan::Json {
                body: Vec::new(),
                overflow: false,
            },
            reported: None,
            request_bytes: 400,
            answer_bytes: 0,
            estimate: true,
            _slot: slots.clone().try_acquire_owned().unwrap(),
        };
        drop(meter);
        assert_eq!(usage.tokens(), 142);
    }
}
