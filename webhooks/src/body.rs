//! What a delivery POSTs: the relay's JSON [`Envelope`] of the event, read back from the event
//! store at each attempt (an erased payload is never sent afterwards), plus `links`.

use canopy_relay::{Envelope, history};
use serde_json::{Value, json};
use sqlx::PgConnection;

/// Base URLs the links point at.
#[derive(Debug, Clone)]
pub struct Links {
    pub query_api_url: String,
    pub command_api_url: String,
}

/// The body of a delivery of event `sequence` of an aggregate, or `None` when the store no
/// longer has it (which it always has: events are append-only).
pub async fn build(
    conn: &mut PgConnection,
    links: &Links,
    aggregate_type: &str,
    aggregate_id: &str,
    sequence: i64,
) -> Result<Option<Vec<u8>>, sqlx::Error> {
    let rows = history::of_aggregate(
        &mut *conn,
        aggregate_type,
        aggregate_id,
        sequence - 1,
        Some(sequence + 1),
        history::Page::events(1),
    )
    .await?;
    let Some(stored) = rows.into_iter().next() else {
        return Ok(None);
    };
    let envelope =
        Envelope::from_stored(stored).map_err(|error| sqlx::Error::Decode(Box::new(error)))?;
    Ok(Some(body(&envelope, links)))
}

/// The envelope as JSON with `links` added.
pub fn body(envelope: &Envelope, links: &Links) -> Vec<u8> {
    let mut value = serde_json::to_value(envelope).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("links".to_owned(), links_of(envelope, links));
    }
    serde_json::to_vec(&value).unwrap_or_default()
}

/// `session` (or `feature`): the aggregate in query-api; for a plan, `approve` and `reject`;
/// for a tool ask, `grant` and `deny` (command-api, POST with a bearer token).
fn links_of(event: &Envelope, links: &Links) -> Value {
    let query = links.query_api_url.trim_end_matches('/');
    let command = links.command_api_url.trim_end_matches('/');
    let id = &event.aggregate_id;
    let mut out = serde_json::Map::new();
    match event.aggregate_type.as_str() {
        "session" => {
            out.insert("session".into(), json!(format!("{query}/sessions/{id}")));
        }
        "feature" => {
            out.insert("feature".into(), json!(format!("{query}/features/{id}")));
        }
        _ => {}
    }
    let field = |name: &str| {
        event
            .data
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    match event.event_type.as_str() {
        "PlanProposed" => {
            if let Some(plan) = field("plan_id") {
                let base = format!("{command}/sessions/{id}/plans/{plan}");
                out.insert("approve".into(), json!(format!("{base}/approve")));
                out.insert("reject".into(), json!(format!("{base}/reject")));
            }
        }
        "ToolApprovalRequested" => {
            if let Some(request) = field("request_id") {
                let base = format!("{command}/sessions/{id}/tool-approvals/{request}");
                out.insert("approve".into(), json!(format!("{base}/grant")));
                out.insert("reject".into(), json!(format!("{base}/deny")));
            }
        }
        _ => {}
    }
    Value::Object(out)
}
