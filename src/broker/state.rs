//! The broker's state and every change to it. Everything here is synchronous
//! and runs under the broker's one lock, so each change is whole: no change
//! spans an `.await`, and a cancelled call leaves nothing half done.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::types::{IdMaker, IdMap, IdSet, NameMap};
use super::{
    BrokerConfig, BrokerError, Held, LeaseId, LeasedTask, NewTask, Outcome, PutOutcome, QueueName,
    QueueStats, Stats, TaskId, TaskResult, TaskState, WorkerId, WorkerInfo,
};

/// Most headers a task may carry.
pub const MAX_HEADERS: usize = 64;
/// Most bytes of header keys and values a task may carry.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Most deliveries a task may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;
/// Longest ttl accepted: a year. Keeps deadline arithmetic far from overflow.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Entries looked at from the head of a queue for `oldest_pending_age`.
const OLDEST_SCAN: usize = 64;
/// Slack before a structure with skipped (stale) entries is compacted: it is
/// rebuilt once it holds more than twice its live entries plus this.
const COMPACT_SLACK: usize = 1024;

/// Turns the monotonic clock that times leases into wall-clock timestamps
/// for clients. Lease timing never reads the wall clock.
#[derive(Clone, Copy, Debug)]
struct Clock {
    instant: Instant,
    system: SystemTime,
}

impl Clock {
    fn now() -> Self {
        Self {
            instant: Instant::now(),
            system: SystemTime::now(),
        }
    }

    /// `at` as a [`Stamp`]; moments before the clock's start (none are
    /// stamped) count as its start.
    fn stamp(&self, at: Instant) -> Stamp {
        let nanos = at.saturating_duration_since(self.instant).as_nanos();
        Stamp(NonZeroU64::MIN.saturating_add(u64::try_from(nanos).unwrap_or(u64::MAX)))
    }

    /// The moment a [`Stamp`] stands for.
    fn instant(&self, stamp: Stamp) -> Instant {
        self.instant + Duration::from_nanos(stamp.0.get() - 1)
    }

    /// The wall-clock time of a [`Stamp`], for clients.
    fn wall_of(&self, stamp: Stamp) -> SystemTime {
        self.wall(self.instant(stamp))
    }

    fn wall(&self, at: Instant) -> SystemTime {
        let wall = match at.checked_duration_since(self.instant) {
            Some(after) => self.system.checked_add(after),
            None => self.system.checked_sub(self.instant - at),
        };
        wall.unwrap_or(self.system)
    }
}

/// A moment as nanoseconds after the broker's clock started, plus one (so
/// that `Option<Stamp>` costs nothing extra): 8 bytes where an `Instant`
/// takes 16, on every held task (bench: bytes per pending task). Good for
/// 584 years of uptime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Stamp(NonZeroU64);

/// A GetTask call waiting for a task.
pub(super) struct TaskWaiter {
    pub id: u64,
    pub worker: WorkerId,
    pub lease: Duration,
    pub tx: oneshot::Sender<LeasedTask>,
}

/// A GetResult call waiting for a result.
pub(super) struct ResultWaiter {
    pub id: u64,
    pub tx: oneshot::Sender<TaskResult>,
}

/// A worker stream: a waiter that may hold up to `window` tasks at once.
/// Its tasks' leases are tied to it: when it closes they go back at once.
pub(super) struct StreamConsumer {
    queue: QueueName,
    worker: WorkerId,
    lease: Duration,
    window: u32,
    outstanding: IdSet<TaskId>,
    tx: mpsc::UnboundedSender<LeasedTask>,
}

/// Results a WatchResults(queue) stream may hold that its transport has
/// not taken yet. Results wait in the queue beyond that, where another
/// reader can take them, so a stalled reader claims at most this many.
#[cfg(not(any(test, feature = "fuzzing")))]
pub const READER_WINDOW: usize = 64;
/// Small in tests and fuzzing, so that short sequences fill the window
/// (the logic does not depend on its size).
#[cfg(any(test, feature = "fuzzing"))]
pub const READER_WINDOW: usize = 4;

/// A WatchResults(queue) stream: takes the queue's results as they finish,
/// while fewer than [`READER_WINDOW`] of them are in its hands.
pub(super) struct ResultReader {
    queue: QueueName,
    /// `None` once the broker closed: the stream ends after what it holds.
    tx: Option<mpsc::UnboundedSender<TaskResult>>,
    flow: Arc<ReaderFlow>,
}

/// The window of a [`ResultReader`], shared with its stream so that taking
/// a result needs no lock: the stream counts down, the broker counts up.
#[derive(Debug, Default)]
pub struct ReaderFlow {
    /// Results sent to the stream that it has not taken yet.
    in_hand: AtomicUsize,
    /// Set (under the lock) when the reader was passed over with its window
    /// full while results waited; the stream then asks for more once it is
    /// half empty, so refills come in batches, not one lock per result.
    starved: AtomicBool,
}

impl ReaderFlow {
    /// Counts one result taken by the stream; true when the broker should
    /// hand it more (it was passed over and the window is now half empty).
    pub fn taken(&self) -> bool {
        let left = self.in_hand.fetch_sub(1, Ordering::AcqRel) - 1;
        left <= READER_WINDOW / 2 && self.starved.swap(false, Ordering::AcqRel)
    }
}

/// Who gets the next task of a queue.
enum Taker {
    Waiter,
    Stream(u64),
}

#[derive(Default)]
struct QueueState {
    /// Tasks in hand-out order. Entries of tasks that are no longer pending
    /// (finished while waiting, say by ttl) are skipped when popped.
    ready: VecDeque<TaskId>,
    pending: u64,
    leased: u64,
    succeeded: u64,
    failed: u64,
    redelivered: u64,
    results_evicted: u64,
    task_waiters: VecDeque<TaskWaiter>,
    /// Worker streams on this queue, in round-robin order.
    streams: VecDeque<u64>,
    result_waiters: VecDeque<ResultWaiter>,
    /// WatchResults(queue) streams on this queue, in round-robin order.
    readers: VecDeque<u64>,
    /// Finished tasks whose result GetResult(queue) has not handed out, in
    /// completion order. Entries of evicted results are skipped.
    unclaimed: VecDeque<TaskId>,
    results_unclaimed: u64,
    idempotency: HashMap<String, TaskId>,
    /// Woken when an unfinished task of this queue finishes while a put
    /// waits for room.
    room: Arc<Notify>,
    /// A put was refused for want of room since `room` was last woken. The
    /// refused call registers on `room` before the lock is released, so
    /// finishing tasks wake it only when someone can be waiting: waking
    /// takes `Notify`'s own lock, which no task should pay for.
    room_wanted: bool,
}

impl QueueState {
    fn unfinished(&self) -> u64 {
        self.pending + self.leased
    }
}

#[derive(Clone, Debug)]
struct Lease {
    seq: u32,
    expires_at: Instant,
    /// When this lease's one timer entry fires; an extension only adds an
    /// entry when it moves the expiry earlier, so the heap holds one live
    /// entry per lease however often it is extended.
    scheduled: Instant,
    worker: WorkerId,
    /// The worker stream it was leased through, if any.
    stream: Option<u64>,
}

/// A finished task, held for its result until retention drops it: all
/// that is kept of the task, in one allocation (the task's own entry is
/// freed when it finishes, while it is still in cache).
#[derive(Debug)]
struct Finished {
    result: TaskResult,
    /// The lease whose report finished the task; 0 when the server did.
    by_lease: u32,
    /// What that report was, to tell it repeated from a different one.
    report: Report,
    /// Not yet handed out by GetResult(queue) or WatchResults(queue).
    unclaimed: bool,
    /// Kept only when the task had any of it.
    rest: Option<Box<FinishedRest>>,
}

/// What few finished tasks need kept.
#[derive(Debug)]
struct FinishedRest {
    /// Forgotten with the result.
    idempotency_key: Option<String>,
    /// The last lease whose failure was retried, with its message, so that
    /// the same report repeated is still answered OK.
    last_retry: Option<(u32, String)>,
}

/// The report that finished a task, without its output or message: those
/// are in the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Report {
    /// The server finished it (ttl, attempts used up).
    Server,
    Success,
    Failure {
        retry: bool,
    },
}

