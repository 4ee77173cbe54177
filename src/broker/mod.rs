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

mod clock;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod model;
mod queue;
mod retention;
mod state;
mod streams;
#[cfg(test)]
mod tests;
mod timers;
mod types;
mod waiters;
mod workers;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

pub use error::BrokerError;
pub use streams::{ResultStream, Watch, WorkerStream, WorkerStreamControl};
pub use types::{
    DEFAULT_QUEUE, Holdings, LeaseId, LeaseRequest, LeasedTask, MAX_ATTEMPTS_LIMIT,
    MAX_HEADER_BYTES, MAX_HEADERS, MAX_IDEMPOTENCY_KEY, NewTask, Outcome, PutOutcome, QueueName,
    QueueStats, Stats, TaskId, TaskResult, TaskState, WorkerId, WorkerInfo,
};
pub use waiters::RESULT_STREAM_WINDOW;

use state::{PutRefused, State};
use waiters::WaiterId;

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

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 100_000,
            max_payload: 4 * 1024 * 1024,
            max_result: 4 * 1024 * 1024,
            default_lease: Duration::from_secs(30),
            max_lease: Duration::from_secs(3600),
            default_max_attempts: 3,
            result_ttl: Duration::from_secs(3600),
            max_results: 100_000,
            worker_timeout: Duration::from_secs(60),
            max_queues: 10_000,
            max_waiters: 100_000,
            max_workers: 10_000,
            max_held_bytes: 1 << 30,
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
        let id = self.state().open_stream(
            &request.queue,
            request.worker,
            request.lease_duration,
            window,
            tx,
            Instant::now(),
        )?;
        Ok(WorkerStream::new(self.clone(), id, deliveries))
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
