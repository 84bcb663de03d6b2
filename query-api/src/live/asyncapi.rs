//! The live protocol as an AsyncAPI 3.0 document (checked in as `openapi/live.asyncapi.json`):
//! every message the streams send, over SSE and WebSocket, with a JSON Schema per message.
//!
//! The frames are built in [`super`] (`sse_event`, `drive_ws`, `WorkspaceFeed::end`); the
//! schemas here describe them, and `query-api/tests/it/asyncapi.rs` validates every frame a
//! running query-api sends against this document.

use serde_json::{Value, json};
use utoipa::PartialSchema;

use super::SessionChange;
use super::presence::Present;

/// The AsyncAPI document of the live streams.
pub(crate) fn document() -> Value {
    let sse = |name: &str| json!({"$ref": format!("#/components/messages/{name}")});
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Canopy query-api live streams",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "A session's events as Server-Sent Events and over WebSocket, and the changes to a workspace's sessions as Server-Sent Events. Every stream authenticates like query-api (a bearer token, or `?ticket=` from `POST /stream-tickets` for EventSource, minted for that one stream), ends with `reauth` when that token expires, is opened by the HTTP request its channel's address names (see `openapi/query-api.json` for its parameters and error answers), and ends with a message that says where to resume.\n\nSSE framing: one message is one SSE event; its `event:` field is the message's name (`message` is SSE's default and is not sent), `id:` is set where the message says, and `data:` is the JSON payload on one line. A comment line (`:`) keeps the connection alive.\n\nWebSocket framing: one message is one text frame holding the JSON payload, whose `kind` names the message; Ping frames keep the connection alive."
        },
        "defaultContentType": "application/json",
        "servers": {
            "query-api": {
                "host": "127.0.0.1:8081",
                "protocol": "http",
                "description": "A query-api (its address is configured: CANOPY_QUERY_API_ADDR); WebSocket channels use `ws` on the same host."
            }
        },
        "channels": {
            "sessionEvents": {
                "address": "/sessions/{session_id}/stream",
                "title": "A session's events (SSE)",
                "description": "First the session's stored events after the client's position (`Last-Event-ID`, else `?after=`, else from the start), then `presence`, then the live events: each once, in sequence order. Ends with `overflow` (the client fell behind), `reconnect` (the server stops, or could not read the store), `reauth` (the token that opened the stream expired) or `unreadable` (a stored event does not decode).",
                "parameters": {"session_id": {"description": "The session's id (a UUID)."}},
                "messages": {
                    "event": sse("sseEvent"),
                    "presence": sse("ssePresence"),
                    "overflow": sse("sseOverflow"),
                    "reconnect": sse("sseReconnect"),
                    "reauth": sse("sseReauth"),
                    "unreadable": sse("sseUnreadable"),
                    "keepAlive": sse("sseKeepAlive")
                }
            },
            "sessionSocket": {
                "address": "/sessions/{session_id}/ws",
                "title": "A session's events (WebSocket)",
                "description": "The same stream as `sessionEvents`, as WebSocket text frames; resume with `?after=<sequence>`. The server closes the socket after an ending frame.",
                "parameters": {"session_id": {"description": "The session's id (a UUID)."}},
                "messages": {
                    "event": sse("wsEvent"),
                    "presence": sse("wsPresence"),
                    "overflow": sse("wsOverflow"),
                    "reconnect": sse("wsReconnect"),
                    "reauth": sse("wsReauth"),
                    "unreadable": sse("wsUnreadable"),
                    "keepAlive": sse("wsKeepAlive")
                },
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "query": {
                            "type": "object",
                            "properties": {
                                "after": {"type": "integer", "minimum": 0, "description": "Resume after this sequence."},
                                "ticket": {"type": "string", "description": "A stream ticket, instead of a bearer token."}
                            }
                        },
                        "bindingVersion": "0.1.0"
                    }
                }
            },
            "workspaceChanges": {
                "address": "/stream",
                "title": "Changes to the workspace's sessions (SSE)",
                "description": "One `change` per event of a session of the reader's workspace, in relay order; reconnecting with `Last-Event-ID` replays what was missed, once and in order. Ends with `overflow`, `reconnect` or `reauth`.",
                "messages": {
                    "change": sse("sseChange"),
                    "overflow": sse("sseWorkspaceOverflow"),
                    "reconnect": sse("sseWorkspaceReconnect"),
                    "reauth": sse("sseWorkspaceReauth"),
                    "keepAlive": sse("sseKeepAlive")
                }
            }
        },
        "operations": {
            "receiveSessionEvents": operation("sessionEvents", &["event", "presence", "overflow", "reconnect", "reauth", "unreadable", "keepAlive"]),
            "receiveSessionFrames": operation("sessionSocket", &["event", "presence", "overflow", "reconnect", "reauth", "unreadable", "keepAlive"]),
            "receiveWorkspaceChanges": operation("workspaceChanges", &["change", "overflow", "reconnect", "reauth", "keepAlive"])
        },
        "components": {
            "schemas": {
                "Envelope": envelope(),
                "Present": schema_of::<Present>(),
                "SessionChange": schema_of::<SessionChange>(),
                "ResumeAfter": {
                    "type": "object",
                    "required": ["resume_after"],
                    "additionalProperties": false,
                    "properties": {"resume_after": resume_after()}
                },
                "Unreadable": {
                    "type": "object",
                    "required": ["resume_after", "sequence"],
                    "additionalProperties": false,
                    "properties": {
                        "resume_after": resume_after(),
                        "sequence": {"type": "integer", "minimum": 1, "description": "The stored event that does not decode: retrying at once meets it again."}
                    }
                },
                "WorkspaceResumeAfter": {
                    "type": "object",
                    "required": ["resume_after"],
                    "additionalProperties": false,
                    "properties": {
                        "resume_after": {
                            "type": ["string", "null"],
                            "pattern": "^[0-9]{1,19}\\.[0-9]{1,18}$",
                            "description": "The `id` of the last change sent (send it as `Last-Event-ID`), or null when none was."
                        }
                    }
                }
            },
            "messages": {
                "sseEvent": sse_message("message", "An event of the session", "The SSE `id` is the event's sequence (send it back as `Last-Event-ID` to resume).", json!({"$ref": "#/components/schemas/Envelope"})),
                "ssePresence": sse_message("presence", "Who is connected", "Sent once the history is out (the client is live from here on) and whenever someone comes or goes.", json!({"type": "array", "items": {"$ref": "#/components/schemas/Present"}})),
                "sseOverflow": sse_message("overflow", "The client fell behind and is closed", "Reconnect with `Last-Event-ID: <resume_after>`.", json!({"$ref": "#/components/schemas/ResumeAfter"})),
                "sseReconnect": sse_message("reconnect", "The server stops, or could not read the store", "Reconnect (to any query-api) with `Last-Event-ID: <resume_after>`.", json!({"$ref": "#/components/schemas/ResumeAfter"})),
                "sseReauth": sse_message("reauth", "The token that opened the stream expired", "The stream ends when its bearer token (a ticket's bearer token) expires: get a fresh token (and ticket) and reconnect with `Last-Event-ID: <resume_after>`.", json!({"$ref": "#/components/schemas/ResumeAfter"})),
                "sseUnreadable": sse_message("unreadable", "A stored event does not decode", "The stream ends before event `sequence`, never skipping it; resume after `resume_after` once it is repaired.", json!({"$ref": "#/components/schemas/Unreadable"})),
                "sseKeepAlive": {
                    "name": "keepAlive",
                    "title": "Keep-alive",
                    "summary": "An SSE comment line (`:`), no event: ignore it.",
                    "description": "Sent every CANOPY_STREAM_KEEPALIVE_MS (15 s by default) while nothing else is.",
                    "contentType": "text/plain",
                    "payload": {"type": "string", "maxLength": 0},
                    "x-sse-comment": true
                },
                "sseChange": sse_message("change", "A session of the workspace changed", "The SSE `id` is the change's place in the relay order, `<transaction id>.<position>` (send it back as `Last-Event-ID`).", json!({"$ref": "#/components/schemas/SessionChange"})),
                "sseWorkspaceOverflow": sse_message("overflow", "The client fell behind and is closed", "Reconnect with `Last-Event-ID: <resume_after>` (or list `/sessions` again when it is null).", json!({"$ref": "#/components/schemas/WorkspaceResumeAfter"})),
                "sseWorkspaceReconnect": sse_message("reconnect", "The server stops, or could not read the store", "Reconnect with `Last-Event-ID: <resume_after>` (or list `/sessions` again when it is null).", json!({"$ref": "#/components/schemas/WorkspaceResumeAfter"})),
                "sseWorkspaceReauth": sse_message("reauth", "The token that opened the stream expired", "Get a fresh token (and ticket) and reconnect with `Last-Event-ID: <resume_after>` (or list `/sessions` again when it is null).", json!({"$ref": "#/components/schemas/WorkspaceResumeAfter"})),
                "wsEvent": ws_message("event", "An event of the session", json!({"event": {"$ref": "#/components/schemas/Envelope"}})),
                "wsPresence": ws_message("presence", "Who is connected (once the history is out, then on every change)", json!({"present": {"type": "array", "items": {"$ref": "#/components/schemas/Present"}}})),
                "wsOverflow": ws_message("overflow", "The client fell behind and is closed: reconnect with `?after=<resume_after>`", json!({"resume_after": resume_after()})),
                "wsReconnect": ws_message("reconnect", "The server stops, or could not read the store: reconnect with `?after=<resume_after>`", json!({"resume_after": resume_after()})),
                "wsReauth": ws_message("reauth", "The token that opened the stream expired: reconnect with a fresh one and `?after=<resume_after>`", json!({"resume_after": resume_after()})),
                "wsUnreadable": ws_message("unreadable", "A stored event does not decode: the stream ends before event `sequence`", json!({"resume_after": resume_after(), "sequence": {"type": "integer", "minimum": 1}})),
                "wsKeepAlive": {
                    "name": "keepAlive",
                    "title": "Keep-alive",
                    "summary": "A WebSocket Ping control frame with an empty payload (clients answer Pong, as WebSocket libraries do).",
                    "description": "Sent every CANOPY_STREAM_KEEPALIVE_MS (15 s by default).",
                    "contentType": "application/octet-stream",
                    "payload": {"type": "string", "maxLength": 0},
                    "x-websocket-opcode": "ping"
                }
            }
        }
    })
}

