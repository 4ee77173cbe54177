//! The [`Broker`] handle: the engine's API. Each call takes the state's
//! one lock for a short synchronous section; calls that wait do so outside
//! it, behind drop guards that give back what a cancelled call held. The
//! broker's ends of its streams live here too, as drop guards: a worker
//! stream's deliveries ([`WorkerStream`], StreamTasks), a queue's results
//! as they finish ([`ResultStream`], WatchResults by queue), and a watch on
//! tasks' results ([`Watch`], WatchResults by task ids). And the one timer
//! task that fires every deadline.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::config::BrokerConfig;
use super::state::{PutRefused, State};
use super::types::{
    BrokerError, Holdings, LeaseId, LeaseRequest, LeasedTask, NewTask, Outcome, PutOutcome,
    QueueName, Snapshot, Stats, TaskId, TaskResult, TaskState, TaskView, WorkerInfo,
};
use super::waiters::{ResultStreamFlow, ResultStreamId, StreamId, StreamSenders, WaiterId};

/// A handle to the queue engine. Cheap to clone; all clones share one state.
///
/// Must be made inside a Tokio runtime: it starts one background task that
/// fires lease and ttl deadlines. That task stops when the last handle is
/// dropped.
#[derive(Clone, Debug)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// A std mutex: no critical section awaits, and each is short.
    state: Mutex<State>,
    timer_wake: Arc<Notify>,
    closed: watch::Sender<bool>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the timer task see that the broker is gone and stop.
        self.timer_wake.notify_one();
    }
}

