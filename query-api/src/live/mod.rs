//! Live subscriptions: a session's events over Server-Sent Events and WebSocket, resumable, with
//! presence; and a workspace-wide stream of session changes.
//!
//! A session stream registers with the process's [`hub::Hub`] first, then reads the session's
//! history from the event store after the client's position (`Last-Event-ID` or `after`), then
//! delivers the live events, skipping those the history already gave and filling any gap from
//! the store: every event once, in sequence order. A client that does not keep up is closed with
//! an `overflow` message naming the position to resume after; at shutdown every client gets
//! `reconnect` with its position.

pub(crate) mod hub;
pub(crate) mod presence;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use canopy_auth::Claims;
use canopy_relay::{Envelope, StoredEvent};
use futures::Stream;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;
use hub::{Hub, Item, Subscription, session_workspace};
use presence::{Presence, Present};

/// Live configuration (part of query-api's config).
#[derive(Debug, Clone)]
pub(crate) struct LiveConfig {
    pub(crate) subject_prefix: String,
    pub(crate) presence_prefix: String,
    pub(crate) buffer: usize,
    pub(crate) heartbeat: Duration,
    pub(crate) keep_alive: Duration,
}

/// The live machinery of one process.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) hub: Arc<Hub>,
    pub(crate) presence: Arc<Presence>,
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
        Ok(Arc::new(Self {
            hub,
            presence,
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
    /// The server is stopping: reconnect and resume after this sequence.
    Reconnect(i64),
}

/// The person behind a stream: a bearer token, or a stream ticket (browsers' EventSource cannot
/// send headers).
#[derive(Debug, Clone)]
pub(crate) struct Watcher {
    claims: Claims,
    workspace_id: String,
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
                let Query(TicketParam { ticket }) =
                    Query::<TicketParam>::from_request_parts(parts, state)
                        .await
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
    session_id: &str,
    workspace_id: &str,
) -> Result<Uuid, ApiError> {
    let session_id: Uuid = session_id
        .parse()
        .map_err(|_| ApiError::NotFound("session"))?;
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
    /// Pass as `?ticket=` to a stream endpoint; it is not a bearer token.
    pub ticket: String,
    pub expires_in_seconds: i64,
}

/// Mint a short-lived stream ticket for the bearer (for browsers' EventSource).
#[utoipa::path(post, path = "/stream-tickets", tag = "live",
    responses((status = 200, body = StreamTicket), (status = 401, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn stream_ticket(
    State(state): State<AppState>,
    headers: HeaderMap,
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
    let ttl = chrono::Duration::seconds(60);
    let ticket = canopy_auth::mint_hs256(&state.ticket_secret, &claims.ticket(ttl))
        .map_err(ApiError::internal)?;
    Ok(Json(StreamTicket {
        ticket,
        expires_in_seconds: ttl.num_seconds(),
    }))
}

/// Where a stream resumes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct StreamParams {
    /// Resume after this sequence (WebSocket; SSE clients send `Last-Event-ID`).
    pub after: Option<i64>,
    /// A stream ticket, instead of a bearer token (read by the `Watcher` extractor; here for
    /// the document).
    #[allow(
        dead_code,
        reason = "documents the query parameter the Watcher extractor reads"
    )]
    pub ticket: Option<String>,
}

fn resume_point(headers: &HeaderMap, params: &StreamParams) -> Result<i64, ApiError> {
    let from_header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .ok_or_else(|| ApiError::invalid("last-event-id", "must be a sequence number"))
        })
        .transpose()?;
    let after = from_header.or(params.after).unwrap_or(0);
    if after < 0 {
        return Err(ApiError::invalid("after", "must not be negative"));
    }
    Ok(after)
}

