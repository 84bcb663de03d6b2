//! The wire contract consumers rely on: subject, every header and every envelope field.

use std::time::Duration;

use async_nats::jetstream::consumer;
use canopy_event_store::{AggregateStore, StoreConfig};
use canopy_relay::{Envelope, EnvelopeMetadata, headers};
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use uuid::Uuid;

use crate::support::{Add, RunningRelay, Tally, config, meta, read_stream};

#[tokio::test]
async fn subject_headers_and_envelope_match_the_contract() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let config = config(&nats.prefix);
    let store = AggregateStore::new(db.pool.clone(), StoreConfig::default());
    let aggregate_id = Uuid::new_v4().to_string();
    let mut metadata = meta();
    metadata.causation_id = Some("cause-1".into());
    metadata.idempotency_key = Some("key-1".into());
    store
        .execute::<Tally>(&aggregate_id, Add { n: 7, times: 2 }, &(), &metadata, None)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (event_id, xid, position, recorded_at, hash): (Uuid, i64, i64, DateTime<Utc>, String) = sqlx::query_as(
        "SELECT event_id, transaction_id::text::bigint, position, recorded_at, encode(hash, 'hex') FROM events \
              WHERE aggregate_id = $1 AND sequence = 2",
    )
    .bind(&aggregate_id)
    .fetch_one(&db.pool)
    .await?;

    let relay = RunningRelay::start(config.clone(), db.pool.clone(), nats.client.clone());
    relay
        .wait_caught_up(&db.pool, Duration::from_secs(10))
        .await?;
    relay.stop().await?;
    let received = read_stream(&nats.jetstream, &config.stream_name).await?;
    assert_eq!(received.len(), 2);
    let message = &received[1];

    assert_eq!(
        message.subject,
        format!("{}.events.tally.{aggregate_id}.Added", nats.prefix)
    );
    let id = event_id.to_string();
    let expected_headers = [
        (headers::MSG_ID, id.as_str()),
        (headers::CE_SPECVERSION, "1.0"),
        (headers::CE_ID, id.as_str()),
        (headers::CE_SOURCE, "canopy"),
        (headers::CE_TYPE, "Added"),
        (headers::CONTENT_TYPE, "application/json"),
        (headers::EVENT_VERSION, "1"),
        (headers::SEQUENCE, "2"),
    ];
    for (name, value) in expected_headers {
        assert_eq!(message.header(name), Some(value), "header {name}");
    }
    assert_eq!(
        message.header(headers::CE_SUBJECT),
        Some(format!("tally/{aggregate_id}").as_str())
    );
    assert_eq!(
        message.header(headers::CE_TIME),
        Some(
            recorded_at
                .to_rfc3339_opts(SecondsFormat::Micros, true)
                .as_str()
        )
    );
    assert_eq!(
        message.header(headers::POSITION),
        Some(position.to_string().as_str())
    );
    assert_eq!(
        message.header(headers::TRANSACTION_ID),
        Some(xid.to_string().as_str())
    );
    // the chain hash: the stream's head as of this event, outside the database
    assert_eq!(message.header(headers::CHAIN_HASH), Some(hash.as_str()));
    // the fence: the second message must follow the first
    assert_eq!(message.header(headers::EXPECTED_LAST_SEQUENCE), Some("1"));

    let expected = Envelope {
        id: event_id,
        event_type: "Added".into(),
        version: "1".into(),
        aggregate_type: "tally".into(),
        aggregate_id: aggregate_id.clone(),
        sequence: 2,
        position,
        transaction_id: u64::try_from(xid)?,
        recorded_at,
        metadata: EnvelopeMetadata {
            actor_id: "u1".into(),
            actor_name: "Ada".into(),
            actor_kind: "user".into(),
            correlation_id: metadata.correlation_id.clone(),
            request_id: metadata.request_id.clone(),
            causation_id: Some("cause-1".into()),
            idempotency_key: Some("key-1".into()),
            other: Default::default(),
        },
        data: serde_json::json!({"n": 7}),
    };
    assert_eq!(message.envelope, expected);

    // The raw JSON, as a consumer in another language sees it: exactly these keys, and
    // recorded_at in RFC 3339.
    let stream = nats.jetstream.get_stream(&config.stream_name).await?;
    let raw = stream.get_raw_message(2).await?;
    let body: serde_json::Value = serde_json::from_slice(&raw.payload)?;
    let mut keys: Vec<&str> = body
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "aggregate_id",
            "aggregate_type",
            "data",
            "id",
            "metadata",
            "position",
            "recorded_at",
            "sequence",
            "transaction_id",
            "type",
            "version"
        ]
    );
    let recorded = body["recorded_at"].as_str().expect("a string");
    assert_eq!(DateTime::parse_from_rfc3339(recorded)?, recorded_at);
    assert_eq!(body["type"], "Added");
    assert_eq!(body["data"], serde_json::json!({"n": 7}));
    assert_eq!(body["metadata"]["causation_id"], "cause-1");
    Ok(())
}

/// One consumer follows one aggregate type with a single wildcard filter.
#[tokio::test]
async fn a_consumer_filters_one_aggregate_type_with_one_wildcard() -> anyhow::Result<()> {
    let db = canopy_testkit::database().await?;
    let nats = canopy_testkit::nats().await?;
    let config = config(&nats.prefix);
    crate::support::insert_event(&db.pool, "a1", 1).await?;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('other', 'o.1 x', 1, 'Noted', '1', '\"Noted\"', \
         '{\"actor_id\":\"u\",\"actor_name\":\"U\",\"actor_kind\":\"user\",\"correlation_id\":\"c\",\"request_id\":\"r\"}')",
    )
    .execute(&db.pool)
    .await?;
    let relay = RunningRelay::start(config.clone(), db.pool.clone(), nats.client.clone());
    relay
        .wait_caught_up(&db.pool, Duration::from_secs(10))
        .await?;
    relay.stop().await?;

    let stream = nats.jetstream.get_stream(&config.stream_name).await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: format!("{}.events.other.>", nats.prefix),
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_millis(500))
        .messages()
        .await?;
    let mut seen = Vec::new();
    while let Some(message) = batch.next().await {
        let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
        let envelope: Envelope = serde_json::from_slice(&message.payload)?;
        seen.push((message.subject.to_string(), envelope));
    }
    assert_eq!(seen.len(), 1);
    // an id with a dot and a space stays one token; a unit variant has no data
    assert_eq!(
        seen[0].0,
        format!("{}.events.other.o%2E1%20x.Noted", nats.prefix)
    );
    assert_eq!(seen[0].1.aggregate_id, "o.1 x");
    assert_eq!(seen[0].1.data, serde_json::Value::Null);
    Ok(())
}