impl Finished {
    /// Whether `outcome` is the report that finished the task.
    fn finished_by(&self, outcome: &Outcome) -> bool {
        match (self.report, outcome) {
            (Report::Success, Outcome::Success(output)) => self.result.output == *output,
            (Report::Failure { retry }, Outcome::Failure { message, retry: r }) => {
                retry == *r && self.result.error == *message
            }
            _ => false,
        }
    }

    fn last_retry(&self) -> Option<&(u32, String)> {
        self.rest.as_ref()?.last_retry.as_ref()
    }

    fn idempotency_key(&self) -> Option<&String> {
        self.rest.as_ref()?.idempotency_key.as_ref()
    }
}

#[derive(Debug)]
/// Boxed variants keep a pending task small: most of a queue's tasks are
/// pending. A finished task leaves `tasks` for `results` ([`Finished`]).
enum Status {
    Pending,
    Leased(Box<Lease>),
}

/// Fields most tasks never use, out of line so that a pending task stays
/// small (bench: bytes per pending task).
#[derive(Default)]
struct Extras {
    headers: HashMap<String, String>,
    idempotency_key: Option<String>,
    /// The last lease whose failure was retried, with its message, so that
    /// the same report repeated is answered OK.
    last_retry: Option<(u32, String)>,
    result_waiters: Vec<ResultWaiter>,
    /// WatchResults streams waiting for this task's result.
    watchers: Vec<mpsc::UnboundedSender<TaskResult>>,
    /// Who held each lease that ended without finishing the task (expired,
    /// retried, given back): index `seq - 1`. The current lease's holder is
    /// in its [`Lease`]. So a task handed out once and finished never
    /// allocates this (bench/README.md).
    holders: Vec<WorkerId>,
}

struct TaskEntry {
    queue: QueueName,
    payload: Bytes,
    max_attempts: u32,
    attempt: u32,
    lease_seq: u32,
    created_at: Stamp,
    /// The ttl's deadline.
    expires_at: Option<Stamp>,
    status: Status,
    extras: Option<Box<Extras>>,
}

