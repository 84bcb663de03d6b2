//! The `/event` SSE stream, parsed into typed [`Event`]s.
//!
//! Each SSE message is `data: {"id":"evt_…","type":"…","properties":{…}}`, without `event:` or
//! `id:` fields and without replay: a subscriber sees `server.connected` and then only live
//! events, so subscribe before prompting. One stream carries every session of the directory;
//! filter with [`Event::session_id`]. Types this crate does not know, and known types whose
//! payload no longer decodes, become [`Event::Unknown`] so a new OpenCode release degrades to
//! missing detail instead of a broken stream.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Error;
use crate::types::{
    MessageError, MessageInfo, Part, PermissionReply, PermissionRequest, Session, SessionStatus,
};

/// An event of the `/event` stream.
#[derive(Debug, Clone)]
pub enum Event {
    /// The first event of every subscription.
    ServerConnected,
    /// Every 10 s, on every subscription.
    ServerHeartbeat,
    SessionCreated {
        session_id: String,
        info: Session,
    },
    SessionUpdated {
        session_id: String,
        info: Session,
    },
    /// `busy`, `idle` or `retry`. `idle` (and [`Event::SessionIdle`]) ends a turn.
    SessionStatus {
        session_id: String,
        status: SessionStatus,
    },
    /// Sent with the `idle` status. After an abort it comes twice.
    SessionIdle {
        session_id: String,
    },
    /// The turn failed (`APIError` after OpenCode's retries, `MessageAbortedError`, ...).
    SessionError {
        session_id: Option<String>,
        error: Option<MessageError>,
    },
    /// A message was created or changed. The same message comes many times: treat as upsert.
    MessageUpdated {
        session_id: String,
        info: MessageInfo,
    },
    /// A part was created or changed (tool state changes, finished text, step boundaries).
    MessagePartUpdated {
        session_id: String,
        part: Part,
    },
    /// A piece of streamed text, between an empty and a full `MessagePartUpdated` of the part.
    MessagePartDelta {
        session_id: String,
        message_id: String,
        part_id: String,
        field: String,
        delta: String,
    },
    /// A tool call waits for [`crate::OpenCodeClient::reply_permission`].
    PermissionAsked(PermissionRequest),
    PermissionReplied {
        session_id: String,
        request_id: String,
        reply: Option<PermissionReply>,
    },
    /// Any other event, or a known one whose payload did not decode.
    Unknown {
        event_type: String,
        properties: Value,
    },
}

impl Event {
    /// The session the event is about, when it is about one.
    pub fn session_id(&self) -> Option<&str> {
        match self {
            Self::SessionCreated { session_id, .. }
            | Self::SessionUpdated { session_id, .. }
            | Self::SessionStatus { session_id, .. }
            | Self::SessionIdle { session_id }
            | Self::MessageUpdated { session_id, .. }
            | Self::MessagePartUpdated { session_id, .. }
            | Self::MessagePartDelta { session_id, .. }
            | Self::PermissionReplied { session_id, .. } => Some(session_id),
            Self::SessionError { session_id, .. } => session_id.as_deref(),
            Self::PermissionAsked(request) => Some(&request.session_id),
            Self::Unknown { properties, .. } => properties["sessionID"].as_str(),
            Self::ServerConnected | Self::ServerHeartbeat => None,
        }
    }