impl Broker {
    /// Makes a broker and starts its timer task.
    pub fn new(config: BrokerConfig) -> Self {
        let timer_wake = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            state: Mutex::new(State::new(config, timer_wake.clone())),
            timer_wake: timer_wake.clone(),
            closed: watch::Sender::new(false),
        });
        tokio::spawn(run_timer(Arc::downgrade(&inner), timer_wake));
        Self { inner }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; the state is still
        // the best there is, so keep serving rather than cascade the panic.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a task, waiting up to `wait` for room while its queue is full.
    ///
    /// # Errors
    /// Invalid input ([`BrokerError::InvalidQueueName`],
    /// [`BrokerError::PayloadTooLarge`], [`BrokerError::InvalidArgument`]);
    /// [`BrokerError::QueueFull`] when no room came in time;
    /// [`BrokerError::LimitReached`] when a new queue would pass the limit;
    /// [`BrokerError::ShuttingDown`] after [`Broker::close`].
    pub async fn put(&self, mut task: NewTask, wait: Duration) -> Result<PutOutcome, BrokerError> {
        let deadline = far_deadline(wait);
        loop {
            let room = {
                let mut state = self.state();
                let now = Instant::now();
                let room = match state.put(task, now) {
                    Ok(outcome) => return Ok(outcome),
                    Err(PutRefused::Error(error)) => return Err(error),
                    Err(PutRefused::Full { error, .. }) if now >= deadline => return Err(error),
                    Err(PutRefused::Full {
                        task: back, room, ..
                    }) => {
                        task = *back;
                        room
                    }
                };
                // Registered before the lock is released, so a task that
                // finishes in between still wakes this call.
                let mut notified = Box::pin(room.notified_owned());
                notified.as_mut().enable();
                notified
            };
            let _ = tokio::time::timeout_at(deadline, room).await;
        }
    }

    /// Stores many tasks under one lock. Each is validated and stored on
    /// its own: the answer has one outcome per task, in order. A task whose
    /// queue is full is refused at once ([`BrokerError::QueueFull`]); batches
    /// do not wait for room.
    pub fn put_many(&self, tasks: Vec<NewTask>) -> Vec<Result<PutOutcome, BrokerError>> {
        self.state().put_many(tasks, Instant::now())
    }

    /// Opens a worker stream (StreamTasks) on `request.queue`: tasks arrive
    /// on the returned [`WorkerStream`] while fewer than its window are
    /// outstanding. Dropping it ends the stream and sends every task still
    /// leased through it back to its queue at once.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] when too many calls and streams wait.
    pub fn open_worker_stream(
        &self,
        request: LeaseRequest,
        window: u32,
    ) -> Result<WorkerStream, BrokerError> {
        let (tx, deliveries) = mpsc::unbounded_channel();
        let (cancels_tx, cancels) = mpsc::unbounded_channel();
        let id = self.state().open_stream(
            &request.queue,
            request.worker,
            request.lease_duration,
            window,
            StreamSenders {
                tasks: tx,
                cancels: cancels_tx,
            },
            Instant::now(),
        )?;
        Ok(WorkerStream::new(self.clone(), id, deliveries, cancels))
    }

    /// Watches many tasks: each result arrives on the returned receiver as
    /// soon as it exists (at once for finished tasks), in completion order.
    /// Not consumed. Dropping the [`Watch`] ends it.
    ///
    /// # Errors
    /// [`BrokerError::TaskNotFound`] for an id not held, before anything is
    /// watched; [`BrokerError::LimitReached`] past `max_waiters`.
    pub fn watch(&self, ids: &[TaskId]) -> Result<Watch, BrokerError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.state().watch_tasks(ids, &tx)?;
        Ok(Watch::new(self.clone(), ids.to_vec(), tx, rx))
    }

    /// Opens a result stream: a queue's results as they finish
    /// (WatchResults by queue):
    /// each result is handed out once, shared with [`Broker::next_result`]
    /// callers, who come first. The stream holds at most a small window of
    /// results its reader has not taken; dropped, it gives those back to
    /// the head of the queue's results. After [`Broker::close`] it ends
    /// once it has handed on what it holds.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] when too many calls and streams wait,
    /// or for a new queue past `max_queues`.
    pub fn open_result_stream(&self, queue: &QueueName) -> Result<ResultStream, BrokerError> {
        let (tx, results) = mpsc::unbounded_channel();
        let (id, flow) = self.state().open_result_stream(queue, tx)?;
        Ok(ResultStream::new(self.clone(), id, flow, results))
    }

    /// Leases the oldest pending task of a queue, waiting up to `wait` for
    /// one. `Ok(None)` means the wait ended with no task.
    ///
    /// If the returned future is dropped while waiting, it takes no task: a
    /// task already handed to it goes back to the head of the queue.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] when too many calls wait already, or a
    /// new queue would pass the queue limit.
    pub async fn lease(
        &self,
        request: LeaseRequest,
        wait: Duration,
    ) -> Result<Option<LeasedTask>, BrokerError> {
        let (tx, rx) = oneshot::channel();
        let waiter = {
            let mut state = self.state();
            let now = Instant::now();
            if let Some(task) =
                state.lease_now(&request.queue, &request.worker, request.lease_duration, now)?
            {
                return Ok(Some(task));
            }
            if state.is_closed() || wait.is_zero() {
                return Ok(None);
            }
            state.add_task_waiter(&request.queue, request.worker, request.lease_duration, tx)?
        };
        let mut guard = TaskWait {
            broker: self,
            queue: request.queue,
            waiter,
            rx,
        };
        if let Some(task) = self.wait(&mut guard.rx, wait).await {
            return Ok(Some(task));
        }
        // The wait ended; a task handed over at the last instant is kept
        // rather than given back.
        Ok(guard.rx.try_recv().ok())
    }

    /// Waits for a value on `rx` until `wait` passes or the broker closes.
    async fn wait<T>(&self, rx: &mut oneshot::Receiver<T>, wait: Duration) -> Option<T> {
        let mut closed = self.inner.closed.subscribe();
        tokio::select! {
            value = rx => value.ok(),
            () = tokio::time::sleep(wait) => None,
            _ = closed.wait_for(|closed| *closed) => None,
        }
    }

    /// Moves the expiry of the current lease of a task to now + `extend_by`
    /// (`None`: the default lease), clamped to the maximum lease.
    ///
    /// # Errors
    /// [`BrokerError::TaskNotFound`], [`BrokerError::TaskFinished`], or
    /// [`BrokerError::StaleLease`] when `lease` is not the current lease.
    pub fn extend(
        &self,
        lease: LeaseId,
        extend_by: Option<Duration>,
    ) -> Result<SystemTime, BrokerError> {
        self.state().extend(lease, extend_by, Instant::now())
    }

    /// Records the outcome reported under `lease` and returns the task's
    /// state afterwards.
    ///
    /// A success from any lease of the task is accepted (the first result
    /// wins). A failure needs the current lease; with `retry` and attempts
    /// left, the task goes back to the head of its queue. Repeating the
    /// call that set the result returns its state again.
    ///
    /// # Errors
    /// [`BrokerError::TaskNotFound`]; [`BrokerError::StaleLease`] for a
    /// failure from a lease that is not current; [`BrokerError::ResultConflict`]
    /// when the task already has a different result;
    /// [`BrokerError::ResultTooLarge`].
    pub fn complete(&self, lease: LeaseId, outcome: Outcome) -> Result<TaskState, BrokerError> {
        self.state().complete(lease, outcome, Instant::now())
    }

    /// [`Broker::complete`] for many results under one lock: one answer
    /// per result, in order, each as `complete` would give it.
    pub fn complete_many(
        &self,
        results: Vec<(LeaseId, Outcome)>,
    ) -> Vec<Result<TaskState, BrokerError>> {
        let mut state = self.state();
        let now = Instant::now();
        results
            .into_iter()
            .map(|(lease, outcome)| state.complete(lease, outcome, now))
            .collect()
    }

    /// The result of a task, waiting up to `wait` while it is unfinished.
    /// Not consumed: asking again gives the same result.
    ///
    /// # Errors
    /// [`BrokerError::TaskNotFound`] for a task never stored or whose result
    /// is no longer held.
    pub async fn result(
        &self,
        task: TaskId,
        wait: Duration,
    ) -> Result<Option<TaskResult>, BrokerError> {
        let (tx, rx) = oneshot::channel();
        let waiter = {
            let mut state = self.state();
            if let Some(result) = state.result_of(task)? {
                return Ok(Some(result));
            }
            if state.is_closed() || wait.is_zero() {
                return Ok(None);
            }
            state.add_result_waiter(task, tx)?
        };
        let mut guard = ResultWait {
            broker: self,
            task,
            waiter,
            rx,
        };
        if let Some(result) = self.wait(&mut guard.rx, wait).await {
            return Ok(Some(result));
        }
        Ok(guard.rx.try_recv().ok())
    }

    /// The next result of a queue in completion order, waiting up to `wait`
    /// for one. Each result is handed out once; if the returned future is
    /// dropped while waiting, a result handed to it goes back to the head.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] when too many calls wait already.
    pub async fn next_result(
        &self,
        queue: QueueName,
        wait: Duration,
    ) -> Result<Option<TaskResult>, BrokerError> {
        let (tx, rx) = oneshot::channel();
        let waiter = {
            let mut state = self.state();
            if let Some(result) = state.next_result(&queue)? {
                return Ok(Some(result));
            }
            if state.is_closed() || wait.is_zero() {
                return Ok(None);
            }
            state.add_queue_result_waiter(&queue, tx)?
        };
        let mut guard = QueueResultWait {
            broker: self,
            queue,
            waiter,
            rx,
        };
        if let Some(result) = self.wait(&mut guard.rx, wait).await {
            return Ok(Some(result));
        }
        Ok(guard.rx.try_recv().ok())
    }

    /// Counters of the queues in `only` (each one listed, with zeros for a
    /// queue not made yet), or of all queues with `None`, and the workers
    /// last seen on them.
    pub fn stats(&self, only: Option<&[QueueName]>) -> Stats {
        self.state().stats(only, Instant::now())
    }

    /// Every worker the table tracks, without the queues' counters.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.state().workers(None, Instant::now())
    }

    /// The queue a held task (or a held result) belongs to; a task's queue
    /// never changes, so the answer stays true.
    ///
    /// # Errors
    /// [`BrokerError::TaskNotFound`] when no such task or result is held.
    pub fn task_queue(&self, task: TaskId) -> Result<QueueName, BrokerError> {
        self.state().task_queue(task)
    }

    /// Takes back an unfinished task: it ends CANCELLED (its result says
    /// so to whoever waits for it), and a lease on it is revoked. Returns
    /// the state it had: pending or leased.
    ///
    /// # Errors
    /// [`BrokerError::TaskFinished`] when it already finished (nothing
    /// changes); [`BrokerError::TaskNotFound`] for an unknown id.
    pub fn cancel(&self, task: TaskId) -> Result<TaskState, BrokerError> {
        self.state().cancel(task, Instant::now())
    }

    /// Stops handing out a queue's tasks (made if new); puts go on and
    /// leases in progress run on. Returns whether it was paused already.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] past `max_queues`.
    pub fn pause(&self, queue: &QueueName) -> Result<bool, BrokerError> {
        self.state().set_paused(queue, true, Instant::now())
    }

    /// Hands out a paused queue's tasks again, at once to whoever waits.
    /// Returns whether it was paused.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] past `max_queues`.
    pub fn resume(&self, queue: &QueueName) -> Result<bool, BrokerError> {
        self.state().set_paused(queue, false, Instant::now())
    }

    /// Drops every pending task of a queue (each ends CANCELLED); returns
    /// how many.
    pub fn purge(&self, queue: &QueueName) -> Result<u64, BrokerError> {
        self.state().purge(queue, Instant::now())
    }

    /// Where an unfinished task is and who holds it.
    ///
    /// # Errors
    /// [`BrokerError::TaskNotFound`] when it is finished or unknown.
    pub fn describe(&self, task: TaskId) -> Result<TaskView, BrokerError> {
        self.state().describe(task)
    }

    /// Every queue's counters and the broker-wide ones, for monitoring, in
    /// one short section under the lock that scans no task.
    pub fn snapshot(&self) -> Snapshot {
        self.state().snapshot(Instant::now())
    }

    /// How many unfinished tasks and results are held.
    pub fn holdings(&self) -> Holdings {
        self.state().holdings()
    }

    /// Starts draining: calls waiting for tasks, results or room are
    /// answered at once, and no new waits begin. Reports still go in.
    pub fn close(&self) {
        let rooms = self.state().close();
        self.inner.closed.send_replace(true);
        for room in rooms {
            room.notify_waiters();
        }
    }

    /// A future that resolves once [`Broker::close`] has been called.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closed = self.inner.closed.subscribe();
        async move {
            let _ = closed.wait_for(|closed| *closed).await;
        }
    }

    /// Whether a panic under the lock poisoned it.
    #[cfg(test)]
    pub(super) fn is_poisoned(&self) -> bool {
        self.inner.state.is_poisoned()
    }

    #[cfg(test)]
    pub(super) fn footprint(&self) -> (usize, usize, usize) {
        self.state().footprint()
    }

    #[cfg(any(test, feature = "fuzzing"))]
    #[doc(hidden)]
    pub fn check(&self) {
        if let Err(problem) = self.state().check_consistency() {
            panic!("broker inconsistent: {problem}");
        }
    }

    /// Waiters registered now: calls waiting, watches, worker and result
    /// streams. Once every call and stream is gone, none may be left.
    #[cfg(any(test, feature = "fuzzing"))]
    #[doc(hidden)]
    pub fn waiters(&self) -> usize {
        self.state().waiters()
    }
}

