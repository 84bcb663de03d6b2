//! Live subscriptions: a session's events over Server-Sent Events and WebSocket, resumable, with
//! presence; and a workspace-wide stream of session changes.
//!
//! A session stream registers with the process's [`hub::Hub`] first, then reads the session's
//! history from the event store after the client's position (`Last-Event-ID` or `after`), then
//! delivers the live events, skipping those the history already gave and filling any gap from
//! the store: every event once, in sequence order. A client that does not keep up is closed with
//! an `overflow` message naming the position to resume after; at shutdown, or when the store
//! cannot be read, every client gets `reconnect` with its position.
//!
//! What one stream holds is bounded whatever the history's length: the history and every gap
//! are read a page at a time ([`history`]), the next page only once the previous one is in the
//! stream's bounded channel. How many streams there are is bounded too ([`slots`]): per person
//! and per process.
//!
//! A stored event that does not decode is never skipped: the stream ends with `unreadable`,
//! naming the position to resume after and the event's sequence, and the error is logged and
//! counted (`canopy_live_unreadable_total{source="store"}`).

pub(crate) mod asyncapi;
pub(crate) mod history;
pub(crate) mod hub;
pub(crate) mod presence;
pub(crate) mod slots;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use canopy_auth::Claims;
use canopy_relay::Envelope;
use futures::Stream;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;
use crate::query::{Ids, Params};
use crate::routes::{
    PresenceProblems, SessionEvents, SessionStreamProblems, SocketProblems, TicketProblems,
    WorkspaceChanges, WorkspaceStreamProblems,
};
use history::{ChangeRow, PageLimits};
use hub::{Hub, Item, Subscription, session_workspace};
use presence::{Presence, Present};
use slots::{Slot, Slots};

/// Live configuration (part of query-api's config).
#[derive(Debug, Clone)]
pub(crate) struct LiveConfig {
    pub(crate) subject_prefix: String,
    pub(crate) presence_prefix: String,
    pub(crate) buffer: usize,
    pub(crate) heartbeat: Duration,
    pub(crate) keep_alive: Duration,
    /// How much of the history a stream reads from the store at once.
    pub(crate) page: PageLimits,
    /// Open streams one person may have in this process.
    pub(crate) max_streams_per_person: usize,
    /// Open streams this process takes in all.
    pub(crate) max_streams: usize,
}

/// Messages a stream may have queued for its client: with a page of history, all that one
/// stream holds.
const STREAM_CHANNEL: usize = 16;

/// The live machinery of one process.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) hub: Arc<Hub>,
    pub(crate) presence: Arc<Presence>,
    pub(crate) slots: Arc<Slots>,
    pub(crate) config: LiveConfig,
}

impl Live {
    /// Subscribes once to session events and to presence, and starts the fan-out tasks.
    pub(crate) async fn start(
        client: async_nats::Client,
        pool: PgPool,
        config: LiveConfig,
    ) -> anyhow::Result<Arc<Self>> {
        let presence = Presence::new(
            client.clone(),
            config.presence_prefix.clone(),
            config.heartbeat,
        );
        let hub = Hub::new(pool, config.buffer);
        let events = client
            .subscribe(format!("{}.session.>", config.subject_prefix))
            .await?;
        let beats = client.subscribe(presence.subject()).await?;
        tokio::spawn(hub.clone().run(events));
        tokio::spawn(presence.clone().listen(beats, hub.clone()));
        tokio::spawn(presence.clone().heartbeat(hub.clone()));
        let slots = Slots::new(config.max_streams_per_person, config.max_streams);
        Ok(Arc::new(Self {
            hub,
            presence,
            slots,
            config,
        }))
    }
}

/// What a stream sends.
#[derive(Debug, Clone)]
enum Out {
    Event(Arc<Envelope>),
    Presence(Vec<Present>),
    /// The client fell behind and is closed: resume after this sequence.
    Overflow(i64),
    /// The server is stopping, or could not read the store: reconnect and resume after this
    /// sequence.
    Reconnect(i64),
    /// The token that opened the stream expired: reconnect with a fresh one and resume after
    /// this sequence.
    Reauth(i64),
    /// The stored event `sequence` does not decode and the stream ends before it (resume after
    /// `resume_after`, once the event is repaired; retrying at once meets it again).
    Unreadable {
        resume_after: i64,
        sequence: i64,
    },
}