    /// Decodes the JSON of one SSE `data:` field.
    pub fn from_json(data: &str) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Envelope {
            #[serde(rename = "type")]
            event_type: String,
            #[serde(default)]
            properties: Value,
        }
        let envelope: Envelope = serde_json::from_str(data)?;
        Ok(Self::decode(envelope.event_type, envelope.properties))
    }

    fn decode(event_type: String, properties: Value) -> Self {
        match Self::decode_known(&event_type, &properties) {
            Some(Ok(event)) => event,
            Some(Err(error)) => {
                tracing::warn!(%event_type, %error, "an opencode event did not decode; kept as unknown");
                Self::Unknown {
                    event_type,
                    properties,
                }
            }
            None => Self::Unknown {
                event_type,
                properties,
            },
        }
    }

    fn decode_known(event_type: &str, p: &Value) -> Option<Result<Self, serde_json::Error>> {
        let event = (|| {
            Ok(match event_type {
                "server.connected" => Self::ServerConnected,
                "server.heartbeat" => Self::ServerHeartbeat,
                "session.created" => Self::SessionCreated {
                    session_id: field(p, "sessionID")?,
                    info: field(p, "info")?,
                },
                "session.updated" => Self::SessionUpdated {
                    session_id: field(p, "sessionID")?,
                    info: field(p, "info")?,
                },
                "session.status" => Self::SessionStatus {
                    session_id: field(p, "sessionID")?,
                    status: field(p, "status")?,
                },
                "session.idle" => Self::SessionIdle {
                    session_id: field(p, "sessionID")?,
                },
                "session.error" => Self::SessionError {
                    session_id: field(p, "sessionID")?,
                    error: field(p, "error")?,
                },
                "message.updated" => Self::MessageUpdated {
                    session_id: field(p, "sessionID")?,
                    info: field(p, "info")?,
                },
                "message.part.updated" => Self::MessagePartUpdated {
                    session_id: field(p, "sessionID")?,
                    part: field(p, "part")?,
                },
                "message.part.delta" => Self::MessagePartDelta {
                    session_id: field(p, "sessionID")?,
                    message_id: field(p, "messageID")?,
                    part_id: field(p, "partID")?,
                    field: field(p, "field")?,
                    delta: field(p, "delta")?,
                },
                "permission.asked" => Self::PermissionAsked(PermissionRequest::deserialize(p)?),
                "permission.replied" => Self::PermissionReplied {
                    session_id: field(p, "sessionID")?,
                    request_id: field(p, "requestID")?,
                    reply: field(p, "reply")?,
                },
                _ => return Err(None),
            })
        })();
        match event {
            Ok(event) => Some(Ok(event)),
            Err(Some(error)) => Some(Err(error)),
            Err(None) => None,
        }
    }
}

/// One field of an event's properties (`null` when absent, so `Option` fields may be missing).
fn field<T: DeserializeOwned>(
    properties: &Value,
    name: &str,
) -> Result<T, Option<serde_json::Error>> {
    T::deserialize(properties.get(name).unwrap_or(&Value::Null)).map_err(Some)
}