/// Now + `wait`, or a day from now for waits past any sane deadline.
fn far_deadline(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(24 * 3600))
}

/// A worker stream's end in the broker: tasks leased to it arrive on
/// [`WorkerStream::next`]. Dropped, it closes the stream: tasks it received
/// but never handed on go back as undelivered; tasks it handed on go back
/// at once, their delivery counted.
#[derive(Debug)]
pub struct WorkerStream {
    broker: Broker,
    id: StreamId,
    deliveries: mpsc::UnboundedReceiver<LeasedTask>,
    /// Leases of this stream's tasks that were cancelled.
    cancels: mpsc::UnboundedReceiver<LeaseId>,
    /// A task taken and put back ([`WorkerStream::put_back`]): the next
    /// one out.
    front: Option<LeasedTask>,
}

impl WorkerStream {
    pub(super) fn new(
        broker: Broker,
        id: StreamId,
        deliveries: mpsc::UnboundedReceiver<LeasedTask>,
        cancels: mpsc::UnboundedReceiver<LeaseId>,
    ) -> Self {
        Self {
            broker,
            id,
            deliveries,
            cancels,
            front: None,
        }
    }

    /// The next lease of this stream's tasks that was cancelled: its task
    /// is finished (CANCELLED) and its place in the window free. Pending
    /// while there is none (never ends on its own).
    pub fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> Poll<Option<LeaseId>> {
        self.cancels.poll_recv(cx)
    }

