//! Read-only views of the state for GetStats and monitoring: the queues'
//! counters and the broker-wide numbers, read from counters the
//! transitions keep. Apart from the state machine because they change
//! nothing; a child of it to read its fields.

use std::time::Duration;

use tokio::time::Instant;

use super::{OLDEST_SCAN, State, Status};
use crate::broker::QueueName;
use crate::broker::queue::QueueState;
use crate::broker::types::QueueStats;
use crate::broker::types::Snapshot;

impl State {
    /// Every queue's counters, sorted by name, and the broker-wide ones.
    /// Per queue it looks at most at the first few entries of the ready
    /// line (for the oldest age); it never walks the tasks.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        Snapshot {
            queues: self.queue_stats(None, now),
            held_bytes: self.held_bytes as u64,
            held_bytes_limit: self.config.max_held_bytes as u64,
            workers_alive: self.workers.alive(now),
            recent_failures: self.failures.iter().cloned().collect(),
        }
    }

    /// The counters of the queues in `only` (zeros for one not made yet),
    /// or of every queue, sorted by name.
    pub(super) fn queue_stats(&self, only: Option<&[QueueName]>, now: Instant) -> Vec<QueueStats> {
        let of = |name: &QueueName, q: &QueueState| q.stats(name, self.oldest_pending_age(q, now));
        let mut queues: Vec<QueueStats> = match only {
            None => self.queues.iter().map(|(name, q)| of(name, q)).collect(),
            Some(names) => names
                .iter()
                .map(|name| match self.queues.get(name) {
                    Some(q) => of(name, q),
                    None => QueueStats {
                        queue: name.to_string(),
                        ..QueueStats::default()
                    },
                })
                .collect(),
        };
        queues.sort_by(|a, b| a.queue.cmp(&b.queue));
        queues.dedup_by(|a, b| a.queue == b.queue);
        queues
    }

    /// The age of the oldest of the first pending tasks in line. Retried
    /// tasks go to the head, so the oldest task is among the first ones;
    /// looking at a bounded number keeps stats cheap on long queues.
    fn oldest_pending_age(&self, queue: &QueueState, now: Instant) -> Duration {
        queue
            .ready_head(OLDEST_SCAN)
            .filter_map(|id| self.tasks.get(id))
            .filter(|e| matches!(e.status, Status::Pending))
            .map(|e| now.duration_since(self.clock.instant(e.created_at)))
            .max()
            .unwrap_or_default()
    }
}
