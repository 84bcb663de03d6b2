//! The host-side model proxy: the only way out of a sandbox to its model.
//!
//! OpenCode in the sandbox talks to `127.0.0.1:8080`, which a bridge in the sandbox forwards to
//! `model.sock` in a read-only host directory. This proxy listens on that socket, lets through
//! only the OpenAI-compatible paths under `/v1/`, drops whatever credentials the sandbox sent,
//! adds the provider's API key and streams the answer (SSE included) back. The key lives in this
//! process only; the sandbox sees a placeholder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::UnixListener;
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

/// A running proxy on one unix socket. Dropping it stops it and removes the socket.
#[derive(Debug)]
pub struct ModelProxy {
    path: PathBuf,
    task: JoinHandle<()>,
}

struct Forwarder {
    upstream: ModelUpstream,
    http: reqwest::Client,
}

/// Request headers passed upstream; everything else (authorization, host, cookies) is dropped.
const PASSED_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::ACCEPT, header::USER_AGENT];

impl ModelProxy {
    /// Listens on `path`, connectable only by `uid` (owner, mode 0600).
    pub fn start(path: &Path, uid: u32, upstream: ModelUpstream) -> Result<Self, Error> {
        remove_stale(path)?;
        let prepare = |source| Error::Prepare {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(prepare)?;
        std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(prepare)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(prepare)?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|error| prepare(std::io::Error::other(error)))?;
        let state = Arc::new(Forwarder { upstream, http });
        let app = axum::Router::new().fallback(forward).with_state(state);
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(%error, "model proxy stopped");
            }
        });
        Ok(Self {
            path: path.to_owned(),
            task,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ModelProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn forward(State(forwarder): State<Arc<Forwarder>>, request: Request) -> Response {
    let Some(rest) = request
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .and_then(|pq| pq.strip_prefix("/v1/"))
        .filter(|rest| !rest.split(['/', '?']).any(|segment| segment == ".."))
    else {
        return (StatusCode::FORBIDDEN, "only /v1/ is proxied\n").into_response();
    };
    let url = format!(
        "{}/{rest}",
        forwarder.upstream.base_url.trim_end_matches('/')
    );
    let mut upstream = forwarder
        .http
        .request(request.method().clone(), url)
        .bearer_auth(&forwarder.upstream.api_key);
    for name in PASSED_HEADERS {
        if let Some(value) = request.headers().get(&name) {
            upstream = upstream.header(name, value);
        }
    }
    let body = reqwest::Body::wrap_stream(request.into_body().into_data_stream());
    match upstream.body(body).send().await {
        Ok(answer) => {
            let mut response = Response::builder().status(answer.status());
            for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
                if let Some(value) = answer.headers().get(&name) {
                    response = response.header(name, value);
                }
            }
            response
                .body(Body::from_stream(answer.bytes_stream()))
                .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
        }
        Err(error) => {
            tracing::warn!(%error, "model upstream unreachable");
            (StatusCode::BAD_GATEWAY, "model upstream unreachable\n").into_response()
        }
    }
}