    /// The next task for this stream; waits while the window is full or the
    /// queue empty. Cancel-safe: a task is never lost by dropping this
    /// future. A task whose lease ended while it waited here (it expired,
    /// or a result came by another way) is skipped: it is no longer this
    /// stream's.
    #[cfg(test)]
    pub async fn next(&mut self) -> Option<LeasedTask> {
        std::future::poll_fn(|cx| self.poll_next_task(cx)).await
    }

    /// [`WorkerStream::next`] as a poll, for a response stream that hands
    /// tasks straight to the transport.
    pub fn poll_next_task(&mut self, cx: &mut Context<'_>) -> Poll<Option<LeasedTask>> {
        self.poll_next_task_at(cx, &mut None)
    }

    /// [`WorkerStream::poll_next_task`] for a caller that takes several
    /// tasks at once: `now` is read from the clock by the first task that
    /// needs it and reused by the rest, so a batch reads the clock once.
    pub fn poll_next_task_at(
        &mut self,
        cx: &mut Context<'_>,
        now: &mut Option<Instant>,
    ) -> Poll<Option<LeasedTask>> {
        loop {
            let task = match self.front.take() {
                Some(task) => task,
                None => match std::task::ready!(self.deliveries.poll_recv(cx)) {
                    Some(task) => task,
                    None => return Poll::Ready(None),
                },
            };
            // Before its expiry a lease can only have ended by a result sent
            // some other way, which the worker's own report then meets as
            // ALREADY_EXISTS; only an expired one needs the lock to check.
            if task.lease_deadline > *now.get_or_insert_with(Instant::now)
                || self.broker.state().leased_through(task.lease_id, self.id)
            {
                return Poll::Ready(Some(task));
            }
        }
    }