impl Out {
    /// The SSE event name, the WebSocket frame's `kind`.
    fn kind(&self) -> &'static str {
        match self {
            Self::Event(_) => "event",
            Self::Presence(_) => "presence",
            Self::Overflow(_) => "overflow",
            Self::Reconnect(_) => "reconnect",
            Self::Reauth(_) => "reauth",
            Self::Unreadable { .. } => "unreadable",
        }
    }

    /// The body of the messages that end a stream.
    fn ending(&self) -> Option<serde_json::Value> {
        match self {
            Self::Overflow(after) | Self::Reconnect(after) | Self::Reauth(after) => {
                Some(serde_json::json!({"resume_after": after}))
            }
            Self::Unreadable {
                resume_after,
                sequence,
            } => Some(serde_json::json!({"resume_after": resume_after, "sequence": sequence})),
            Self::Event(_) | Self::Presence(_) => None,
        }
    }
}

/// The person behind a stream: a bearer token, or a stream ticket (browsers' EventSource cannot
/// send headers), which opens only the stream it was minted for.
#[derive(Debug, Clone)]
pub(crate) struct Watcher {
    claims: Claims,
    workspace_id: String,
    /// When the stream must end: the bearer token's expiry (a ticket's bearer's).
    until: i64,
}

impl Watcher {
    /// Refuses a ticket minted for another stream (as an invalid ticket: 401, whoever's stream
    /// it names), so that a ticket opens exactly one stream.
    fn may_open(&self, stream: &str) -> Result<(), ApiError> {
        match self.claims.stream.as_deref() {
            None => Ok(()),
            Some(bound) if bound == stream => Ok(()),
            Some(_) => Err(ApiError::Unauthorized),
        }
    }

    /// The instant the stream must end at, with its token.
    fn deadline(&self) -> tokio::time::Instant {
        let left = self.until - chrono::Utc::now().timestamp();
        tokio::time::Instant::now() + Duration::from_secs(u64::try_from(left).unwrap_or(0))
    }
}

#[derive(Debug, Deserialize)]
struct TicketParam {
    ticket: Option<String>,
}

impl FromRequestParts<AppState> for Watcher {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        let claims = match bearer {
            Some(token) => state.verifier.verify(token.trim()),
            None => {
                let TicketParam { ticket } = canopy_http::params::query(parts.uri.query())
                    .map_err(|_| ApiError::Unauthorized)?;
                let ticket = ticket.ok_or(ApiError::Unauthorized)?;
                state.verifier.verify_ticket(&ticket)
            }
        }
        .map_err(|_| ApiError::Unauthorized)?;
        if !claims.role.can_read() {
            return Err(ApiError::Forbidden);
        }
        let workspace_id = claims.workspace_id.clone().ok_or(ApiError::Forbidden)?;
        Ok(Self {
            until: claims.valid_until(),
            claims,
            workspace_id,
        })
    }
}

fn live(state: &AppState) -> Result<&Arc<Live>, ApiError> {
    state.live.as_ref().ok_or(ApiError::Unavailable)
}

async fn check_session(
    state: &AppState,
    session_id: Uuid,
    workspace_id: &str,
) -> Result<Uuid, ApiError> {
    let workspace = session_workspace(&state.pool, session_id)
        .await
        .map_err(ApiError::internal)?;
    if workspace.as_deref() == Some(workspace_id) {
        Ok(session_id)
    } else {
        Err(ApiError::NotFound("session"))
    }
}

/// A ticket for a stream.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StreamTicket {
    /// Pass as `?ticket=` to the stream it was minted for; it is not a bearer token.
    pub ticket: String,
    /// How long the ticket opens its stream: a minute at most, never past the bearer token's
    /// expiry.
    pub expires_in_seconds: i64,
}

/// Which stream a ticket opens.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TicketFor {
    /// The session whose stream (SSE or WebSocket) the ticket opens; without it, the ticket
    /// opens the workspace stream (`/stream`) only.
    pub session_id: Option<Uuid>,
}

