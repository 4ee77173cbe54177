//! The store seam: what the gRPC layer asks of wherever tasks and results
//! live. Two stores implement it:
//! - the in-memory engine ([`crate::broker::Broker`], `memory.rs`), the
//!   embedded default;
//! - PostgreSQL (`postgres/`), durable and shared by several servers.
//!
//! The gRPC layer is generic over [`Store`] (static dispatch: the memory
//! store's calls compile to direct calls, as before the seam). Both speak
//! the engine's vocabulary (`broker::types`): no transport type and no SQL
//! crosses the seam.

mod memory;
pub(crate) mod postgres;

use std::future::Future;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::broker::{
    BrokerError, Holdings, LeaseId, LeaseRequest, LeasedTask, NewTask, Outcome, PutOutcome,
    QueueName, Snapshot, Stats, TaskId, TaskResult, TaskState, TaskView, WorkerInfo,
};

/// Where tasks and results live: every call of `taskq.v1`, in engine terms.
///
/// Each method's contract is the one documented on the same method of
/// [`crate::broker::Broker`]; a store that cannot reach its backing
/// service answers [`BrokerError::StoreUnavailable`].
pub trait Store: Clone + Send + Sync + 'static {
    /// A worker stream's deliveries (StreamTasks).
    type WorkerStream: TaskDeliveries;
    /// A queue's result stream (WatchResults by queue).
    type ResultStream: ResultDeliveries;
    /// A watch of listed tasks' results (WatchResults by ids).
    type Watch: ResultWatch;

    /// Stores a task, waiting up to `wait` for room in a full queue.
    fn put(
        &self,
        task: NewTask,
        wait: Duration,
    ) -> impl Future<Output = Result<PutOutcome, BrokerError>> + Send;

    /// Stores many tasks; one answer per task, in order.
    fn put_many(
        &self,
        tasks: Vec<NewTask>,
    ) -> impl Future<Output = Vec<Result<PutOutcome, BrokerError>>> + Send;

    /// Leases the next task of a queue, waiting up to `wait` for one.
    fn lease(
        &self,
        request: LeaseRequest,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<LeasedTask>, BrokerError>> + Send;

    /// Moves the expiry of the current lease of a task.
    fn extend(
        &self,
        lease: LeaseId,
        extend_by: Option<Duration>,
    ) -> impl Future<Output = Result<SystemTime, BrokerError>> + Send;

    /// Records an outcome reported under `lease`.
    fn complete(
        &self,
        lease: LeaseId,
        outcome: Outcome,
    ) -> impl Future<Output = Result<TaskState, BrokerError>> + Send;

    /// [`Store::complete`] for many results; one answer per result.
    fn complete_many(
        &self,
        results: Vec<(LeaseId, Outcome)>,
    ) -> impl Future<Output = Vec<Result<TaskState, BrokerError>>> + Send;

    /// A task's result, waiting up to `wait` while it is unfinished.
    fn result(
        &self,
        task: TaskId,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<TaskResult>, BrokerError>> + Send;

    /// The next result of a queue, handed out once, waiting up to `wait`.
    fn next_result(
        &self,
        queue: QueueName,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<TaskResult>, BrokerError>> + Send;

    /// Counters of the queues in `only`, or of all queues.
    fn stats(
        &self,
        only: Option<&[QueueName]>,
    ) -> impl Future<Output = Result<Stats, BrokerError>> + Send;

    /// The queue a held task belongs to.
    fn task_queue(
        &self,
        task: TaskId,
    ) -> impl Future<Output = Result<QueueName, BrokerError>> + Send;

    /// Takes back an unfinished task: it ends CANCELLED and a lease on it
    /// is revoked (a worker stream holding it is told). Returns the state
    /// it had, pending or leased; [`BrokerError::TaskFinished`] for a
    /// finished task, [`BrokerError::TaskNotFound`] for an unknown one.
    fn cancel(&self, task: TaskId) -> impl Future<Output = Result<TaskState, BrokerError>> + Send;

    /// Stops (`paused`) or restarts the hand-outs of a queue; returns
    /// whether it was paused before.
    fn set_paused(
        &self,
        queue: &QueueName,
        paused: bool,
    ) -> impl Future<Output = Result<bool, BrokerError>> + Send;

    /// Drops every pending task of a queue (each ends CANCELLED); returns
    /// how many.
    fn purge(&self, queue: &QueueName) -> impl Future<Output = Result<u64, BrokerError>> + Send;

    /// The workers that called this server, for the status page: what
    /// [`Store::stats`] lists, without counting the queues.
    fn workers(&self) -> impl Future<Output = Result<Vec<WorkerInfo>, BrokerError>> + Send;

    /// Where an unfinished task is and who holds it (the status page's
    /// lookup); [`BrokerError::TaskNotFound`] when it is finished or
    /// unknown.
    fn describe(&self, task: TaskId) -> impl Future<Output = Result<TaskView, BrokerError>> + Send;

    /// Opens a worker stream on `request.queue` with `window` tasks in
    /// flight at most.
    fn open_worker_stream(
        &self,
        request: LeaseRequest,
        window: u32,
    ) -> impl Future<Output = Result<Self::WorkerStream, BrokerError>> + Send;

    /// Opens a queue's result stream.
    fn open_result_stream(
        &self,
        queue: &QueueName,
    ) -> impl Future<Output = Result<Self::ResultStream, BrokerError>> + Send;

    /// Watches the results of the listed tasks.
    fn watch(
        &self,
        ids: &[TaskId],
    ) -> impl Future<Output = Result<Self::Watch, BrokerError>> + Send;

    /// Every queue's counters, for monitoring.
    fn snapshot(&self) -> impl Future<Output = Result<Snapshot, BrokerError>> + Send;

    /// Starts draining: waiting calls are answered at once.
    fn close(&self);

    /// Resolves once [`Store::close`] has been called.
    fn closed(&self) -> impl Future<Output = ()> + Send + 'static;

    /// Gives back at once what this server's worker streams still hold:
    /// the drain's grace is over and the server stops, so those streams
    /// end (StreamTasks, point 5). A store that outlives the process would
    /// otherwise keep the tasks until their leases run out.
    fn release_streams(&self) -> impl Future<Output = ()> + Send;

    /// What this server holds that a stop would lose (nothing, for a
    /// durable store), for the last log line.
    fn holdings(&self) -> Holdings;

    /// The store's name in logs and errors: `memory` or `postgres`.
    fn kind(&self) -> &'static str;
}

/// The tasks delivered to one worker stream.
pub trait TaskDeliveries: Send + Unpin + 'static {
    /// Who sets the stream's window and counts what it holds.
    type Control: WindowControl;

    /// The next task leased to this stream, when there is one.
    fn poll_next_task(&mut self, cx: &mut Context<'_>) -> Poll<Option<LeasedTask>>;

    /// [`TaskDeliveries::poll_next_task`] sharing one clock reading across a
    /// batch (`now` is read once, when first needed).
    fn poll_next_task_at(
        &mut self,
        cx: &mut Context<'_>,
        now: &mut Option<Instant>,
    ) -> Poll<Option<LeasedTask>>;

    /// Tasks ready to be taken without waiting.
    fn ready(&self) -> usize;

    /// The next lease of this stream's tasks that was cancelled
    /// ([`Store::cancel`]): its place in the window is free. Pending while
    /// there is none.
    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> Poll<Option<LeaseId>>;

    /// A task taken but not sent goes back to the front of the stream.
    fn put_back(&mut self, task: LeasedTask);

    /// The stream's control.
    fn control(&self) -> Self::Control;
}

/// Sets a worker stream's window and counts what it holds.
pub trait WindowControl: Send + Sync + 'static {
    /// Tasks in flight at most from now on.
    fn set_window(&self, window: u32);
    /// Tasks leased through the stream and not yet reported.
    fn outstanding(&self) -> usize;
    /// Ends the stream and gives back what it holds, before the server
    /// closes its side: a worker that sees the stream end finds its
    /// unreported tasks back in the queue. (The memory store gives them
    /// back when the stream is dropped, under its lock; nothing to do
    /// here.)
    fn give_back(&self) -> impl Future<Output = ()> + Send;
}

/// The results handed to one result stream.
pub trait ResultDeliveries: Send + Unpin + 'static {
    /// The next result; `None` once the store closed and this stream handed
    /// on what it held.
    fn poll_next_result(&mut self, cx: &mut Context<'_>) -> Poll<Option<TaskResult>>;
    /// Results ready to be taken without waiting.
    fn ready(&self) -> usize;
    /// A result taken but not sent goes back to the front.
    fn put_back(&mut self, result: TaskResult);
}

/// The results of watched tasks as each exists.
pub trait ResultWatch: Send + 'static {
    /// The next watched result; `None` when the watch ended.
    fn recv(&mut self) -> impl Future<Output = Option<TaskResult>> + Send;
}