    /// Tasks waiting to be taken now (some may be skipped when taken): room
    /// to reserve for a batch.
    pub fn ready(&self) -> usize {
        self.deliveries.len() + usize::from(self.front.is_some())
    }

    /// Puts back a task just taken and not sent (it did not fit a batch):
    /// it is the next one taken, its lease checked again then, and if the
    /// stream ends first it goes back to its queue as undelivered, like the
    /// tasks still in the channel.
    pub fn put_back(&mut self, task: LeasedTask) {
        debug_assert!(self.front.is_none(), "one task put back at a time");
        self.front = Some(task);
    }

    /// A handle on this stream's window for another task (the one reading
    /// the worker's messages), while this one is polled for deliveries.
    pub fn control(&self) -> WorkerStreamControl {
        WorkerStreamControl {
            broker: self.broker.clone(),
            id: self.id,
        }
    }
}

/// The window of a [`WorkerStream`], from another task. Outlives nothing:
/// once the stream is dropped, changes to it do nothing.
#[derive(Clone, Debug)]
pub struct WorkerStreamControl {
    broker: Broker,
    id: StreamId,
}

impl WorkerStreamControl {
    /// Changes how many tasks may be outstanding; 0 pauses delivery.
    pub fn set_window(&self, window: u32) {
        self.broker
            .state()
            .set_window(self.id, window, Instant::now());
    }

    /// How many tasks are leased through the stream now.
    pub fn outstanding(&self) -> usize {
        self.broker.state().stream_outstanding(self.id)
    }
}

impl Drop for WorkerStream {
    fn drop(&mut self) {
        self.deliveries.close();
        let mut state = self.broker.state();
        let now = Instant::now();
        if let Some(task) = self.front.take() {
            state.undo_lease(task.lease_id, now);
        }
        while let Ok(task) = self.deliveries.try_recv() {
            state.undo_lease(task.lease_id, now);
        }
        state.close_stream(self.id, now);
    }
}

/// A result stream (WatchResults by queue): a queue's results as they
/// finish, from [`Broker::open_result_stream`].
#[derive(Debug)]
pub struct ResultStream {
    broker: Broker,
    id: ResultStreamId,
    flow: Arc<ResultStreamFlow>,
    results: mpsc::UnboundedReceiver<TaskResult>,
    /// A result taken and put back ([`ResultStream::put_back`]): the next
    /// one out.
    front: Option<TaskResult>,
}

impl ResultStream {
    pub(super) fn new(
        broker: Broker,
        id: ResultStreamId,
        flow: Arc<ResultStreamFlow>,
        results: mpsc::UnboundedReceiver<TaskResult>,
    ) -> Self {
        Self {
            broker,
            id,
            flow,
            results,
            front: None,
        }
    }

