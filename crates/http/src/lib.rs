//! HTTP plumbing both APIs share, so that it is written once: RFC 9457 problem bodies, the id of
//! the request being answered, request metrics, the process's Prometheus recorder, the layers
//! and documentation routes every API router ends with, the operations endpoints ([`ops`]), query and path parameters read with the
//! failing parameter named ([`params`]), and the pieces of their OpenAPI documents (the
//! bearer-token security scheme, problem+json and plain-text answers). Each API keeps its own
//! error type and its table from error to status and code.
//!
//! With the `contract` feature, [`contract`] walks an OpenAPI document and checks a running API
//! against it (the APIs' contract tests).

#[cfg(feature = "contract")]
pub mod contract;
pub mod ops;
pub mod params;
pub mod serve;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::ToSchema;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, ResponseBuilder, Type};
use utoipa_swagger_ui::SwaggerUi;

/// Where every API serves its OpenAPI document; the `/docs` page loads it from there.
pub const OPENAPI_PATH: &str = "/openapi.json";

/// One invalid field of a request (a JSON path such as `text` or `steps[3]`, or a query
/// parameter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// RFC 9457 problem details, with Canopy's stable `code`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    /// Stable, machine-readable error code.
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The id of the request, to find its log lines (the only content of a 5xx body).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The invalid fields, for `validation_failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
    /// `budget_exhausted`: the budget's kind (`workspace_monthly_cost`, `session_tokens`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// `budget_exhausted`: whose spending, `workspace`, `session:<id>` or `person:<user id>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// `budget_exhausted`: the period, `YYYY-MM`, `YYYY-MM-DD` (UTC) or empty for a session's
    /// life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
    /// `budget_exhausted`: `micro_usd`, `tokens`, `seconds` or `sessions`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// `budget_exhausted`: the budget's limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// `budget_exhausted`: recorded usage in the period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spent: Option<u64>,
    /// `budget_exhausted`: what admitted prompts that have not finished hold back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved: Option<u64>,
    /// `budget_exhausted`: `limit - spent - reserved`, at least 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
}

impl Problem {
    /// This problem with the members of a `budget_exhausted` refusal.
    pub fn with_budget(mut self, shortfall: BudgetShortfall) -> Self {
        self.budget = Some(shortfall.budget);
        self.scope = Some(shortfall.scope);
        self.period = Some(shortfall.period);
        self.unit = Some(shortfall.unit);
        self.limit = Some(shortfall.limit);
        self.spent = Some(shortfall.spent);
        self.reserved = Some(shortfall.reserved);
        self.remaining = Some(shortfall.remaining);
        self
    }
}

/// Which budget refused a request and how it stands (members of a `budget_exhausted` problem).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetShortfall {
    /// The budget's kind (`workspace_monthly_cost`, `session_tokens`, ...).
    pub budget: String,
    /// Whose spending: `workspace`, `session:<id>` or `person:<user id>`.
    pub scope: String,
    /// `YYYY-MM`, `YYYY-MM-DD` (UTC) or empty for a session's life.
    pub period: String,
    /// `micro_usd`, `tokens`, `seconds` or `sessions`.
    pub unit: String,
    pub limit: u64,
    /// Recorded usage in the period.
    pub spent: u64,
    /// Held back by admitted prompts that have not finished.
    pub reserved: u64,
    /// What is left: `limit - spent - reserved`, at least 0.
    pub remaining: u64,
}

impl Problem {
    /// The problem for the request being answered. A 5xx carries no detail: internals stay in
    /// the log.
    pub fn new(
        status: StatusCode,
        code: &str,
        detail: String,
        errors: Option<Vec<FieldError>>,
    ) -> Self {
        Self {
            problem_type: format!("urn:canopy:problem:{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            code: code.to_owned(),
            detail: (!status.is_server_error()).then_some(detail),
            request_id: current_request_id(),
            errors,
            budget: None,
            scope: None,
            period: None,
            unit: None,
            limit: None,
            spent: None,
            reserved: None,
            remaining: None,
        }
    }

    /// The `application/problem+json` response, with `Retry-After` when retrying can help.
    pub fn into_response_with(self, retry_after: Option<Duration>) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(self)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(retry_after) = retry_after {
            let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// An allow-list of CORS origins from configuration (empty entries are ignored).
pub fn cors_origins(origins: &[String]) -> anyhow::Result<AllowOrigin> {
    let origins = origins
        .iter()
        .filter(|o| !o.trim().is_empty())
        .map(|o| HeaderValue::from_str(o.trim()).with_context(|| format!("CORS origin {o}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(AllowOrigin::list(origins))
}

/// What every API router ends with: `/openapi.json` and the `/docs` page (Swagger UI, loading
/// `/openapi.json`), then the request-id, CORS, tracing and [`observe`] layers.
pub fn finish_router(
    router: Router,
    openapi: &utoipa::openapi::OpenApi,
    cors: CorsLayer,
) -> anyhow::Result<Router> {
    // Serialized once and shared: the router (and this handler) is cloned per connection, and a
    // captured document would be copied with it (about 1 MiB each).
    let document = axum::body::Bytes::from(
        serde_json::to_vec(openapi).context("serialize the OpenAPI document")?,
    );
    let request_id = HeaderName::from_static("x-request-id");
    Ok(router
        .route(
            OPENAPI_PATH,
            axum::routing::get(move || {
                let document = document.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], document) }
            }),
        )
        // The page's initializer must name the document: without a URL Swagger UI shows "No API
        // definition provided."
        .merge(SwaggerUi::new("/docs").config(utoipa_swagger_ui::Config::from(OPENAPI_PATH)))
        .layer(axum::middleware::from_fn(observe))
        .layer(TraceLayer::new_for_http())
        .layer(cors)
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid)))
}

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

/// A documented error answer: `application/problem+json` with the [`Problem`] schema, and
/// `Retry-After` (seconds) when `retry_after` says the answer can carry it.
pub fn problem_response(description: &str, retry_after: bool) -> RefOr<utoipa::openapi::Response> {
    let mut response = ResponseBuilder::new().description(description).content(
        "application/problem+json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build(),
    );
    if retry_after {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1)),
                ))
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    RefOr::T(response.build())
}

/// A documented plain-text answer (health, readiness, metrics).
pub fn text_response(description: &str, content_type: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                content_type,
                ContentBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .build(),
            )
            .build(),
    )
}

/// The documented answers of operations endpoints, each as plain text.
macro_rules! text_answers {
    ($($(#[$doc:meta])* $name:ident => ($description:literal, $content_type:literal);)+) => {
        $(
            $(#[$doc])*
            #[derive(Debug)]
            pub struct $name;

            impl utoipa::IntoResponses for $name {
                fn responses() -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::Response>> {
                    [("200".to_owned(), text_response($description, $content_type))].into()
                }
            }
        )+
    };
}

text_answers! {
    /// `/healthz`: `ok`.
    Alive => ("Alive: `ok`", "text/plain");
    /// `/readyz`: `ready`.
    Ready => ("Ready: `ready`", "text/plain");
    /// `/metrics`: the Prometheus text exposition.
    Metrics => ("Prometheus metrics (text exposition format 0.0.4)", "text/plain");
}
