//! The HTTP client of OpenCode's classic API.
//!
//! Every request has the client's own timeout ([`ClientConfig::request_timeout`]); the event
//! stream has a stall timeout instead. What the server sends is read up to a size
//! ([`ClientConfig::max_body_bytes`], [`ClientConfig::max_event_bytes`]) and refused beyond it:
//! in a sandbox, the server answering may be whatever took OpenCode's place. How the client reaches the server is a [`Transport`],
//! decided in one place ([`OpenCodeClient::new`]): TCP to a base URL, or HTTP over a unix socket
//! (the sandbox bridges OpenCode's port to a socket), where reqwest connects to the socket and the
//! URL's host is only a placeholder.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Error;
use crate::events::EventStream;
use crate::types::{
    CreateSession, Health, MessageWithParts, PermissionReply, PermissionRequest, Prompt, Session,
    SessionStatus,
};

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP to a base URL such as `http://127.0.0.1:4096`.
    Tcp { base_url: String },
    /// HTTP over a unix socket.
    UnixSocket { path: PathBuf },
}

/// HTTP basic auth, needed on every endpoint once the server has `OPENCODE_SERVER_PASSWORD`.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    /// `opencode` unless the server has `OPENCODE_SERVER_USERNAME`.
    pub username: String,
    pub password: String,
}

impl BasicAuth {
    pub fn opencode(password: impl Into<String>) -> Self {
        Self {
            username: "opencode".to_owned(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What an [`OpenCodeClient`] is built from.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub transport: Transport,
    pub auth: Option<BasicAuth>,
    /// The project directory requests are about (`?directory=`); the server's working directory
    /// when `None`.
    pub directory: Option<PathBuf>,
    /// The whole of one request, answer included. OpenCode answers its API in milliseconds;
    /// the timeout exists because an early request can be accepted and never answered.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long the event stream may be silent before it counts as dead (heartbeats come every
    /// 10 s).
    pub event_stall_timeout: Duration,
    /// The largest answer body read ([`Error::TooLarge`] beyond). A session's whole history is
    /// the largest answer OpenCode gives.
    pub max_body_bytes: usize,
    /// The largest event of the event stream, which ends with [`Error::EventTooLarge`] beyond.
    /// A tool part's update carries the tool's whole output.
    pub max_event_bytes: usize,
}

impl ClientConfig {
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            auth: None,
            directory: None,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            event_stall_timeout: Duration::from_secs(35),
            max_body_bytes: 128 << 20,
            max_event_bytes: 16 << 20,
        }
    }

    pub fn tcp(base_url: impl Into<String>) -> Self {
        Self::new(Transport::Tcp {
            base_url: base_url.into(),
        })
    }

    pub fn unix_socket(path: impl Into<PathBuf>) -> Self {
        Self::new(Transport::UnixSocket { path: path.into() })
    }

    pub fn with_auth(mut self, auth: Option<BasicAuth>) -> Self {
        self.auth = auth;
        self
    }

    pub fn with_directory(mut self, directory: impl Into<PathBuf>) -> Self {
        self.directory = Some(directory.into());
        self
    }
}

/// A client of one OpenCode server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OpenCodeClient {
    http: reqwest::Client,
    base: Url,
    config: ClientConfig,
}

