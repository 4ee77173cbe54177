//! The broker's clock: the monotonic time that times leases, and the
//! compact [`Stamp`] that held tasks keep instead of an `Instant`.
//!
//! Rule: lease and ttl timing never read the wall clock. Wall-clock times
//! exist only for clients, derived from the monotonic clock and the one
//! wall-clock reading taken at start.

use std::num::NonZeroU64;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// Turns the monotonic clock that times leases into wall-clock timestamps
/// for clients.
#[derive(Clone, Copy, Debug)]
pub(super) struct Clock {
    instant: Instant,
    system: SystemTime,
}

impl Clock {
    /// A clock that starts now.
    pub(super) fn now() -> Self {
        Self {
            instant: Instant::now(),
            system: SystemTime::now(),
        }
    }

    /// `at` as a [`Stamp`]; moments before the clock's start (none are
    /// stamped) count as its start.
    pub(super) fn stamp(&self, at: Instant) -> Stamp {
        let nanos = at.saturating_duration_since(self.instant).as_nanos();
        Stamp(NonZeroU64::MIN.saturating_add(u64::try_from(nanos).unwrap_or(u64::MAX)))
    }

    /// The moment a [`Stamp`] stands for.
    pub(super) fn instant(&self, stamp: Stamp) -> Instant {
        self.instant + Duration::from_nanos(stamp.0.get() - 1)
    }

    /// The wall-clock time of a [`Stamp`], for clients.
    pub(super) fn wall_of(&self, stamp: Stamp) -> SystemTime {
        self.wall(self.instant(stamp))
    }

    /// The wall-clock time of a monotonic moment, for clients.
    pub(super) fn wall(&self, at: Instant) -> SystemTime {
        let wall = match at.checked_duration_since(self.instant) {
            Some(after) => self.system.checked_add(after),
            None => self.system.checked_sub(self.instant - at),
        };
        wall.unwrap_or(self.system)
    }

    /// Milliseconds since the Unix epoch at `at`, for task ids.
    pub(super) fn unix_ms(&self, at: Instant) -> u64 {
        self.wall(at)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A moment as nanoseconds after the broker's clock started, plus one (so
/// that `Option<Stamp>` costs nothing extra): 8 bytes where an `Instant`
/// takes 16, on every held task (bench/README.md: bytes per pending task).
/// Good for 584 years of uptime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Stamp(NonZeroU64);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stamps_round_trip_and_cost_eight_bytes() {
        let clock = Clock::now();
        let later = Instant::now() + Duration::from_millis(1500);
        assert_eq!(clock.instant(clock.stamp(later)), later);
        assert_eq!(
            clock.wall_of(clock.stamp(later)),
            clock.wall(Instant::now()) + Duration::from_millis(1500)
        );
        assert_eq!(std::mem::size_of::<Option<Stamp>>(), 8);
    }
}