fn operation(channel: &str, messages: &[&str]) -> Value {
    json!({
        "action": "receive",
        "channel": {"$ref": format!("#/channels/{channel}")},
        "messages": messages
            .iter()
            .map(|m| json!({"$ref": format!("#/channels/{channel}/messages/{m}")}))
            .collect::<Vec<_>>()
    })
}

fn sse_message(event: &str, title: &str, description: &str, payload: Value) -> Value {
    json!({
        "name": event,
        "title": title,
        "summary": format!("SSE event `{event}`"),
        "description": description,
        "payload": payload,
        "x-sse-event": event
    })
}

/// A WebSocket text frame: `{"kind": <kind>, ...properties}`.
fn ws_message(kind: &str, title: &str, properties: Value) -> Value {
    let mut all = serde_json::Map::new();
    all.insert("kind".to_owned(), json!({"const": kind}));
    let mut required = vec![json!("kind")];
    if let Value::Object(properties) = properties {
        for (name, schema) in properties {
            required.push(json!(name));
            all.insert(name, schema);
        }
    }
    json!({
        "name": kind,
        "title": title,
        "summary": format!("WebSocket text frame of kind `{kind}`"),
        "payload": {
            "type": "object",
            "required": required,
            "additionalProperties": false,
            "properties": all
        }
    })
}