/// Mint a short-lived stream ticket for the bearer (for browsers' EventSource), for one stream:
/// a session's (`?session_id=`) or, without it, the workspace's. It opens that stream only, for a minute at most
/// and never past the bearer token's expiry; a stream opened with it ends (with `reauth`) when
/// the bearer token expires. It may be used again within its minute (EventSource reconnects with
/// the same URL). Another workspace's session is 404, as one that does not exist.
#[utoipa::path(post, path = "/stream-tickets", tag = "live",
    params(TicketFor),
    responses((status = 200, body = StreamTicket, description = "A stream ticket, valid for a minute at most"), TicketProblems),
    security(("bearer" = [])))]
pub(crate) async fn stream_ticket(
    State(state): State<AppState>,
    headers: HeaderMap,
    Params(target): Params<TicketFor>,
) -> Result<Json<StreamTicket>, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or(ApiError::Unauthorized)?;
    let claims = state
        .verifier
        .verify(token.trim())
        .map_err(|_| ApiError::Unauthorized)?;
    if !claims.role.can_read() {
        return Err(ApiError::Forbidden);
    }
    let workspace_id = claims.workspace_id.clone().ok_or(ApiError::Forbidden)?;
    let stream = match target.session_id {
        Some(session_id) => {
            check_session(&state, session_id, &workspace_id).await?;
            canopy_auth::session_stream(session_id)
        }
        None => canopy_auth::WORKSPACE_STREAM.to_owned(),
    };
    let ticket = claims.ticket(
        stream,
        chrono::Duration::seconds(canopy_auth::TICKET_TTL_SECS),
    );
    let expires_in_seconds = (ticket.exp - chrono::Utc::now().timestamp()).max(0);
    let ticket =
        canopy_auth::mint_hs256(&state.ticket_secret, &ticket).map_err(ApiError::internal)?;
    Ok(Json(StreamTicket {
        ticket,
        expires_in_seconds,
    }))
}

/// Where a stream resumes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct StreamParams {
    /// Resume after this sequence (WebSocket; SSE clients send `Last-Event-ID`, which wins).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// A stream ticket, instead of a bearer token (read by the `Watcher` extractor; here for
    /// the document).
    #[allow(
        dead_code,
        reason = "documents the query parameter the Watcher extractor reads"
    )]
    pub ticket: Option<String>,
}

/// How a browser's EventSource authenticates (the workspace stream resumes by `Last-Event-ID`
/// only).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TicketParams {
    /// A stream ticket, instead of a bearer token (read by the `Watcher` extractor; here for
    /// the document).
    #[allow(
        dead_code,
        reason = "documents the query parameter the Watcher extractor reads"
    )]
    pub ticket: Option<String>,
}

fn resume_point(headers: &HeaderMap, params: &StreamParams) -> Result<i64, ApiError> {
    if params.after.is_some_and(|after| after < 0) {
        return Err(ApiError::invalid("after", "must not be negative"));
    }
    let from_header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|after| *after >= 0)
                .ok_or_else(|| {
                    ApiError::invalid("Last-Event-ID", "must be a sequence number (0 or more)")
                })
        })
        .transpose()?;
    Ok(from_header.or(params.after).unwrap_or(0))
}

/// A session's events as Server-Sent Events: each event's `id` is its sequence (so
/// `Last-Event-ID` resumes), its data the relay's envelope; `presence`, `overflow`,
/// `reconnect` and `unreadable` are named events, and a comment line keeps the connection
/// alive. Every message is described in `openapi/live.asyncapi.json`.
#[utoipa::path(get, path = "/sessions/{session_id}/stream", tag = "live",
    params(("session_id" = Uuid, Path, description = "The session's id"), StreamParams,
           ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0, description = "Resume after this sequence")),
    responses(SessionEvents, SessionStreamProblems),
    security(("bearer" = [])))]
pub(crate) async fn session_sse(
    State(state): State<AppState>,
    watcher: Watcher,
    Ids(session_id): Ids<Uuid>,
    Params(params): Params<StreamParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = resume_point(&headers, &params)?;
    watcher.may_open(&canopy_auth::session_stream(session_id))?;
    let live = live(&state)?.clone();
    let session_id = check_session(&state, session_id, &watcher.workspace_id).await?;
    let slot = live.slots.acquire(&watcher.claims.sub)?;
    let outs = session_stream(&state, live.clone(), session_id, after, &watcher, slot).await;
    let events = futures::StreamExt::map(outs, |out| {
        Ok::<_, std::convert::Infallible>(sse_event(out))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(live.config.keep_alive))
        .into_response())
}

