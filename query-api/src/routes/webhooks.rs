//! Webhook subscriptions and their delivery log, for owners and admins of the workspace (read
//! from the delivery service's tables, `webhook_subscriptions`, `webhook_deliveries` and
//! `webhook_attempts`; the secrets are not readable here). Another workspace's subscription
//! is 404.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Manager;
use crate::error::ApiError;
use crate::query::{Cursor, Filter, Ids, Listed, PageParams, Params, list_query, page_of};
use crate::routes::read::Page;
use crate::routes::{WebhookListProblems, WebhookProblems};

/// A webhook subscription as the delivery service sees it.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct Webhook {
    pub webhook_id: Uuid,
    pub url: String,
    pub event_types: Vec<String>,
    pub description: String,
    /// `active` or `paused` (by a person).
    pub status: String,
    /// When the delivery service suspended the endpoint after repeated dead letters (a resume
    /// lifts it), and why.
    pub suspended_at: Option<DateTime<Utc>>,
    pub suspended_reason: Option<String>,
    /// Deliveries dead-lettered in a row.
    pub dead_streak: i32,
    pub secret_version: i64,
    /// First 16 hex digits of the current secret's SHA-256.
    pub secret_fingerprint: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub created_xid: i64,
    #[serde(skip)]
    pub created_position: i64,
}

impl Listed for Webhook {
    fn cursor(&self) -> Cursor {
        Cursor {
            xid: self.created_xid,
            position: self.created_position,
        }
    }
}

const WEBHOOKS: &str = "(SELECT *, subscribed_transaction_id AS created_xid, \
    subscribed_position AS created_position FROM public.webhook_subscriptions \
    WHERE status <> 'deleted') AS webhooks";
const WEBHOOK_COLUMNS: &str = "webhook_id, url, event_types, description, status, suspended_at, \
    suspended_reason, dead_streak, secret_version, secret_fingerprint, created_by, created_at, \
    updated_at";

/// List the workspace's webhook subscriptions (owners and admins), newest first by default.
#[utoipa::path(get, path = "/webhooks", tag = "webhooks",
    params(PageParams),
    responses((status = 200, body = Page<Webhook>, description = "A page of subscriptions"), WebhookListProblems),
    security(("bearer" = [])))]
pub(crate) async fn list_webhooks(
    State(state): State<AppState>,
    manager: Manager,
    Params(page): Params<PageParams>,
) -> Result<Json<Page<Webhook>>, ApiError> {
    let (mut query, limit, _) =
        list_query(WEBHOOKS, WEBHOOK_COLUMNS, &manager.workspace_id, &[], &page)?;
    let rows: Vec<Webhook> = query
        .build_query_as()
        .fetch_all(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    let (items, next_cursor) = page_of(rows, limit);
    Ok(Json(Page { items, next_cursor }))
}

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DeliveryStatus {
    Pending,
    Delivered,
    Dead,
}

impl DeliveryStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeliveryFilters {
    #[param(inline)]
    pub status: Option<DeliveryStatus>,
}

/// One event's delivery to the endpoint, with its attempts.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct Delivery {
    pub event_id: Uuid,
    /// The `webhook-id` header: the same on every attempt and redelivery.
    pub message_id: String,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    /// `pending`, `delivered` or `dead` (no attempt left).
    pub status: String,
    /// The attempt series (2 and up after redeliveries by hand).
    pub series: i32,
    /// Attempts in the current series.
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub queued_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    /// The latest attempts (at most 50), oldest first.
    #[sqlx(skip)]
    pub attempt_log: Vec<Attempt>,
    #[serde(skip)]
    pub created_xid: i64,
    #[serde(skip)]
    pub created_position: i64,
}

impl Listed for Delivery {
    fn cursor(&self) -> Cursor {
        Cursor {
            xid: self.created_xid,
            position: self.created_position,
        }
    }
}

/// One attempt: when, what answered and how long it took.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub(crate) struct Attempt {
    pub series: i32,
    pub attempt: i32,
    pub attempted_at: DateTime<Utc>,
    /// The endpoint's HTTP status, absent when it did not answer.
    pub status_code: Option<i32>,
    pub latency_ms: i32,
    pub error: Option<String>,
    /// `delivered`, `failed` (retried) or `dead`.
    pub outcome: String,
    #[serde(skip)]
    pub event_id: Uuid,
}

const DELIVERIES: &str = "(SELECT *, transaction_id AS created_xid, position AS created_position \
    FROM public.webhook_deliveries) AS deliveries";
const DELIVERY_COLUMNS: &str = "event_id, message_id, event_type, aggregate_type, aggregate_id, \
    sequence, status, series, attempts, next_attempt_at, recorded_at, queued_at, delivered_at, \
    last_status_code, last_error";

/// Attempts shown per delivery.
const ATTEMPTS_PER_DELIVERY: i64 = 50;

/// The delivery log of one subscription (owners and admins): each event queued for it, in the
/// endpoint's order (newest first by default), with its attempts (status, latency, error).
#[utoipa::path(get, path = "/webhooks/{webhook_id}/deliveries", tag = "webhooks",
    params(("webhook_id" = Uuid, Path, description = "The subscription's id"), DeliveryFilters, PageParams),
    responses((status = 200, body = Page<Delivery>, description = "A page of deliveries"), WebhookProblems),
    security(("bearer" = [])))]
pub(crate) async fn list_deliveries(
    State(state): State<AppState>,
    manager: Manager,
    Ids(webhook_id): Ids<Uuid>,
    Params(filters): Params<DeliveryFilters>,
    Params(page): Params<PageParams>,
) -> Result<Json<Page<Delivery>>, ApiError> {
    let mut list = vec![Filter::Id("webhook_id", webhook_id)];
    if let Some(status) = filters.status {
        list.push(Filter::Text("status", status.as_str().to_owned()));
    }
    // the parameters are checked first: a bad page is 422 whichever subscription it names
    let (mut query, limit, _) = list_query(
        DELIVERIES,
        DELIVERY_COLUMNS,
        &manager.workspace_id,
        &list,
        &page,
    )?;
    let exists: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM public.webhook_subscriptions
          WHERE webhook_id = $1 AND workspace_id = $2 AND status <> 'deleted'",
    )
    .bind(webhook_id)
    .bind(&manager.workspace_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    if exists.is_none() {
        return Err(ApiError::NotFound("webhook"));
    }
    let rows: Vec<Delivery> = query
        .build_query_as()
        .fetch_all(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    let (mut items, next_cursor) = page_of(rows, limit);
    let events: Vec<Uuid> = items.iter().map(|d| d.event_id).collect();
    let attempts: Vec<Attempt> = sqlx::query_as(
        "SELECT series, attempt, attempted_at, status_code, latency_ms, error, outcome, event_id
           FROM (SELECT a.*, row_number() OVER (PARTITION BY event_id ORDER BY id DESC) AS n
                   FROM public.webhook_attempts a
                  WHERE webhook_id = $1 AND event_id = ANY($2)) latest
          WHERE n <= $3 ORDER BY event_id, series, attempt",
    )
    .bind(webhook_id)
    .bind(&events)
    .bind(ATTEMPTS_PER_DELIVERY)
    .fetch_all(&state.pool)
    .await
    .map_err(ApiError::internal)?;
    let mut by_event: HashMap<Uuid, Vec<Attempt>> = HashMap::new();
    for attempt in attempts {
        by_event.entry(attempt.event_id).or_default().push(attempt);
    }
    for delivery in &mut items {
        delivery.attempt_log = by_event.remove(&delivery.event_id).unwrap_or_default();
    }
    Ok(Json(Page { items, next_cursor }))
}