impl TaskEntry {
    fn expired(&self, clock: &Clock, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| clock.instant(at) <= now)
    }

    fn extras_mut(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// The lease with this sequence number may have run out.
    Lease(u32),
    /// The task's ttl has run out.
    Ttl,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TimerEntry {
    at: Instant,
    task: TaskId,
    kind: TimerKind,
}

struct WorkerRecord {
    queue: Option<QueueName>,
    last_seen: Instant,
    in_flight: u32,
}

/// Why a put did not store a task.
pub(super) enum PutRefused {
    /// The queue is full: wait on `room`, then try again with `task`.
    Full {
        task: Box<NewTask>,
        room: Arc<Notify>,
        error: BrokerError,
    },
    /// Refused for good.
    Error(BrokerError),
}

impl From<BrokerError> for PutRefused {
    fn from(error: BrokerError) -> Self {
        Self::Error(error)
    }
}

pub(super) struct State {
    config: BrokerConfig,
    clock: Clock,
    queues: NameMap<QueueName, QueueState>,
    /// Unfinished tasks (pending or leased). Boxed: the map's buckets then
    /// cost a pointer, not a whole entry, at its load factor; and an entry
    /// moves to `results` without being copied.
    tasks: IdMap<TaskId, Box<TaskEntry>>,
    /// Finished tasks, held for their results until retention drops them.
    /// Apart from `tasks`, so that the map the hot path works in holds only
    /// the work in progress and stays small and in cache, however many
    /// results are kept (bench/README.md, session 6).
    results: IdMap<TaskId, Box<Finished>>,
    /// Finished tasks in completion order, for retention by age and count.
    finished: VecDeque<(Instant, TaskId)>,
    /// Every lease and ttl deadline; stale entries are skipped when due.
    timers: BinaryHeap<Reverse<TimerEntry>>,
    /// Entries `timers` kept at its last compaction: it is compacted again
    /// past twice that (or twice what can be live, if less) plus
    /// `COMPACT_SLACK`. Measured against what is live rather than against
    /// every task held (most of which, retained results, have no timer),
    /// the heap stays near the size of the work in progress, and each
    /// compaction is paid for by the pushes before it or by the stale
    /// entries it drops.
    timers_kept: usize,
    /// Wakes the timer task when a deadline earlier than all others arrives.
    timer_wake: Arc<Notify>,
    workers: NameMap<WorkerId, WorkerRecord>,
    streams: IdMap<u64, StreamConsumer>,
    readers: IdMap<u64, ResultReader>,
    next_waiter: u64,
    waiters: usize,
    /// Bytes of payloads of unfinished tasks and outputs of results held.
    held_bytes: usize,
    closed: bool,
    ids: IdMaker,
}

/// Records that `worker` was seen now, working on `queue` if given, and
/// adds `leased` to what it holds; known workers (nearly every call) take
/// one lookup. A free function over the workers' map, so that a lease can
/// record its worker while it holds its task's entry. Past `max_workers`,
/// silent workers holding nothing are forgotten; if that frees nothing,
/// the worker is not tracked (tracking is best effort past the limit; the
/// work is not).
fn touch_worker_in(
    workers: &mut NameMap<WorkerId, WorkerRecord>,
    config: &BrokerConfig,
    worker: &WorkerId,
    queue: Option<&QueueName>,
    leased: u32,
    now: Instant,
) {
    if let Some(record) = workers.get_mut(worker) {
        record.last_seen = now;
        record.in_flight = record.in_flight.saturating_add(leased);
        if let Some(queue) = queue {
            record.queue = Some(queue.clone());
        }
        return;
    }
    if workers.len() >= config.max_workers {
        prune_workers(workers, config, now);
        if workers.len() >= config.max_workers {
            return;
        }
    }
    workers.insert(
        worker.clone(),
        WorkerRecord {
            queue: queue.cloned(),
            last_seen: now,
            in_flight: leased,
        },
    );
}

/// Forgets workers that are silent and hold nothing.
fn prune_workers(
    workers: &mut NameMap<WorkerId, WorkerRecord>,
    config: &BrokerConfig,
    now: Instant,
) {
    let timeout = config.worker_timeout;
    workers.retain(|_, w| w.in_flight > 0 || now.duration_since(w.last_seen) < timeout);
}

impl State {
    pub fn new(config: BrokerConfig, timer_wake: Arc<Notify>) -> Self {
        Self {
            config,
            clock: Clock::now(),
            queues: NameMap::default(),
            tasks: IdMap::default(),
            results: IdMap::default(),
            finished: VecDeque::new(),
            timers: BinaryHeap::new(),
            timers_kept: 0,
            timer_wake,
            workers: NameMap::default(),
            streams: IdMap::default(),
            readers: IdMap::default(),
            next_waiter: 0,
            waiters: 0,
            held_bytes: 0,
            closed: false,
            ids: IdMaker::new(),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Marks the broker closed and returns every queue's room signal, so
    /// that calls waiting for room wake and see it.
    pub fn close(&mut self) -> Vec<Arc<Notify>> {
        self.closed = true;
        // Result streams end once they have sent what they hold.
        for reader in self.readers.values_mut() {
            reader.tx = None;
        }
        self.queues.values().map(|q| q.room.clone()).collect()
    }

    pub fn held(&self) -> Held {
        Held {
            tasks: self.tasks.len(),
            results: self.results.len(),
        }
    }

    /// Whether a task or its result is held.
    fn holds(&self, id: &TaskId) -> bool {
        self.tasks.contains_key(id) || self.results.contains_key(id)
    }

    /// The queue a held task (or result) belongs to.
    pub fn task_queue(&self, task: TaskId) -> Result<QueueName, BrokerError> {
        self.tasks
            .get(&task)
            .map(|entry| entry.queue.clone())
            .or_else(|| {
                self.results
                    .get(&task)
                    .map(|done| done.result.queue.clone())
            })
            .ok_or_else(|| BrokerError::TaskNotFound(task.to_string()))
    }

    /// The queue `name`, made if new (within `--max-queues`), and the map's
    /// own copy of its name: tasks keep that one, so every task of a queue
    /// shares one allocation (bench: bytes per pending task).
    fn queue_mut(&mut self, name: &QueueName) -> Result<(QueueName, &mut QueueState), BrokerError> {
        let limit = self.config.max_queues;
        let count = self.queues.len();
        match self.queues.entry(name.clone()) {
            Entry::Occupied(entry) => Ok((entry.key().clone(), entry.into_mut())),
            Entry::Vacant(_) if count >= limit => Err(BrokerError::LimitReached(format!(
                "{limit} queues exist (server flag --max-queues); reuse an existing queue name"
            ))),
            Entry::Vacant(entry) => {
                let name = entry.key().clone();
                Ok((name, entry.insert(QueueState::default())))
            }
        }
    }

    /// A queue for a stream, a waiting call or a reader: made if new.
    fn queue_of(&mut self, name: &QueueName) -> &mut QueueState {
        self.queues.entry(name.clone()).or_default()
    }

    /// The queue of a held task or result. It exists: every task's queue
    /// was made when the task was put, and queues are never removed. A
    /// plain lookup, where `queue_of` would copy the name for the map's
    /// entry API; the hot path looks a queue up several times per task.
    fn known_queue(&mut self, name: &QueueName) -> &mut QueueState {
        self.queues
            .get_mut(name)
            .expect("a held task's queue exists: queues are never removed")
    }

    fn schedule(&mut self, at: Instant, task: TaskId, kind: TimerKind) {
        // At most a ttl entry and a lease entry per unfinished task are
        // live.
        let live = 2 * self.tasks.len();
        if self.timers.len() > 2 * self.timers_kept.min(live) + COMPACT_SLACK {
            self.compact_timers();
            self.timers_kept = self.timers.len();
        }
        let earliest = self.timers.peek().is_none_or(|Reverse(top)| at < top.at);
        self.timers.push(Reverse(TimerEntry { at, task, kind }));
        if earliest {
            self.timer_wake.notify_one();
        }
    }

    /// Drops timer entries that can no longer do anything: those of tasks
    /// finished or gone, and lease entries of leases no longer current.
    fn compact_timers(&mut self) {
        let tasks = &self.tasks;
        self.timers.retain(|Reverse(entry)| {
            tasks
                .get(&entry.task)
                .is_some_and(|e| match (&e.status, entry.kind) {
                    (Status::Leased(l), TimerKind::Lease(seq)) => {
                        l.seq == seq && l.scheduled == entry.at
                    }
                    (_, TimerKind::Ttl) => true,
                    (Status::Pending, TimerKind::Lease(_)) => false,
                })
        });
    }

    fn touch_worker(&mut self, worker: &WorkerId, queue: Option<&QueueName>, now: Instant) {
        touch_worker_in(&mut self.workers, &self.config, worker, queue, 0, now);
    }

    fn worker_in_flight(&mut self, worker: &WorkerId, delta: i32) {
        if let Some(record) = self.workers.get_mut(worker) {
            record.in_flight = record.in_flight.saturating_add_signed(delta);
        }
    }

    fn clamp_lease(&self, lease: Option<Duration>) -> Duration {
        lease
            .filter(|d| !d.is_zero())
            .unwrap_or(self.config.default_lease)
            .min(self.config.max_lease)
    }

    // ---- Put ----

    /// Stores a task and hands it out if a taker waits.
    pub fn put(&mut self, task: NewTask, now: Instant) -> Result<PutOutcome, PutRefused> {
        let (outcome, queue) = self.store(task, now)?;
        if let Some(queue) = queue {
            self.dispatch(&queue, now);
        }
        Ok(outcome)
    }

    /// Stores a batch of tasks, each as [`State::put`] would, and then
    /// hands out what it can: takers get the same tasks in the same order
    /// as with one put after another, but a batch does not look for a
    /// taker once per task while none has room.
    pub fn put_many(
        &mut self,
        tasks: Vec<NewTask>,
        now: Instant,
    ) -> Vec<Result<PutOutcome, BrokerError>> {
        let mut stored: Option<QueueName> = None;
        let mut outcomes = Vec::with_capacity(tasks.len());
        for task in tasks {
            outcomes.push(match self.store(task, now) {
                Ok((outcome, queue)) => {
                    // Another queue than the task before's: that one is
                    // dispatched first, as it would have been.
                    if let Some(queue) = queue
                        && let Some(before) = stored.replace(queue)
                        && stored.as_ref() != Some(&before)
                    {
                        self.dispatch(&before, now);
                    }
                    Ok(outcome)
                }
                Err(PutRefused::Error(error) | PutRefused::Full { error, .. }) => Err(error),
            });
        }
        if let Some(queue) = stored {
            self.dispatch(&queue, now);
        }
        outcomes
    }

    /// A put without the hand-out: the queue to dispatch when a task was
    /// stored (not for a duplicate).
    fn store(
        &mut self,
        task: NewTask,
        now: Instant,
    ) -> Result<(PutOutcome, Option<QueueName>), PutRefused> {
        if self.closed {
            return Err(BrokerError::ShuttingDown.into());
        }
        let requested = match &task.queue {
            Some(q) => q.clone(),
            None => QueueName::parse("")?,
        };
        self.validate(&task)?;
        let capacity = self.config.queue_capacity;
        let (queue_name, queue) = self.queue_mut(&requested)?;
        if let Some(key) = &task.idempotency_key {
            if let Some(&task_id) = queue.idempotency.get(key) {
                let outcome = PutOutcome {
                    task_id,
                    duplicate: true,
                };
                return Ok((outcome, None));
            }
        }
        let held_limit = self.config.max_held_bytes;
        if self.held_bytes + task.payload.len() > held_limit {
            return Err(BrokerError::LimitReached(format!(
                "the server holds {} bytes of payloads and results (server flag \
                 --max-held-bytes {held_limit}); retry later or read results out",
                self.held_bytes
            ))
            .into());
        }
        let id = self.fresh_id(now);
        let queue = self.queues.get_mut(&queue_name).expect("made above");
        if queue.unfinished() >= capacity as u64 {
            let room = queue.room.clone();
            queue.room_wanted = true;
            return Err(PutRefused::Full {
                task: Box::new(task),
                room,
                error: BrokerError::QueueFull {
                    queue: queue_name,
                    capacity,
                },
            });
        }
        if let Some(key) = &task.idempotency_key {
            queue.idempotency.insert(key.clone(), id);
        }
        if queue.ready.len() > 2 * queue.pending as usize + COMPACT_SLACK {
            // Entries of tasks that expired while pending are skipped when
            // popped; a queue nobody takes from must still not keep them.
            let tasks = &self.tasks;
            queue.ready.retain(|id| {
                tasks
                    .get(id)
                    .is_some_and(|e| matches!(e.status, Status::Pending))
            });
        }
        queue.ready.push_back(id);
        queue.pending += 1;
        let expires_at = task.ttl.map(|ttl| now + ttl);
        let max_attempts = match task.max_attempts {
            0 => self.config.default_max_attempts,
            n => n,
        };
        let extras = (!task.headers.is_empty() || task.idempotency_key.is_some()).then(|| {
            Box::new(Extras {
                headers: task.headers,
                idempotency_key: task.idempotency_key,
                ..Extras::default()
            })
        });
        self.held_bytes += task.payload.len();
        self.tasks.insert(
            id,
            Box::new(TaskEntry {
                queue: queue_name.clone(),
                payload: task.payload,
                max_attempts,
                attempt: 0,
                lease_seq: 0,
                created_at: self.clock.stamp(now),
                expires_at: expires_at.map(|at| self.clock.stamp(at)),
                status: Status::Pending,
                extras,
            }),
        );
        if let Some(at) = expires_at {
            self.schedule(at, id, TimerKind::Ttl);
        }
        let outcome = PutOutcome {
            task_id: id,
            duplicate: false,
        };
        Ok((outcome, Some(queue_name)))
    }

    fn fresh_id(&mut self, now: Instant) -> TaskId {
        let unix_ms = self
            .clock
            .wall(now)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // The maker's ids do not repeat in a process's life (all 64 bits of
        // its counter are in each id: `IdMaker::next`), so no lookup is
        // paid per task to check, least of all in the map of results.
        let id = self.ids.next(unix_ms);
        debug_assert!(!self.holds(&id), "task id {id} made twice");
        id
    }

    fn validate(&self, task: &NewTask) -> Result<(), BrokerError> {
        let limit = self.config.max_payload;
        if task.payload.len() > limit {
            return Err(BrokerError::PayloadTooLarge {
                size: task.payload.len(),
                limit,
            });
        }
        if task.max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(BrokerError::InvalidArgument(format!(
                "max_attempts is {}; the limit is {MAX_ATTEMPTS_LIMIT} (0 means the server default)",
                task.max_attempts
            )));
        }
        if task.headers.len() > MAX_HEADERS {
            return Err(BrokerError::InvalidArgument(format!(
                "{} headers; the limit is {MAX_HEADERS}",
                task.headers.len()
            )));
        }
        let header_bytes: usize = task.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if header_bytes > MAX_HEADER_BYTES {
            return Err(BrokerError::InvalidArgument(format!(
                "headers are {header_bytes} bytes; the limit is {MAX_HEADER_BYTES} bytes"
            )));
        }
        if let Some(key) = &task.idempotency_key {
            if key.len() > MAX_IDEMPOTENCY_KEY {
                return Err(BrokerError::InvalidArgument(format!(
                    "idempotency_key is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY} bytes",
                    key.len()
                )));
            }
        }
        if task.ttl.is_some_and(|ttl| ttl.is_zero() || ttl > MAX_TTL) {
            return Err(BrokerError::InvalidArgument(
                "ttl must be positive and at most 366 days; leave it unset for no ttl".into(),
            ));
        }
        Ok(())
    }

    // ---- Lease ----

    /// Leases the queue's next task to `worker` at once, if there is one.
    pub fn lease_now(
        &mut self,
        queue: &QueueName,
        worker: &WorkerId,
        lease: Option<Duration>,
        now: Instant,
    ) -> Result<Option<LeasedTask>, BrokerError> {
        self.queue_mut(queue)?;
        self.touch_worker(worker, Some(queue), now);
        if self.closed {
            return Ok(None);
        }
        let lease = self.clamp_lease(lease);
        Ok(self
            .pop_ready(queue, now)
            .map(|id| self.start_lease(id, worker.clone(), lease, None, now)))
    }

    /// Takes the next task that can be handed out from the head of a queue.
    /// Tasks found past their ttl are failed on the way.
    fn pop_ready(&mut self, queue_name: &QueueName, now: Instant) -> Option<TaskId> {
        loop {
            let id = self.queues.get_mut(queue_name)?.ready.pop_front()?;
            let Some(entry) = self.tasks.get(&id) else {
                continue;
            };
            if !matches!(entry.status, Status::Pending) {
                continue;
            }
            if entry.expired(&self.clock, now) {
                self.fail_expired(id, now);
                continue;
            }
            return Some(id);
        }
    }

    fn start_lease(
        &mut self,
        id: TaskId,
        worker: WorkerId,
        lease: Duration,
        stream: Option<u64>,
        now: Instant,
    ) -> LeasedTask {
        let expires_at = now + lease;
        let entry = self.tasks.get_mut(&id).expect("popped task is held");
        // A worker whose wait outlived its record is recorded again here.
        touch_worker_in(
            &mut self.workers,
            &self.config,
            &worker,
            Some(&entry.queue),
            1,
            now,
        );
        entry.attempt += 1;
        entry.lease_seq += 1;
        let seq = entry.lease_seq;
        entry.status = Status::Leased(Box::new(Lease {
            seq,
            expires_at,
            scheduled: expires_at,
            worker,
            stream,
        }));
        let task = LeasedTask {
            id,
            queue: entry.queue.clone(),
            payload: entry.payload.clone(),
            headers: entry
                .extras
                .as_ref()
                .map(|x| x.headers.clone())
                .unwrap_or_default(),
            attempt: entry.attempt,
            max_attempts: entry.max_attempts,
            lease_id: LeaseId { task: id, seq },
            lease_expires_at: self.clock.wall(expires_at),
            lease_deadline: expires_at,
            created_at: self.clock.wall_of(entry.created_at),
            expires_at: entry.expires_at.map(|at| self.clock.wall_of(at)),
        };
        let queue = self.known_queue(&task.queue);
        queue.pending -= 1;
        queue.leased += 1;
        if let Some(consumer) = stream.and_then(|sid| self.streams.get_mut(&sid)) {
            consumer.outstanding.insert(id);
        }
        self.schedule(expires_at, id, TimerKind::Lease(seq));
        task
    }

    /// A lease taken through a stream has ended: the stream has room for
    /// one more task.
    fn stream_slot_freed(&mut self, lease: &Lease, id: TaskId) {
        if let Some(consumer) = lease.stream.and_then(|sid| self.streams.get_mut(&sid)) {
            consumer.outstanding.remove(&id);
        }
    }

    /// Moves a leased task back to the head of its queue. Returns the
    /// lease it had.
    fn release(&mut self, id: TaskId) -> Option<Box<Lease>> {
        let entry = self.tasks.get_mut(&id)?;
        let Status::Leased(lease) = std::mem::replace(&mut entry.status, Status::Pending) else {
            unreachable!("release is only called on a leased task");
        };
        // Kept for a late report from this lease (`complete`).
        let holders = &mut entry.extras_mut().holders;
        debug_assert_eq!(
            holders.len() + 1,
            lease.seq as usize,
            "one holder per ended lease"
        );
        holders.push(lease.worker.clone());
        let queue_name = entry.queue.clone();
        let queue = self.known_queue(&queue_name);
        queue.leased -= 1;
        queue.pending += 1;
        queue.ready.push_front(id);
        self.worker_in_flight(&lease.worker, -1);
        self.stream_slot_freed(&lease, id);
        Some(lease)
    }

    /// Gives back a task that was leased to a call that can no longer be
    /// answered: it never reached a worker, so the delivery does not count.
    pub fn undo_lease(&mut self, lease: LeaseId, now: Instant) {
        let current = self
            .tasks
            .get(&lease.task)
            .is_some_and(|e| matches!(&e.status, Status::Leased(l) if l.seq == lease.seq));
        if !current {
            return;
        }
        self.release(lease.task);
        let entry = self.tasks.get_mut(&lease.task).expect("just released");
        entry.attempt -= 1;
        if entry.expired(&self.clock, now) {
            // Its ttl ran out while it sat with the call that is gone.
            self.fail_expired(lease.task, now);
            return;
        }
        let queue = entry.queue.clone();
        self.dispatch(&queue, now);
    }

    /// Hands ready tasks of a queue to its waiting calls and worker
    /// streams, inside the lock. Waiting calls come first (they wait with a
    /// deadline); streams with room take turns. A taker that is gone gets
    /// nothing; a task whose send fails goes straight back to the head.
    fn dispatch(&mut self, queue_name: &QueueName, now: Instant) {
        while let Some(taker) = self.next_taker(queue_name) {
            let Some(id) = self.pop_ready(queue_name, now) else {
                return;
            };
            match taker {
                Taker::Waiter => {
                    let queue = self.queues.get_mut(queue_name).expect("queue exists");
                    let waiter = queue.task_waiters.pop_front().expect("front exists");
                    self.waiters -= 1;
                    let task = self.start_lease(id, waiter.worker, waiter.lease, None, now);
                    let lease = task.lease_id;
                    if waiter.tx.send(task).is_err() {
                        self.undo_lease(lease, now);
                    }
                }
                Taker::Stream(sid) => {
                    let consumer = &self.streams[&sid];
                    let (worker, lease) = (consumer.worker.clone(), consumer.lease);
                    let task = self.start_lease(id, worker, lease, Some(sid), now);
                    let lease = task.lease_id;
                    if self.streams[&sid].tx.send(task).is_err() {
                        // The stream's receiver is closing: its guard will
                        // close the stream; this task never reached it.
                        self.undo_lease(lease, now);
                    }
                }
            }
        }
    }

    /// The next taker of a queue's tasks: the first live waiting call, else
    /// the next stream (round robin) with room in its window. None while
    /// nothing is pending: no taker is looked for then (a finished task
    /// often frees room in a stream while its queue is empty).
    fn next_taker(&mut self, queue_name: &QueueName) -> Option<Taker> {
        if self.closed {
            // Draining: waiting calls were answered; streams take no more.
            return None;
        }
        let queue = self.queues.get_mut(queue_name)?;
        if queue.pending == 0 {
            return None;
        }
        while let Some(front) = queue.task_waiters.front() {
            if !front.tx.is_closed() {
                return Some(Taker::Waiter);
            }
            queue.task_waiters.pop_front();
            self.waiters -= 1;
        }
        for _ in 0..queue.streams.len() {
            let sid = queue.streams.pop_front()?;
            queue.streams.push_back(sid);
            let consumer = &self.streams[&sid];
            // A stream whose handler is gone is skipped; its guard closes it.
            if !consumer.tx.is_closed()
                && (consumer.outstanding.len() as u64) < u64::from(consumer.window)
            {
                return Some(Taker::Stream(sid));
            }
        }
        None
    }

    // ---- Worker streams ----

    /// Registers a worker stream on a queue and hands it what is ready.
    pub fn open_stream(
        &mut self,
        queue: &QueueName,
        worker: WorkerId,
        lease: Option<Duration>,
        window: u32,
        tx: mpsc::UnboundedSender<LeasedTask>,
        now: Instant,
    ) -> Result<u64, BrokerError> {
        self.queue_mut(queue)?;
        let id = self.next_waiter_id()?;
        self.touch_worker(&worker, Some(queue), now);
        let lease = self.clamp_lease(lease);
        self.streams.insert(
            id,
            StreamConsumer {
                queue: queue.clone(),
                worker,
                lease,
                window,
                outstanding: IdSet::default(),
                tx,
            },
        );
        self.queue_of(queue).streams.push_back(id);
        if !self.closed {
            self.dispatch(queue, now);
        }
        Ok(id)
    }

    /// Changes a stream's window; 0 pauses it.
    pub fn set_window(&mut self, stream: u64, window: u32, now: Instant) {
        let Some(consumer) = self.streams.get_mut(&stream) else {
            return;
        };
        consumer.window = window;
        let queue = consumer.queue.clone();
        if !self.closed {
            self.dispatch(&queue, now);
        }
    }

    /// The tasks a stream holds, for its worker's bookkeeping.
    pub fn stream_outstanding(&self, stream: u64) -> usize {
        self.streams.get(&stream).map_or(0, |c| c.outstanding.len())
    }

    /// Ends a worker stream: every task still leased through it goes back
    /// to the head of its queue at once (or fails, out of attempts or ttl),
    /// as if its lease had run out now.
    pub fn close_stream(&mut self, stream: u64, now: Instant) {
        let Some(consumer) = self.streams.remove(&stream) else {
            return;
        };
        self.waiters -= 1;
        if let Some(queue) = self.queues.get_mut(&consumer.queue) {
            queue.streams.retain(|sid| *sid != stream);
        }
        for id in consumer.outstanding {
            let through_this_stream = self.tasks.get(&id).is_some_and(
                |e| matches!(&e.status, Status::Leased(l) if l.stream == Some(stream)),
            );
            if through_this_stream {
                self.lease_lost(id, now);
            }
        }
        self.dispatch(&consumer.queue, now);
    }

    fn next_waiter_id(&mut self) -> Result<u64, BrokerError> {
        if self.waiters >= self.config.max_waiters {
            return Err(BrokerError::LimitReached(format!(
                "{} calls are already waiting (server flag --max-waiters); retry later",
                self.config.max_waiters
            )));
        }
        self.waiters += 1;
        self.next_waiter += 1;
        Ok(self.next_waiter)
    }

    pub fn add_task_waiter(
        &mut self,
        queue: &QueueName,
        worker: WorkerId,
        lease: Option<Duration>,
        tx: oneshot::Sender<LeasedTask>,
    ) -> Result<u64, BrokerError> {
        let lease = self.clamp_lease(lease);
        let id = self.next_waiter_id()?;
        self.queue_of(queue).task_waiters.push_back(TaskWaiter {
            id,
            worker,
            lease,
            tx,
        });
        Ok(id)
    }

    pub fn remove_task_waiter(&mut self, queue: &QueueName, id: u64) {
        if let Some(q) = self.queues.get_mut(queue) {
            if let Some(pos) = q.task_waiters.iter().position(|w| w.id == id) {
                q.task_waiters.remove(pos);
                self.waiters -= 1;
            }
        }
    }

    // ---- Extend and complete ----

    pub fn extend(
        &mut self,
        lease: LeaseId,
        extend_by: Option<Duration>,
        now: Instant,
    ) -> Result<SystemTime, BrokerError> {
        let by = self.clamp_lease(extend_by);
        let Some(entry) = self.tasks.get_mut(&lease.task) else {
            return Err(if self.results.contains_key(&lease.task) {
                BrokerError::TaskFinished(lease.task)
            } else {
                BrokerError::TaskNotFound(lease.task.to_string())
            });
        };
        let held = match &mut entry.status {
            // A lease past its expiry is lost even if the timer has not
            // handed the task on yet.
            Status::Leased(current) if current.seq == lease.seq && current.expires_at > now => {
                current
            }
            _ => return Err(BrokerError::stale(lease)),
        };
        let expires_at = now + by;
        held.expires_at = expires_at;
        // A later expiry is found by the entry already in the heap, which
        // re-arms itself when it fires early; only an earlier one needs a
        // new entry.
        let earlier = expires_at < held.scheduled;
        if earlier {
            held.scheduled = expires_at;
        }
        let worker = held.worker.clone();
        self.touch_worker(&worker, None, now);
        if earlier {
            self.schedule(expires_at, lease.task, TimerKind::Lease(lease.seq));
        }
        Ok(self.clock.wall(expires_at))
    }

    pub fn complete(
        &mut self,
        lease: LeaseId,
        outcome: Outcome,
        now: Instant,
    ) -> Result<TaskState, BrokerError> {
        let limit = self.config.max_result;
        let outcome = match outcome {
            Outcome::Success(output) if output.len() > limit => {
                return Err(BrokerError::ResultTooLarge {
                    size: output.len(),
                    limit,
                });
            }
            // A failure message is diagnosis, not data: one too long is cut
            // to the limit rather than refused, so that a failure can always
            // be reported (a refused one would leave the task to expire).
            Outcome::Failure { message, retry } if message.len() > limit => Outcome::Failure {
                message: truncate(message, limit),
                retry,
            },
            outcome => outcome,
        };
        // The same retried failure again: a client retrying after a lost
        // answer. The task went back in line then; nothing changes now.
        let repeats = |last: Option<&(u32, String)>| {
            matches!(&outcome, Outcome::Failure { message, retry: true }
                if last.is_some_and(|(seq, m)| *seq == lease.seq && m == message))
        };
        // The task in progress first: that is the map in cache, and where
        // nearly every report finds its task.
        let Some(entry) = self.tasks.get(&lease.task) else {
            let done = self
                .results
                .get(&lease.task)
                .ok_or_else(|| BrokerError::TaskNotFound(lease.task.to_string()))?;
            return if repeats(done.last_retry())
                || (done.by_lease == lease.seq && done.finished_by(&outcome))
            {
                Ok(done.result.state)
            } else {
                Err(BrokerError::ResultConflict(lease.task))
            };
        };
        if repeats(entry.extras.as_ref().and_then(|x| x.last_retry.as_ref())) {
            return Ok(state_of(&entry.status));
        }
        if lease.seq == 0 || lease.seq > entry.lease_seq {
            return Err(BrokerError::stale(lease));
        }
        let holder = match &entry.status {
            Status::Leased(current) if current.seq == lease.seq => Some(&current.worker),
            _ => entry
                .extras
                .as_ref()
                .and_then(|x| x.holders.get(lease.seq as usize - 1)),
        }
        .cloned()
        .expect("every issued lease has its holder");
        let is_current = matches!(&entry.status,
            Status::Leased(l) if l.seq == lease.seq && l.expires_at > now);
        match outcome {
            Outcome::Success(output) => {
                self.touch_worker(&holder, None, now);
                self.finish(
                    lease.task,
                    TaskState::Succeeded,
                    output,
                    String::new(),
                    Some(holder),
                    lease.seq,
                    Report::Success,
                    now,
                );
                Ok(TaskState::Succeeded)
            }
            Outcome::Failure { message, retry } => {
                if !is_current {
                    return Err(BrokerError::stale(lease));
                }
                let can_retry =
                    retry && entry.attempt < entry.max_attempts && !entry.expired(&self.clock, now);
                self.touch_worker(&holder, None, now);
                if can_retry {
                    self.release(lease.task);
                    let entry = self.tasks.get_mut(&lease.task).expect("held");
                    entry.extras_mut().last_retry = Some((lease.seq, message));
                    let queue = entry.queue.clone();
                    self.known_queue(&queue).redelivered += 1;
                    self.dispatch(&queue, now);
                    Ok(TaskState::Pending)
                } else {
                    self.finish(
                        lease.task,
                        TaskState::Failed,
                        Bytes::new(),
                        message,
                        Some(holder),
                        lease.seq,
                        Report::Failure { retry },
                        now,
                    );
                    Ok(TaskState::Failed)
                }
            }
        }
    }

    /// Ends a task: records its result, wakes whoever waits for it, and
    /// frees its room in the queue.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        id: TaskId,
        state: TaskState,
        output: Bytes,
        error: String,
        worker: Option<WorkerId>,
        by_lease: u32,
        report: Report,
        now: Instant,
    ) {
        let Some(entry) = self.tasks.remove(&id) else {
            return;
        };
        let result = TaskResult {
            task_id: id,
            queue: entry.queue.clone(),
            state,
            output,
            error,
            attempts: entry.attempt,
            worker,
            created_at: self.clock.wall_of(entry.created_at),
            finished_at: self.clock.wall(now),
        };
        // The input is no longer needed once there is a result.
        self.held_bytes = self.held_bytes - entry.payload.len() + result.output.len();
        let TaskEntry {
            queue: queue_name,
            status: previous,
            extras,
            ..
        } = *entry;
        // Whoever waits for this result gets it now. A failed send means
        // that caller or stream left; nothing to give back.
        let rest = extras.and_then(|extras| {
            let Extras {
                idempotency_key,
                last_retry,
                result_waiters,
                watchers,
                ..
            } = *extras;
            self.waiters -= result_waiters.len() + watchers.len();
            for waiter in result_waiters {
                let _ = waiter.tx.send(result.clone());
            }
            for watcher in watchers {
                let _ = watcher.send(result.clone());
            }
            (idempotency_key.is_some() || last_retry.is_some()).then(|| {
                Box::new(FinishedRest {
                    idempotency_key,
                    last_retry,
                })
            })
        });
        self.results.insert(
            id,
            Box::new(Finished {
                result,
                by_lease,
                report,
                unclaimed: true,
                rest,
            }),
        );
        let freed_stream = match &previous {
            Status::Leased(lease) => {
                self.worker_in_flight(&lease.worker, -1);
                self.stream_slot_freed(lease, id);
                lease.stream.is_some()
            }
            _ => false,
        };
        let queue = self.known_queue(&queue_name);
        match previous {
            Status::Pending => queue.pending -= 1,
            Status::Leased(_) => queue.leased -= 1,
        }
        match state {
            TaskState::Succeeded => queue.succeeded += 1,
            _ => queue.failed += 1,
        }
        if queue.room_wanted {
            queue.room_wanted = false;
            queue.room.notify_waiters();
        }
        // In line behind results not yet handed out, so that readers by
        // queue get them in completion order.
        queue.unclaimed.push_back(id);
        queue.results_unclaimed += 1;
        self.dispatch_results(&queue_name);
        if self.finished.is_empty() {
            // The timer may sleep past this result's retention otherwise.
            self.timer_wake.notify_one();
        }
        self.finished.push_back((now, id));
        self.evict_results(now);
        if freed_stream && !self.closed {
            self.dispatch(&queue_name, now);
        }
    }

    /// Hands unclaimed results of a queue, oldest first, inside the lock:
    /// to its waiting GetResult(queue) calls first (they wait with a
    /// deadline), then to its WatchResults(queue) streams with room, in
    /// turns.
    fn dispatch_results(&mut self, queue_name: &QueueName) {
        loop {
            let Some(queue) = self.queues.get_mut(queue_name) else {
                return;
            };
            if queue.results_unclaimed == 0 {
                return;
            }
            if let Some(front) = queue.result_waiters.front() {
                if front.tx.is_closed() {
                    queue.result_waiters.pop_front();
                    self.waiters -= 1;
                    continue;
                }
                let Some(result) = self.take_unclaimed(queue_name) else {
                    return;
                };
                let queue = self.queues.get_mut(queue_name).expect("queue exists");
                let waiter = queue.result_waiters.pop_front().expect("front exists");
                self.waiters -= 1;
                if let Err(result) = waiter.tx.send(result) {
                    self.return_unclaimed(&result);
                }
                continue;
            }
            let Some(rid) = self.next_reader(queue_name) else {
                return;
            };
            let Some(result) = self.take_unclaimed(queue_name) else {
                return;
            };
            let reader = &self.readers[&rid];
            let tx = reader
                .tx
                .as_ref()
                .expect("next_reader skips closed readers");
            reader.flow.in_hand.fetch_add(1, Ordering::AcqRel);
            if let Err(failed) = tx.send(result) {
                // The stream is closing; its guard returns what it holds.
                reader.flow.in_hand.fetch_sub(1, Ordering::AcqRel);
                self.return_unclaimed(&failed.0);
                return;
            }
        }
    }

    /// The next WatchResults(queue) stream of a queue (round robin) with
    /// room in its window. Full ones are marked to ask again when half
    /// empty.
    fn next_reader(&mut self, queue_name: &QueueName) -> Option<u64> {
        let queue = self.queues.get_mut(queue_name)?;
        for _ in 0..queue.readers.len() {
            let rid = queue.readers.pop_front()?;
            queue.readers.push_back(rid);
            let reader = &self.readers[&rid];
            if reader
                .tx
                .as_ref()
                .is_none_or(mpsc::UnboundedSender::is_closed)
            {
                continue;
            }
            if reader.flow.in_hand.load(Ordering::Acquire) < READER_WINDOW {
                return Some(rid);
            }
            reader.flow.starved.store(true, Ordering::Release);
        }
        None
    }

    fn fail_expired(&mut self, id: TaskId, now: Instant) {
        let worker = self.tasks.get(&id).and_then(|e| match &e.status {
            Status::Leased(lease) => Some(lease.worker.clone()),
            _ => e.extras.as_ref()?.holders.last().cloned(),
        });
        self.finish(
            id,
            TaskState::Failed,
            Bytes::new(),
            "task expired: its ttl ran out before it finished".into(),
            worker,
            0,
            Report::Server,
            now,
        );
    }

    /// Drops the oldest results beyond the count limit or the age limit.
    fn evict_results(&mut self, now: Instant) {
        while let Some(&(finished_at, id)) = self.finished.front() {
            let too_many = self.finished.len() > self.config.max_results;
            let too_old = now.duration_since(finished_at) >= self.config.result_ttl;
            if !(too_many || too_old) {
                return;
            }
            self.finished.pop_front();
            let Some(done) = self.results.remove(&id) else {
                continue;
            };
            self.held_bytes -= done.result.output.len();
            let queue = self.known_queue(&done.result.queue);
            if done.unclaimed {
                queue.results_unclaimed -= 1;
                queue.results_evicted += 1;
                // Evictions go in completion order, so the entry is usually
                // at the head; anything else is swept by compaction.
                if queue.unclaimed.front() == Some(&id) {
                    queue.unclaimed.pop_front();
                }
            }
            if let Some(key) = done.idempotency_key() {
                if queue.idempotency.get(key) == Some(&id) {
                    queue.idempotency.remove(key);
                }
            }
        }
    }

    // ---- Results ----

    /// The finished result of a task, or `Ok(None)` while it is unfinished.
    pub fn result_of(&self, id: TaskId) -> Result<Option<TaskResult>, BrokerError> {
        if let Some(done) = self.results.get(&id) {
            return Ok(Some(done.result.clone()));
        }
        if self.tasks.contains_key(&id) {
            return Ok(None);
        }
        Err(BrokerError::TaskNotFound(id.to_string()))
    }

    pub fn add_result_waiter(
        &mut self,
        id: TaskId,
        tx: oneshot::Sender<TaskResult>,
    ) -> Result<u64, BrokerError> {
        let waiter_id = self.next_waiter_id()?;
        let entry = self.tasks.get_mut(&id).expect("caller checked the task");
        let extras = entry.extras_mut();
        let before = extras.result_waiters.len();
        extras.result_waiters.retain(|w| !w.tx.is_closed());
        let gone = before - extras.result_waiters.len();
        extras
            .result_waiters
            .push(ResultWaiter { id: waiter_id, tx });
        self.waiters -= gone;
        Ok(waiter_id)
    }

    /// Sends each task's result to `tx` as soon as it exists: at once for
    /// finished tasks, else when they finish. Every id is checked first.
    pub fn watch_tasks(
        &mut self,
        ids: &[TaskId],
        tx: &mpsc::UnboundedSender<TaskResult>,
    ) -> Result<(), BrokerError> {
        if let Some(unknown) = ids.iter().find(|id| !self.holds(id)) {
            return Err(BrokerError::TaskNotFound(unknown.to_string()));
        }
        if self.waiters + ids.len() > self.config.max_waiters {
            return Err(BrokerError::LimitReached(format!(
                "{} calls are already waiting (server flag --max-waiters); retry later",
                self.config.max_waiters
            )));
        }
        for id in ids {
            if let Some(done) = self.results.get(id) {
                let _ = tx.send(done.result.clone());
                continue;
            }
            let entry = self.tasks.get_mut(id).expect("checked above");
            let extras = entry.extras_mut();
            let before = extras.watchers.len();
            extras.watchers.retain(|w| !w.is_closed());
            let gone = before - extras.watchers.len();
            extras.watchers.push(tx.clone());
            self.waiters = self.waiters + 1 - gone;
        }
        Ok(())
    }

    /// Unregisters a watch from the tasks it still waits for.
    pub fn unwatch(&mut self, ids: &[TaskId], tx: &mpsc::UnboundedSender<TaskResult>) {
        for id in ids {
            let Some(extras) = self.tasks.get_mut(id).and_then(|e| e.extras.as_mut()) else {
                continue;
            };
            let before = extras.watchers.len();
            extras.watchers.retain(|w| !w.same_channel(tx));
            self.waiters -= before - extras.watchers.len();
        }
    }

    /// Whether `lease` is the current lease of its task and was taken
    /// through `stream`.
    pub fn leased_through(&self, lease: LeaseId, stream: u64) -> bool {
        self.tasks.get(&lease.task).is_some_and(|e| {
            matches!(&e.status, Status::Leased(l) if l.seq == lease.seq && l.stream == Some(stream))
        })
    }

    pub fn remove_result_waiter(&mut self, id: TaskId, waiter: u64) {
        if let Some(extras) = self.tasks.get_mut(&id).and_then(|e| e.extras.as_mut()) {
            if let Some(pos) = extras.result_waiters.iter().position(|w| w.id == waiter) {
                extras.result_waiters.swap_remove(pos);
                self.waiters -= 1;
            }
        }
    }

    /// Hands out the queue's oldest unclaimed result, if there is one.
    pub fn next_result(
        &mut self,
        queue_name: &QueueName,
    ) -> Result<Option<TaskResult>, BrokerError> {
        self.queue_mut(queue_name)?;
        Ok(self.take_unclaimed(queue_name))
    }

    /// Takes the oldest unclaimed result of a queue, skipping entries of
    /// results evicted meanwhile.
    fn take_unclaimed(&mut self, queue_name: &QueueName) -> Option<TaskResult> {
        let queue = self.queues.get_mut(queue_name)?;
        if queue.unclaimed.len() > 2 * queue.results_unclaimed as usize + COMPACT_SLACK {
            let results = &self.results;
            queue
                .unclaimed
                .retain(|id| results.get(id).is_some_and(|e| e.unclaimed));
        }
        loop {
            let queue = self.known_queue(queue_name);
            let id = queue.unclaimed.pop_front()?;
            let Some(done) = self.results.get_mut(&id) else {
                continue;
            };
            if !done.unclaimed {
                continue;
            }
            done.unclaimed = false;
            let result = done.result.clone();
            self.known_queue(queue_name).results_unclaimed -= 1;
            return Some(result);
        }
    }

    /// Puts back a result that was handed to a call that can no longer be
    /// answered, at the head of the line, and offers it to the next
    /// waiting reader.
    pub fn unclaim(&mut self, result: &TaskResult) {
        self.return_unclaimed(result);
        self.dispatch_results(&result.queue);
    }

    fn return_unclaimed(&mut self, result: &TaskResult) {
        let Some(done) = self.results.get_mut(&result.task_id) else {
            return;
        };
        if done.unclaimed {
            return;
        }
        done.unclaimed = true;
        let queue = self.known_queue(&result.queue);
        queue.unclaimed.push_front(result.task_id);
        queue.results_unclaimed += 1;
    }

    /// Registers a WatchResults(queue) stream and hands it what is
    /// unclaimed, up to its window.
    pub fn open_reader(
        &mut self,
        queue: &QueueName,
        tx: mpsc::UnboundedSender<TaskResult>,
    ) -> Result<(u64, Arc<ReaderFlow>), BrokerError> {
        let (queue, _) = self.queue_mut(queue)?;
        let id = self.next_waiter_id()?;
        let flow = Arc::new(ReaderFlow::default());
        let tx = (!self.closed).then_some(tx);
        self.readers.insert(
            id,
            ResultReader {
                queue: queue.clone(),
                tx,
                flow: flow.clone(),
            },
        );
        self.queue_of(&queue).readers.push_back(id);
        self.dispatch_results(&queue);
        Ok((id, flow))
    }

    /// Hands a WatchResults(queue) stream more results, now that its window
    /// has room again.
    pub fn refill_reader(&mut self, reader: u64) {
        if let Some(queue) = self.readers.get(&reader).map(|r| r.queue.clone()) {
            self.dispatch_results(&queue);
        }
    }

    /// Ends a WatchResults(queue) stream. `unsent` are the results it held
    /// but never sent, oldest first: they go back to the head of the
    /// queue's results, in order, for the next reader.
    pub fn close_reader(&mut self, reader: u64, unsent: Vec<TaskResult>) {
        let Some(closed) = self.readers.remove(&reader) else {
            return;
        };
        self.waiters -= 1;
        if let Some(queue) = self.queues.get_mut(&closed.queue) {
            queue.readers.retain(|id| *id != reader);
        }
        for result in unsent.iter().rev() {
            self.return_unclaimed(result);
        }
        self.dispatch_results(&closed.queue);
    }

    pub fn add_queue_result_waiter(
        &mut self,
        queue: &QueueName,
        tx: oneshot::Sender<TaskResult>,
    ) -> Result<u64, BrokerError> {
        let id = self.next_waiter_id()?;
        self.queue_of(queue)
            .result_waiters
            .push_back(ResultWaiter { id, tx });
        Ok(id)
    }

    pub fn remove_queue_result_waiter(&mut self, queue: &QueueName, id: u64) {
        if let Some(q) = self.queues.get_mut(queue) {
            if let Some(pos) = q.result_waiters.iter().position(|w| w.id == id) {
                q.result_waiters.remove(pos);
                self.waiters -= 1;
            }
        }
    }

    // ---- Timers ----

    /// Handles every lease and ttl deadline that is due and drops results
    /// past their retention. Returns when to look again.
    pub fn fire_due(&mut self, now: Instant) -> Option<Instant> {
        while let Some(Reverse(top)) = self.timers.peek() {
            if top.at > now {
                break;
            }
            let Reverse(due) = self.timers.pop().expect("peeked");
            match due.kind {
                TimerKind::Lease(seq) => self.lease_due(due.task, seq, due.at, now),
                TimerKind::Ttl => {
                    let pending = self
                        .tasks
                        .get(&due.task)
                        .is_some_and(|e| matches!(e.status, Status::Pending));
                    if pending {
                        self.fail_expired(due.task, now);
                    }
                }
            }
        }
        self.evict_results(now);
        let next_timer = self.timers.peek().map(|Reverse(t)| t.at);
        let next_eviction = self
            .finished
            .front()
            .map(|&(at, _)| at + self.config.result_ttl);
        match (next_timer, next_eviction) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn lease_due(&mut self, id: TaskId, seq: u32, at: Instant, now: Instant) {
        let Some(entry) = self.tasks.get_mut(&id) else {
            return;
        };
        let Status::Leased(lease) = &mut entry.status else {
            return;
        };
        if lease.seq != seq || lease.scheduled != at {
            // An entry of an earlier lease, or one replaced by an earlier
            // expiry: stale.
            return;
        }
        if lease.expires_at > now {
            // Extended since this entry was made: re-arm it for the new expiry.
            let expires_at = lease.expires_at;
            lease.scheduled = expires_at;
            self.schedule(expires_at, id, TimerKind::Lease(seq));
            return;
        }
        self.lease_lost(id, now);
    }

    /// A leased task's lease is over (expired, or its stream closed): back
    /// to the head of the queue for another attempt, or FAILED when it has
    /// used its attempts or its ttl.
    fn lease_lost(&mut self, id: TaskId, now: Instant) {
        let entry = &self.tasks[&id];
        let Status::Leased(lease) = &entry.status else {
            return;
        };
        let worker = lease.worker.clone();
        if entry.expired(&self.clock, now) {
            self.fail_expired(id, now);
        } else if entry.attempt >= entry.max_attempts {
            let error = format!(
                "lease expired on attempt {} of {}: worker {worker} reported no result in time",
                entry.attempt, entry.max_attempts
            );
            self.finish(
                id,
                TaskState::Failed,
                Bytes::new(),
                error,
                Some(worker),
                0,
                Report::Server,
                now,
            );
        } else {
            tracing::debug!(task_id = %id, worker_id = %worker, "lease expired; task requeued");
            self.release(id);
            let queue = self.tasks[&id].queue.clone();
            self.known_queue(&queue).redelivered += 1;
            self.dispatch(&queue, now);
        }
    }

    // ---- Stats ----

    pub fn stats(&mut self, only: Option<&QueueName>, now: Instant) -> Stats {
        let mut queues: Vec<QueueStats> = self
            .queues
            .iter()
            .filter(|(name, _)| only.is_none_or(|o| o == *name))
            .map(|(name, q)| QueueStats {
                queue: name.to_string(),
                pending: q.pending,
                leased: q.leased,
                succeeded: q.succeeded,
                failed: q.failed,
                redelivered: q.redelivered,
                oldest_pending_age: self.oldest_pending_age(q, now),
                results_unclaimed: q.results_unclaimed,
                results_evicted: q.results_evicted,
                waiting_workers: q.task_waiters.len() as u64,
            })
            .collect();
        if let (Some(name), true) = (only, queues.is_empty()) {
            queues.push(QueueStats {
                queue: name.to_string(),
                ..QueueStats::default()
            });
        }
        queues.sort_by(|a, b| a.queue.cmp(&b.queue));
        prune_workers(&mut self.workers, &self.config, now);
        let timeout = self.config.worker_timeout;
        let mut workers: Vec<WorkerInfo> = self
            .workers
            .iter()
            .filter(|(_, w)| only.is_none_or(|o| w.queue.as_ref() == Some(o)))
            .map(|(id, w)| WorkerInfo {
                worker: id.clone(),
                queue: w.queue.clone(),
                last_seen: self.clock.wall(w.last_seen),
                in_flight: w.in_flight,
                alive: now.duration_since(w.last_seen) < timeout,
            })
            .collect();
        workers.sort_by(|a, b| a.worker.cmp(&b.worker));
        Stats { queues, workers }
    }

    /// The age of the oldest of the first pending tasks in line. Retried
    /// tasks go to the head, so the oldest task is among the first ones;
    /// looking at a bounded number keeps stats cheap on long queues.
    fn oldest_pending_age(&self, queue: &QueueState, now: Instant) -> Duration {
        queue
            .ready
            .iter()
            .take(OLDEST_SCAN)
            .filter_map(|id| self.tasks.get(id))
            .filter(|e| matches!(e.status, Status::Pending))
            .map(|e| now.duration_since(self.clock.instant(e.created_at)))
            .max()
            .unwrap_or_default()
    }

    /// Sizes of the structures that may hold skipped entries: timer heap,
    /// and the ready and unclaimed lines of all queues together.
    #[cfg(test)]
    pub fn footprint(&self) -> (usize, usize, usize) {
        (
            self.timers.len(),
            self.queues.values().map(|q| q.ready.len()).sum(),
            self.queues.values().map(|q| q.unclaimed.len()).sum(),
        )
    }

    /// Checks the bookkeeping against the tasks themselves; used by tests
    /// after every step. Returns what is wrong, if anything.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut counts: HashMap<&QueueName, (u64, u64)> = HashMap::new();
        if self.finished.len() != self.results.len() {
            return Err(format!(
                "{} results held, {} in the retention line",
                self.results.len(),
                self.finished.len()
            ));
        }
        for (id, entry) in &self.tasks {
            let c = counts.entry(&entry.queue).or_default();
            match &entry.status {
                Status::Pending => {
                    c.0 += 1;
                    let queue = &self.queues[&entry.queue];
                    let n = queue.ready.iter().filter(|r| *r == id).count();
                    if n != 1 {
                        return Err(format!("pending task {id} is in its queue {n} times"));
                    }
                }
                Status::Leased(_) => c.1 += 1,
            }
        }
        let mut unclaimed: HashMap<&QueueName, u64> = HashMap::new();
        for done in self.results.values().filter(|done| done.unclaimed) {
            *unclaimed.entry(&done.result.queue).or_default() += 1;
        }
        for (name, q) in &self.queues {
            let results = unclaimed.get(name).copied().unwrap_or_default();
            if q.results_unclaimed != results {
                return Err(format!(
                    "queue {name}: counter says {} results unclaimed, results say {results}",
                    q.results_unclaimed
                ));
            }
        }
        for (name, q) in &self.queues {
            let (pending, leased) = counts.get(name).copied().unwrap_or_default();
            if (q.pending, q.leased) != (pending, leased) {
                return Err(format!(
                    "queue {name}: counters say {}/{} pending/leased, tasks say {pending}/{leased}",
                    q.pending, q.leased
                ));
            }
        }
        let waiting: usize = self
            .queues
            .values()
            .map(|q| q.task_waiters.len() + q.result_waiters.len())
            .sum::<usize>()
            + self
                .tasks
                .values()
                .filter_map(|e| e.extras.as_ref())
                .map(|x| x.result_waiters.len() + x.watchers.len())
                .sum::<usize>()
            + self.streams.len()
            + self.readers.len();
        let held: usize = self.tasks.values().map(|e| e.payload.len()).sum::<usize>()
            + self
                .results
                .values()
                .map(|done| done.result.output.len())
                .sum::<usize>();
        if held != self.held_bytes {
            return Err(format!(
                "{held} bytes held, counter says {}",
                self.held_bytes
            ));
        }
        if waiting != self.waiters {
            return Err(format!(
                "{waiting} waiters registered, counter says {}",
                self.waiters
            ));
        }
        Ok(())
    }
}

/// `text` cut to at most `limit` bytes, at a character boundary.
fn truncate(mut text: String, limit: usize) -> String {
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

fn state_of(status: &Status) -> TaskState {
    match status {
        Status::Pending => TaskState::Pending,
        Status::Leased(_) => TaskState::Leased,
    }
}

/// Guards the memory per pending task (bench: `--fill`): a boxed entry of
/// at most 96 bytes takes a 96-byte allocator chunk; at 97 it would take
/// 112, 16 bytes more on every held task. (A status of two variants, one a
/// box, costs one pointer: finished tasks live apart, in `results`.)
#[cfg(test)]
#[test]
fn a_task_entry_fits_a_96_byte_chunk() {
    let size = std::mem::size_of::<TaskEntry>();
    assert!(size <= 96, "TaskEntry is {size} bytes");
    assert_eq!(std::mem::size_of::<Status>(), 8);
    assert_eq!(std::mem::size_of::<Option<Stamp>>(), 8);
}
