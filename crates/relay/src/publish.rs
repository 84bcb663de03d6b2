//! Pipelined, fenced publishing: up to `max_in_flight` messages await their PubAck at once, and
//! every message carries the stream sequence it must follow.
//!
//! Pipelining alone can reorder: when a connection drops, message N may die in its socket while
//! N+1, still queued in the client, goes out on the next connection. So each message names the
//! stream's expected last sequence (`Nats-Expected-Last-Sequence`): JetStream stores it only
//! right after its predecessor, and refuses it otherwise. The caller then restarts from the
//! first unacknowledged event. JetStream checks `Nats-Msg-Id` before the expected sequence, so
//! a message already stored answers "duplicate" rather than failing the fence.
//!
//! A duplicate is not stored, so every prediction after it is one too high: the pipeline marks
//! itself broken, the caller stops feeding it, drains what is in flight (the first wrong
//! prediction fails with a wrong-last-sequence error, which is expected then) and starts a new
//! pipeline from [`Pipeline::stream_last`].

use std::collections::VecDeque;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self};

use crate::envelope::Outgoing;
use crate::{Cursor, RelayError};

pub(crate) struct Pipeline {
    js: jetstream::Context,
    max_in_flight: usize,
    base: u64,
    next_expected: u64,
    in_flight: VecDeque<(Cursor, PublishAckFuture)>,
    acked: Option<Cursor>,
    stored: u64,
    duplicates: u64,
    last_stored: Option<u64>,
    broken: bool,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("in_flight", &self.in_flight.len())
            .field("acked", &self.acked)
            .field("next_expected", &self.next_expected)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// A pipeline for a stream whose last sequence is `stream_last`.
    pub(crate) fn new(js: jetstream::Context, max_in_flight: usize, stream_last: u64) -> Self {
        Self {
            js,
            max_in_flight: max_in_flight.max(1),
            base: stream_last,
            next_expected: stream_last,
            in_flight: VecDeque::new(),
            acked: None,
            stored: 0,
            duplicates: 0,
            last_stored: None,
            broken: false,
        }
    }

    /// Sends `message`, first awaiting the oldest PubAck while the pipeline is full.
    pub(crate) async fn push(
        &mut self,
        cursor: Cursor,
        message: Outgoing,
    ) -> Result<(), RelayError> {
        while self.in_flight.len() >= self.max_in_flight {
            self.await_oldest().await?;
        }
        let mut publish = PublishMessage::build()
            .payload(message.payload)
            .headers(message.headers);
        // An empty stream has no sequence to expect; the first message goes unfenced.
        if self.next_expected > 0 {
            publish = publish.expected_last_sequence(self.next_expected);
        }
        self.next_expected += 1;
        let ack = self
            .js
            .send_publish(message.subject, publish)
            .await
            .map_err(RelayError::Publish)?;
        self.in_flight.push_back((cursor, ack));
        Ok(())
    }

    /// Awaits every PubAck still outstanding, in order; stops at the first failure.
    pub(crate) async fn drain(&mut self) -> Result<(), RelayError> {
        while !self.in_flight.is_empty() {
            self.await_oldest().await?;
        }
        Ok(())
    }

    async fn await_oldest(&mut self) -> Result<(), RelayError> {
        let Some((cursor, ack)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let ack = ack.await.map_err(RelayError::Publish)?;
        self.acked = Some(cursor);
        if ack.duplicate {
            self.duplicates += 1;
            self.broken = true;
        } else {
            self.stored += 1;
            self.last_stored = Some(ack.sequence);
        }
        Ok(())
    }

    /// The last event acknowledged with every earlier one acknowledged too.
    pub(crate) fn acked(&self) -> Option<Cursor> {
        self.acked
    }

    /// Acknowledged publishes (stored, recognised as duplicates) since the last call.
    pub(crate) fn take_counts(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.stored),
            std::mem::take(&mut self.duplicates),
        )
    }

    /// A duplicate made the predicted sequences of later messages wrong: stop feeding this
    /// pipeline, drain it and start another from [`Self::stream_last`].
    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    /// The stream's last sequence as far as this pipeline's acks tell.
    pub(crate) fn stream_last(&self) -> u64 {
        self.last_stored.unwrap_or(self.base)
    }
}