/// The live events of one directory's OpenCode instance.
///
/// Ends with [`Error::EventStreamStalled`] when nothing arrives for the stall timeout: the server
/// sends a heartbeat every 10 s, so silence means a dead connection, not a quiet session.
pub struct EventStream {
    inner: Pin<Box<dyn Stream<Item = Result<Event, Error>> + Send>>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl EventStream {
    /// The events of `response`, each at most `max_event_bytes` long.
    pub(crate) fn new(
        response: reqwest::Response,
        stall_timeout: Duration,
        max_event_bytes: usize,
    ) -> Self {
        let messages = sse_data(response.bytes_stream(), max_event_bytes);
        let events = messages.filter_map(|item| async move {
            match item {
                Ok(data) if data.trim().is_empty() => None,
                Ok(data) => match Event::from_json(&data) {
                    Ok(event) => Some(Ok(event)),
                    Err(error) => {
                        let data: String = data.chars().take(200).collect();
                        tracing::warn!(%error, %data, "skipped an opencode event that is not json");
                        None
                    }
                },
                Err(error) => Some(Err(error)),
            }
        });
        let events = Box::pin(events);
        let guarded = futures::stream::unfold(Some(events), move |state| async move {
            let mut events = state?;
            match tokio::time::timeout(stall_timeout, events.next()).await {
                Ok(Some(Ok(event))) => Some((Ok(event), Some(events))),
                // After an error or a stall the stream is over.
                Ok(Some(Err(error))) => Some((Err(error), None)),
                Ok(None) => None,
                Err(_) => Some((Err(Error::EventStreamStalled(stall_timeout)), None)),
            }
        });
        Self {
            inner: Box::pin(guarded),
        }
    }
}

/// The `data` of each server-sent event in `bytes`. The stream ends with
/// [`Error::EventTooLarge`] as soon as one event (its data plus the line being read) passes
/// `limit` bytes, and with [`Error::EventStream`] when the connection breaks.
fn sse_data(
    bytes: impl Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
    limit: usize,
) -> impl Stream<Item = Result<String, Error>> + Send {
    struct State<S> {
        bytes: Pin<Box<S>>,
        parser: SseParser,
        ready: VecDeque<String>,
        done: bool,
    }
    let state = State {
        bytes: Box::pin(bytes),
        parser: SseParser::new(limit),
        ready: VecDeque::new(),
        done: false,
    };
    futures::stream::unfold(state, move |mut state| async move {
        loop {
            if let Some(data) = state.ready.pop_front() {
                return Some((Ok(data), state));
            }
            if state.done {
                return None;
            }
            match state.bytes.next().await {
                Some(Ok(chunk)) => {
                    if state.parser.push(&chunk, &mut state.ready).is_err() {
                        state.done = true;
                        state.ready.clear();
                        return Some((Err(Error::EventTooLarge { limit }), state));
                    }
                }
                Some(Err(error)) => {
                    state.done = true;
                    return Some((Err(Error::EventStream(error.to_string())), state));
                }
                // An event the stream did not end with a blank line is dropped (as the spec says).
                None => state.done = true,
            }
        }
    })
}

/// An event passed the size limit.
#[derive(Debug)]
struct TooLarge;

/// A server-sent events parser for the one field OpenCode uses, `data`, linear in its input
/// (each byte is looked at once) and bounded: an event's data and the line being read together
/// stay within `limit` bytes.
#[derive(Debug)]
struct SseParser {
    limit: usize,
    /// The line being read, without its end.
    line: Vec<u8>,
    /// The data lines of the event being read, each followed by `\n`.
    data: Vec<u8>,
    /// The last byte was a `\r`: a `\n` right after it ends no further line.
    after_cr: bool,
}

impl SseParser {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            line: Vec::new(),
            data: Vec::new(),
            after_cr: false,
        }
    }

    /// Reads `chunk`, adding the data of every event it completes to `ready`.
    fn push(&mut self, mut chunk: &[u8], ready: &mut VecDeque<String>) -> Result<(), TooLarge> {
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        while !chunk.is_empty() {
            let Some(end) = chunk.iter().position(|byte| matches!(byte, b'\r' | b'\n')) else {
                self.extend_line(chunk)?;
                break;
            };
            self.extend_line(&chunk[..end])?;
            self.end_line(ready);
            let crlf = chunk[end] == b'\r' && chunk.get(end + 1) == Some(&b'\n');
            if chunk[end] == b'\r' && end + 1 == chunk.len() {
                self.after_cr = true;
            }
            chunk = &chunk[end + if crlf { 2 } else { 1 }..];
        }
        Ok(())
    }

    fn extend_line(&mut self, part: &[u8]) -> Result<(), TooLarge> {
        if self.data.len() + self.line.len() + part.len() > self.limit {
            return Err(TooLarge);
        }
        self.line.extend_from_slice(part);
        Ok(())
    }

    fn end_line(&mut self, ready: &mut VecDeque<String>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            // A blank line ends the event.
            if !self.data.is_empty() {
                self.data.pop();
                ready.push_back(String::from_utf8_lossy(&self.data).into_owned());
                self.data.clear();
            }
            return;
        }
        let (field, value) = match line.iter().position(|byte| *byte == b':') {
            Some(colon) => (&line[..colon], &line[colon + 1..]),
            None => (&line[..], &[][..]),
        };
        // `:` first is a comment; `event`, `id` and `retry` are not used.
        if field == b"data" {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            self.data.extend_from_slice(value);
            self.data.push(b'\n');
        }
    }
}

impl Stream for EventStream {
    type Item = Result<Event, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ToolState;

