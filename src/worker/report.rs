//! What a worker did: how each task ended from the worker's side, and the
//! one tally of those ends that both modes keep.

use crate::pb;

/// What a worker did, for its exit log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Tasks reported as succeeded.
    pub succeeded: u64,
    /// Tasks reported as failed (retried or final).
    pub failed: u64,
    /// Tasks whose lease was lost, or whose report could not be delivered.
    pub abandoned: u64,
    /// Tasks still running when the shutdown grace ran out, handed back to
    /// the queue unfinished.
    pub interrupted: u64,
    /// Tasks the server sent.
    pub tasks_received: u64,
    /// The messages those tasks came in: on the stream path a `task` or a
    /// `tasks` message each, so `tasks_received / task_messages` is the
    /// mean batch the server sent; on the unary path a GetTask answer per
    /// task.
    pub task_messages: u64,
}

impl WorkerReport {
    /// Counts a message from the server that carried `tasks` tasks.
    pub(crate) fn received(&mut self, tasks: usize) {
        self.task_messages += 1;
        self.tasks_received += tasks as u64;
    }

    /// Counts a task that ended.
    pub(crate) fn count(&mut self, ran: Ran) {
        match ran {
            Ran::Succeeded => self.succeeded += 1,
            Ran::Failed => self.failed += 1,
            Ran::Abandoned => self.abandoned += 1,
            Ran::Interrupted => self.interrupted += 1,
        }
    }
}

/// How one task ended, from the worker's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ran {
    /// Its output was accepted.
    Succeeded,
    /// Its failure was accepted (to be retried or final).
    Failed,
    /// Its lease was lost, or its report was not accepted.
    Abandoned,
    /// It was still running when the shutdown grace ran out.
    Interrupted,
}

impl Ran {
    /// How a task ended, by the server's answer to its result on a stream.
    pub(crate) fn acknowledged(ack: &pb::ResultAck) -> Self {
        match (&ack.error, ack.state()) {
            (Some(error), _) => {
                tracing::warn!(task_id = %ack.task_id, error = %error.message, "result not accepted");
                Self::Abandoned
            }
            (None, pb::TaskState::Succeeded) => Self::Succeeded,
            (None, _) => Self::Failed,
        }
    }
}
