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
//!   line), leased (to exactly one lease), or finished (with a result).
//! - All state sits behind one `std::sync::Mutex`, held only for short,
//!   synchronous sections. No change spans an `.await`, so a call that is
//!   cancelled at any point leaves the broker consistent.
//! - A task handed to a waiting call is leased inside the lock; if that call
//!   is gone, the task goes back to the head of its queue at once.
//! - Lease and ttl deadlines live in one heap driven by one background task;
//!   time is `tokio::time::Instant` (monotonic, and pausable in tests).

mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod model;
mod state;
#[cfg(test)]
mod tests;
mod types;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

pub use error::BrokerError;
pub use state::{MAX_ATTEMPTS_LIMIT, MAX_HEADER_BYTES, MAX_HEADERS, MAX_IDEMPOTENCY_KEY};
pub use types::{
    DEFAULT_QUEUE, Held, LeaseId, LeaseRequest, LeasedTask, NewTask, Outcome, PutOutcome,
    QueueName, QueueStats, Stats, TaskId, TaskResult, TaskState, WorkerId, WorkerInfo,
};

use state::{PutRefused, State};

/// Limits and defaults of a broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Most unfinished (pending and leased) tasks per queue.
    pub queue_capacity: usize,
    /// Largest payload, in bytes.
    pub max_payload: usize,
    /// Largest result output or failure message, in bytes.
    pub max_result: usize,
    /// Lease length when a request gives none.
    pub default_lease: Duration,
    /// Longest lease or extension granted.
    pub max_lease: Duration,
    /// Deliveries allowed when a task asks for 0.
    pub default_max_attempts: u32,
    /// How long finished results are held.
    pub result_ttl: Duration,
    /// Most finished results held; beyond it the oldest are dropped.
    pub max_results: usize,
    /// Silence after which a worker is reported not alive.
    pub worker_timeout: Duration,
    /// Most queues.
    pub max_queues: usize,
    /// Most calls waiting at once (for tasks or results).
    pub max_waiters: usize,
    /// Most workers tracked; silent idle ones are forgotten first.
    pub max_workers: usize,
    /// Most bytes of payloads (of unfinished tasks) and outputs (of
    /// results) held in all; a put past it is refused.
    pub max_held_bytes: usize,
}

/// Default of [`BrokerConfig::queue_capacity`] (`--queue-capacity`).
pub const DEFAULT_QUEUE_CAPACITY: usize = 100_000;
/// Default of [`BrokerConfig::max_payload`] (`--max-payload`): 4 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 4 << 20;
/// Default of [`BrokerConfig::max_result`] (`--max-result`): 4 MiB.
pub const DEFAULT_MAX_RESULT: usize = 4 << 20;
/// Default of [`BrokerConfig::default_lease`] (`--default-lease`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default of [`BrokerConfig::max_lease`] (`--max-lease`): an hour.
pub const DEFAULT_MAX_LEASE: Duration = Duration::from_secs(3600);
/// Default of [`BrokerConfig::default_max_attempts`]
/// (`--default-max-attempts`).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default of [`BrokerConfig::result_ttl`] (`--result-ttl`): an hour.
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(3600);
/// Default of [`BrokerConfig::max_results`] (`--max-results`).
pub const DEFAULT_MAX_RESULTS: usize = 100_000;
/// Default of [`BrokerConfig::worker_timeout`] (`--worker-timeout`).
pub const DEFAULT_WORKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`BrokerConfig::max_queues`] (`--max-queues`).
pub const DEFAULT_MAX_QUEUES: usize = 10_000;
/// Default of [`BrokerConfig::max_waiters`] (`--max-waiters`).
pub const DEFAULT_MAX_WAITERS: usize = 100_000;
/// Default of [`BrokerConfig::max_workers`] (no flag).
pub const DEFAULT_MAX_WORKERS: usize = 10_000;
/// Default of [`BrokerConfig::max_held_bytes`] (`--max-held-bytes`): 1 GiB.
pub const DEFAULT_MAX_HELD_BYTES: usize = 1 << 30;

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_result: DEFAULT_MAX_RESULT,
            default_lease: DEFAULT_LEASE,
            max_lease: DEFAULT_MAX_LEASE,
            default_max_attempts: DEFAULT_MAX_ATTEMPTS,
            result_ttl: DEFAULT_RESULT_TTL,
            max_results: DEFAULT_MAX_RESULTS,
            worker_timeout: DEFAULT_WORKER_TIMEOUT,
            max_queues: DEFAULT_MAX_QUEUES,
            max_waiters: DEFAULT_MAX_WAITERS,
            max_workers: DEFAULT_MAX_WORKERS,
            max_held_bytes: DEFAULT_MAX_HELD_BYTES,
        }
    }
}

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

    fn state(&self) -> MutexGuard<'_, State> {
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

    /// Opens a worker stream on `request.queue`: tasks arrive on the
    /// returned [`Subscription`] while fewer than its window are
    /// outstanding. Dropping the subscription ends the stream and sends
    /// every task still leased through it back to its queue at once.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] when too many calls and streams wait.
    pub fn subscribe(
        &self,
        request: LeaseRequest,
        window: u32,
    ) -> Result<Subscription, BrokerError> {
        let (tx, deliveries) = mpsc::unbounded_channel();
        let id = self.state().open_stream(
            &request.queue,
            request.worker,
            request.lease,
            window,
            tx,
            Instant::now(),
        )?;
        Ok(Subscription {
            broker: self.clone(),
            id,
            deliveries,
            front: None,
        })
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
        Ok(Watch {
            broker: self.clone(),
            ids: ids.to_vec(),
            tx,
            rx,
        })
    }

    /// Reads a queue's results as they finish (WatchResults by queue):
    /// each result is handed out once, shared with [`Broker::next_result`]
    /// callers, who come first. The stream holds at most a small window of
    /// results its reader has not taken; dropped, it gives those back to
    /// the head of the queue's results. After [`Broker::close`] it ends
    /// once it has handed on what it holds.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] when too many calls and streams wait,
    /// or for a new queue past `max_queues`.
    pub fn read_results(&self, queue: &QueueName) -> Result<ResultStream, BrokerError> {
        let (tx, results) = mpsc::unbounded_channel();
        let (id, flow) = self.state().open_reader(queue, tx)?;
        Ok(ResultStream {
            broker: self.clone(),
            id,
            flow,
            results,
            front: None,
        })
    }

    /// True once [`Broker::close`] has been called.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
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
                state.lease_now(&request.queue, &request.worker, request.lease, now)?
            {
                return Ok(Some(task));
            }
            if state.is_closed() || wait.is_zero() {
                return Ok(None);
            }
            state.add_task_waiter(&request.queue, request.worker, request.lease, tx)?
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

    /// Counters of one queue (or all) and the known workers.
    pub fn stats(&self, queue: Option<&QueueName>) -> Stats {
        self.state().stats(queue, Instant::now())
    }

    /// The queue a held task (or a held result) belongs to; a task's queue
    /// never changes, so the answer stays true.
    ///
    /// # Errors
    /// [`BrokerError::TaskNotFound`] when no such task or result is held.
    pub fn task_queue(&self, task: TaskId) -> Result<QueueName, BrokerError> {
        self.state().task_queue(task)
    }

    /// How many unfinished tasks and results are held.
    pub fn held(&self) -> Held {
        self.state().held()
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

    #[cfg(test)]
    fn footprint(&self) -> (usize, usize, usize) {
        self.state().footprint()
    }

    #[cfg(any(test, feature = "fuzzing"))]
    #[doc(hidden)]
    pub fn check(&self) {
        if let Err(problem) = self.state().check_consistency() {
            panic!("broker inconsistent: {problem}");
        }
    }
}

