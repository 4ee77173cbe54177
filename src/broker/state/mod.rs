//! The state machine: every task's state and every change to it. Put,
//! lease, dispatch, extend, complete, finish and expiry call into each
//! other, so they live together here; the parts that keep their own rules
//! behind a small interface live beside it: the clock (`clock`), the timer
//! heap (`timers`), a queue's lines and counters (`queue`), finished
//! results and their retention (`retention`), the worker table
//! (`workers`), waiters and their cap (`waiters`), and the validation of
//! new tasks (`types`).
//!
//! Everything here is synchronous and runs under the broker's one lock, so
//! each change is whole: no change spans an `.await`, and a cancelled call
//! leaves nothing half done.

#[cfg(any(test, feature = "fuzzing"))]
mod check;
mod control;
mod deadlines;
mod snapshot;
mod task;

use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::clock::Clock;
use super::queue::{QueueState, Unfinished};
use super::retention::{Finished, FinishedRest, Report, Retained, RetentionLimits};
use super::timers::{TimerEntry, TimerHeap, TimerKind};
use super::types::{IdMaker, IdMap, IdSet, NameMap};
use super::waiters::{
    ResultStreamFlow, ResultStreamId, ResultStreamRecord, ResultWaiter, StreamId, StreamSenders,
    TaskWaiter, WaiterId, WaiterSlots, Watcher, WorkerStreamRecord,
};
use super::workers::WorkerTable;
use super::{
    BrokerConfig, BrokerError, Holdings, LeaseId, LeasedTask, NewTask, Outcome, PutOutcome,
    QueueName, RECENT_FAILURES, TaskId, TaskResult, TaskState, WorkerId,
};
use task::{Ended, Extras, Lease, Status, TaskEntry, state_of, timer_is_live};

/// Entries looked at from the head of a queue for `oldest_pending_age`.
const OLDEST_SCAN: usize = 64;

/// Who gets the next task of a queue.
enum Recipient {
    WaitingCall,
    WorkerStream(StreamId),
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
    /// moves out without being copied.
    tasks: IdMap<TaskId, Box<TaskEntry>>,
    /// Finished tasks, held for their results until retention drops them.
    results: Retained,
    /// Every lease and ttl deadline; stale entries are skipped when due.
    timers: TimerHeap,
    workers: WorkerTable,
    streams: IdMap<StreamId, WorkerStreamRecord>,
    result_streams: IdMap<ResultStreamId, ResultStreamRecord>,
    /// Every waiter's slot comes from here (`--max-waiters`).
    slots: WaiterSlots,
    /// Bytes of payloads of unfinished tasks and outputs of results held.
    held_bytes: usize,
    /// The latest tasks that finished FAILED, newest at the front, for
    /// the status page ([`RECENT_FAILURES`] at most).
    failures: VecDeque<TaskResult>,
    closed: bool,
    ids: IdMaker,
}