fn sse_event(out: Out) -> Event {
    match out {
        Out::Event(envelope) => Event::default()
            .id(envelope.sequence.to_string())
            .json_data(&*envelope)
            .unwrap_or_default(),
        Out::Presence(present) => Event::default()
            .event("presence")
            .json_data(&present)
            .unwrap_or_default(),
        ending => Event::default()
            .event(ending.kind())
            .json_data(ending.ending())
            .unwrap_or_default(),
    }
}

/// A session's events over WebSocket: text frames of `{"kind": "event"|"presence"|"overflow"|
/// "reconnect"|"unreadable", ...}` (described in `openapi/live.asyncapi.json`), pings keep the
/// connection alive; resume with `?after=<sequence>`.
#[utoipa::path(get, path = "/sessions/{session_id}/ws", tag = "live",
    params(("session_id" = Uuid, Path, description = "The session's id"), StreamParams),
    responses((status = 101, description = "Switching to WebSocket (frames in `openapi/live.asyncapi.json`)"),
              SocketProblems),
    security(("bearer" = [])))]
pub(crate) async fn session_ws(
    State(state): State<AppState>,
    watcher: Watcher,
    Ids(session_id): Ids<Uuid>,
    Params(params): Params<StreamParams>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let after = resume_point(&headers, &params)?;
    watcher.may_open(&canopy_auth::session_stream(session_id))?;
    let upgrade = upgrade.map_err(|_| ApiError::UpgradeRequired)?;
    let live = live(&state)?.clone();
    let session_id = check_session(&state, session_id, &watcher.workspace_id).await?;
    let slot = live.slots.acquire(&watcher.claims.sub)?;
    let outs = session_stream(&state, live.clone(), session_id, after, &watcher, slot).await;
    let ping = live.config.keep_alive;
    // clients send nothing but control frames: refuse anything bigger than one
    Ok(upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| drive_ws(socket, outs, ping)))
}

async fn drive_ws(
    mut socket: WebSocket,
    outs: impl Stream<Item = Out> + Send + 'static,
    ping: Duration,
) {
    let mut outs = Box::pin(outs);
    let mut tick = tokio::time::interval(ping);
    tick.tick().await;
    loop {
        tokio::select! {
            out = futures::StreamExt::next(&mut outs) => {
                let Some(out) = out else { break };
                let frame = match out {
                    Out::Event(envelope) => serde_json::json!({"kind": "event", "event": &*envelope}),
                    Out::Presence(present) => serde_json::json!({"kind": "presence", "present": present}),
                    ending => {
                        let mut frame = ending.ending().unwrap_or_default();
                        frame["kind"] = ending.kind().into();
                        frame
                    }
                };
                if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => {
                match incoming {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    _ => {}
                }
            }
            _ = tick.tick() => {
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    return;
                }
            }
        }
    }
    if socket.send(Message::Close(None)).await.is_err() {
        return;
    }
    // The closing handshake: read until the client's Close. Closing the connection with frames
    // of the client's unread (the Pongs of a client catching up) resets it, and a reset drops
    // what the client has not read yet, the ending frame (where to resume) included.
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
        while let Some(Ok(message)) = socket.recv().await {
            if let Message::Close(_) = message {
                break;
            }
        }
    })
    .await;
}

/// The largest message a WebSocket client may send (it has nothing to say but Pong and Close):
/// a bigger one ends the connection.
const MAX_CLIENT_MESSAGE: usize = 4 * 1024;

/// How long a WebSocket waits for the client's Close after its own.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(30);

/// Who is connected to a session now (a bearer token only: a stream ticket opens its stream and
/// nothing else).
#[utoipa::path(get, path = "/sessions/{session_id}/presence", tag = "live",
    params(("session_id" = Uuid, Path, description = "The session's id")),
    responses((status = 200, body = Vec<Present>, description = "Who is connected"), PresenceProblems),
    security(("bearer" = [])))]