/// Now + `wait`, or a day from now for waits past any sane deadline.
fn far_deadline(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(24 * 3600))
}

/// A worker stream's end in the broker: tasks leased to it arrive on
/// [`Subscription::next`]. Dropped, it closes the stream: tasks it received
/// but never handed on go back as undelivered; tasks it handed on go back
/// at once, their delivery counted.
#[derive(Debug)]
pub struct Subscription {
    broker: Broker,
    id: u64,
    deliveries: mpsc::UnboundedReceiver<LeasedTask>,
    /// A task taken and put back ([`Subscription::put_back`]): the next
    /// one out.
    front: Option<LeasedTask>,
}

impl Subscription {
    /// The next task for this stream; waits while the window is full or the
    /// queue empty. Cancel-safe: a task is never lost by dropping this
    /// future. A task whose lease ended while it waited here (it expired,
    /// or a result came by another way) is skipped: it is no longer this
    /// stream's.
    pub async fn next(&mut self) -> Option<LeasedTask> {
        std::future::poll_fn(|cx| self.poll_next_task(cx)).await
    }

    /// [`Subscription::next`] as a poll, for a response stream that hands
    /// tasks straight to the transport.
    pub fn poll_next_task(&mut self, cx: &mut Context<'_>) -> Poll<Option<LeasedTask>> {
        self.poll_next_task_at(cx, &mut None)
    }

    /// [`Subscription::poll_next_task`] for a caller that takes several
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
    pub fn control(&self) -> SubscriptionControl {
        SubscriptionControl {
            broker: self.broker.clone(),
            id: self.id,
        }
    }
}

/// The window of a [`Subscription`], from another task. Outlives nothing:
/// once the subscription is dropped, changes to it do nothing.
#[derive(Clone, Debug)]
pub struct SubscriptionControl {
    broker: Broker,
    id: u64,
}

impl SubscriptionControl {
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

impl Drop for Subscription {
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

/// A queue's results as they finish, from [`Broker::read_results`].
#[derive(Debug)]
pub struct ResultStream {
    broker: Broker,
    id: u64,
    flow: Arc<state::ReaderFlow>,
    results: mpsc::UnboundedReceiver<TaskResult>,
    /// A result taken and put back ([`ResultStream::put_back`]): the next
    /// one out.
    front: Option<TaskResult>,
}

impl ResultStream {
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
            self.broker.state().refill_reader(self.id);
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
        self.broker.state().close_reader(self.id, unsent);
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
    waiter: u64,
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
    waiter: u64,
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
    waiter: u64,
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
