//! What a relay is told: where it publishes, how hard it pushes and how it waits.

use std::time::Duration;

use crate::RelayError;

/// Settings of one relay. `Default` gives the production names; tests override the stream name,
/// the subject prefix and usually the timings.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// The checkpoint row (`relay_checkpoints.name`). One name per stream the events go to.
    pub name: String,
    /// JetStream stream name.
    pub stream_name: String,
    /// Subjects are `<subject_prefix>.<aggregate_type>.<aggregate_id>.<event_type>`; the stream
    /// takes `<subject_prefix>.>`, so nothing else may publish under it.
    pub subject_prefix: String,
    /// JetStream's `Nats-Msg-Id` dedupe window. A relay restarted after a crash republishes from
    /// its checkpoint, so this must exceed the time a crashed relay takes to come back (or a
    /// standby to take over) for the stream to stay free of duplicates.
    pub duplicate_window: Duration,
    /// Publishes awaiting their PubAck at once.
    pub max_in_flight: usize,
    /// Rows read per query, and how often the checkpoint is written while catching up.
    pub batch_size: usize,
    /// Safety net when a notification is lost (LISTEN reconnect): read anyway this often.
    pub poll_interval: Duration,
    /// When committed events wait behind an older open transaction (beyond the horizon), read
    /// again after this instead of waiting for a notification.
    pub horizon_poll_interval: Duration,
    /// Key of the Postgres session advisory lock that elects the single publisher. Advisory
    /// locks are per database; relays of different streams in one database need different keys.
    pub lock_key: i64,
    /// How often a standby tries to take the lock.
    pub standby_retry: Duration,
    /// How long a publish waits for its PubAck (and JetStream API calls for their answer).
    pub ack_timeout: Duration,
    /// Bound on each query on the relay's own connection; a query that does not answer in time
    /// counts as a lost connection, so a partitioned leader stops publishing.
    pub db_timeout: Duration,
    /// First delay after a failure; doubled on each failure in a row (with jitter) up to
    /// `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How often the leader measures its lag while it is busy (always when it goes idle).
    pub lag_interval: Duration,
    /// Stream limits (`-1` / zero: unlimited).
    pub stream_max_bytes: i64,
    pub stream_max_age: Duration,
    /// Stream replicas: 1 for a single local server; 3 in production (see the crate docs).
    pub stream_replicas: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            name: "canopy-relay".to_owned(),
            stream_name: "CANOPY_EVENTS".to_owned(),
            subject_prefix: "canopy.events".to_owned(),
            duplicate_window: Duration::from_secs(120),
            max_in_flight: 256,
            batch_size: 1000,
            poll_interval: Duration::from_secs(2),
            horizon_poll_interval: Duration::from_millis(25),
            // "canopyrl" in ASCII: a fixed, recognisable key in pg_locks
            lock_key: 0x6361_6e6f_7079_726c,
            standby_retry: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(5),
            db_timeout: Duration::from_secs(30),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            lag_interval: Duration::from_secs(1),
            stream_max_bytes: -1,
            stream_max_age: Duration::ZERO,
            stream_replicas: 1,
        }
    }
}

impl RelayConfig {
    /// The production defaults with another stream and subject prefix (tests use a unique one).
    pub fn with_stream(stream_name: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        Self {
            stream_name: stream_name.into(),
            subject_prefix: subject_prefix.into(),
            ..Self::default()
        }
    }

    /// Refuses settings the relay cannot run with.
    pub fn validate(&self) -> Result<(), RelayError> {
        let invalid = |reason: String| Err(RelayError::Config(reason));
        if self.name.is_empty() {
            return invalid("the relay name is empty".into());
        }
        if self.stream_name.is_empty()
            || self.stream_name.contains(|c: char| {
                matches!(c, '.' | '*' | '>' | '/' | '\\') || !c.is_ascii_graphic()
            })
        {
            return invalid(format!("invalid stream name {:?}", self.stream_name));
        }
        let bad_token = |t: &str| {
            t.is_empty()
                || t == "*"
                || t == ">"
                || t.contains(|c: char| c.is_whitespace() || c.is_control())
        };
        if self.subject_prefix.split('.').any(bad_token) {
            return invalid(format!("invalid subject prefix {:?}", self.subject_prefix));
        }
        if self.max_in_flight == 0 || self.batch_size == 0 {
            return invalid("max_in_flight and batch_size must be at least 1".into());
        }
        if self.duplicate_window.is_zero() {
            return invalid("the duplicate window must not be zero".into());
        }
        if self.stream_replicas == 0 {
            return invalid("the stream needs at least one replica".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_names_are_refused() {
        RelayConfig::default().validate().unwrap();
        for (stream, prefix) in [
            ("A.B", "canopy.events"),
            ("", "canopy.events"),
            ("A B", "canopy.events"),
            ("OK", "canopy..events"),
            ("OK", "canopy.*"),
            ("OK", "canopy.>"),
            ("OK", "canopy events"),
            ("OK", ""),
        ] {
            assert!(
                RelayConfig::with_stream(stream, prefix).validate().is_err(),
                "{stream:?} / {prefix:?} was accepted"
            );
        }
    }
}
