//! Caps on open live streams: per person (the token's `sub`, whatever the stream: a session's
//! SSE or WebSocket, or the workspace stream) and per process. A stream takes a [`Slot`] before
//! it starts and holds it in the task that feeds it; the slot is free again when that task ends,
//! which it does as soon as the client is gone.
//!
//! Counted per process: behind a load balancer a person's cap is this cap times the processes
//! their streams land on, which still bounds what one person can make one process hold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::ApiError;

/// The open streams of one process.
#[derive(Debug)]
pub(crate) struct Slots {
    per_person: usize,
    total: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_person: HashMap<String, usize>,
}

/// One open stream; dropping it frees its place.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
    person: String,
}

impl Slots {
    /// At most `per_person` streams per person and `total` in all (each at least 1).
    pub(crate) fn new(per_person: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_person: per_person.max(1),
            total: total.max(1),
            open: Mutex::default(),
        })
    }

    /// A place for one more stream of `person`: 429 when they have their share open, 503 when
    /// the process has.
    pub(crate) fn acquire(self: &Arc<Self>, person: &str) -> Result<Slot, ApiError> {
        let mut open = self.lock();
        let theirs = open.by_person.get(person).copied().unwrap_or(0);
        if theirs >= self.per_person {
            metrics::counter!("canopy_live_streams_refused_total", "reason" => "person")
                .increment(1);
            return Err(ApiError::TooManyStreams {
                limit: self.per_person,
            });
        }
        if open.total >= self.total {
            metrics::counter!("canopy_live_streams_refused_total", "reason" => "process")
                .increment(1);
            return Err(ApiError::StreamsAtCapacity);
        }
        open.total += 1;
        *open.by_person.entry(person.to_owned()).or_default() += 1;
        metrics::gauge!("canopy_live_streams").increment(1.0);
        Ok(Slot {
            slots: self.clone(),
            person: person.to_owned(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.by_person.get_mut(&self.person) {
            *count -= 1;
            if *count == 0 {
                open.by_person.remove(&self.person);
            }
        }
        metrics::gauge!("canopy_live_streams").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_person_gets_their_share_and_a_freed_slot_is_taken_again() {
        let slots = Slots::new(2, 3);
        let a1 = slots.acquire("ada").unwrap();
        let _a2 = slots.acquire("ada").unwrap();
        assert!(matches!(
            slots.acquire("ada"),
            Err(ApiError::TooManyStreams { limit: 2 })
        ));
        let _g1 = slots.acquire("grace").unwrap();
        assert!(matches!(
            slots.acquire("linus"),
            Err(ApiError::StreamsAtCapacity)
        ));
        drop(a1);
        let _a3 = slots.acquire("ada").unwrap();
        assert_eq!(slots.lock().by_person["ada"], 2);
        assert_eq!(slots.lock().total, 3);
    }

    #[test]
    fn dropping_every_slot_forgets_the_person() {
        let slots = Slots::new(1, 10);
        drop(slots.acquire("ada").unwrap());
        assert!(slots.lock().by_person.is_empty());
        assert_eq!(slots.lock().total, 0);
    }
}
