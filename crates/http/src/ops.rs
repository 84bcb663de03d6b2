//! The operations endpoints every API serves alike: liveness, readiness (its database answers)
//! and the process's Prometheus metrics. Each API merges [`routes`] into its router, so the
//! three handlers and their documentation exist once.

use std::time::Duration;

use axum::extract::{FromRef, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use utoipa::openapi::RefOr;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::{Alive, Metrics, Problem, Ready, problem_response};

/// What the operations endpoints read: the API's database pool and the process's metrics.
#[derive(Clone, Debug)]
pub struct Ops {
    pub pool: PgPool,
    pub metrics: PrometheusHandle,
}

/// `/healthz`, `/readyz` and `/metrics`, documented, for an API whose state `S` gives [`Ops`].
pub fn routes<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    Ops: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// How long a readiness probe waits for the database.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses(Alive))]
async fn healthz() -> &'static str {
    "ok"
}

/// The service can serve: its database answers.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(Ready, Unready))]
async fn readyz(State(ops): State<Ops>) -> Response {
    match tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&ops.pool)).await {
        Ok(Ok(_)) => "ready".into_response(),
        _ => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the service is not ready".to_owned(),
            None,
        )
        .into_response_with(Some(Duration::from_secs(5))),
    }
}

/// Prometheus text exposition of the process's metrics.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses(Metrics))]
async fn metrics(State(ops): State<Ops>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ops.metrics.render(),
    )
        .into_response()
}

/// `/readyz`'s 503.
struct Unready;

impl utoipa::IntoResponses for Unready {
    fn responses() -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        [(
            "503".to_owned(),
            problem_response(
                "`unavailable`: the database does not answer (see Retry-After)",
                true,
            ),
        )]
        .into()
    }
}
