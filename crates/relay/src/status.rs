//! What a relay reports about itself: the [`RelayStatus`] snapshot and the `metrics` facade.
//!
//! The crate records metrics and installs no exporter; the process that embeds the relay
//! chooses one. Every metric carries the label `relay` (the relay's name).

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use crate::Cursor;

/// Metric names.
pub mod metric {
    /// Gauge: committed events after the checkpoint, including those waiting beyond the
    /// horizon behind an older open transaction (saturates at 1,000,000).
    pub const LAG_EVENTS: &str = "canopy_relay_lag_events";
    /// Gauge: age in seconds of the oldest committed event not yet published (0 when none).
    pub const LAG_SECONDS: &str = "canopy_relay_lag_seconds";
    /// Counter: publishes acknowledged by JetStream (stored or recognised as duplicates).
    pub const PUBLISHED_TOTAL: &str = "canopy_relay_published_total";
    /// Counter: acknowledged publishes JetStream had already stored (`Nats-Msg-Id` dedupe).
    pub const DUPLICATES_TOTAL: &str = "canopy_relay_duplicates_total";
    /// Counter: failed publishes, PubAcks and stream operations.
    pub const PUBLISH_ERRORS_TOTAL: &str = "canopy_relay_publish_errors_total";
    /// Gauge: 1 while this relay holds the lock and publishes, else 0.
    pub const IS_LEADER: &str = "canopy_relay_is_leader";
    /// Counter: times the stream was found behind the checkpoint (lost or recreated).
    pub const STREAM_BEHIND_TOTAL: &str = "canopy_relay_stream_behind_total";
}

/// A snapshot of one relay, for tests and health endpoints.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RelayStatus {
    /// Whether this relay currently holds the lock and publishes.
    pub is_leader: bool,
    /// Times this relay became leader.
    pub terms: u64,
    /// The checkpoint as last read or written by this relay while leading.
    pub checkpoint: Option<Cursor>,
    /// The last event acknowledged with every earlier one (ahead of `checkpoint` mid-batch).
    pub acked: Option<Cursor>,
    /// Committed events after the checkpoint, beyond the horizon included; measured by the
    /// leader when it goes idle and at most every `lag_interval` while busy.
    pub lag_events: Option<u64>,
    /// Age of the oldest of those events, in seconds.
    pub lag_seconds: Option<f64>,
    pub lag_measured_at: Option<DateTime<Utc>>,
    /// Publishes JetStream acknowledged, duplicates included.
    pub published_total: u64,
    /// Acknowledged publishes that JetStream had already stored.
    pub duplicates_total: u64,
    pub publish_errors_total: u64,
    pub stream_behind_total: u64,
    pub last_error: Option<String>,
}

/// State shared between a running relay and its handles.
#[derive(Debug)]
pub(crate) struct Shared {
    name: String,
    status: Mutex<RelayStatus>,
    acked: watch::Sender<Option<Cursor>>,
}

impl Shared {
    pub(crate) fn new(name: String) -> Self {
        metrics::describe_gauge!(metric::LAG_EVENTS, "committed events not yet published");
        metrics::describe_gauge!(
            metric::LAG_SECONDS,
            metrics::Unit::Seconds,
            "age of the oldest committed event not yet published"
        );
        metrics::describe_counter!(metric::PUBLISHED_TOTAL, "publishes acknowledged");
        metrics::describe_counter!(
            metric::DUPLICATES_TOTAL,
            "publishes acknowledged as duplicates"
        );
        metrics::describe_counter!(metric::PUBLISH_ERRORS_TOTAL, "failed publishes");
        metrics::describe_gauge!(metric::IS_LEADER, "1 while this relay publishes");
        metrics::describe_counter!(
            metric::STREAM_BEHIND_TOTAL,
            "stream found behind the checkpoint"
        );
        Self {
            name,
            status: Mutex::new(RelayStatus::default()),
            acked: watch::channel(None).0,
        }
    }

    pub(crate) fn snapshot(&self) -> RelayStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn subscribe_acked(&self) -> watch::Receiver<Option<Cursor>> {
        self.acked.subscribe()
    }

    fn update(&self, change: impl FnOnce(&mut RelayStatus)) {
        change(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub(crate) fn set_leader(&self, leading: bool) {
        self.update(|s| {
            if leading && !s.is_leader {
                s.terms += 1;
            }
            s.is_leader = leading;
        });
        metrics::gauge!(metric::IS_LEADER, "relay" => self.name.clone()).set(if leading {
            1.0
        } else {
            0.0
        });
    }

    /// Called on every acknowledgment that moves the contiguous prefix; kept cheap (a watch
    /// send) because it runs at publish rate.
    pub(crate) fn acked(&self, cursor: Cursor) {
        self.acked.send_replace(Some(cursor));
    }

    pub(crate) fn published(&self, stored: u64, duplicates: u64, acked: Option<Cursor>) {
        if stored == 0 && duplicates == 0 {
            return;
        }
        self.update(|s| {
            s.published_total += stored + duplicates;
            s.duplicates_total += duplicates;
            if acked.is_some() {
                s.acked = acked;
            }
        });
        metrics::counter!(metric::PUBLISHED_TOTAL, "relay" => self.name.clone())
            .increment(stored + duplicates);
        if duplicates > 0 {
            metrics::counter!(metric::DUPLICATES_TOTAL, "relay" => self.name.clone())
                .increment(duplicates);
        }
    }

    pub(crate) fn checkpoint(&self, cursor: Cursor) {
        self.update(|s| {
            s.checkpoint = Some(cursor);
            s.acked = Some(cursor).max(s.acked);
        });
    }

    /// The checkpoint moved back (the stream lost events): the acked cursor follows it.
    pub(crate) fn rewound(&self, cursor: Cursor) {
        self.update(|s| {
            s.checkpoint = Some(cursor);
            s.acked = Some(cursor);
            s.stream_behind_total += 1;
        });
        self.acked.send_replace(Some(cursor));
        metrics::counter!(metric::STREAM_BEHIND_TOTAL, "relay" => self.name.clone()).increment(1);
    }

    pub(crate) fn publish_error(&self, error: &dyn std::error::Error) {
        self.update(|s| {
            s.publish_errors_total += 1;
            s.last_error = Some(error.to_string());
        });
        metrics::counter!(metric::PUBLISH_ERRORS_TOTAL, "relay" => self.name.clone()).increment(1);
    }

    pub(crate) fn other_error(&self, error: &dyn std::error::Error) {
        self.update(|s| s.last_error = Some(error.to_string()));
    }

    pub(crate) fn lag(&self, events: u64, seconds: f64) {
        self.update(|s| {
            s.lag_events = Some(events);
            s.lag_seconds = Some(seconds);
            s.lag_measured_at = Some(Utc::now());
        });
        // gauges are f64; the count is capped far below 2^53, so it converts exactly
        metrics::gauge!(metric::LAG_EVENTS, "relay" => self.name.clone()).set(events as f64);
        metrics::gauge!(metric::LAG_SECONDS, "relay" => self.name.clone()).set(seconds);
    }
}
