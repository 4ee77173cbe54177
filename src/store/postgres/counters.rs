//! What this server did since it started, per queue: the counters and
//! task durations of `/metrics` and the status page.
//!
//! Several servers share one database, so each counts its own work: the
//! puts it committed, the tasks it handed out, the results it committed
//! and the leases and ttls its sweep ended. Prometheus adds them up across
//! servers (`sum without (instance)`), as for any counter of a replicated
//! service. A transaction's counts are kept apart in a [`Tally`] and added
//! only once it has committed, so a batch that fails and runs again is not
//! counted twice. One short lock per transaction, never per task.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::registry::lock;
use crate::broker::{QueueStats, TaskDurations};

/// One queue's counts.
#[derive(Clone, Debug, Default)]
pub(crate) struct QueueCounts {
    pub(crate) enqueued: u64,
    pub(crate) delivered: u64,
    pub(crate) succeeded: u64,
    /// Failures, those whose ttl ran out included.
    pub(crate) failed: u64,
    pub(crate) expired: u64,
    pub(crate) cancelled: u64,
    pub(crate) retried_after_error: u64,
    pub(crate) retried_after_lease_expiry: u64,
    pub(crate) durations: TaskDurations,
}

impl QueueCounts {
    fn add(&mut self, other: &Self) {
        self.enqueued += other.enqueued;
        self.delivered += other.delivered;
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        self.expired += other.expired;
        self.cancelled += other.cancelled;
        self.retried_after_error += other.retried_after_error;
        self.retried_after_lease_expiry += other.retried_after_lease_expiry;
        self.durations.add(&other.durations);
    }

    /// A task handed out after waiting `waited` seconds (the database's
    /// clock).
    pub(crate) fn delivered(&mut self, waited: f64) {
        self.delivered += 1;
        self.durations.wait.observe(seconds(waited));
    }

    /// A task finished: `ran` is how long its last lease had run (`None`
    /// when it was not leased), `took` how long since its put, in seconds.
    pub(crate) fn finished(&mut self, ran: Option<f64>, took: f64) {
        if let Some(ran) = ran {
            self.durations.run.observe(seconds(ran));
        }
        self.durations.end_to_end.observe(seconds(took));
    }

    /// These counts into a queue's stats.
    pub(crate) fn fill(&self, stats: &mut QueueStats) {
        stats.enqueued = self.enqueued;
        stats.delivered = self.delivered;
        stats.succeeded = self.succeeded;
        stats.failed = self.failed;
        stats.expired = self.expired;
        stats.cancelled = self.cancelled;
        stats.retried_after_error = self.retried_after_error;
        stats.retried_after_lease_expiry = self.retried_after_lease_expiry;
        stats.redelivered = self.retried_after_error + self.retried_after_lease_expiry;
        stats.durations = self.durations;
    }
}

/// Seconds from the database as a duration: negative (clock steps) as zero.
fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or_default()
}

/// The counts of one transaction, not yet committed.
#[derive(Debug, Default)]
pub(crate) struct Tally(HashMap<String, QueueCounts>);

impl Tally {
    /// The counts of `queue` in this transaction.
    pub(crate) fn queue(&mut self, queue: &str) -> &mut QueueCounts {
        if !self.0.contains_key(queue) {
            self.0.insert(queue.to_owned(), QueueCounts::default());
        }
        self.0.get_mut(queue).expect("inserted above")
    }
}

/// This server's counts since it started.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Taken once per committed transaction and by a scrape.
    queues: Mutex<HashMap<String, QueueCounts>>,
}

impl Counters {
    /// Adds a committed transaction's counts.
    pub(crate) fn add(&self, tally: Tally) {
        if tally.0.is_empty() {
            return;
        }
        let mut queues = lock(&self.queues);
        for (queue, counts) in tally.0 {
            queues.entry(queue).or_default().add(&counts);
        }
    }

    /// Every queue's counts.
    pub(crate) fn read(&self) -> HashMap<String, QueueCounts> {
        lock(&self.queues).clone()
    }
}