pub(crate) async fn session_presence(
    State(state): State<AppState>,
    watcher: Watcher,
    Ids(session_id): Ids<Uuid>,
) -> Result<Json<Vec<Present>>, ApiError> {
    if watcher.claims.stream.is_some() {
        return Err(ApiError::Unauthorized);
    }
    let live = live(&state)?;
    let session_id = check_session(&state, session_id, &watcher.workspace_id).await?;
    Ok(Json(live.presence.list(session_id)))
}

/// A change to a session of the workspace.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SessionChange {
    pub session_id: String,
    pub event_id: Uuid,
    pub event_type: String,
    pub sequence: i64,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
}

/// Changes to the workspace's sessions (SSE; named event `change`, data [`SessionChange`]).
/// Each change's `id` is its place in the relay's order; reconnecting with `Last-Event-ID`
/// replays what was missed, once and in order. Without it the stream starts with what comes next
/// (list `/sessions` first, then watch).
#[utoipa::path(get, path = "/stream", tag = "live",
    params(TicketParams,
           ("Last-Event-ID" = Option<String>, Header, nullable = false, pattern = r"^[0-9]{1,19}\.[0-9]{1,18}$", example = "1.1",
            description = "Resume after this change (an `id` this stream sent)")),
    responses(WorkspaceChanges, WorkspaceStreamProblems),
    security(("bearer" = [])))]
pub(crate) async fn workspace_sse(
    State(state): State<AppState>,
    watcher: Watcher,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let resume = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(Order::parse)
                .ok_or_else(|| ApiError::invalid("Last-Event-ID", "not an id this stream sent"))
        })
        .transpose()?;
    watcher.may_open(canopy_auth::WORKSPACE_STREAM)?;
    let live = live(&state)?.clone();
    let slot = live.slots.acquire(&watcher.claims.sub)?;
    // subscribe before reading the history, so that nothing falls between the two
    let subscription = live.hub.subscribe_workspace(&watcher.workspace_id);
    let (tx, rx) = mpsc::channel::<Event>(STREAM_CHANNEL);
    let feed = WorkspaceFeed {
        pool: state.pool.clone(),
        workspace: watcher.workspace_id.clone(),
        page: live.config.page.events,
        shutdown: state.shutdown.clone(),
        deadline: watcher.deadline(),
        tx,
    };
    tokio::spawn(async move {
        let _slot = slot;
        feed.follow(resume, subscription).await;
    });
    let events = futures::StreamExt::map(tokio_stream_from(rx), Ok::<_, std::convert::Infallible>);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(live.config.keep_alive))
        .into_response())
}

/// A place in the relay's order: `(transaction id, position)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Order(u64, i64);

impl Order {
    fn of(envelope: &Envelope) -> Self {
        Self(envelope.transaction_id, envelope.position)
    }

    fn of_row(row: &ChangeRow) -> Self {
        Self(
            u64::try_from(row.transaction_id).unwrap_or_default(),
            row.position,
        )
    }

    /// Exactly the documented pattern, `^[0-9]{1,19}\.[0-9]{1,18}$`.
    fn parse(text: &str) -> Option<Self> {
        let (xid, position) = text.trim().split_once('.')?;
        let digits = |part: &str, most: usize| {
            (1..=most).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit())
        };
        if !digits(xid, 19) || !digits(position, 18) {
            return None;
        }
        Some(Self(xid.parse().ok()?, position.parse().ok()?))
    }

    fn id(self) -> String {
        format!("{}.{}", self.0, self.1)
    }
}

fn change(order: Order, change: SessionChange) -> Event {
    Event::default()
        .id(order.id())
        .event("change")
        .json_data(change)
        .unwrap_or_default()
}

fn live_change(envelope: &Envelope) -> Event {
    change(
        Order::of(envelope),
        SessionChange {
            session_id: envelope.aggregate_id.clone(),
            event_id: envelope.id,
            event_type: envelope.event_type.clone(),
            sequence: envelope.sequence,
            recorded_at: envelope.recorded_at,
        },
    )
}

fn stored_change(row: ChangeRow) -> Event {
    change(
        Order::of_row(&row),
        SessionChange {
            session_id: row.session_id,
            event_id: row.event_id,
            event_type: row.event_type,
            sequence: row.sequence,
            recorded_at: row.recorded_at,
        },
    )
}

