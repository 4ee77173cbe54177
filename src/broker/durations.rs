//! How long tasks take, per queue: the wait (from put, or from going back
//! to the line, to the lease), the run (from the lease to the report that
//! finished the task) and the whole trip (from put to finished), each as a
//! histogram of fixed buckets.
//!
//! Recorded under the engine's lock as tasks move, with no lock and no
//! allocation of its own: an observation is a short search over
//! [`BUCKET_NANOS`] and two additions. Monitoring reads copies of them in a
//! [`Snapshot`](super::Snapshot).

use std::time::Duration;

/// The upper bounds of the buckets, in seconds: from a millisecond (a task
/// taken at once by a waiting stream) to an hour (a queue that backs up).
pub const TASK_DURATION_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0, 3600.0,
];

/// [`TASK_DURATION_BUCKETS`] in nanoseconds, for the hot path.
const BUCKET_NANOS: [u64; TASK_DURATION_BUCKETS.len()] = {
    let mut nanos = [0; TASK_DURATION_BUCKETS.len()];
    let mut i = 0;
    while i < TASK_DURATION_BUCKETS.len() {
        // Every bound is a whole number of microseconds.
        nanos[i] = (TASK_DURATION_BUCKETS[i] * 1e6) as u64 * 1000;
        i += 1;
    }
    nanos
};

/// Counts of durations by bucket, and their sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DurationHistogram {
    /// Observations by bucket ([`TASK_DURATION_BUCKETS`], then the ones past
    /// the last bound), not cumulative.
    pub buckets: [u64; TASK_DURATION_BUCKETS.len() + 1],
    /// The sum of every observation, in nanoseconds.
    pub sum_nanos: u64,
}

impl DurationHistogram {
    /// Counts one duration.
    pub fn observe(&mut self, duration: Duration) {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        // The bucket whose bound is the first at or above it (`le`).
        let bucket = BUCKET_NANOS.partition_point(|&bound| bound < nanos);
        self.buckets[bucket] += 1;
        self.sum_nanos = self.sum_nanos.saturating_add(nanos);
    }

    /// How many durations were counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The sum of every duration counted, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_nanos as f64 / 1e9
    }

    /// Adds another histogram's counts to this one (queues folded under
    /// one label).
    pub fn add(&mut self, other: &Self) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine += theirs;
        }
        self.sum_nanos = self.sum_nanos.saturating_add(other.sum_nanos);
    }
}

/// The three durations of a queue's tasks since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskDurations {
    /// From put, or from going back to the line for another attempt, to
    /// the lease.
    pub wait: DurationHistogram,
    /// From the lease to the report that finished the task (success, or a
    /// failure that ended it).
    pub run: DurationHistogram,
    /// From put to finished, whatever the outcome (ttl expiry included).
    pub end_to_end: DurationHistogram,
}

impl TaskDurations {
    /// Adds another queue's durations to these.
    pub fn add(&mut self, other: &Self) {
        self.wait.add(&other.wait);
        self.run.add(&other.run);
        self.end_to_end.add(&other.end_to_end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_lands_in_the_first_bucket_at_or_above_it() {
        let mut h = DurationHistogram::default();
        h.observe(Duration::ZERO);
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_micros(1001));
        h.observe(Duration::from_secs(3600));
        h.observe(Duration::from_secs(3601));
        assert_eq!(h.buckets[0], 2, "0 and exactly 1 ms are le 0.001");
        assert_eq!(h.buckets[1], 1, "1.001 ms is le 0.0025");
        assert_eq!(h.buckets[TASK_DURATION_BUCKETS.len() - 1], 1);
        assert_eq!(
            h.buckets[TASK_DURATION_BUCKETS.len()],
            1,
            "past the last bound"
        );
        assert_eq!(h.count(), 5);
        assert!((h.sum_seconds() - 7_201.002_001).abs() < 1e-6);
    }
}
