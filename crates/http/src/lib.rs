//! HTTP plumbing both APIs share, so that it is written once: the id of the request being
//! answered (for error bodies and logs), request metrics, the process's Prometheus recorder, and
//! the bearer-token security scheme of their OpenAPI documents. Each API keeps its own error
//! type and status table.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

tokio::task_local! {
    /// The `x-request-id` of the request being answered, set by [`observe`].
    static REQUEST_ID: String;
}

/// The id of the request being answered, when called within one.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID
        .try_with(Clone::clone)
        .ok()
        .filter(|id| !id.is_empty())
}

/// Middleware: makes the request id available to [`current_request_id`] and records
/// `canopy_http_requests_total` and `canopy_http_request_duration_seconds` by method, matched
/// route and status. Add it inside the request-id layer.
pub async fn observe(request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = REQUEST_ID.scope(request_id, next.run(request)).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("canopy_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("canopy_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The process's Prometheus recorder, installed once and shared by every app in the process.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => handle,
            Err(error) => {
                tracing::warn!(%error, "a metrics recorder is already installed; /metrics shows only this app's own");
                PrometheusBuilder::new().build_recorder().handle()
            }
        })
        .clone()
}

/// Adds the `bearer` (JWT) security scheme to an OpenAPI document.
#[derive(Debug)]
pub struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut bearer = Http::new(HttpAuthScheme::Bearer);
        bearer.bearer_format = Some("JWT".to_owned());
        components.add_security_scheme("bearer", SecurityScheme::Http(bearer));
    }
}
