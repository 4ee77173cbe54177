//! Waiting between attempts to reach the server: exponential backoff with
//! jitter, and the outage it spans logged once when it starts and once
//! when it ends. Both the stream and the unary loop reconnect through it.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// Exponential backoff with jitter: 100 ms doubling to 5 s, each delay
/// drawn from the upper half of its step so that many workers spread out.
#[derive(Debug)]
pub struct Backoff {
    step: u32,
    rng: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        Self {
            step: 0,
            rng: seed | 1,
        }
    }
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = Self::BASE
            .saturating_mul(1 << self.step.min(16))
            .min(Self::MAX);
        self.step += 1;
        // xorshift64: jitter needs spread, not cryptographic strength.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = ceiling / 2;
        half + half.mul_f64((self.rng % 1000) as f64 / 1000.0)
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.step = 0;
    }
}

/// A worker's way back to the server: the backoff between attempts, and
/// one log line when an outage starts and one when it ends.
#[derive(Debug, Default)]
pub(crate) struct Reconnect {
    backoff: Backoff,
    /// When the current outage started; `None` while the server answers.
    outage: Option<Instant>,
}

impl Reconnect {
    /// The server answered: an outage in progress is over.
    pub(crate) fn reached(&mut self) {
        if let Some(since) = self.outage.take() {
            tracing::info!(after = ?since.elapsed(), "server reachable again");
        }
        self.backoff.reset();
    }

    /// The server could not be reached: how long to wait before the next
    /// attempt.
    pub(crate) fn failed(&mut self, error: &dyn std::fmt::Display) -> Duration {
        if self.outage.is_none() {
            tracing::warn!(%error, "server unavailable; retrying with backoff");
            self.outage = Some(Instant::now());
        }
        self.backoff.next_delay()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_ceiling_with_jitter() {
        let mut backoff = Backoff::default();
        let delays: Vec<_> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400));
        assert!(delays.iter().all(|d| *d <= Backoff::MAX));
        assert!(delays[11] >= Backoff::MAX / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn each_step_stays_in_the_upper_half_of_its_ceiling() {
        let mut backoff = Backoff::default();
        for step in 0..20 {
            let ceiling = Backoff::BASE
                .saturating_mul(1 << step.min(16))
                .min(Backoff::MAX);
            let delay = backoff.next_delay();
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "step {step}: {delay:?}"
            );
        }
    }

    #[test]
    fn workers_started_together_spread_out() {
        let mut a = Backoff::default();
        let mut b = Backoff {
            rng: a.rng ^ 0x9e37_79b9_7f4a_7c15,
            ..Backoff::default()
        };
        let apart = (0..8).filter(|_| a.next_delay() != b.next_delay()).count();
        assert!(apart > 0, "two seeds gave the same delays");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_starts_over_once_the_server_answers() {
        let mut reconnect = Reconnect::default();
        let first = reconnect.failed(&"down");
        assert!(first <= Duration::from_millis(100));
        for _ in 0..6 {
            reconnect.failed(&"down");
        }
        assert!(reconnect.failed(&"down") >= Duration::from_millis(3200) / 2);
        assert!(reconnect.outage.is_some());
        reconnect.reached();
        assert!(reconnect.outage.is_none());
        assert!(reconnect.failed(&"down") <= Duration::from_millis(100));
    }
}