fn resume_after() -> Value {
    json!({
        "type": "integer",
        "minimum": 0,
        "description": "The sequence of the last event sent (0 when none was): resume after it."
    })
}

/// The relay's envelope (`canopy_relay::Envelope`), as the session streams send it.
fn envelope() -> Value {
    json!({
        "type": "object",
        "description": "An event, as the relay publishes it.",
        "required": ["id", "type", "version", "aggregate_type", "aggregate_id", "sequence", "position", "transaction_id", "recorded_at", "metadata", "data"],
        "additionalProperties": false,
        "properties": {
            "id": {"type": "string", "format": "uuid", "description": "The event id."},
            "type": {"type": "string", "description": "The event type, e.g. `PromptSubmitted`."},
            "version": {"type": "string", "description": "The payload version of that type, e.g. `\"1\"`."},
            "aggregate_type": {"type": "string", "const": "session"},
            "aggregate_id": {"type": "string", "format": "uuid", "description": "The session's id."},
            "sequence": {"type": "integer", "minimum": 1, "description": "1-based and gap-free per session: order and dedupe by it."},
            "position": {"type": "integer", "minimum": 1, "description": "Global position: unique, not in relay order."},
            "transaction_id": {"type": "integer", "minimum": 0, "description": "The committing transaction (`xid8`)."},
            "recorded_at": {"type": "string", "format": "date-time"},
            "metadata": {
                "type": "object",
                "required": ["actor_id", "actor_name", "actor_kind", "correlation_id", "request_id"],
                "properties": {
                    "actor_id": {"type": "string"},
                    "actor_name": {"type": "string"},
                    "actor_kind": {"type": "string", "enum": ["user", "service"]},
                    "correlation_id": {"type": "string"},
                    "request_id": {"type": "string"},
                    "causation_id": {"type": "string"},
                    "idempotency_key": {"type": "string"}
                },
                "additionalProperties": true
            },
            "data": {"description": "The event's payload: its JSON Schema is `schemas/session/<type>.v<version>.json`."}
        }
    })
}

/// A schema utoipa derives, as JSON.
fn schema_of<T: PartialSchema>() -> Value {
    serde_json::to_value(T::schema()).unwrap_or(Value::Null)
}
