//! How long a retried failure waits before its next attempt: exponential
//! in the attempt that failed, capped, with "equal jitter" (a random point
//! in the upper half of the step), so that tasks failing together do not
//! come back together. Shared by every store, so a retry waits alike on
//! each.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// The backoff of retried failures (`--retry-backoff`,
/// `--retry-backoff-max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryBackoff {
    /// The step after a first attempt fails; each further failure doubles
    /// it. Zero: retried failures go back at once.
    pub base: Duration,
    /// The longest step.
    pub max: Duration,
}

/// Default of [`RetryBackoff::base`] (`--retry-backoff`).
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Default of [`RetryBackoff::max`] (`--retry-backoff-max`): 5 minutes.
pub const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(300);

impl Default for RetryBackoff {
    fn default() -> Self {
        Self {
            base: DEFAULT_RETRY_BACKOFF,
            max: DEFAULT_RETRY_BACKOFF_MAX,
        }
    }
}

impl RetryBackoff {
    /// No wait: retried failures go back at once.
    pub const NONE: Self = Self {
        base: Duration::ZERO,
        max: Duration::ZERO,
    };

    /// The step after attempt `attempt` (1 for the first) failed:
    /// `base * 2^(attempt - 1)`, at most `max`.
    #[must_use]
    pub fn step(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.base
            .checked_mul(1 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The wait after attempt `attempt` failed: a random point between half
    /// the [`step`](Self::step) and the whole of it.
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        let step = self.step(attempt);
        // Each `RandomState` is keyed afresh, so hashing a constant with it
        // is a random draw; no generator crate is needed for jitter.
        let roll = RandomState::new().hash_one(attempt);
        let half = step / 2;
        let spread = u64::try_from((step - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(roll % spread.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_up_to_the_cap() {
        let backoff = RetryBackoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
        };
        let steps: Vec<u64> = (1..=6).map(|a| backoff.step(a).as_secs()).collect();
        assert_eq!(steps, [1, 2, 4, 8, 10, 10]);
        // Far past the point where doubling would overflow.
        assert_eq!(backoff.step(u32::MAX), Duration::from_secs(10));
        assert_eq!(RetryBackoff::NONE.delay(3), Duration::ZERO);
    }

    #[test]
    fn delays_fall_in_the_upper_half_of_their_step() {
        let backoff = RetryBackoff::default();
        let mut distinct = std::collections::HashSet::new();
        for attempt in 1..=12 {
            let step = backoff.step(attempt);
            for _ in 0..50 {
                let delay = backoff.delay(attempt);
                assert!(
                    delay >= step / 2 && delay <= step,
                    "attempt {attempt}: {delay:?} outside {:?}..={step:?}",
                    step / 2
                );
                distinct.insert(delay);
            }
        }
        // Jitter: draws differ (600 draws over 12 steps of at least 0.5 s).
        assert!(
            distinct.len() > 500,
            "only {} distinct delays",
            distinct.len()
        );
    }
}
