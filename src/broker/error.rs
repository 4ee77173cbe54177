//! The engine's errors. Each says what went wrong and what to do; the gRPC
//! layer maps each onto one status code.

use super::{LeaseId, QueueName, TaskId};

/// Why the broker refused a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The queue name is not 1 to 128 of `A-Z a-z 0-9 . _ -`.
    #[error("invalid queue name {name:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ -")]
    InvalidQueueName {
        /// The name given (shortened).
        name: String,
    },
    /// The payload is over the limit.
    #[error(
        "payload is {size} bytes; the limit is {limit} bytes (server flag --max-payload): \
         store large inputs elsewhere and send a reference"
    )]
    PayloadTooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The result output or failure message is over the limit.
    #[error("result is {size} bytes; the limit is {limit} bytes (server flag --max-result)")]
    ResultTooLarge {
        /// The result's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Some other field of the request is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The queue holds its capacity of unfinished tasks.
    #[error(
        "queue {queue} is full ({capacity} unfinished tasks): retry later, add workers, \
         or raise the server's --queue-capacity"
    )]
    QueueFull {
        /// The queue.
        queue: QueueName,
        /// Its capacity.
        capacity: usize,
    },
    /// A server-wide limit is reached.
    #[error("server limit reached: {0}")]
    LimitReached(String),
    /// No such task is held.
    #[error("no task {0}: it was never stored, or its result is no longer held")]
    TaskNotFound(String),
    /// The lease named is not the task's current lease.
    #[error(
        "lease {lease} is not the current lease of task {task}: it expired or was released, \
         and the task may be running elsewhere; drop this report"
    )]
    StaleLease {
        /// The task.
        task: TaskId,
        /// The lease given.
        lease: String,
    },
    /// The task already has its result.
    #[error("task {0} is already finished")]
    TaskFinished(TaskId),
    /// The task already has a different result.
    #[error("task {0} already has a different result; results are write-once")]
    ResultConflict(TaskId),
    /// The broker is draining for shutdown.
    #[error("the server is shutting down: retry against another instance or after restart")]
    ShuttingDown,
}

impl BrokerError {
    pub(crate) fn stale(lease: LeaseId) -> Self {
        Self::StaleLease {
            task: lease.task,
            // Sequence 0 is never issued: it stands for a lease id that was
            // malformed or named another task.
            lease: if lease.seq == 0 {
                "given".into()
            } else {
                lease.to_string()
            },
        }
    }
}
