//! The wire contract: subject, headers and JSON body of every message the relay publishes.
//!
//! [`Envelope`] is what consumers deserialize. The relay writes the body from the stored row
//! directly (metadata and data are passed through as stored), and a test reads a published
//! message back into an [`Envelope`] field by field, so the two cannot drift apart.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Cursor;

/// Header names the relay sets on every message.
pub mod headers {
    /// The event id: JetStream drops a second message with the same id inside the stream's
    /// duplicate window.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// Stream sequence the relay expects to be the stream's last; JetStream refuses the message
    /// otherwise. The relay's ordering fence (see the crate docs); consumers can ignore it.
    pub const EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";
    /// Always `1.0`.
    pub const CE_SPECVERSION: &str = "ce-specversion";
    /// The event id.
    pub const CE_ID: &str = "ce-id";
    /// Always `canopy`.
    pub const CE_SOURCE: &str = "ce-source";
    /// The event type (`SessionStarted`, ...).
    pub const CE_TYPE: &str = "ce-type";
    /// `recorded_at`, RFC 3339 in UTC with microseconds.
    pub const CE_TIME: &str = "ce-time";
    /// `<aggregate_type>/<aggregate_id>`.
    pub const CE_SUBJECT: &str = "ce-subject";
    /// The body's media type, always `application/json`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// The event's sequence within its aggregate (1-based).
    pub const SEQUENCE: &str = "canopy-sequence";
    /// The event's global position (taken at insert; unique, not in relay order).
    pub const POSITION: &str = "canopy-position";
    /// The committing transaction's id (`xid8`, decimal).
    pub const TRANSACTION_ID: &str = "canopy-transaction-id";
    /// The payload version of the event type.
    pub const EVENT_VERSION: &str = "canopy-event-version";
    /// The event's chain hash (64 lowercase hex digits): the stream's head as of this event,
    /// kept outside the database, so a chain deleted at its end or re-hashed in the store
    /// disagrees with what JetStream holds (`docs/audit-format.md`).
    pub const CHAIN_HASH: &str = "canopy-chain-hash";
}

/// The JSON body of every message. Field names are the contract for consumers in any language.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The event id (also `Nats-Msg-Id` and `ce-id`).
    pub id: Uuid,
    /// The event type, e.g. `SessionStarted`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The payload version of that type, e.g. `"1"`.
    pub version: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// 1-based and gap-free per aggregate: the key consumers order and dedupe by.
    pub sequence: i64,
    /// Global position, unique but not in relay order, which is
    /// `(transaction_id, position)`.
    pub position: i64,
    /// The committing transaction (`xid8`).
    pub transaction_id: u64,
    /// When the appending transaction started (RFC 3339, UTC).
    pub recorded_at: DateTime<Utc>,
    pub metadata: EnvelopeMetadata,
    /// The event payload without its type tag: the stored `{"<EventType>": body}` becomes `body`.
    pub data: serde_json::Value,
}

/// Who caused the event and within which request. Values are strings; keys a later writer adds
/// are kept in `other`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeMetadata {
    pub actor_id: String,
    pub actor_name: String,
    /// `user` or `service`.
    pub actor_kind: String,
    pub correlation_id: String,
    pub request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// The subject of an event: `<prefix>.<aggregate_type>.<aggregate_id>.<event_type>`, each part
/// made a single subject token by [`subject_token`].
pub fn subject(prefix: &str, aggregate_type: &str, aggregate_id: &str, event_type: &str) -> String {
    format!(
        "{prefix}.{}.{}.{}",
        subject_token(aggregate_type),
        subject_token(aggregate_id),
        subject_token(event_type)
    )
}

/// Makes `value` one NATS subject token. Characters that would split or widen a subject (`.`,
/// `*`, `>`), whitespace, control characters and `%` itself are percent-encoded as the `%XX` of
/// their UTF-8 bytes, so the mapping is reversible; an empty value becomes `%`. UUIDs and Rust
/// type names pass unchanged.
pub fn subject_token(value: &str) -> Cow<'_, str> {
    if value.is_empty() {
        return Cow::Borrowed("%");
    }
    let needs = |c: char| matches!(c, '.' | '*' | '>' | '%') || c.is_whitespace() || c.is_control();
    if !value.contains(needs) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        if needs(c) {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// An event as stored in the event store, as [`crate::history`] reads it for consumers that read
/// the store directly (the relay, a projection's rebuild or gap, a stream's history):
/// [`Envelope::from_stored`] gives them the very envelope the relay publishes for it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredEvent {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
    pub position: i64,
    pub transaction_id: i64,
    pub recorded_at: DateTime<Utc>,
    /// The chain hash, hex (absent where a query did not read it).
    #[sqlx(default)]
    pub hash: Option<String>,
}

impl Envelope {
    /// The envelope of a stored event, exactly as the relay publishes it.
    pub fn from_stored(event: StoredEvent) -> Result<Self, serde_json::Error> {
        let data = untag(&event.payload, &event.event_type).clone();
        Ok(Self {
            id: event.event_id,
            event_type: event.event_type,
            version: event.event_version,
            aggregate_type: event.aggregate_type,
            aggregate_id: event.aggregate_id,
            sequence: event.sequence,
            position: event.position,
            transaction_id: u64::try_from(event.transaction_id).unwrap_or_default(),
            recorded_at: event.recorded_at,
            metadata: serde_json::from_value(event.metadata)?,
            data,
        })
    }
}

impl StoredEvent {
    /// Where the event is in relay order.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            transaction_id: u64::try_from(self.transaction_id).unwrap_or_default(),
            position: self.position,
        }
    }
}

