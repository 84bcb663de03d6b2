//! The endpoints: read models (get by id, list with filters), analytics, operations; and the
//! error answers each kind of endpoint documents.

pub(crate) mod analytics;
pub(crate) mod audit;
pub(crate) mod budgets;
pub(crate) mod read;
pub(crate) mod webhooks;

use std::collections::BTreeMap;

use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, RefOr};

/// The documented problem+json answer of `status`: what it means here and its codes.
fn problem(status: u16) -> (String, RefOr<Response>) {
    let (description, retry_after) = match status {
        401 => (
            "`unauthorized`: missing or invalid bearer token (or stream ticket)",
            false,
        ),
        403 => (
            "`forbidden`: the caller's role may not read (the runner) or, on `/audit`, may not audit (only owner, admin and auditor may), on `/webhooks` may not manage webhooks (only owner and admin may), or its token names no workspace",
            false,
        ),
        404 => (
            "`not_found`: no such resource in the caller's workspace",
            false,
        ),
        409 => (
            "`not_yet_consistent`: the projection did not reach `consistent_with` in time (see Retry-After)",
            true,
        ),
        422 => (
            "`validation_failed`: a path or query parameter breaks its schema; `errors` names it",
            false,
        ),
        426 => (
            "`upgrade_required`: not a WebSocket handshake (this endpoint speaks WebSocket only)",
            false,
        ),
        429 => (
            "`too_many_streams`: this person has their share of live streams open here; `too_many_waits`: this person has their share of reads waiting for `consistent_with` here",
            false,
        ),
        500 => (
            "`internal`: internal error (the body carries only a request id)",
            false,
        ),
        503 => (
            "`unavailable` (the database does not answer, or live streams are off) or `streams_at_capacity` (see Retry-After)",
            true,
        ),
        _ => ("Error", false),
    };
    (
        status.to_string(),
        canopy_http::problem_response(description, retry_after),
    )
}

/// A set of documented problem answers, for `responses(...)` of `#[utoipa::path]`.
macro_rules! problems {
    ($($(#[$doc:meta])* $name:ident: $($status:literal),+;)+) => {
        $(
            $(#[$doc])*
            pub(crate) struct $name;

            impl utoipa::IntoResponses for $name {
                fn responses() -> BTreeMap<String, RefOr<Response>> {
                    [$($status),+].into_iter().map(problem).collect()
                }
            }
        )+
    };
}

problems! {
    /// Lists: filters and paging (422), read-your-writes (409).
    ListProblems: 401, 403, 409, 422, 429, 500;
    /// One resource by id.
    GetProblems: 401, 403, 404, 409, 422, 429, 500;
    /// Analytics: filters (422).
    AnalyticsProblems: 401, 403, 422, 500;
    /// The budgets: filters (422), a session of another workspace (404).
    BudgetProblems: 401, 403, 404, 422, 500;
    /// Minting a stream ticket.
    TicketProblems: 401, 403, 404, 422, 500;
    /// A session's SSE stream.
    SessionStreamProblems: 401, 403, 404, 422, 429, 500, 503;
    /// A session's WebSocket.
    SocketProblems: 401, 403, 404, 422, 426, 429, 500, 503;
    /// Who is connected to a session.
    PresenceProblems: 401, 403, 404, 422, 500, 503;
    /// The workspace's SSE stream.
    WorkspaceStreamProblems: 401, 403, 422, 429, 500, 503;
    /// Auditors' reads.
    AuditProblems: 401, 403, 404, 422, 500;
    /// Webhook lists (owners and admins).
    WebhookListProblems: 401, 403, 422, 500;
    /// A webhook's deliveries (owners and admins).
    WebhookProblems: 401, 403, 404, 422, 500;
}

/// A `200 text/event-stream` answer whose schema describes each event (as OpenAPI 3.2's
/// `itemSchema` does, and tools reading 3.1 take `schema` to): its `event` name (absent for SSE's
/// default, `message`), its `id` and its JSON `data`. The messages themselves are in
/// `openapi/live.asyncapi.json`.
fn event_stream(description: &str, events: &[&str], id_pattern: &str) -> RefOr<Response> {
    let text = || ObjectBuilder::new().schema_type(Type::String);
    let event = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "event",
            text()
                .enum_values(Some(events.iter().copied()))
                .description(Some("The message's name (absent: `message`)")),
        )
        .property(
            "id",
            text()
                .pattern(Some(id_pattern))
                .description(Some("Where to resume after this event (`Last-Event-ID`)")),
        )
        .property(
            "data",
            text()
                .content_media_type("application/json")
                .description(Some("The message's JSON payload")),
        )
        .required("data");
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "text/event-stream",
                ContentBuilder::new().schema(Some(event)).build(),
            )
            .build(),
    )
}

/// A session's SSE stream.
pub(crate) struct SessionEvents;

impl utoipa::IntoResponses for SessionEvents {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        [(
            "200".to_owned(),
            event_stream(
                "The session's events, then `presence`, then the live events; ends with \
                 `overflow`, `reconnect` or `unreadable` (messages in `openapi/live.asyncapi.json`)",
                &["message", "presence", "overflow", "reconnect", "unreadable"],
                "^[0-9]{1,19}$",
            ),
        )]
        .into()
    }
}

/// The workspace's SSE stream.
pub(crate) struct WorkspaceChanges;

impl utoipa::IntoResponses for WorkspaceChanges {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        [(
            "200".to_owned(),
            event_stream(
                "Changes to the workspace's sessions; ends with `overflow` or `reconnect` \
                 (messages in `openapi/live.asyncapi.json`)",
                &["change", "overflow", "reconnect"],
                "^[0-9]{1,19}\\.[0-9]{1,18}$",
            ),
        )]
        .into()
    }
}
