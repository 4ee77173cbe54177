//! The memory store: the in-memory engine behind the seam. Each call is a
//! direct call of the [`Broker`] method of the same name; the synchronous
//! ones are wrapped in ready futures, which the compiler folds away.

use std::future::{Future, ready};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{ResultDeliveries, ResultWatch, Store, TaskDeliveries, WindowControl};
use crate::broker::{
    Broker, BrokerError, Holdings, LeaseId, LeaseRequest, LeasedTask, NewTask, Outcome, PutOutcome,
    QueueName, ResultStream, Snapshot, Stats, TaskId, TaskResult, TaskState, TaskView, Watch,
    WorkerInfo, WorkerStream, WorkerStreamControl,
};

impl Store for Broker {
    type WorkerStream = WorkerStream;
    type ResultStream = ResultStream;
    type Watch = Watch;

    fn put(
        &self,
        task: NewTask,
        wait: Duration,
    ) -> impl Future<Output = Result<PutOutcome, BrokerError>> + Send {
        Broker::put(self, task, wait)
    }

    fn put_many(
        &self,
        tasks: Vec<NewTask>,
    ) -> impl Future<Output = Vec<Result<PutOutcome, BrokerError>>> + Send {
        ready(Broker::put_many(self, tasks))
    }

    fn lease(
        &self,
        request: LeaseRequest,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<LeasedTask>, BrokerError>> + Send {
        Broker::lease(self, request, wait)
    }

    fn extend(
        &self,
        lease: LeaseId,
        extend_by: Option<Duration>,
    ) -> impl Future<Output = Result<SystemTime, BrokerError>> + Send {
        ready(Broker::extend(self, lease, extend_by))
    }

    fn complete(
        &self,
        lease: LeaseId,
        outcome: Outcome,
    ) -> impl Future<Output = Result<TaskState, BrokerError>> + Send {
        ready(Broker::complete(self, lease, outcome))
    }

    fn complete_many(
        &self,
        results: Vec<(LeaseId, Outcome)>,
    ) -> impl Future<Output = Vec<Result<TaskState, BrokerError>>> + Send {
        ready(Broker::complete_many(self, results))
    }

    fn result(
        &self,
        task: TaskId,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<TaskResult>, BrokerError>> + Send {
        Broker::result(self, task, wait)
    }

    fn next_result(
        &self,
        queue: QueueName,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<TaskResult>, BrokerError>> + Send {
        Broker::next_result(self, queue, wait)
    }

    fn stats(
        &self,
        only: Option<&[QueueName]>,
    ) -> impl Future<Output = Result<Stats, BrokerError>> + Send {
        ready(Ok(Broker::stats(self, only)))
    }

    fn task_queue(
        &self,
        task: TaskId,
    ) -> impl Future<Output = Result<QueueName, BrokerError>> + Send {
        ready(Broker::task_queue(self, task))
    }

    fn cancel(&self, task: TaskId) -> impl Future<Output = Result<TaskState, BrokerError>> + Send {
        ready(Broker::cancel(self, task))
    }

    fn set_paused(
        &self,
        queue: &QueueName,
        paused: bool,
    ) -> impl Future<Output = Result<bool, BrokerError>> + Send {
        ready(if paused {
            Broker::pause(self, queue)
        } else {
            Broker::resume(self, queue)
        })
    }

    fn purge(&self, queue: &QueueName) -> impl Future<Output = Result<u64, BrokerError>> + Send {
        ready(Broker::purge(self, queue))
    }

    fn workers(&self) -> impl Future<Output = Result<Vec<WorkerInfo>, BrokerError>> + Send {
        ready(Ok(Broker::workers(self)))
    }

    fn describe(&self, task: TaskId) -> impl Future<Output = Result<TaskView, BrokerError>> + Send {
        ready(Broker::describe(self, task))
    }

    fn open_worker_stream(
        &self,
        request: LeaseRequest,
        window: u32,
    ) -> impl Future<Output = Result<WorkerStream, BrokerError>> + Send {
        ready(Broker::open_worker_stream(self, request, window))
    }

    fn open_result_stream(
        &self,
        queue: &QueueName,
    ) -> impl Future<Output = Result<ResultStream, BrokerError>> + Send {
        ready(Broker::open_result_stream(self, queue))
    }

    fn watch(&self, ids: &[TaskId]) -> impl Future<Output = Result<Watch, BrokerError>> + Send {
        ready(Broker::watch(self, ids))
    }

    fn snapshot(&self) -> impl Future<Output = Result<Snapshot, BrokerError>> + Send {
        ready(Ok(Broker::snapshot(self)))
    }

    fn close(&self) {
        Broker::close(self);
    }

    fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        Broker::closed(self)
    }

    /// Nothing to do: what the streams hold ends with the process.
    fn release_streams(&self) -> impl Future<Output = ()> + Send {
        ready(())
    }

    fn holdings(&self) -> Holdings {
        Broker::holdings(self)
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

impl TaskDeliveries for WorkerStream {
    type Control = WorkerStreamControl;

    fn poll_next_task(&mut self, cx: &mut Context<'_>) -> Poll<Option<LeasedTask>> {
        WorkerStream::poll_next_task(self, cx)
    }

    fn poll_next_task_at(
        &mut self,
        cx: &mut Context<'_>,
        now: &mut Option<Instant>,
    ) -> Poll<Option<LeasedTask>> {
        WorkerStream::poll_next_task_at(self, cx, now)
    }

    fn ready(&self) -> usize {
        WorkerStream::ready(self)
    }

    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> Poll<Option<LeaseId>> {
        WorkerStream::poll_cancelled(self, cx)
    }

    fn put_back(&mut self, task: LeasedTask) {
        WorkerStream::put_back(self, task);
    }

    fn control(&self) -> WorkerStreamControl {
        WorkerStream::control(self)
    }
}

impl WindowControl for WorkerStreamControl {
    fn set_window(&self, window: u32) {
        WorkerStreamControl::set_window(self, window);
    }

    fn outstanding(&self) -> usize {
        WorkerStreamControl::outstanding(self)
    }

    fn give_back(&self) -> impl Future<Output = ()> + Send {
        ready(())
    }
}

impl ResultDeliveries for ResultStream {
    fn poll_next_result(&mut self, cx: &mut Context<'_>) -> Poll<Option<TaskResult>> {
        ResultStream::poll_next_result(self, cx)
    }

    fn ready(&self) -> usize {
        ResultStream::ready(self)
    }

    fn put_back(&mut self, result: TaskResult) {
        ResultStream::put_back(self, result);
    }
}

impl ResultWatch for Watch {
    fn recv(&mut self) -> impl Future<Output = Option<TaskResult>> + Send {
        Watch::recv(self)
    }
}
