//! Read-only views of the state for GetStats and monitoring: the queues'
//! counters and the broker-wide numbers, read from counters the
//! transitions keep; the workers; a task's queue and whereabouts. Apart from the state machine because they change
//! nothing; a child of it to read its fields.

use std::time::Duration;

use tokio::time::Instant;

use super::task::state_of;
use super::{OLDEST_SCAN, State, Status};
use crate::broker::QueueName;
use crate::broker::queue::QueueState;
use crate::broker::types::{
    BrokerError, LeaseView, QueueStats, Snapshot, Stats, TaskId, TaskView, WorkerInfo,
};

impl State {
    /// The queue a held task (or result) belongs to.
    pub fn task_queue(&self, task: TaskId) -> Result<QueueName, BrokerError> {
        self.tasks
            .get(&task)
            .map(|entry| entry.queue.clone())
            .or_else(|| {
                self.results
                    .get(&task)
                    .map(|done| done.result.queue.clone())
            })
            .ok_or_else(|| BrokerError::TaskNotFound(task.to_string()))
    }

    /// Where an unfinished task is and who holds it; NOT_FOUND for a
    /// finished one (its result says the rest) or an unknown one.
    pub fn describe(&self, task: TaskId) -> Result<TaskView, BrokerError> {
        let entry = self
            .tasks
            .get(&task)
            .ok_or_else(|| BrokerError::TaskNotFound(task.to_string()))?;
        let lease = match &entry.status {
            Status::Leased(lease) => Some(LeaseView {
                worker: lease.worker.clone(),
                expires_at: self.clock.wall(lease.expires_at),
            }),
            Status::Pending => None,
        };
        Ok(TaskView {
            queue: entry.queue.clone(),
            state: state_of(&entry.status),
            attempts: entry.attempt,
            max_attempts: entry.max_attempts,
            created_at: self.clock.wall_of(entry.created_at),
            expires_at: entry.expires_at.map(|at| self.clock.wall_of(at)),
            payload_bytes: entry.payload.len() as u64,
            lease,
        })
    }

    /// Every queue's counters and the workers, for GetStats.
    pub fn stats(&mut self, only: Option<&[QueueName]>, now: Instant) -> Stats {
        let queues = self.queue_stats(only, now);
        let workers = self.workers(only, now);
        Stats { queues, workers }
    }

    /// The workers last seen on a queue of `only` (or all), with the
    /// deadlines of the leases their records name.
    pub fn workers(&mut self, only: Option<&[QueueName]>, now: Instant) -> Vec<WorkerInfo> {
        let (tasks, clock) = (&self.tasks, self.clock);
        let deadline = |task| match &tasks.get(&task)?.status {
            Status::Leased(lease) => Some(clock.wall(lease.expires_at)),
            Status::Pending => None,
        };
        self.workers.report(only, &self.clock, now, deadline)
    }

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

    /// The age of the oldest of the first pending tasks of each line. Each
    /// line is in id order, so its oldest task is among its first ones;
    /// looking at a bounded number keeps stats cheap on long queues.
    fn oldest_pending_age(&self, queue: &QueueState, now: Instant) -> Duration {
        queue
            .ready_heads(OLDEST_SCAN)
            .filter_map(|id| self.tasks.get(id))
            .filter(|e| e.is_ready())
            .map(|e| now.duration_since(self.clock.instant(e.created_at)))
            .max()
            .unwrap_or_default()
    }
}
