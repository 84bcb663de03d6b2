//! The `/event` SSE stream, parsed into typed [`Event`]s.
//!
//! Each SSE message is `data: {"id":"evt_…","type":"…","properties":{…}}`, without `event:` or
//! `id:` fields and without replay: a subscriber sees `server.connected` and then only live
//! events, so subscribe before prompting. One stream carries every session of the directory;
//! filter with [`Event::session_id`]. Types this crate does not know, and known types whose
//! payload no longer decodes, become [`Event::Unknown`] so a new OpenCode release degrades to
//! missing detail instead of a broken stream.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use eventsource_stream::Eventsource;
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
    pub(crate) fn new(response: reqwest::Response, stall_timeout: Duration) -> Self {
        let events = response.bytes_stream().eventsource().filter_map(|item| async move {
            match item {
                Ok(message) if message.data.trim().is_empty() => None,
                Ok(message) => match Event::from_json(&message.data) {
                    Ok(event) => Some(Ok(event)),
                    Err(error) => {
                        tracing::warn!(%error, data = %message.data, "skipped an opencode event that is not json");
                        None
                    }
                },
                Err(error) => Some(Err(Error::EventStream(error.to_string()))),
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
}