/// What feeds one workspace stream.
struct WorkspaceFeed {
    pool: PgPool,
    workspace: String,
    page: usize,
    shutdown: watch::Receiver<bool>,
    /// When the token that opened the stream expires.
    deadline: tokio::time::Instant,
    tx: mpsc::Sender<Event>,
}

impl WorkspaceFeed {
    /// Replays the workspace's changes after `resume` a page at a time (below the snapshot
    /// horizon, as the relay publishes), then follows the live ones in relay order, skipping
    /// what was replayed.
    async fn follow(mut self, resume: Option<Order>, mut subscription: Subscription) {
        let mut last = resume;
        if let Some(mut cursor) = resume {
            loop {
                let page = match history::workspace_page(
                    &self.pool,
                    &self.workspace,
                    (cursor.0, cursor.1),
                    self.page,
                )
                .await
                {
                    Ok(page) => page,
                    Err(error) => {
                        tracing::warn!(%error, "could not read the workspace's history");
                        self.end("reconnect", last).await;
                        return;
                    }
                };
                let complete = page.len() < self.page;
                for row in page {
                    let order = Order::of_row(&row);
                    let sent = tokio::select! {
                        sent = self.tx.send(stored_change(row)) => sent.is_ok(),
                        _ = self.shutdown.changed() => {
                            self.end("reconnect", last).await;
                            return;
                        }
                        () = tokio::time::sleep_until(self.deadline) => {
                            self.end("reauth", last).await;
                            return;
                        }
                    };
                    if !sent {
                        return;
                    }
                    cursor = order;
                    last = Some(order);
                }
                if complete {
                    break;
                }
            }
        }
        loop {
            let event = tokio::select! {
                item = subscription.rx.recv() => match item {
                    Some(Item::Event(envelope)) => {
                        let order = Order::of(&envelope);
                        if last.is_some_and(|last| order <= last) {
                            continue;
                        }
                        last = Some(order);
                        live_change(&envelope)
                    }
                    Some(Item::Presence) => continue,
                    None => {
                        self.end("overflow", last).await;
                        return;
                    }
                },
                _ = self.shutdown.changed() => {
                    self.end("reconnect", last).await;
                    return;
                }
                () = tokio::time::sleep_until(self.deadline) => {
                    self.end("reauth", last).await;
                    return;
                }
                _ = self.tx.closed() => return,
            };
            if self.tx.send(event).await.is_err() {
                return;
            }
        }
    }