impl OpenCodeClient {
    pub fn new(config: ClientConfig) -> Result<Self, Error> {
        let builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // The API is local; a proxy from the environment would only get in the way.
            .no_proxy();
        let (builder, base) = match &config.transport {
            Transport::Tcp { base_url } => (builder, base_url.clone()),
            // The host is never resolved: every connection goes to the socket.
            Transport::UnixSocket { path } => (
                builder.unix_socket(path.clone()),
                "http://opencode".to_owned(),
            ),
        };
        let base = Url::parse(&base).map_err(|error| Error::InvalidBaseUrl {
            url: base.clone(),
            reason: error.to_string(),
        })?;
        let http = builder.build().map_err(Error::ClientBuild)?;
        Ok(Self { http, base, config })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The same server, for another project directory.
    pub fn for_directory(&self, directory: impl Into<PathBuf>) -> Self {
        let mut client = self.clone();
        client.config.directory = Some(directory.into());
        client
    }

    /// `GET /global/health`, with its own (short) timeout.
    pub async fn health_within(&self, timeout: Duration) -> Result<Health, Error> {
        let request = self
            .request(Method::GET, &["global", "health"])
            .timeout(timeout);
        self.json(Method::GET, "/global/health", request, timeout)
            .await
    }

    /// `GET /global/health`.
    pub async fn health(&self) -> Result<Health, Error> {
        self.health_within(self.config.request_timeout).await
    }

    /// `POST /session`.
    pub async fn create_session(&self, session: &CreateSession) -> Result<Session, Error> {
        self.send(Method::POST, &["session"], Some(session)).await
    }

    /// `GET /session/{id}`.
    pub async fn session(&self, session_id: &str) -> Result<Session, Error> {
        self.send(Method::GET, &["session", session_id], None::<&()>)
            .await
    }

    /// `GET /session`: the sessions of the project.
    pub async fn sessions(&self) -> Result<Vec<Session>, Error> {
        self.send(Method::GET, &["session"], None::<&()>).await
    }

    /// `DELETE /session/{id}`.
    pub async fn delete_session(&self, session_id: &str) -> Result<bool, Error> {
        self.send(Method::DELETE, &["session", session_id], None::<&()>)
            .await
    }

    /// `POST /session/{id}/prompt_async`: starts a turn and returns at once; follow it on the
    /// event stream (subscribe first: there is no replay).
    pub async fn prompt_async(&self, session_id: &str, prompt: &Prompt) -> Result<(), Error> {
        let path = ["session", session_id, "prompt_async"];
        let request = self.request(Method::POST, &path).json(prompt);
        self.empty(Method::POST, &display(&path), request).await
    }

    /// `GET /session/{id}/message`: the whole history, oldest first.
    pub async fn messages(&self, session_id: &str) -> Result<Vec<MessageWithParts>, Error> {
        self.send(
            Method::GET,
            &["session", session_id, "message"],
            None::<&()>,
        )
        .await
    }

    /// `GET /session/{id}/message?limit=n`: the newest `n` messages, oldest first.
    pub async fn latest_messages(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<MessageWithParts>, Error> {
        let path = ["session", session_id, "message"];
        let timeout = self.config.request_timeout;
        let request = self
            .request(Method::GET, &path)
            .query(&[("limit", limit)])
            .timeout(timeout);
        self.json(Method::GET, &display(&path), request, timeout)
            .await
    }

    /// `GET /session/status`: busy and retrying sessions (idle ones are left out).
    pub async fn session_statuses(&self) -> Result<HashMap<String, SessionStatus>, Error> {
        self.send(Method::GET, &["session", "status"], None::<&()>)
            .await
    }

    /// `GET /permission`: the permission requests waiting for a reply.
    pub async fn pending_permissions(&self) -> Result<Vec<PermissionRequest>, Error> {
        self.send(Method::GET, &["permission"], None::<&()>).await
    }

    /// `POST /permission/{id}/reply`.
    pub async fn reply_permission(
        &self,
        request_id: &str,
        reply: &PermissionReply,
    ) -> Result<(), Error> {
        let _: Value = self
            .send(
                Method::POST,
                &["permission", request_id, "reply"],
                Some(reply),
            )
            .await?;
        Ok(())
    }

    /// `POST /session/{id}/abort`: stops the running turn (the model call and running tools).
    /// OpenCode answers `true` even for idle or unknown sessions.
    pub async fn abort(&self, session_id: &str) -> Result<bool, Error> {
        self.send(Method::POST, &["session", session_id, "abort"], None::<&()>)
            .await
    }

    /// `GET /event`: the live events of the client's directory.
    pub async fn events(&self) -> Result<EventStream, Error> {
        let timeout = self.config.request_timeout;
        let request = self
            .request(Method::GET, &["event"])
            .header(reqwest::header::ACCEPT, "text/event-stream");
        // No total timeout on the request itself: the stream is meant to stay open. Only getting
        // the response head is bounded here; the body has the stall timeout.
        let response = tokio::time::timeout(timeout, request.send())
            .await
            .map_err(|_| Error::Timeout {
                method: "GET".to_owned(),
                path: "/event".to_owned(),
                after: timeout,
            })?
            .map_err(|source| request_error("GET", "/event", source, timeout))?;
        let response = check_status("GET", "/event", response, timeout).await?;
        Ok(EventStream::new(
            response,
            self.config.event_stall_timeout,
            self.config.max_event_bytes,
        ))
    }

    /// A request to `segments` with the directory and auth. Every request is built here.
    fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if segments.first() != Some(&"global")
            && let Some(directory) = &self.config.directory
        {
            url.query_pairs_mut()
                .append_pair("directory", &directory.to_string_lossy());
        }
        let request = self.http.request(method, url);
        match &self.config.auth {
            Some(auth) => request.basic_auth(&auth.username, Some(&auth.password)),
            None => request,
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&impl Serialize>,
    ) -> Result<T, Error> {
        let timeout = self.config.request_timeout;
        let mut request = self.request(method.clone(), segments).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        self.json(method, &display(segments), request, timeout)
            .await
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        request: RequestBuilder,
        timeout: Duration,
    ) -> Result<T, Error> {
        let response = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|source| request_error(method.as_str(), path, source, timeout))?;
        let response = check_status(method.as_str(), path, response, timeout).await?;
        let bytes = read_capped(response, self.config.max_body_bytes)
            .await
            .map_err(|capped| match capped {
                Capped::TooLarge => Error::TooLarge {
                    method: method.to_string(),
                    path: path.to_owned(),
                    limit: self.config.max_body_bytes,
                },
                Capped::Read(source) => request_error(method.as_str(), path, source, timeout),
            })?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Decode {
            method: method.to_string(),
            path: path.to_owned(),
            source,
        })
    }

