//! Exponential backoff with jitter, so relays that failed together do not retry together.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base: base.max(Duration::from_millis(1)),
            max: max.max(base),
            failures: 0,
        }
    }

    /// The delay before the next attempt: "equal jitter", a random point in the upper half of
    /// an exponentially growing ceiling, so there is always some pause yet no lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let delay = Self::after(self.base, self.max, self.failures);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// The delay after `failures` earlier failures in a row (0 for the first retry), for
    /// callers that count failures themselves (a message's delivery count).
    pub fn after(base: Duration, max: Duration, failures: u32) -> Duration {
        let base = base.max(Duration::from_millis(1));
        let ceiling = base
            .saturating_mul(1u32 << failures.min(16))
            .min(max.max(base));
        let ceiling_ms = u64::try_from(ceiling.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let half = ceiling_ms / 2;
        Duration::from_millis(half + rand::rng().random_range(0..=ceiling_ms - half))
    }

    /// Progress was made: the next failure starts from the base delay again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay <= Duration::from_secs(5));
        }
        assert!(backoff.next_delay() >= Duration::from_millis(2500));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
