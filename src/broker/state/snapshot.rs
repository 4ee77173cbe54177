//! The monitoring snapshot: the queues' counters and the broker-wide
//! numbers, read from counters the transitions keep. Apart from the state
//! machine because it changes nothing; a child of it to read its fields.

use tokio::time::Instant;

use super::State;
use crate::broker::types::Snapshot;

impl State {
    /// Every queue's counters, sorted by name, and the broker-wide ones.
    /// Per queue it looks at most at the first few entries of the ready
    /// line (for the oldest age); it never walks the tasks.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let mut queues: Vec<_> = self
            .queues
            .iter()
            .map(|(name, q)| q.stats(name, self.oldest_pending_age(q, now)))
            .collect();
        queues.sort_by(|a, b| a.queue.cmp(&b.queue));
        Snapshot {
            queues,
            held_bytes: self.held_bytes as u64,
            held_bytes_limit: self.config.max_held_bytes as u64,
            workers_alive: self.workers.alive(now),
        }
    }
}
