//! The work handed to the writers (group commit).

use tokio::sync::oneshot;

use crate::broker::{
    BrokerError, LeaseId, NewTask, Outcome, PutOutcome, QueueName, TaskId, TaskState,
};

/// Work for a writer.
pub(crate) enum Job {
    /// Store tasks (already validated, with their queue and ids).
    Put {
        tasks: Vec<Prepared>,
        answer: oneshot::Sender<Vec<Result<PutOutcome, BrokerError>>>,
    },
    /// Record results.
    Complete {
        results: Vec<(LeaseId, Outcome)>,
        answer: oneshot::Sender<Vec<Result<TaskState, BrokerError>>>,
    },
}

impl Job {
    pub(crate) fn items(&self) -> usize {
        match self {
            Job::Put { tasks, .. } => tasks.len(),
            Job::Complete { results, .. } => results.len(),
        }
    }
}

/// A task ready to insert.
pub(crate) struct Prepared {
    pub id: TaskId,
    pub queue: QueueName,
    pub task: NewTask,
    pub max_attempts: u32,
}

impl Prepared {
    /// Whether it waits out a delay before it is pending.
    pub(crate) fn is_delayed(&self) -> bool {
        self.task.delay.is_some_and(|delay| !delay.is_zero())
    }
}
