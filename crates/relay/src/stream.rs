//! The JetStream side: creating the stream idempotently and reading where it ends.

use async_nats::jetstream::context::ContextBuilder;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self};

use crate::envelope::cursor_of;
use crate::{Cursor, RelayConfig, RelayError};

/// The JetStream context the relay publishes through: its timeouts and ack capacity follow the
/// config (the context's own cap must exceed `max_in_flight`, or publishes would wait on it).
pub(crate) fn context(client: async_nats::Client, config: &RelayConfig) -> jetstream::Context {
    ContextBuilder::new()
        .timeout(config.ack_timeout)
        .ack_timeout(config.ack_timeout)
        .max_ack_inflight(config.max_in_flight.saturating_mul(8).max(5_000))
        .build(client)
}

/// The stream's configuration as the relay wants it.
pub fn stream_config(config: &RelayConfig) -> stream::Config {
    stream::Config {
        name: config.stream_name.clone(),
        description: Some("Canopy events, relayed from the Postgres event store".to_owned()),
        subjects: vec![format!("{}.>", config.subject_prefix)],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        num_replicas: config.stream_replicas,
        duplicate_window: config.duplicate_window,
        max_bytes: config.stream_max_bytes,
        max_age: config.stream_max_age,
        ..Default::default()
    }
}

/// Creates the stream, or updates it to the relay's configuration. Idempotent.
pub async fn ensure_stream(
    client: &async_nats::Client,
    config: &RelayConfig,
) -> Result<stream::Info, RelayError> {
    ensure(&context(client.clone(), config), config).await
}

pub(crate) async fn ensure(
    js: &jetstream::Context,
    config: &RelayConfig,
) -> Result<stream::Info, RelayError> {
    js.create_or_update_stream(stream_config(config))
        .await
        .map_err(RelayError::Stream)
}

/// Where the stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tail {
    /// The stream's last sequence (0: nothing was ever stored).
    pub(crate) last_sequence: u64,
    pub(crate) last: TailEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TailEvent {
    /// Nothing was ever stored: a new, or lost and recreated, stream.
    Empty,
    /// The last message is one of the relay's events.
    Event(Cursor),
    /// The last message is gone (expired by `max_age`, purged) or was not the relay's.
    Unknown,
}

pub(crate) async fn tail(js: &jetstream::Context, name: &str) -> Result<Tail, RelayError> {
    let stream = js.get_stream(name).await.map_err(RelayError::StreamInfo)?;
    let last_sequence = stream.cached_info().state.last_sequence;
    if last_sequence == 0 {
        return Ok(Tail {
            last_sequence,
            last: TailEvent::Empty,
        });
    }
    let last = match stream.get_raw_message(last_sequence).await {
        Ok(message) => cursor_of(&message.headers).map_or(TailEvent::Unknown, TailEvent::Event),
        Err(error) if error.kind() == stream::RawMessageErrorKind::NoMessageFound => {
            TailEvent::Unknown
        }
        Err(error) => return Err(RelayError::StreamMessage(error)),
    };
    Ok(Tail {
        last_sequence,
        last,
    })
}

/// The stream's last sequence (cheaper than [`tail`] when the last message does not matter).
pub(crate) async fn last_sequence(js: &jetstream::Context, name: &str) -> Result<u64, RelayError> {
    let stream = js.get_stream(name).await.map_err(RelayError::StreamInfo)?;
    Ok(stream.cached_info().state.last_sequence)
}

/// The event stream named `name`, once the relay has created it: consumers started before the
/// relay wait here (backing off up to 5 s between looks). `None` when `stop` turns true first.
pub async fn wait_for_stream(
    jetstream: &async_nats::jetstream::Context,
    name: &str,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<async_nats::jetstream::stream::Stream> {
    let mut backoff = canopy_process::Backoff::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(5),
    );
    loop {
        if *stop.borrow() {
            return None;
        }
        match jetstream.get_stream(name).await {
            Ok(stream) => return Some(stream),
            Err(error) => {
                tracing::info!(%error, stream = name, "waiting for the event stream");
                tokio::select! {
                    _ = stop.changed() => return None,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}