    /// Ends the stream with `kind` and the place to resume after.
    async fn end(&self, kind: &'static str, last: Option<Order>) {
        let body = serde_json::json!({"resume_after": last.map(Order::id)}).to_string();
        let _ = self.tx.send(Event::default().event(kind).data(body)).await;
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Registers, reads the history after `after`, then follows the live events; see the module
/// docs for the guarantees. The stream's `slot` is held until it ends.
async fn session_stream(
    state: &AppState,
    live: Arc<Live>,
    session_id: Uuid,
    after: i64,
    watcher: &Watcher,
    slot: Slot,
) -> impl Stream<Item = Out> + Send + 'static {
    let subscription = live.hub.subscribe_session(session_id);
    let connected = live
        .presence
        .connect(session_id, &watcher.claims.sub, &watcher.claims.name)
        .await;
    let (tx, rx) = mpsc::channel::<Out>(STREAM_CHANNEL);
    let feed = SessionFeed {
        pool: state.pool.clone(),
        page: live.config.page,
        session_id,
        last: after,
        shutdown: state.shutdown.clone(),
        deadline: watcher.deadline(),
        tx,
        live,
    };
    tokio::spawn(async move {
        let _slot = slot;
        let _connected = connected;
        feed.follow(subscription).await;
    });
    tokio_stream_from(rx)
}

/// What feeds one session stream, and the last sequence it sent.
struct SessionFeed {
    pool: PgPool,
    live: Arc<Live>,
    page: PageLimits,
    session_id: Uuid,
    last: i64,
    shutdown: watch::Receiver<bool>,
    /// When the token that opened the stream expires.
    deadline: tokio::time::Instant,
    tx: mpsc::Sender<Out>,
}

/// Why sending from the store stopped early.
enum Stopped {
    /// The client is gone.
    Closed,
    /// The server is stopping.
    Shutdown,
    /// The token that opened the stream expired.
    Expired,
    Store(sqlx::Error),
    Unreadable {
        sequence: i64,
        event_id: Uuid,
        error: serde_json::Error,
    },
}

impl SessionFeed {
    async fn follow(mut self, mut subscription: Subscription) {
        // history first: everything committed after the client's position
        if let Err(stopped) = self.replay(None).await {
            self.stop(stopped).await;
            return;
        }
        let present = Out::Presence(self.live.presence.list(self.session_id));
        if self.tx.send(present).await.is_err() {
            return;
        }
        loop {
            let item = tokio::select! {
                item = subscription.rx.recv() => item,
                _ = self.shutdown.changed() => {
                    self.stop(Stopped::Shutdown).await;
                    return;
                }
                () = tokio::time::sleep_until(self.deadline) => {
                    self.stop(Stopped::Expired).await;
                    return;
                }
                _ = self.tx.closed() => return,
            };
            match item {
                Some(Item::Event(event)) => {
                    if event.sequence <= self.last {
                        continue;
                    }
                    if event.sequence > self.last + 1 {
                        // events the live feed has not brought (yet): the store has them
                        if let Err(stopped) = self.replay(Some(event.sequence)).await {
                            self.stop(stopped).await;
                            return;
                        }
                        if event.sequence != self.last + 1 {
                            // committed events the store does not show: never skip them
                            tracing::warn!(session_id = %self.session_id, last = self.last,
                                sequence = event.sequence, "the store lacks events the live feed has passed");
                            let _ = self.tx.send(Out::Reconnect(self.last)).await;
                            return;
                        }
                    }
                    let sequence = event.sequence;
                    if self.tx.send(Out::Event(event)).await.is_err() {
                        return;
                    }
                    self.last = sequence;
                }
                Some(Item::Presence) => {
                    let present = Out::Presence(self.live.presence.list(self.session_id));
                    if self.tx.send(present).await.is_err() {
                        return;
                    }
                }
                None => {
                    if subscription.overflowed.load(Ordering::SeqCst) {
                        let _ = self.tx.send(Out::Overflow(self.last)).await;
                    }
                    return;
                }
            }
        }
    }

    /// Sends the session's stored events after the last one sent and before `before` (all of
    /// them without), a page at a time: the next page is read only once the previous one is in
    /// the channel, so the stream holds at most a page and the channel's buffer.
    async fn replay(&mut self, before: Option<i64>) -> Result<(), Stopped> {
        loop {
            if before.is_some_and(|before| self.last + 1 >= before) {
                return Ok(());
            }
            let page =
                history::session_page(&self.pool, self.session_id, self.last, before, self.page)
                    .await
                    .map_err(Stopped::Store)?;
            if page.is_empty() {
                return Ok(());
            }
            for row in page {
                let (sequence, event_id) = (row.sequence, row.event_id);
                let envelope = Envelope::from_stored(row).map_err(|error| Stopped::Unreadable {
                    sequence,
                    event_id,
                    error,
                })?;
                tokio::select! {
                    sent = self.tx.send(Out::Event(Arc::new(envelope))) => {
                        sent.map_err(|_| Stopped::Closed)?;
                    }
                    _ = self.shutdown.changed() => return Err(Stopped::Shutdown),
                    () = tokio::time::sleep_until(self.deadline) => return Err(Stopped::Expired),
                }
                self.last = sequence;
            }
        }
    }

    /// Ends the stream, telling the client where to resume when it can be told.
    async fn stop(&self, stopped: Stopped) {
        let last = self.last;
        let out = match stopped {
            Stopped::Closed => return,
            Stopped::Shutdown => Out::Reconnect(last),
            Stopped::Expired => Out::Reauth(last),
            Stopped::Store(error) => {
                tracing::warn!(%error, session_id = %self.session_id, "could not read a session's history");
                Out::Reconnect(last)
            }
            Stopped::Unreadable {
                sequence,
                event_id,
                error,
            } => {
                metrics::counter!("canopy_live_unreadable_total", "source" => "store").increment(1);
                tracing::error!(%error, session_id = %self.session_id, sequence, %event_id,
                    "a stored event does not decode: the stream ends before it");
                Out::Unreadable {
                    resume_after: last,
                    sequence,
                }
            }
        };
        let _ = self.tx.send(out).await;
    }
}