/// A message ready to publish.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) subject: String,
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
}

/// The body as written: borrowed fields, metadata passed through as stored, so a row whose
/// metadata has an unexpected shape is still published (the relay must never stop at one row).
#[derive(Serialize)]
struct WireEnvelope<'a> {
    id: Uuid,
    #[serde(rename = "type")]
    event_type: &'a str,
    version: &'a str,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    position: i64,
    transaction_id: u64,
    recorded_at: DateTime<Utc>,
    metadata: &'a serde_json::Value,
    data: &'a serde_json::Value,
}

pub(crate) fn encode(row: &StoredEvent, prefix: &str) -> Outgoing {
    let data = untag(&row.payload, &row.event_type);
    let body = WireEnvelope {
        id: row.event_id,
        event_type: &row.event_type,
        version: &row.event_version,
        aggregate_type: &row.aggregate_type,
        aggregate_id: &row.aggregate_id,
        sequence: row.sequence,
        position: row.position,
        transaction_id: row.cursor().transaction_id,
        recorded_at: row.recorded_at,
        metadata: &row.metadata,
        data,
    };
    // Serializing borrowed JSON values and plain fields into a Vec cannot fail.
    let payload = serde_json::to_vec(&body).unwrap_or_default();

    let id = row.event_id.to_string();
    let mut map = HeaderMap::new();
    map.insert(headers::MSG_ID, id.as_str());
    map.insert(headers::CE_SPECVERSION, "1.0");
    map.insert(headers::CE_ID, id.as_str());
    map.insert(headers::CE_SOURCE, "canopy");
    map.insert(headers::CE_TYPE, header_value(&row.event_type).as_ref());
    map.insert(
        headers::CE_TIME,
        row.recorded_at
            .to_rfc3339_opts(SecondsFormat::Micros, true)
            .as_str(),
    );
    map.insert(
        headers::CE_SUBJECT,
        header_value(&format!("{}/{}", row.aggregate_type, row.aggregate_id)).as_ref(),
    );
    map.insert(headers::CONTENT_TYPE, "application/json");
    map.insert(headers::SEQUENCE, row.sequence.to_string());
    map.insert(headers::POSITION, row.position.to_string());
    map.insert(
        headers::TRANSACTION_ID,
        row.cursor().transaction_id.to_string(),
    );
    map.insert(
        headers::EVENT_VERSION,
        header_value(&row.event_version).as_ref(),
    );
    if let Some(hash) = &row.hash {
        map.insert(headers::CHAIN_HASH, hash.as_str());
    }
    Outgoing {
        subject: subject(
            prefix,
            &row.aggregate_type,
            &row.aggregate_id,
            &row.event_type,
        ),
        headers: map,
        payload: Bytes::from(payload),
    }
}

/// Reads the relay's cursor back from a published message's headers.
pub(crate) fn cursor_of(map: &HeaderMap) -> Option<Cursor> {
    Some(Cursor {
        transaction_id: map.get(headers::TRANSACTION_ID)?.as_str().parse().ok()?,
        position: map.get(headers::POSITION)?.as_str().parse().ok()?,
    })
}

/// The payload body under its type tag. cqrs-es stores enum events externally tagged: a newtype
/// variant as `{"<EventType>": body}`, a unit variant as `"<EventType>"` (no body: `null`).
/// Anything else is passed through whole rather than held back.
fn untag<'a>(payload: &'a serde_json::Value, event_type: &str) -> &'a serde_json::Value {
    static NULL: serde_json::Value = serde_json::Value::Null;
    match payload {
        serde_json::Value::Object(map) if map.len() == 1 => match map.get(event_type) {
            Some(body) => body,
            None => payload,
        },
        serde_json::Value::String(tag) if tag == event_type => &NULL,
        _ => payload,
    }
}

/// Header values cannot carry line breaks (they would end the header block). Control
/// characters are percent-encoded; the body keeps the exact values.
fn header_value(value: &str) -> Cow<'_, str> {
    if !value.contains(char::is_control) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        if c.is_control() {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_tokens_pass_and_unsafe_ones_are_percent_encoded() {
        assert_eq!(
            subject_token("1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
            "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
        );
        assert_eq!(subject_token("SessionStarted"), "SessionStarted");
        assert_eq!(subject_token("a.b"), "a%2Eb");
        assert_eq!(subject_token("*"), "%2A");
        assert_eq!(subject_token(">"), "%3E");
        assert_eq!(subject_token("a b\tc"), "a%20b%09c");
        assert_eq!(subject_token("50%"), "50%25");
        assert_eq!(subject_token(""), "%");
        assert_eq!(subject_token("é\u{2003}"), "é%E2%80%83");
        assert_eq!(
            subject("canopy.events", "session", "x.y", "Started"),
            "canopy.events.session.x%2Ey.Started"
        );
    }

    #[test]
    fn payload_tag_is_removed_only_when_it_names_the_event_type() {
        let tagged = serde_json::json!({"Added": {"n": 1}});
        assert_eq!(untag(&tagged, "Added"), &serde_json::json!({"n": 1}));
        assert_eq!(untag(&tagged, "Other"), &tagged);
        assert_eq!(
            untag(&serde_json::json!("Closed"), "Closed"),
            &serde_json::Value::Null
        );
        let two = serde_json::json!({"Added": 1, "x": 2});
        assert_eq!(untag(&two, "Added"), &two);
    }

    #[test]
    fn header_values_lose_line_breaks() {
        assert_eq!(header_value("a/b"), "a/b");
        assert_eq!(header_value("a\r\nb"), "a%0D%0Ab");
    }
}