    #[test]
    fn known_events_decode_and_others_are_kept() {
        let running = r#"{"id":"evt_1","type":"message.part.updated","properties":{"sessionID":"ses_1",
            "part":{"id":"prt_1","sessionID":"ses_1","messageID":"msg_1","type":"tool","tool":"bash",
            "callID":"call_1","state":{"status":"running","input":{"command":"ls"},"time":{"start":1}}},
            "time":1}}"#;
        let Event::MessagePartUpdated {
            session_id,
            part: Part::Tool(tool),
        } = Event::from_json(running).unwrap()
        else {
            panic!("not a tool part update")
        };
        assert_eq!(session_id, "ses_1");
        assert!(matches!(tool.state, ToolState::Running { .. }));

        let retry = r#"{"type":"session.status","properties":{"sessionID":"ses_1",
            "status":{"type":"retry","attempt":2,"message":"boom","next":5}}}"#;
        assert!(matches!(
            Event::from_json(retry).unwrap(),
            Event::SessionStatus {
                status: SessionStatus::Retry { attempt: 2, .. },
                ..
            }
        ));

        let unknown = r#"{"type":"todo.updated","properties":{"sessionID":"ses_2","todos":[]}}"#;
        let event = Event::from_json(unknown).unwrap();
        assert!(
            matches!(&event, Event::Unknown { event_type, .. } if event_type == "todo.updated")
        );
        assert_eq!(event.session_id(), Some("ses_2"));

        // A known type whose payload changed shape must not break the stream.
        let drifted = r#"{"type":"session.idle","properties":{"session":"ses_3"}}"#;
        assert!(matches!(
            Event::from_json(drifted).unwrap(),
            Event::Unknown { .. }
        ));

        let asked = r#"{"type":"permission.asked","properties":{"id":"per_1","sessionID":"ses_1",
            "permission":"bash","patterns":["echo hi"],"metadata":{"command":"echo hi"},
            "always":["echo *"],"tool":{"messageID":"msg_1","callID":"call_1"}}}"#;
        let Event::PermissionAsked(request) = Event::from_json(asked).unwrap() else {
            panic!("not a permission request")
        };
        assert_eq!(request.patterns, ["echo hi"]);
        assert_eq!(request.tool.unwrap().call_id, "call_1");

        let error = r#"{"type":"session.error","properties":{"sessionID":"ses_1",
            "error":{"name":"MessageAbortedError","data":{"message":"Aborted"}}}}"#;
        let Event::SessionError {
            error: Some(error), ..
        } = Event::from_json(error).unwrap()
        else {
            panic!("not a session error")
        };
        assert!(error.is_aborted());
    }

    fn parse(limit: usize, chunks: &[&[u8]]) -> Result<Vec<String>, TooLarge> {
        let mut parser = SseParser::new(limit);
        let mut ready = VecDeque::new();
        for chunk in chunks {
            parser.push(chunk, &mut ready)?;
        }
        Ok(ready.into_iter().collect())
    }

    #[test]
    fn server_sent_events_are_parsed_across_chunks_and_line_ends() {
        let events = parse(
            1024,
            &[
                b": comment\n\ndata: {\"a\":1}\n\n",
                b"data: one\r\ndata:two\r\n\r\n",
                b"event: x\rdata: three\r",
                b"\n\r",
                b"data: fo",
                b"ur\n",
                b"\n",
                b"data: never ended",
            ],
        )
        .unwrap();
        assert_eq!(events, ["{\"a\":1}", "one\ntwo", "three", "four"]);
    }

    #[test]
    fn an_event_past_the_limit_is_refused_however_it_is_split() {
        // 20 bytes of data per event fit; the line being read counts too.
        assert!(parse(20, &[b"data: 01234567890123456789\n\n"]).is_err());
        assert_eq!(
            parse(26, &[b"data: 01234567890123456789\n\n"]).unwrap(),
            ["01234567890123456789"]
        );
        assert!(parse(20, &[b"data: 0123456789", b"0123456789"]).is_err());
        assert!(parse(20, &[b"data: 0123456789\n", b"data: 0123456789\n\n"]).is_err());
        // The limit is per event, not per stream.
        let many: Vec<&[u8]> = vec![b"data: 0123456789\n\n"; 100];
        assert_eq!(parse(20, &many).unwrap().len(), 100);
    }
}
