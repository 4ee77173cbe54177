//! The operator's calls on tasks and queues: cancel. Apart from the
//! state machine because no other transition calls them; a child of it to
//! use its transitions (`finish`).

use bytes::Bytes;
use tokio::time::Instant;

use super::task::{Ended, state_of};
use super::{State, Status};
use crate::broker::retention::Report;
use crate::broker::types::{BrokerError, LeaseId, TaskId, TaskState};

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
}
