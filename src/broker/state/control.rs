//! The operator's calls on tasks and queues: cancel, pause and resume,
//! purge. Apart from the
//! state machine because no other transition calls them; a child of it to
//! use its transitions (`finish`).

use bytes::Bytes;
use tokio::time::Instant;

use super::task::{Ended, state_of};
use super::{State, Status};
use crate::broker::retention::Report;
use crate::broker::types::{BrokerError, LeaseId, QueueName, TaskId, TaskState};

impl State {
    /// Takes back an unfinished task: it ends CANCELLED, and a lease on it
    /// is revoked (a worker stream holding it is told). Returns the state
    /// it had.
    pub fn cancel(&mut self, id: TaskId, now: Instant) -> Result<TaskState, BrokerError> {
        let Some(entry) = self.tasks.get(&id) else {
            return Err(if self.results.contains(&id) {
                BrokerError::TaskFinished(id)
            } else {
                BrokerError::TaskNotFound(id.to_string())
            });
        };
        let previous = state_of(&entry.status);
        let holder = match &entry.status {
            Status::Leased(lease) => {
                if let Some(stream) = lease.stream.and_then(|sid| self.streams.get(&sid)) {
                    // A stream that left has nothing to stop.
                    let _ = stream.cancels.send(LeaseId {
                        task: id,
                        seq: lease.seq,
                    });
                }
                Some(lease.worker.clone())
            }
            Status::Pending => None,
        };
        tracing::debug!(task_id = %id, ?previous, "task cancelled");
        let ended = Ended {
            state: TaskState::Cancelled,
            output: Bytes::new(),
            error: "cancelled by CancelTask before it finished".into(),
            worker: holder,
            by_lease: 0,
            report: Report::Cancelled,
        };
        self.finish(id, ended, now);
        Ok(previous)
    }

    /// Stops (or with `paused` false, restarts) the hand-outs of a queue,
    /// made if new; puts go on, and leases in progress run on. Returns
    /// whether it was paused before.
    pub fn set_paused(
        &mut self,
        queue: &QueueName,
        paused: bool,
        now: Instant,
    ) -> Result<bool, BrokerError> {
        let (_, state) = self.queue_mut(queue)?;
        let was = std::mem::replace(&mut state.paused, paused);
        tracing::info!(queue = %queue, paused, was_paused = was, "queue hand-outs changed");
        if was && !paused && !self.closed {
            self.dispatch(queue, now);
        }
        Ok(was)
    }

    /// Drops every pending and delayed task of a queue: each ends
    /// CANCELLED, so whoever waits for its result learns it. Leased tasks
    /// run on. Returns how many it dropped. (Under the lock: proportional
    /// to the queue's pending tasks, and to every task held when the queue
    /// has delayed ones.)
    pub fn purge(&mut self, queue: &QueueName, now: Instant) -> Result<u64, BrokerError> {
        let Some(state) = self.queues.get_mut(queue) else {
            return Ok(0);
        };
        let mut line = state.take_ready();
        if state.delayed() > 0 {
            // Delayed tasks are in no line: found by a pass over the tasks
            // held, paid only by a queue that has some.
            let delayed: Vec<TaskId> = self
                .tasks
                .iter()
                .filter(|(_, entry)| entry.queue == *queue && entry.due().is_some())
                .map(|(id, _)| *id)
                .collect();
            line.extend(delayed);
            // One order for both, as PostgreSQL's results of one purge
            // go out: by priority, then id.
            let tasks = &self.tasks;
            line.sort_unstable_by_key(|id| {
                let priority = tasks.get(id).map_or(0, |entry| entry.priority);
                (std::cmp::Reverse(priority), *id)
            });
        }
        let mut purged = 0;
        for id in line {
            let pending = self
                .tasks
                .get(&id)
                .is_some_and(|entry| matches!(entry.status, Status::Pending));
            if !pending {
                continue;
            }
            let ended = Ended {
                state: TaskState::Cancelled,
                output: Bytes::new(),
                error: "purged by PurgeQueue before it was handed out".into(),
                worker: None,
                by_lease: 0,
                report: Report::Cancelled,
            };
            self.finish(id, ended, now);
            purged += 1;
        }
        tracing::info!(queue = %queue, purged, "queue purged");
        Ok(purged)
    }
}
