//! Per-caller rate limits for people (the runner is a trusted service and is not limited here).
//! A token bucket per caller (governor's GCRA): `per_second` sustained, `burst` at once.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::error::ApiError;

/// Rate limits keyed by caller scope.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl RateLimiter {
    pub(crate) fn new(per_second: u32, burst: u32) -> Self {
        let per_second = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(
                Quota::per_second(per_second).allow_burst(burst),
            ),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one request from the caller's bucket, or says how long to wait.
    pub(crate) fn check(&self, scope: &str) -> Result<(), ApiError> {
        self.limiter
            .check_key(&scope.to_owned())
            .map_err(|not_until| ApiError::RateLimited {
                retry_after: not_until
                    .wait_time_from(self.clock.now())
                    .max(Duration::from_secs(1)),
            })
    }

    /// Forgets callers whose buckets are full again (keeps memory bounded).
    pub(crate) fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusal_with_a_wait_and_callers_are_separate() {
        let limiter = RateLimiter::new(1, 3);
        for _ in 0..3 {
            limiter.check("a").unwrap();
        }
        let refused = limiter.check("a").unwrap_err();
        assert_eq!(refused.code(), "rate_limited");
        assert!(refused.retry_after().unwrap() >= Duration::from_secs(1));
        limiter.check("b").unwrap();
    }
}
