//! The queue engine: named queues of tasks, leases with one timer for all of
//! them, results, and the calls waiting for either.
//!
//! This module knows nothing of gRPC, protobuf or sockets (a test in
//! `tests/architecture.rs` keeps it so): it speaks in [`NewTask`],
//! [`LeasedTask`], [`TaskResult`] and [`BrokerError`], so that another front
//! end or a durable store can be put behind the same API.
//!
//! Invariants:
//! - Every held task is in exactly one state: pending (once in its queue's
//!   line), delayed (in no line, with one timer entry for when it is due),
//!   leased (to exactly one lease), or finished (with a result).
//! - All state sits behind one `std::sync::Mutex`, held only for short,
//!   synchronous sections. No change spans an `.await`, so a call that is
//!   cancelled at any point leaves the broker consistent.
//! - A task handed to a waiting call is leased inside the lock; if that call
//!   is gone, the task goes back to the head of its queue at once.
//! - Lease and ttl deadlines live in one heap driven by one background task;
//!   time is `tokio::time::Instant` (monotonic, and pausable in tests).
//! - A queue hands out its highest priority first and, within one
//!   priority, its oldest task (by id, which is made in put order). A task
//!   that comes back (its lease lost, its retry's backoff or its delay
//!   over) takes its place by id, so it goes before every task put after
//!   it.

mod backoff;
mod clock;
mod config;
mod durations;
mod handle;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod model;
mod queue;
mod ready;
mod retention;
#[cfg(test)]
mod schedule_tests;
mod state;
#[cfg(test)]
mod tests;
mod timers;
mod types;
mod waiters;
mod workers;

pub use backoff::RetryBackoff;
pub use config::{
    BrokerConfig, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_QUEUES, DEFAULT_MAX_RESULTS,
    DEFAULT_MAX_WAITERS, DEFAULT_QUEUE_CAPACITY,
};
pub use durations::{DurationHistogram, TASK_DURATION_BUCKETS, TaskDurations};
pub use handle::{Broker, ResultStream, Watch, WorkerStream, WorkerStreamControl};
pub use types::{
    BrokerError, Holdings, LeaseId, LeaseRequest, LeaseView, LeasedTask, NewTask, Outcome,
    PutOutcome, QueueName, QueueStats, RECENT_FAILURES, Snapshot, Stats, TaskId, TaskResult,
    TaskState, TaskView, WorkerId, WorkerInfo,
};
pub(crate) use types::{IdMaker, IdMap};
#[cfg(any(test, feature = "fuzzing"))]
pub use waiters::RESULT_STREAM_WINDOW;