/// A session's events as Server-Sent Events: each event's `id` is its sequence (so
/// `Last-Event-ID` resumes), its data the relay's envelope; `presence`, `overflow` and
/// `reconnect` are named events.
#[utoipa::path(get, path = "/sessions/{session_id}/stream", tag = "live",
    params(("session_id" = Uuid, Path), StreamParams, ("Last-Event-ID" = Option<i64>, Header)),
    responses((status = 200, description = "text/event-stream"), (status = 401, body = crate::error::Problem),
              (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn session_sse(
    State(state): State<AppState>,
    watcher: Watcher,
    Path(session_id): Path<String>,
    Query(params): Query<StreamParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let live = live(&state)?.clone();
    let session_id = check_session(&state, &session_id, &watcher.workspace_id).await?;
    let after = resume_point(&headers, &params)?;
    let outs = session_stream(&state, live.clone(), session_id, after, &watcher).await;
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
        Out::Overflow(after) => Event::default()
            .event("overflow")
            .json_data(serde_json::json!({"resume_after": after}))
            .unwrap_or_default(),
        Out::Reconnect(after) => Event::default()
            .event("reconnect")
            .json_data(serde_json::json!({"resume_after": after}))
            .unwrap_or_default(),
    }
}

/// A session's events over WebSocket: text frames of `{"kind": "event"|"presence"|"overflow"|
/// "reconnect", ...}`; resume with `?after=<sequence>`.
#[utoipa::path(get, path = "/sessions/{session_id}/ws", tag = "live",
    params(("session_id" = Uuid, Path), StreamParams),
    responses((status = 101, description = "WebSocket"), (status = 401, body = crate::error::Problem),
              (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn session_ws(
    State(state): State<AppState>,
    watcher: Watcher,
    Path(session_id): Path<String>,
    Query(params): Query<StreamParams>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let live = live(&state)?.clone();
    let session_id = check_session(&state, &session_id, &watcher.workspace_id).await?;
    let after = resume_point(&headers, &params)?;
    let outs = session_stream(&state, live.clone(), session_id, after, &watcher).await;
    let ping = live.config.keep_alive;
    Ok(upgrade.on_upgrade(move |socket| drive_ws(socket, outs, ping)))
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
                    Out::Overflow(after) => serde_json::json!({"kind": "overflow", "resume_after": after}),
                    Out::Reconnect(after) => serde_json::json!({"kind": "reconnect", "resume_after": after}),
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
    let _ = socket.send(Message::Close(None)).await;
}

/// Who is connected to a session now.
#[utoipa::path(get, path = "/sessions/{session_id}/presence", tag = "live",
    params(("session_id" = Uuid, Path)),
    responses((status = 200, body = Vec<Present>), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn session_presence(
    State(state): State<AppState>,
    watcher: Watcher,
    Path(session_id): Path<String>,
) -> Result<Json<Vec<Present>>, ApiError> {
    let live = live(&state)?;
    let session_id = check_session(&state, &session_id, &watcher.workspace_id).await?;
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
    params(StreamParams, ("Last-Event-ID" = Option<String>, Header)),
    responses((status = 200, description = "text/event-stream"), (status = 401, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn workspace_sse(
    State(state): State<AppState>,
    watcher: Watcher,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let live = live(&state)?.clone();
    let resume = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(Order::parse)
                .ok_or_else(|| ApiError::invalid("last-event-id", "not an id this stream sent"))
        })
        .transpose()?;
    // subscribe before reading the history, so that nothing falls between the two
    let subscription = live.hub.subscribe_workspace(&watcher.workspace_id);
    let (tx, rx) = mpsc::channel::<Event>(16);
    let pool = state.pool.clone();
    let shutdown = state.shutdown.clone();
    let workspace = watcher.workspace_id.clone();
    tokio::spawn(follow_workspace(
        pool,
        workspace,
        resume,
        subscription,
        shutdown,
        tx,
    ));
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

    fn parse(text: &str) -> Option<Self> {
        let (xid, position) = text.trim().split_once('.')?;
        Some(Self(xid.parse().ok()?, position.parse().ok()?))
    }

    fn id(self) -> String {
        format!("{}.{}", self.0, self.1)
    }
}

fn change(envelope: &Envelope) -> Event {
    Event::default()
        .id(Order::of(envelope).id())
        .event("change")
        .json_data(SessionChange {
            session_id: envelope.aggregate_id.clone(),
            event_id: envelope.id,
            event_type: envelope.event_type.clone(),
            sequence: envelope.sequence,
            recorded_at: envelope.recorded_at,
        })
        .unwrap_or_default()
}

/// Replays the workspace's changes after `resume` (below the snapshot horizon, as the relay
/// publishes), then follows the live ones in relay order, skipping what was replayed.
async fn follow_workspace(
    pool: PgPool,
    workspace: String,
    resume: Option<Order>,
    mut subscription: Subscription,
    mut shutdown: watch::Receiver<bool>,
    tx: mpsc::Sender<Event>,
) {
    let mut last = resume;
    if let Some(mut cursor) = resume {
        loop {
            let batch = match workspace_history(&pool, &workspace, cursor).await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(%error, "could not read the workspace's history");
                    return;
                }
            };
            let Some(end) = batch.last().map(Order::of) else {
                break;
            };
            for envelope in &batch {
                if tx.send(change(envelope)).await.is_err() {
                    return;
                }
            }
            cursor = end;
            last = Some(end);
        }
    }
    let resume_after =
        |last: Option<Order>| serde_json::json!({"resume_after": last.map(Order::id)}).to_string();
    loop {
        let event = tokio::select! {
            item = subscription.rx.recv() => match item {
                Some(Item::Event(envelope)) => {
                    let order = Order::of(&envelope);
                    if last.is_some_and(|last| order <= last) {
                        continue;
                    }
                    last = Some(order);
                    change(&envelope)
                }
                Some(Item::Presence) => continue,
                None => {
                    let _ = tx.send(Event::default().event("overflow").data(resume_after(last))).await;
                    return;
                }
            },
            _ = shutdown.changed() => {
                let _ = tx.send(Event::default().event("reconnect").data(resume_after(last))).await;
                return;
            }
            _ = tx.closed() => return,
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// The next batch of the workspace's session events after `after`, committed and below the
/// snapshot horizon.
async fn workspace_history(
    pool: &PgPool,
    workspace: &str,
    after: Order,
) -> Result<Vec<Envelope>, sqlx::Error> {
    let rows: Vec<StoredEvent> = sqlx::query_as(
        "SELECT e.event_id, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                e.payload, e.metadata, e.position, e.transaction_id::text::bigint AS transaction_id,
                e.recorded_at
           FROM events e
           JOIN events s ON s.aggregate_type = 'session' AND s.aggregate_id = e.aggregate_id AND s.sequence = 1
          WHERE e.aggregate_type = 'session'
            AND s.payload -> 'SessionStarted' ->> 'workspace_id' = $1
            AND (e.transaction_id, e.position) > ($2::text::xid8, $3)
            AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
          ORDER BY e.transaction_id, e.position
          LIMIT 500",
    )
    .bind(workspace)
    .bind(after.0.to_string())
    .bind(after.1)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| Envelope::from_stored(row).ok())
        .collect())
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Registers, reads the history after `after`, then follows the live events; see the module
/// docs for the guarantees.
async fn session_stream(
    state: &AppState,
    live: Arc<Live>,
    session_id: Uuid,
    after: i64,
    watcher: &Watcher,
) -> impl Stream<Item = Out> + Send + 'static {
    let subscription = live.hub.subscribe_session(session_id);
    let connected = live
        .presence
        .connect(session_id, &watcher.claims.sub, &watcher.claims.name)
        .await;
    let (tx, rx) = mpsc::channel::<Out>(16);
    let pool = state.pool.clone();
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let _connected = connected;
        follow(pool, live, session_id, after, subscription, shutdown, tx).await;
    });
    tokio_stream_from(rx)
}

async fn follow(
    pool: PgPool,
    live: Arc<Live>,
    session_id: Uuid,
    mut last: i64,
    mut subscription: Subscription,
    mut shutdown: watch::Receiver<bool>,
    tx: mpsc::Sender<Out>,
) {
    // history first: everything committed after the client's position
    match history(&pool, session_id, last, None).await {
        Ok(events) => {
            for event in events {
                last = event.sequence;
                if tx.send(Out::Event(Arc::new(event))).await.is_err() {
                    return;
                }
            }
        }
        Err(error) => {
            tracing::warn!(%error, "could not read a session's history");
            return;
        }
    }
    if tx
        .send(Out::Presence(live.presence.list(session_id)))
        .await
        .is_err()
    {
        return;
    }
    loop {
        let out = tokio::select! {
            item = subscription.rx.recv() => item,
            _ = shutdown.changed() => {
                let _ = tx.send(Out::Reconnect(last)).await;
                return;
            }
            _ = tx.closed() => return,
        };
        match out {
            Some(Item::Event(event)) => {
                if event.sequence <= last {
                    continue;
                }
                if event.sequence > last + 1 {
                    // an event the live feed has not brought (yet): the store has it
                    let Ok(missing) = history(&pool, session_id, last, Some(event.sequence)).await
                    else {
                        return;
                    };
                    for missed in missing {
                        if tx.send(Out::Event(Arc::new(missed))).await.is_err() {
                            return;
                        }
                    }
                }
                last = event.sequence;
                if tx.send(Out::Event(event)).await.is_err() {
                    return;
                }
            }
            Some(Item::Presence) => {
                if tx
                    .send(Out::Presence(live.presence.list(session_id)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            None => {
                if subscription.overflowed.load(Ordering::SeqCst) {
                    let _ = tx.send(Out::Overflow(last)).await;
                }
                return;
            }
        }
    }
}

async fn history(
    pool: &PgPool,
    session_id: Uuid,
    after: i64,
    before: Option<i64>,
) -> Result<Vec<Envelope>, sqlx::Error> {
    let rows: Vec<StoredEvent> = sqlx::query_as(
        "SELECT event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                position, transaction_id::text::bigint AS transaction_id, recorded_at
           FROM events
          WHERE aggregate_type = 'session' AND aggregate_id = $1 AND sequence > $2
            AND ($3::bigint IS NULL OR sequence < $3)
          ORDER BY sequence",
    )
    .bind(session_id.to_string())
    .bind(after)
    .bind(before)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| Envelope::from_stored(row).ok())
        .collect())
}