/// Whether JetStream refused a message because the stream's last sequence was not the one it
/// named: expected after a duplicate, otherwise a sign that something else published.
pub(crate) fn is_fence_refusal(error: &RelayError) -> bool {
    matches!(error, RelayError::Publish(e) if e.kind() == PublishErrorKind::WrongLastSequence)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_nats::HeaderMap;
    use bytes::Bytes;

    use super::*;
    use crate::RelayConfig;
    use crate::stream::{context, ensure};

    fn message(subject: String, id: &str) -> Outgoing {
        let mut headers = HeaderMap::new();
        headers.insert(crate::headers::MSG_ID, id);
        Outgoing {
            subject,
            headers,
            payload: Bytes::from(id.to_owned()),
        }
    }

    fn at(position: i64) -> Cursor {
        Cursor {
            transaction_id: 1,
            position,
        }
    }

    /// Message 2 never reaches the stream (here: its subject has no stream; in production: it
    /// died with a connection while 3 was still queued). The fence keeps 3 out, so the stream
    /// never holds 3 without 2.
    #[tokio::test]
    async fn a_message_whose_predecessor_was_lost_is_refused() -> anyhow::Result<()> {
        let nats = canopy_testkit::nats().await?;
        let config = RelayConfig {
            ack_timeout: Duration::from_secs(2),
            ..RelayConfig::with_stream(
                nats.prefix.to_uppercase(),
                format!("{}.events", nats.prefix),
            )
        };
        let js = context(nats.client.clone(), &config);
        ensure(&js, &config).await?;
        let subject = format!("{}.events.tally.a.Added", nats.prefix);

        let mut pipeline = Pipeline::new(js.clone(), 8, 0);
        pipeline.push(at(1), message(subject.clone(), "m1")).await?;
        pipeline
            .push(at(2), message(format!("{}.elsewhere", nats.prefix), "m2"))
            .await?;
        pipeline.push(at(3), message(subject.clone(), "m3")).await?;
        let lost = pipeline.drain().await.expect_err("m2 has no stream");
        assert!(!is_fence_refusal(&lost), "{lost}");
        assert_eq!(pipeline.acked(), Some(at(1)));
        // m3 is still in flight: its answer is the fence's refusal
        let refused = pipeline.drain().await.expect_err("m3 must be refused");
        assert!(is_fence_refusal(&refused), "{refused}");

        let info = js
            .get_stream(&config.stream_name)
            .await?
            .info()
            .await?
            .state
            .clone();
        assert_eq!((info.messages, info.last_sequence), (1, 1));

        // A new pipeline from the first unacknowledged event puts 2 and 3 in order; the copy of
        // 1 sent again is recognised, not stored.
        let mut retry = Pipeline::new(js.clone(), 8, 1);
        retry.push(at(1), message(subject.clone(), "m1")).await?;
        retry.drain().await?;
        assert_eq!(retry.take_counts(), (0, 1));
        assert!(retry.is_broken(), "a duplicate breaks the predictions");
        let mut retry = Pipeline::new(js.clone(), 8, retry.stream_last());
        retry.push(at(2), message(subject.clone(), "m2")).await?;
        retry.push(at(3), message(subject.clone(), "m3")).await?;
        retry.drain().await?;
        assert_eq!(retry.take_counts(), (2, 0));
        assert_eq!(retry.stream_last(), 3);

        let stream = js.get_stream(&config.stream_name).await?;
        for (sequence, id) in [(1, "m1"), (2, "m2"), (3, "m3")] {
            assert_eq!(
                stream.get_raw_message(sequence).await?.payload,
                id.as_bytes()
            );
        }
        Ok(())
    }
}