impl State {
    pub fn new(config: BrokerConfig, timer_wake: Arc<Notify>) -> Self {
        Self {
            clock: Clock::now(),
            queues: NameMap::default(),
            tasks: IdMap::default(),
            results: Retained::new(RetentionLimits {
                result_ttl: config.result_ttl,
                max_results: config.max_results,
            }),
            timers: TimerHeap::new(timer_wake),
            workers: WorkerTable::new(config.max_workers, config.worker_timeout),
            streams: IdMap::default(),
            result_streams: IdMap::default(),
            slots: WaiterSlots::new(config.max_waiters),
            held_bytes: 0,
            failures: VecDeque::with_capacity(RECENT_FAILURES),
            closed: false,
            ids: IdMaker::new(),
            config,
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
        for stream in self.result_streams.values_mut() {
            stream.tx = None;
        }
        self.queues.values().map(QueueState::room).collect()
    }

    pub fn holdings(&self) -> Holdings {
        Holdings {
            tasks: self.tasks.len(),
            results: self.results.len(),
        }
    }

    /// Whether a task or its result is held.
    fn holds(&self, id: &TaskId) -> bool {
        self.tasks.contains_key(id) || self.results.contains(id)
    }

    /// Keeps a note of a task that finished FAILED for the status page.
    /// Off the path of tasks that succeed.
    fn note_failure(&mut self, result: &TaskResult) {
        if self.failures.len() == RECENT_FAILURES {
            self.failures.pop_back();
        }
        self.failures.push_front(result.as_failure_note());
    }

    /// The queue `name`, made if new (within `--max-queues`), and the map's
    /// own copy of its name: tasks keep that one, so every task of a queue
    /// shares one allocation (bench/README.md: bytes per pending task).
    fn queue_mut(&mut self, name: &QueueName) -> Result<(QueueName, &mut QueueState), BrokerError> {
        let limit = self.config.max_queues;
        let count = self.queues.len();
        match self.queues.entry(name.clone()) {
            Entry::Occupied(entry) => Ok((entry.key().clone(), entry.into_mut())),
            Entry::Vacant(_) if count >= limit => Err(BrokerError::queues_full(limit)),
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
        let tasks = &self.tasks;
        // At most a ttl entry and a lease entry per unfinished task are
        // live.
        self.timers
            .schedule(TimerEntry { at, task, kind }, 2 * tasks.len(), |entry| {
                timer_is_live(tasks, entry)
            });
    }

    fn clamp_lease(&self, lease_duration: Option<Duration>) -> Duration {
        lease_duration
            .filter(|d| !d.is_zero())
            .unwrap_or(self.config.default_lease)
            .min(self.config.max_lease)
    }

    // ---- Put ----

    /// Stores a task and hands it out if a recipient waits.
    pub fn put(&mut self, task: NewTask, now: Instant) -> Result<PutOutcome, PutRefused> {
        let (outcome, queue) = self.store(task, now)?;
        if let Some(queue) = queue {
            self.dispatch(&queue, now);
        }
        Ok(outcome)
    }

    /// Stores a batch of tasks, each as [`State::put`] would, and then
    /// hands out what it can, per run of tasks of one queue: a run goes out
    /// by priority as a whole, and a batch does not look for a recipient
    /// once per task while none has room.
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
        task.validate(self.config.max_payload)?;
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
            let room = queue.want_room();
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
        let due = task.delay.filter(|d| !d.is_zero()).map(|d| now + d);
        if due.is_some() {
            queue.push_delayed();
        } else {
            let tasks = &self.tasks;
            queue.push_new(id, task.priority, |id| {
                tasks.get(id).is_some_and(|e| e.is_ready())
            });
        }
        let expires_at = task.ttl.map(|ttl| now + ttl);
        let max_attempts = match task.max_attempts {
            0 => self.config.default_max_attempts,
            n => n,
        };
        let due = due.map(|at| (at, self.clock.stamp(at)));
        let extras = (!task.headers.is_empty() || task.idempotency_key.is_some() || due.is_some())
            .then(|| {
                Box::new(Extras {
                    headers: task.headers,
                    idempotency_key: task.idempotency_key,
                    due: due.map(|(_, stamp)| stamp),
                    // It waits for a hand-out from when it is due.
                    ready_since: due.map(|(_, stamp)| stamp),
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
                priority: task.priority,
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
        if let Some((at, _)) = due {
            self.schedule(at, id, TimerKind::Due);
            // Nothing to hand out before it is due.
            return Ok((outcome, None));
        }
        Ok((outcome, Some(queue_name)))
    }

    fn fresh_id(&mut self, now: Instant) -> TaskId {
        // The maker's ids do not repeat in a process's life (all 64 bits of
        // its counter are in each id: `IdMaker::next`), so no lookup is
        // paid per task to check, least of all in the map of results.
        let id = self.ids.next(self.clock.unix_ms(now));
        debug_assert!(!self.holds(&id), "task id {id} made twice");
        id
    }

    // ---- Lease ----

    /// Leases the queue's next task to `worker` at once, if there is one.
    pub fn lease_now(
        &mut self,
        queue: &QueueName,
        worker: &WorkerId,
        lease_duration: Option<Duration>,
        now: Instant,
    ) -> Result<Option<LeasedTask>, BrokerError> {
        self.queue_mut(queue)?;
        self.workers.touch(worker, Some(queue), None, now);
        if self.closed || self.known_queue(queue).paused {
            return Ok(None);
        }
        let lease_duration = self.clamp_lease(lease_duration);
        Ok(self
            .pop_ready(queue, now)
            .map(|id| self.start_lease(id, worker.clone(), lease_duration, None, now)))
    }

    /// Takes the next task that can be handed out from the head of a queue.
    /// Tasks found past their ttl are failed on the way.
    fn pop_ready(&mut self, queue_name: &QueueName, now: Instant) -> Option<TaskId> {
        loop {
            let id = self.queues.get_mut(queue_name)?.pop_ready()?;
            let Some(entry) = self.tasks.get(&id) else {
                continue;
            };
            // A line never holds a delayed task (`check_consistency`), so
            // the status alone tells a stale entry.
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
        lease_duration: Duration,
        stream: Option<StreamId>,
        now: Instant,
    ) -> LeasedTask {
        let expires_at = now + lease_duration;
        let entry = self.tasks.get_mut(&id).expect("popped task is held");
        // A worker whose wait outlived its record is recorded again here.
        self.workers
            .touch(&worker, Some(&entry.queue), Some(id), now);
        entry.attempt += 1;
        entry.lease_seq += 1;
        let seq = entry.lease_seq;
        let ready_since = entry
            .extras
            .as_ref()
            .and_then(|x| x.ready_since)
            .unwrap_or(entry.created_at);
        let waited = now.saturating_duration_since(self.clock.instant(ready_since));
        entry.status = Status::Leased(Box::new(Lease {
            seq,
            leased_at: now,
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
        self.known_queue(&task.queue).leased_one(waited);
        if let Some(stream) = stream.and_then(|sid| self.streams.get_mut(&sid)) {
            stream.outstanding.insert(id);
        }
        self.schedule(expires_at, id, TimerKind::Lease(seq));
        task
    }

    /// A lease taken through a worker stream has ended: the stream has
    /// room for one more task.
    fn stream_slot_freed(&mut self, lease: &Lease, id: TaskId) {
        if let Some(stream) = lease.stream.and_then(|sid| self.streams.get_mut(&sid)) {
            stream.outstanding.remove(&id);
        }
    }

    /// Moves a leased task back in line (in its place by id), ready again
    /// from `now`, or with `backoff` into the delayed tasks until then.
    /// Returns the lease it had.
    fn release(&mut self, id: TaskId, backoff: Duration, now: Instant) -> Option<Box<Lease>> {
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
        let ready_at = now + backoff;
        let stamp = self.clock.stamp(ready_at);
        let (queue_name, priority) = (entry.queue.clone(), entry.priority);
        let extras = entry.extras_mut();
        extras.ready_since = Some(stamp);
        if backoff.is_zero() {
            self.known_queue(&queue_name).released(id, priority);
        } else {
            extras.due = Some(stamp);
            self.known_queue(&queue_name).released_delayed();
            self.schedule(ready_at, id, TimerKind::Due);
        }
        self.workers.lease_ended(&lease.worker, id);
        self.stream_slot_freed(&lease, id);
        Some(lease)
    }

    /// Gives back a task that was leased to a call that can no longer be
    /// answered: it never reached a worker, so the delivery does not count.
    pub fn undo_lease(&mut self, lease_id: LeaseId, now: Instant) {
        let current = self
            .tasks
            .get(&lease_id.task)
            .is_some_and(|e| matches!(&e.status, Status::Leased(l) if l.seq == lease_id.seq));
        if !current {
            return;
        }
        self.release(lease_id.task, Duration::ZERO, now);
        let entry = self.tasks.get_mut(&lease_id.task).expect("just released");
        entry.attempt -= 1;
        if entry.expired(&self.clock, now) {
            // Its ttl ran out while it sat with the call that is gone.
            self.fail_expired(lease_id.task, now);
            return;
        }
        let queue = entry.queue.clone();
        self.dispatch(&queue, now);
    }

    /// Hands ready tasks of a queue to its waiting calls and worker
    /// streams, inside the lock. Waiting calls come first (they wait with a
    /// deadline); streams with room take turns. A recipient that is gone
    /// gets nothing; a task whose send fails goes straight back to the
    /// head.
    fn dispatch(&mut self, queue_name: &QueueName, now: Instant) {
        while let Some(recipient) = self.next_recipient(queue_name) {
            let Some(id) = self.pop_ready(queue_name, now) else {
                return;
            };
            match recipient {
                Recipient::WaitingCall => {
                    let waiter = self
                        .known_queue(queue_name)
                        .task_waiters
                        .pop_front()
                        .expect("front exists");
                    let task =
                        self.start_lease(id, waiter.worker, waiter.lease_duration, None, now);
                    let lease_id = task.lease_id;
                    if waiter.tx.send(task).is_err() {
                        self.undo_lease(lease_id, now);
                    }
                }
                Recipient::WorkerStream(sid) => {
                    let stream = &self.streams[&sid];
                    let (worker, lease_duration) = (stream.worker.clone(), stream.lease_duration);
                    let task = self.start_lease(id, worker, lease_duration, Some(sid), now);
                    let lease_id = task.lease_id;
                    if self.streams[&sid].tx.send(task).is_err() {
                        // The stream's receiver is closing: its guard will
                        // close the stream; this task never reached it.
                        self.undo_lease(lease_id, now);
                    }
                }
            }
        }
    }

    /// The next recipient of a queue's tasks: the first live waiting call,
    /// else the next worker stream (round robin) with room in its window.
    /// None while nothing is pending: no recipient is looked for then (a
    /// finished task often frees room in a stream while its queue is
    /// empty).
    fn next_recipient(&mut self, queue_name: &QueueName) -> Option<Recipient> {
        if self.closed {
            // Draining: waiting calls were answered; streams take no more.
            return None;
        }
        let queue = self.queues.get_mut(queue_name)?;
        if queue.pending() == 0 || queue.paused {
            return None;
        }
        while let Some(front) = queue.task_waiters.front() {
            if !front.tx.is_closed() {
                return Some(Recipient::WaitingCall);
            }
            queue.task_waiters.pop_front();
        }
        for _ in 0..queue.streams.len() {
            let sid = queue.streams.pop_front()?;
            queue.streams.push_back(sid);
            // A stream whose handler is gone is skipped; its guard closes it.
            if self.streams[&sid].has_room() {
                return Some(Recipient::WorkerStream(sid));
            }
        }
        None
    }

    // ---- Worker streams and waiting GetTask calls ----

    /// Registers a worker stream on a queue and hands it what is ready.
    pub fn open_stream(
        &mut self,
        queue: &QueueName,
        worker: WorkerId,
        lease_duration: Option<Duration>,
        window: u32,
        senders: StreamSenders,
        now: Instant,
    ) -> Result<StreamId, BrokerError> {
        self.queue_mut(queue)?;
        let (id, slot) = self.slots.admit_stream()?;
        self.workers.touch(&worker, Some(queue), None, now);
        let lease_duration = self.clamp_lease(lease_duration);
        self.streams.insert(
            id,
            WorkerStreamRecord {
                queue: queue.clone(),
                worker,
                lease_duration,
                window,
                outstanding: IdSet::default(),
                tx: senders.tasks,
                cancels: senders.cancels,
                _slot: slot,
            },
        );
        self.queue_of(queue).streams.push_back(id);
        if !self.closed {
            self.dispatch(queue, now);
        }
        Ok(id)
    }

    /// Changes a worker stream's window; 0 pauses it.
    pub fn set_window(&mut self, stream: StreamId, window: u32, now: Instant) {
        let Some(record) = self.streams.get_mut(&stream) else {
            return;
        };
        record.window = window;
        let queue = record.queue.clone();
        if !self.closed {
            self.dispatch(&queue, now);
        }
    }

    /// The tasks a worker stream holds, for its worker's bookkeeping.
    pub fn stream_outstanding(&self, stream: StreamId) -> usize {
        self.streams.get(&stream).map_or(0, |s| s.outstanding.len())
    }

    /// Whether `lease_id` is the current lease of its task and was taken
    /// through `stream`.
    pub fn leased_through(&self, lease_id: LeaseId, stream: StreamId) -> bool {
        self.tasks.get(&lease_id.task).is_some_and(|e| {
            matches!(&e.status,
                Status::Leased(l) if l.seq == lease_id.seq && l.stream == Some(stream))
        })
    }

    /// Ends a worker stream: every task still leased through it goes back
    /// to the head of its queue at once, oldest first (or fails, out of
    /// attempts or ttl), as if its lease had run out now.
    pub fn close_stream(&mut self, stream: StreamId, now: Instant) {
        let Some(record) = self.streams.remove(&stream) else {
            return;
        };
        if let Some(queue) = self.queues.get_mut(&record.queue) {
            queue.streams.retain(|sid| *sid != stream);
        }
        // Newest first, each to the head of the line: the line then starts
        // with the oldest, in the order the tasks were made, and not in the
        // order the set happens to hash them (which the model-based test
        // could not predict).
        let mut held: Vec<TaskId> = record.outstanding.into_iter().collect();
        held.sort_unstable_by(|a, b| b.cmp(a));
        for id in held {
            if self.leased_through_stream(id, stream) {
                self.lease_lost(id, now);
            }
        }
        self.dispatch(&record.queue, now);
    }

    fn leased_through_stream(&self, id: TaskId, stream: StreamId) -> bool {
        self.tasks
            .get(&id)
            .is_some_and(|e| matches!(&e.status, Status::Leased(l) if l.stream == Some(stream)))
    }

    /// Registers a GetTask call waiting for a task of `queue`.
    pub fn add_task_waiter(
        &mut self,
        queue: &QueueName,
        worker: WorkerId,
        lease_duration: Option<Duration>,
        tx: oneshot::Sender<LeasedTask>,
    ) -> Result<WaiterId, BrokerError> {
        let lease_duration = self.clamp_lease(lease_duration);
        let (id, slot) = self.slots.admit_waiter()?;
        self.queue_of(queue).task_waiters.push_back(TaskWaiter {
            id,
            worker,
            lease_duration,
            tx,
            _slot: slot,
        });
        Ok(id)
    }

    pub fn remove_task_waiter(&mut self, queue: &QueueName, id: WaiterId) {
        if let Some(q) = self.queues.get_mut(queue) {
            q.remove_task_waiter(id);
        }
    }

    // ---- Extend and complete ----

    pub fn extend(
        &mut self,
        lease_id: LeaseId,
        extend_by: Option<Duration>,
        now: Instant,
    ) -> Result<SystemTime, BrokerError> {
        let by = self.clamp_lease(extend_by);
        let Some(entry) = self.tasks.get_mut(&lease_id.task) else {
            return Err(match self.results.get(&lease_id.task) {
                Some(done) if done.report == Report::Cancelled => {
                    BrokerError::Cancelled(lease_id.task)
                }
                Some(_) => BrokerError::TaskFinished(lease_id.task),
                None => BrokerError::TaskNotFound(lease_id.task.to_string()),
            });
        };
        let current = match &mut entry.status {
            // A lease past its expiry is lost even if the timer has not
            // handed the task on yet.
            Status::Leased(current) if current.seq == lease_id.seq && current.expires_at > now => {
                current
            }
            _ => return Err(BrokerError::stale(lease_id)),
        };
        let expires_at = now + by;
        current.expires_at = expires_at;
        // A later expiry is found by the entry already in the heap, which
        // re-arms itself when it fires early; only an earlier one needs a
        // new entry.
        let earlier = expires_at < current.scheduled;
        if earlier {
            current.scheduled = expires_at;
        }
        self.workers.touch(&current.worker, None, None, now);
        if earlier {
            self.schedule(expires_at, lease_id.task, TimerKind::Lease(lease_id.seq));
        }
        Ok(self.clock.wall(expires_at))
    }

    pub fn complete(
        &mut self,
        lease_id: LeaseId,
        outcome: Outcome,
        now: Instant,
    ) -> Result<TaskState, BrokerError> {
        let outcome = outcome.within(self.config.max_result)?;
        // The same retried failure again: a client retrying after a lost
        // answer. The task went back in line then; nothing changes now.
        let repeats = |last: Option<&(u32, String)>| {
            matches!(&outcome, Outcome::Failure { message, retry: true, .. }
                if last.is_some_and(|(seq, m)| *seq == lease_id.seq && m == message))
        };
        // The task in progress first: that is the map in cache, and where
        // nearly every report finds its task.
        let Some(entry) = self.tasks.get(&lease_id.task) else {
            let done = self
                .results
                .get(&lease_id.task)
                .ok_or_else(|| BrokerError::TaskNotFound(lease_id.task.to_string()))?;
            if done.report == Report::Cancelled {
                return Err(BrokerError::Cancelled(lease_id.task));
            }
            return if repeats(done.last_retry())
                || (done.by_lease == lease_id.seq && done.finished_by(&outcome))
            {
                Ok(done.result.state)
            } else {
                Err(BrokerError::ResultConflict(lease_id.task))
            };
        };
        if repeats(entry.extras.as_ref().and_then(|x| x.last_retry.as_ref())) {
            return Ok(state_of(&entry.status));
        }
        if lease_id.seq == 0 || lease_id.seq > entry.lease_seq {
            return Err(BrokerError::stale(lease_id));
        }
        let holder = match &entry.status {
            Status::Leased(current) if current.seq == lease_id.seq => Some(&current.worker),
            _ => entry
                .extras
                .as_ref()
                .and_then(|x| x.holders.get(lease_id.seq as usize - 1)),
        }
        .cloned()
        .expect("every issued lease has its holder");
        let is_current = matches!(&entry.status,
            Status::Leased(l) if l.seq == lease_id.seq && l.expires_at > now);
        match outcome {
            Outcome::Success(output) => {
                self.workers.touch(&holder, None, None, now);
                let ended = Ended {
                    state: TaskState::Succeeded,
                    output,
                    error: String::new(),
                    worker: Some(holder),
                    by_lease: lease_id.seq,
                    report: Report::Success,
                };
                self.finish(lease_id.task, ended, now);
                Ok(TaskState::Succeeded)
            }
            Outcome::Failure {
                message,
                retry,
                retry_after,
            } => {
                if !is_current {
                    return Err(BrokerError::stale(lease_id));
                }
                let can_retry =
                    retry && entry.attempt < entry.max_attempts && !entry.expired(&self.clock, now);
                self.workers.touch(&holder, None, None, now);
                if can_retry {
                    let backoff = retry_after
                        .unwrap_or_else(|| self.config.retry_backoff.delay(entry.attempt));
                    self.release(lease_id.task, backoff, now);
                    let entry = self.tasks.get_mut(&lease_id.task).expect("held");
                    entry.extras_mut().last_retry = Some((lease_id.seq, message));
                    let queue = entry.queue.clone();
                    self.known_queue(&queue).retried_after_error();
                    self.dispatch(&queue, now);
                    Ok(TaskState::Pending)
                } else {
                    let ended = Ended {
                        state: TaskState::Failed,
                        output: Bytes::new(),
                        error: message,
                        worker: Some(holder),
                        by_lease: lease_id.seq,
                        report: Report::Failure { retry },
                    };
                    self.finish(lease_id.task, ended, now);
                    Ok(TaskState::Failed)
                }
            }
        }
    }

    /// Ends a task: records its result, wakes whoever waits for it, and
    /// frees its room in the queue.
    fn finish(&mut self, id: TaskId, ended: Ended, now: Instant) {
        let Some(entry) = self.tasks.remove(&id) else {
            return;
        };
        let result = TaskResult {
            task_id: id,
            queue: entry.queue.clone(),
            state: ended.state,
            output: ended.output,
            error: ended.error,
            attempts: entry.attempt,
            worker: ended.worker,
            created_at: self.clock.wall_of(entry.created_at),
            finished_at: self.clock.wall(now),
        };
        // The input is no longer needed once there is a result.
        self.held_bytes = self.held_bytes - entry.payload.len() + result.output.len();
        if result.state == TaskState::Failed {
            self.note_failure(&result);
        }
        let TaskEntry {
            queue: queue_name,
            status: previous,
            extras,
            created_at,
            ..
        } = *entry;
        // Whoever waits for this result gets it now (their slots go back as
        // they are dropped). A failed send means that caller or stream
        // left; nothing to give back.
        let delayed = extras.as_ref().is_some_and(|x| x.due.is_some());
        let rest = extras.and_then(|extras| {
            let Extras {
                idempotency_key,
                last_retry,
                result_waiters,
                watchers,
                ..
            } = *extras;
            for waiter in result_waiters {
                let _ = waiter.tx.send(result.clone());
            }
            for watcher in watchers {
                let _ = watcher.tx.send(result.clone());
            }
            (idempotency_key.is_some() || last_retry.is_some()).then(|| {
                Box::new(FinishedRest {
                    idempotency_key,
                    last_retry,
                })
            })
        });
        let report = ended.report;
        let first = self.results.insert(
            id,
            Box::new(Finished {
                result,
                by_lease: ended.by_lease,
                report: ended.report,
                unclaimed: true,
                rest,
            }),
            now,
        );
        let (was, freed_stream) = match &previous {
            Status::Leased(lease) => {
                self.workers.lease_ended(&lease.worker, id);
                self.stream_slot_freed(lease, id);
                let ran = now.saturating_duration_since(lease.leased_at);
                (Unfinished::Leased { ran }, lease.stream.is_some())
            }
            Status::Pending if delayed => (Unfinished::Delayed, false),
            Status::Pending => (Unfinished::Pending, false),
        };
        let took = now.saturating_duration_since(self.clock.instant(created_at));
        self.known_queue(&queue_name)
            .finished(id, was, took, report);
        self.dispatch_results(&queue_name);
        if first {
            // The timer may sleep past this result's retention otherwise.
            self.timers.wake();
        }
        self.evict_results(now);
        if freed_stream && !self.closed {
            self.dispatch(&queue_name, now);
        }
    }

    fn fail_expired(&mut self, id: TaskId, now: Instant) {
        let worker = self.tasks.get(&id).and_then(|e| match &e.status {
            Status::Leased(lease) => Some(lease.worker.clone()),
            _ => e.extras.as_ref()?.holders.last().cloned(),
        });
        let ended = Ended {
            state: TaskState::Failed,
            output: Bytes::new(),
            error: "task expired: its ttl ran out before it finished".into(),
            worker,
            by_lease: 0,
            report: Report::Expired,
        };
        self.finish(id, ended, now);
    }

    /// Drops the results retention no longer keeps, and what refers to
    /// them: their bytes, their place among the queue's unclaimed results,
    /// their idempotency key.
    fn evict_results(&mut self, now: Instant) {
        while let Some((id, done)) = self.results.evict_next(now) {
            self.held_bytes -= done.result.output.len();
            let queue = self.known_queue(&done.result.queue);
            if done.unclaimed {
                queue.unclaimed_evicted(id);
            }
            if let Some(key) = done.idempotency_key() {
                if queue.idempotency.get(key) == Some(&id) {
                    queue.idempotency.remove(key);
                }
            }
        }
    }

    // ---- Results ----

    /// Hands unclaimed results of a queue, oldest first, inside the lock:
    /// to its waiting GetResult(queue) calls first (they wait with a
    /// deadline), then to its result streams with room, in turns.
    fn dispatch_results(&mut self, queue_name: &QueueName) {
        loop {
            let Some(queue) = self.queues.get_mut(queue_name) else {
                return;
            };
            if queue.results_unclaimed() == 0 {
                return;
            }
            if let Some(front) = queue.result_waiters.front() {
                if front.tx.is_closed() {
                    queue.result_waiters.pop_front();
                    continue;
                }
                let Some(result) = self.take_unclaimed(queue_name) else {
                    return;
                };
                let waiter = self
                    .known_queue(queue_name)
                    .result_waiters
                    .pop_front()
                    .expect("front exists");
                if let Err(result) = waiter.tx.send(result) {
                    self.return_unclaimed(&result);
                }
                continue;
            }
            let Some(sid) = self.next_result_stream(queue_name) else {
                return;
            };
            let Some(result) = self.take_unclaimed(queue_name) else {
                return;
            };
            let stream = &self.result_streams[&sid];
            let tx = stream
                .tx
                .as_ref()
                .expect("next_result_stream skips closed streams");
            stream.flow.sent();
            if let Err(failed) = tx.send(result) {
                // The stream is closing; its guard returns what it holds.
                stream.flow.unsent();
                self.return_unclaimed(&failed.0);
                return;
            }
        }
    }

    /// The next result stream of a queue (round robin) with room in its
    /// window. Full ones are marked to ask again when half empty.
    fn next_result_stream(&mut self, queue_name: &QueueName) -> Option<ResultStreamId> {
        let queue = self.queues.get_mut(queue_name)?;
        for _ in 0..queue.result_streams.len() {
            let sid = queue.result_streams.pop_front()?;
            queue.result_streams.push_back(sid);
            let stream = &self.result_streams[&sid];
            if !stream.is_closed() && stream.flow.has_room() {
                return Some(sid);
            }
        }
        None
    }

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

    /// Registers a GetResult call waiting for an unfinished task's result.
    pub fn add_result_waiter(
        &mut self,
        id: TaskId,
        tx: oneshot::Sender<TaskResult>,
    ) -> Result<WaiterId, BrokerError> {
        let (waiter_id, slot) = self.slots.admit_waiter()?;
        let entry = self.tasks.get_mut(&id).expect("caller checked the task");
        let extras = entry.extras_mut();
        extras.result_waiters.retain(|w| !w.tx.is_closed());
        extras.result_waiters.push(ResultWaiter {
            id: waiter_id,
            tx,
            _slot: slot,
        });
        Ok(waiter_id)
    }

    pub fn remove_result_waiter(&mut self, id: TaskId, waiter: WaiterId) {
        if let Some(extras) = self.tasks.get_mut(&id).and_then(|e| e.extras.as_mut()) {
            if let Some(pos) = extras.result_waiters.iter().position(|w| w.id == waiter) {
                extras.result_waiters.swap_remove(pos);
            }
        }
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
        self.slots.check_room(ids.len())?;
        for id in ids {
            if let Some(done) = self.results.get(id) {
                let _ = tx.send(done.result.clone());
                continue;
            }
            let entry = self.tasks.get_mut(id).expect("checked above");
            let extras = entry.extras_mut();
            extras.watchers.retain(|w| !w.tx.is_closed());
            extras.watchers.push(Watcher {
                tx: tx.clone(),
                _slot: self.slots.take(),
            });
        }
        Ok(())
    }

    /// Unregisters a watch from the tasks it still waits for.
    pub fn unwatch(&mut self, ids: &[TaskId], tx: &mpsc::UnboundedSender<TaskResult>) {
        for id in ids {
            if let Some(extras) = self.tasks.get_mut(id).and_then(|e| e.extras.as_mut()) {
                extras.watchers.retain(|w| !w.tx.same_channel(tx));
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
        let results = &self.results;
        let id = queue.pop_unclaimed(|id| results.get(id).is_some_and(|d| d.unclaimed))?;
        let done = self
            .results
            .get_mut(&id)
            .expect("an unclaimed result is held");
        done.unclaimed = false;
        Some(done.result.clone())
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
        self.known_queue(&result.queue)
            .unclaimed_again(result.task_id);
    }

    /// Registers a result stream (WatchResults by queue) and hands it what
    /// is unclaimed, up to its window.
    pub fn open_result_stream(
        &mut self,
        queue: &QueueName,
        tx: mpsc::UnboundedSender<TaskResult>,
    ) -> Result<(ResultStreamId, Arc<ResultStreamFlow>), BrokerError> {
        let (queue, _) = self.queue_mut(queue)?;
        let (id, slot) = self.slots.admit_result_stream()?;
        let flow = Arc::new(ResultStreamFlow::default());
        let tx = (!self.closed).then_some(tx);
        self.result_streams.insert(
            id,
            ResultStreamRecord {
                queue: queue.clone(),
                tx,
                flow: flow.clone(),
                _slot: slot,
            },
        );
        self.queue_of(&queue).result_streams.push_back(id);
        self.dispatch_results(&queue);
        Ok((id, flow))
    }

    /// Hands a result stream more results, now that its window has room
    /// again.
    pub fn refill_result_stream(&mut self, stream: ResultStreamId) {
        if let Some(queue) = self.result_streams.get(&stream).map(|s| s.queue.clone()) {
            self.dispatch_results(&queue);
        }
    }

    /// Ends a result stream. `unsent` are the results it held but never
    /// sent, oldest first: they go back to the head of the queue's
    /// results, in order, for the next reader.
    pub fn close_result_stream(&mut self, stream: ResultStreamId, unsent: Vec<TaskResult>) {
        let Some(closed) = self.result_streams.remove(&stream) else {
            return;
        };
        if let Some(queue) = self.queues.get_mut(&closed.queue) {
            queue.result_streams.retain(|id| *id != stream);
        }
        for result in unsent.iter().rev() {
            self.return_unclaimed(result);
        }
        self.dispatch_results(&closed.queue);
    }

    /// Registers a GetResult(queue) call waiting for the queue's next
    /// result.
    pub fn add_queue_result_waiter(
        &mut self,
        queue: &QueueName,
        tx: oneshot::Sender<TaskResult>,
    ) -> Result<WaiterId, BrokerError> {
        let (id, slot) = self.slots.admit_waiter()?;
        self.queue_of(queue).result_waiters.push_back(ResultWaiter {
            id,
            tx,
            _slot: slot,
        });
        Ok(id)
    }

    pub fn remove_queue_result_waiter(&mut self, queue: &QueueName, id: WaiterId) {
        if let Some(q) = self.queues.get_mut(queue) {
            q.remove_result_waiter(id);
        }
    }
}