    /// The next result, waiting for one; `None` once the broker closed and
    /// everything held was handed on. Taking a result needs no lock, except
    /// now and then to ask for more after the window filled.
    pub fn poll_next_result(&mut self, cx: &mut Context<'_>) -> Poll<Option<TaskResult>> {
        if let Some(result) = self.front.take() {
            // Counted when it was first taken.
            return Poll::Ready(Some(result));
        }
        let result = std::task::ready!(self.results.poll_recv(cx));
        if result.is_some() && self.flow.taken() {
            self.broker.state().refill_result_stream(self.id);
        }
        Poll::Ready(result)
    }

    /// Results waiting to be taken now: room to reserve for a batch.
    pub fn ready(&self) -> usize {
        self.results.len() + usize::from(self.front.is_some())
    }

    /// Puts back a result just taken and not sent (it did not fit a
    /// batch): it is the next one taken, and if the stream ends first it
    /// goes back to the queue's results first, ahead of those still in the
    /// channel.
    pub fn put_back(&mut self, result: TaskResult) {
        debug_assert!(self.front.is_none(), "one result put back at a time");
        self.front = Some(result);
    }

    /// [`ResultStream::poll_next_result`] as a future.
    #[cfg(test)]
    pub async fn next(&mut self) -> Option<TaskResult> {
        std::future::poll_fn(|cx| self.poll_next_result(cx)).await
    }
}

impl Drop for ResultStream {
    fn drop(&mut self) {
        // Closed first, so that nothing arrives after the drain below.
        self.results.close();
        let mut unsent: Vec<_> = self.front.take().into_iter().collect();
        while let Ok(result) = self.results.try_recv() {
            unsent.push(result);
        }
        self.broker.state().close_result_stream(self.id, unsent);
    }
}

/// A watch on tasks' results: each arrives once, as soon as it exists.
/// Dropped, it unregisters from the tasks still unfinished.
#[derive(Debug)]
pub struct Watch {
    broker: Broker,
    ids: Vec<TaskId>,
    tx: mpsc::UnboundedSender<TaskResult>,
    rx: mpsc::UnboundedReceiver<TaskResult>,
}

impl Watch {
    pub(super) fn new(
        broker: Broker,
        ids: Vec<TaskId>,
        tx: mpsc::UnboundedSender<TaskResult>,
        rx: mpsc::UnboundedReceiver<TaskResult>,
    ) -> Self {
        Self {
            broker,
            ids,
            tx,
            rx,
        }
    }

    /// The next result, in completion order.
    pub async fn recv(&mut self) -> Option<TaskResult> {
        self.rx.recv().await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.broker.state().unwatch(&self.ids, &self.tx);
    }
}

/// A waiting `lease` call. Dropped with a task in hand (the call is gone),
/// it gives the task back.
struct TaskWait<'a> {
    broker: &'a Broker,
    queue: QueueName,
    waiter: WaiterId,
    rx: oneshot::Receiver<LeasedTask>,
}

impl Drop for TaskWait<'_> {
    fn drop(&mut self) {
        // Closed first, so no task can arrive after the check below.
        self.rx.close();
        let mut state = self.broker.state();
        state.remove_task_waiter(&self.queue, self.waiter);
        if let Ok(task) = self.rx.try_recv() {
            state.undo_lease(task.lease_id, Instant::now());
        }
    }
}

/// A waiting `result` call.
struct ResultWait<'a> {
    broker: &'a Broker,
    task: TaskId,
    waiter: WaiterId,
    rx: oneshot::Receiver<TaskResult>,
}

impl Drop for ResultWait<'_> {
    fn drop(&mut self) {
        self.broker
            .state()
            .remove_result_waiter(self.task, self.waiter);
    }
}

/// A waiting `next_result` call. Dropped with a result in hand, it puts
/// the result back at the head of the queue's results.
struct QueueResultWait<'a> {
    broker: &'a Broker,
    queue: QueueName,
    waiter: WaiterId,
    rx: oneshot::Receiver<TaskResult>,
}

impl Drop for QueueResultWait<'_> {
    fn drop(&mut self) {
        self.rx.close();
        let mut state = self.broker.state();
        state.remove_queue_result_waiter(&self.queue, self.waiter);
        if let Ok(result) = self.rx.try_recv() {
            state.unclaim(&result);
        }
    }
}

/// Fires lease and ttl deadlines and result retention, sleeping until the
/// earliest one. One task for all deadlines: nothing runs per idle task.
async fn run_timer(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.fire_due(Instant::now())
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}