    async fn empty(
        &self,
        method: Method,
        path: &str,
        request: RequestBuilder,
    ) -> Result<(), Error> {
        let timeout = self.config.request_timeout;
        let response = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|source| request_error(method.as_str(), path, source, timeout))?;
        check_status(method.as_str(), path, response, timeout).await?;
        Ok(())
    }
}

fn display(segments: &[&str]) -> String {
    format!("/{}", segments.join("/"))
}

fn request_error(method: &str, path: &str, source: reqwest::Error, timeout: Duration) -> Error {
    if source.is_timeout() {
        Error::Timeout {
            method: method.to_owned(),
            path: path.to_owned(),
            after: timeout,
        }
    } else {
        Error::Request {
            method: method.to_owned(),
            path: path.to_owned(),
            source,
        }
    }
}

/// Turns an error status into [`Error::Status`], reading OpenCode's error body shapes:
/// `{"name","data":{"message"}}` and `{"_tag","message"}`.
async fn check_status(
    method: &str,
    path: &str,
    response: reqwest::Response,
    timeout: Duration,
) -> Result<reqwest::Response, Error> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = match read_capped(response, ERROR_BODY_BYTES).await {
        Ok(body) => String::from_utf8_lossy(&body).into_owned(),
        Err(Capped::TooLarge) => String::new(),
        Err(Capped::Read(source)) => return Err(request_error(method, path, source, timeout)),
    };
    let parsed: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let name = parsed["name"]
        .as_str()
        .or_else(|| parsed["_tag"].as_str())
        .map(str::to_owned);
    let message = parsed["data"]["message"]
        .as_str()
        .or_else(|| parsed["message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| describe(status, &body));
    Err(Error::Status {
        method: method.to_owned(),
        path: path.to_owned(),
        status: status.as_u16(),
        name,
        message,
    })
}

/// What is read of an error answer's body; OpenCode's are a few hundred bytes.
const ERROR_BODY_BYTES: usize = 64 * 1024;

/// Why [`read_capped`] gave up.
enum Capped {
    TooLarge,
    Read(reqwest::Error),
}

/// The whole body, unless it is (or says it is) longer than `limit` bytes.
async fn read_capped(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, Capped> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(Capped::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Capped::Read)? {
        if body.len() + chunk.len() > limit {
            return Err(Capped::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn describe(status: StatusCode, body: &str) -> String {
    let body: String = body.chars().take(200).collect();
    if body.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("no body")
            .to_lowercase()
    } else {
        body
    }
}
