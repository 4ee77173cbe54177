//! The reference model: queues as plain lists, time as milliseconds,
//! written for clarity, not speed. Each operation returns what a client of
//! the broker would see; the runner (`model/mod.rs`) compares.
//!
//! What it models, in the broker's words: tasks (put, `put_many`,
//! idempotency keys, ttl, leases, extensions, reports, expiry), worker
//! streams (windows, deliveries, window changes, the give-back when one
//! closes), results (by id, by queue, result streams) and their retention
//! by count. Not modelled: waiting calls (the runner never waits),
//! retention by age (the runner's `result_ttl` outlasts any sequence),
//! the workers' table, and closing the broker.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use super::super::types::MAX_ATTEMPTS_LIMIT;
use super::super::{DEFAULT_MAX_ATTEMPTS, Outcome, RESULT_STREAM_WINDOW, TaskId, TaskState};

/// The runner's broker holds at most this many unfinished tasks per queue.
pub(super) const QUEUE_CAPACITY: usize = 10;
/// The runner's broker takes payloads of at most this many bytes.
pub(super) const MAX_PAYLOAD: usize = 8;
/// The runner's broker keeps at most this many results.
pub(super) const MAX_RESULTS: usize = 16;

#[derive(Clone, Debug, PartialEq)]
enum ModelState {
    Pending,
    /// Waiting out a delay or a retry's wait, until `due`.
    Delayed {
        due: u64,
    },
    Leased {
        seq: u32,
        expires: u64,
        /// The worker stream it was leased through, by number.
        stream: Option<usize>,
    },
    Finished {
        state: TaskState,
        output: Bytes,
        by_lease: u32,
        outcome: Option<Outcome>,
    },
}

#[derive(Clone, Debug)]
struct ModelTask {
    queue: &'static str,
    attempt: u32,
    max_attempts: u32,
    lease_seq: u32,
    priority: i32,
    state: ModelState,
    last_retry: Option<(u32, String)>,
    /// When its ttl runs out, if it has one.
    ttl_at: Option<u64>,
    key: Option<&'static str>,
}

/// A task as the runner puts it.
#[derive(Clone, Debug)]
pub(super) struct Spec {
    pub queue: &'static str,
    pub payload: Bytes,
    /// 0: the broker's default.
    pub max_attempts: u32,
    pub ttl_ms: Option<u64>,
    pub key: Option<&'static str>,
    pub priority: i32,
    /// 0 and `None` alike: no delay.
    pub delay_ms: Option<u64>,
}

/// What a put should do when it is not refused.
#[derive(Debug, PartialEq)]
pub(super) enum Admit {
    /// Store a new task.
    New,
    /// Store nothing: the key is held by this task.
    Duplicate(TaskId),
}

/// A task sent to a worker stream: what its handle hands on when taken.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Delivery {
    pub id: TaskId,
    pub attempt: u32,
    pub seq: u32,
    /// The lease's expiry when it was sent.
    pub deadline: u64,
}

/// A worker stream (StreamTasks) as the model sees it.
struct ModelWorkerStream {
    queue: &'static str,
    lease_ms: u64,
    window: u32,
    /// Tasks leased through it now.
    outstanding: BTreeSet<TaskId>,
    /// Sent to its handle and not taken yet, in order.
    channel: VecDeque<Delivery>,
    /// A delivery taken and put back: the next one taken.
    front: Option<Delivery>,
    /// Being dropped: it takes nothing more.
    closing: bool,
    /// Leases of its tasks that were cancelled, not yet taken, in order.
    cancels: VecDeque<(TaskId, u32)>,
}

/// A WatchResults(queue) stream as the model sees it: the results set
/// aside for it, and whether it was passed over while full.
struct ModelResultStream {
    queue: &'static str,
    in_hand: VecDeque<TaskId>,
    starved: bool,
    /// A result taken and put back: the next one taken, outside the window.
    front: Option<TaskId>,
}

/// A queue's counters as GetStats reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub pending: u64,
    pub delayed: u64,
    pub leased: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub redelivered: u64,
    pub results_unclaimed: u64,
    pub results_evicted: u64,
    pub cancelled: u64,
}

/// The reference: queues as plain lists, time as milliseconds.
#[derive(Default)]
pub(super) struct Model {
    now: u64,
    /// Unfinished tasks and the results still held.
    tasks: BTreeMap<TaskId, ModelTask>,
    /// Pending tasks of each queue, in no order: the next one handed out
    /// is picked by priority, then id (`pop_ready`).
    lines: BTreeMap<&'static str, VecDeque<TaskId>>,
    /// Results not handed out, in completion order.
    results: BTreeMap<&'static str, VecDeque<TaskId>>,
    /// Results held, in completion order: the oldest go past the count.
    finished: VecDeque<TaskId>,
    /// Idempotency keys, held while their task (or its result) is.
    keys: BTreeMap<(&'static str, &'static str), TaskId>,
    /// Counters that outlive the tasks they count.
    counters: BTreeMap<&'static str, Counts>,
    /// Open result streams by number, and each queue's turn order.
    result_streams: BTreeMap<usize, ModelResultStream>,
    result_turns: BTreeMap<&'static str, VecDeque<usize>>,
    /// Open worker streams by number, and each queue's turn order.
    worker_streams: BTreeMap<usize, ModelWorkerStream>,
    worker_turns: BTreeMap<&'static str, VecDeque<usize>>,
    /// Queues whose hand-outs are paused.
    paused: BTreeSet<&'static str>,
    /// Every result is kept (no eviction by count): for a store that drops
    /// results past the count in the background (PostgreSQL's retention).
    keep_all_results: bool,
}

impl Model {
    #[cfg(test)]
    /// A model that never drops a result by count.
    pub(super) fn keeping_all_results() -> Self {
        Self {
            keep_all_results: true,
            ..Self::default()
        }
    }

    // ---- Put ----

    /// What a put of `spec` does now: refused (the error's kind), a new
    /// task, or a duplicate. Checked in the broker's order: the task
    /// itself, its key, then room in its queue.
    pub(super) fn admit(&self, spec: &Spec) -> Result<Admit, &'static str> {
        if spec.payload.len() > MAX_PAYLOAD {
            return Err("payload");
        }
        if spec.max_attempts > MAX_ATTEMPTS_LIMIT || spec.ttl_ms == Some(0) {
            return Err("invalid");
        }
        if let (Some(delay), Some(ttl)) = (spec.delay_ms, spec.ttl_ms)
            && delay >= ttl
        {
            return Err("invalid");
        }
        if let Some(&id) = spec.key.and_then(|key| self.keys.get(&(spec.queue, key))) {
            return Ok(Admit::Duplicate(id));
        }
        let unfinished = self
            .tasks
            .values()
            .filter(|t| t.queue == spec.queue)
            .filter(|t| !matches!(t.state, ModelState::Finished { .. }))
            .count();
        if unfinished >= QUEUE_CAPACITY {
            return Err("full");
        }
        Ok(Admit::New)
    }

    /// Stores a task [`Model::admit`] let in, under the id the broker gave
    /// it: delayed until its time, or in line and, with `dispatch`, handed
    /// out if a worker stream has room.
    pub(super) fn store(&mut self, id: TaskId, spec: &Spec, dispatch: bool) {
        let max_attempts = match spec.max_attempts {
            0 => DEFAULT_MAX_ATTEMPTS,
            n => n,
        };
        self.tasks.insert(
            id,
            ModelTask {
                queue: spec.queue,
                attempt: 0,
                max_attempts,
                lease_seq: 0,
                priority: spec.priority,
                state: ModelState::Pending,
                last_retry: None,
                ttl_at: spec.ttl_ms.map(|ttl| self.now + ttl),
                key: spec.key,
            },
        );
        if let Some(key) = spec.key {
            self.keys.insert((spec.queue, key), id);
        }
        match spec.delay_ms.filter(|ms| *ms > 0) {
            Some(ms) => {
                self.tasks.get_mut(&id).unwrap().state = ModelState::Delayed { due: self.now + ms };
            }
            None => {
                self.lines.entry(spec.queue).or_default().push_back(id);
                if dispatch {
                    self.dispatch(spec.queue);
                }
            }
        }
    }

    // ---- Leases ----

    fn ttl_passed(&self, id: TaskId) -> bool {
        self.tasks[&id].ttl_at.is_some_and(|at| at <= self.now)
    }

    /// The next task of a queue that can be handed out; those past their
    /// ttl are failed on the way.
    fn pop_ready(&mut self, queue: &'static str) -> Option<TaskId> {
        loop {
            let line = self.lines.get_mut(queue)?;
            // Highest priority first; within one, the oldest (lowest id).
            let tasks = &self.tasks;
            let at = (0..line.len())
                .max_by_key(|&i| (tasks[&line[i]].priority, std::cmp::Reverse(line[i])))?;
            let id = line.remove(at)?;
            if !self.ttl_passed(id) {
                return Some(id);
            }
            self.fail_expired(id);
        }
    }

    fn start_lease(&mut self, id: TaskId, lease_ms: u64, stream: Option<usize>) -> Delivery {
        let now = self.now;
        let task = self.tasks.get_mut(&id).unwrap();
        task.attempt += 1;
        task.lease_seq += 1;
        let (attempt, seq) = (task.attempt, task.lease_seq);
        task.state = ModelState::Leased {
            seq,
            expires: now + lease_ms,
            stream,
        };
        if let Some(n) = stream {
            self.worker_streams
                .get_mut(&n)
                .unwrap()
                .outstanding
                .insert(id);
        }
        Delivery {
            id,
            attempt,
            seq,
            deadline: now + lease_ms,
        }
    }

    /// GetTask without a wait: the queue's next task, or none.
    pub(super) fn lease(&mut self, queue: &'static str, lease_ms: u64) -> Option<(TaskId, u32)> {
        if self.paused.contains(queue) {
            return None;
        }
        let id = self.pop_ready(queue)?;
        let delivery = self.start_lease(id, lease_ms, None);
        Some((id, delivery.attempt))
    }

    /// A leased task back in its line, in its place by id; its stream has room
    /// for one more.
    fn release(&mut self, id: TaskId) {
        let task = self.tasks.get_mut(&id).unwrap();
        let ModelState::Leased { stream, .. } = task.state else {
            unreachable!("only a leased task is released");
        };
        task.state = ModelState::Pending;
        // Back in line; its id gives it its place before every task put
        // after it.
        self.lines.entry(task.queue).or_default().push_back(id);
        if let Some(stream) = stream.and_then(|n| self.worker_streams.get_mut(&n)) {
            stream.outstanding.remove(&id);
        }
    }

    /// A delayed task is due: back in line, and handed out if a worker
    /// stream has room.
    fn delay_over(&mut self, id: TaskId) {
        let task = self.tasks.get_mut(&id).unwrap();
        task.state = ModelState::Pending;
        let queue = task.queue;
        self.lines.entry(queue).or_default().push_back(id);
        self.dispatch(queue);
    }

    /// A lease ran out (or its stream closed): FAILED when past its ttl or
    /// out of attempts, else back to the head for another attempt.
    fn lease_lost(&mut self, id: TaskId) {
        let task = &self.tasks[&id];
        if self.ttl_passed(id) {
            self.fail_expired(id);
        } else if task.attempt >= task.max_attempts {
            self.finish(id, TaskState::Failed, Bytes::new(), 0, None);
        } else {
            let queue = task.queue;
            self.release(id);
            self.counters.entry(queue).or_default().redelivered += 1;
            self.dispatch(queue);
        }
    }

    fn fail_expired(&mut self, id: TaskId) {
        self.finish(id, TaskState::Failed, Bytes::new(), 0, None);
    }

    /// A delivery that never reached the worker given back: the attempt
    /// does not count.
    fn undo(&mut self, delivery: Delivery) {
        let current = self.tasks.get(&delivery.id).is_some_and(
            |t| matches!(t.state, ModelState::Leased { seq, .. } if seq == delivery.seq),
        );
        if !current {
            return;
        }
        self.release(delivery.id);
        let task = self.tasks.get_mut(&delivery.id).unwrap();
        task.attempt -= 1;
        let queue = task.queue;
        if self.ttl_passed(delivery.id) {
            self.fail_expired(delivery.id);
        } else {
            self.dispatch(queue);
        }
    }

    /// Deadlines up to `ms` from now, one at a time in the broker's order
    /// (time, then task id): leases that ran out, and pending tasks past
    /// their ttl. A deadline handled can hand a task out, whose lease may
    /// run out before `ms` too.
    pub(super) fn advance(&mut self, ms: u64) {
        let until = self.now + ms;
        loop {
            let due = self
                .tasks
                .iter()
                .filter_map(|(id, t)| {
                    let at = match t.state {
                        ModelState::Leased { expires, .. } => Some(expires),
                        ModelState::Pending => t.ttl_at,
                        // The ttl first when both fall at once (the
                        // broker's timers: ttl before due).
                        ModelState::Delayed { due } => {
                            Some(t.ttl_at.map_or(due, |ttl| ttl.min(due)))
                        }
                        ModelState::Finished { .. } => None,
                    };
                    at.filter(|at| *at <= until).map(|at| (at, *id))
                })
                .min();
            let Some((at, id)) = due else { break };
            self.now = at;
            match self.tasks[&id].state {
                ModelState::Delayed { due }
                    if self.tasks[&id].ttl_at.is_none_or(|ttl| due < ttl) =>
                {
                    self.delay_over(id);
                }
                ModelState::Pending | ModelState::Delayed { .. } => self.fail_expired(id),
                _ => self.lease_lost(id),
            }
        }
        self.now = until;
    }

    pub(super) fn extend(&mut self, id: TaskId, seq: u32, by_ms: u64) -> Result<(), &'static str> {
        let Some(task) = self.tasks.get_mut(&id) else {
            return Err("not found");
        };
        match &mut task.state {
            ModelState::Finished {
                state: TaskState::Cancelled,
                ..
            } => Err("cancelled"),
            ModelState::Finished { .. } => Err("finished"),
            ModelState::Leased {
                seq: s, expires, ..
            } if *s == seq && *expires > self.now => {
                *expires = self.now + by_ms;
                Ok(())
            }
            _ => Err("stale"),
        }
    }

    // ---- Reports ----

    pub(super) fn complete(
        &mut self,
        id: TaskId,
        seq: u32,
        outcome: Outcome,
    ) -> Result<TaskState, &'static str> {
        let now = self.now;
        let ttl_passed = self.tasks.contains_key(&id) && self.ttl_passed(id);
        let Some(task) = self.tasks.get_mut(&id) else {
            return Err("not found");
        };
        // No lease of a cancelled task counts, a repeated report neither.
        if matches!(
            task.state,
            ModelState::Finished {
                state: TaskState::Cancelled,
                ..
            }
        ) {
            return Err("cancelled");
        }
        if let Outcome::Failure {
            message,
            retry: true,
            ..
        } = &outcome
            && task
                .last_retry
                .as_ref()
                .is_some_and(|(s, m)| *s == seq && m == message)
        {
            return Ok(match &task.state {
                ModelState::Pending | ModelState::Delayed { .. } => TaskState::Pending,
                ModelState::Leased { .. } => TaskState::Leased,
                ModelState::Finished { state, .. } => *state,
            });
        }
        if let ModelState::Finished {
            state,
            by_lease,
            outcome: done,
            ..
        } = &task.state
        {
            // A failure's wait is advice, not part of the report.
            return if *by_lease == seq && done.as_ref().map(report) == Some(report(&outcome)) {
                Ok(*state)
            } else {
                Err("conflict")
            };
        }
        if seq == 0 || seq > task.lease_seq {
            return Err("stale");
        }
        let current = matches!(task.state,
            ModelState::Leased { seq: s, expires, .. } if s == seq && expires > now);
        match outcome.clone() {
            Outcome::Success(output) => {
                self.finish(id, TaskState::Succeeded, output, seq, Some(outcome));
                Ok(TaskState::Succeeded)
            }
            Outcome::Failure { .. } if !current => Err("stale"),
            Outcome::Failure {
                message,
                retry,
                retry_after,
            } => {
                if retry && task.attempt < task.max_attempts && !ttl_passed {
                    let queue = task.queue;
                    self.release(id);
                    // The runner's broker has no backoff: only a worker's
                    // own wait delays the retry.
                    let wait = retry_after.map_or(0, |after| after.as_millis() as u64);
                    if wait > 0 {
                        self.lines.get_mut(queue).unwrap().retain(|t| *t != id);
                        self.tasks.get_mut(&id).unwrap().state = ModelState::Delayed {
                            due: self.now + wait,
                        };
                    }
                    self.tasks.get_mut(&id).unwrap().last_retry = Some((seq, message));
                    self.counters.entry(queue).or_default().redelivered += 1;
                    self.dispatch(queue);
                    Ok(TaskState::Pending)
                } else {
                    self.finish(id, TaskState::Failed, Bytes::new(), seq, Some(outcome));
                    Ok(TaskState::Failed)
                }
            }
        }
    }

    /// Ends a task: its result joins the queue's results (handed to result
    /// streams with room), the oldest results past the count are dropped,
    /// and a worker stream it was leased through has room again.
    fn finish(
        &mut self,
        id: TaskId,
        state: TaskState,
        output: Bytes,
        by_lease: u32,
        outcome: Option<Outcome>,
    ) {
        let task = self.tasks.get_mut(&id).unwrap();
        let finished = ModelState::Finished {
            state,
            output,
            by_lease,
            outcome,
        };
        let queue = task.queue;
        let mut freed_stream = false;
        match std::mem::replace(&mut task.state, finished) {
            ModelState::Pending => self.lines.get_mut(queue).unwrap().retain(|t| *t != id),
            ModelState::Delayed { .. } => {}
            ModelState::Leased { stream, .. } => {
                if let Some(n) = stream {
                    freed_stream = true;
                    if let Some(stream) = self.worker_streams.get_mut(&n) {
                        stream.outstanding.remove(&id);
                    }
                }
            }
            ModelState::Finished { .. } => unreachable!("a task finishes once"),
        }
        let counters = self.counters.entry(queue).or_default();
        match state {
            TaskState::Succeeded => counters.succeeded += 1,
            TaskState::Cancelled => counters.cancelled += 1,
            _ => counters.failed += 1,
        }
        self.results.entry(queue).or_default().push_back(id);
        self.finished.push_back(id);
        self.hand_out(queue);
        self.evict();
        if freed_stream {
            self.dispatch(queue);
        }
    }

    /// Results past the count, oldest first: gone, with their key.
    fn evict(&mut self) {
        while !self.keep_all_results && self.finished.len() > MAX_RESULTS {
            let id = self.finished.pop_front().unwrap();
            let task = self.tasks.remove(&id).unwrap();
            let results = self.results.get_mut(task.queue).unwrap();
            if let Some(at) = results.iter().position(|r| *r == id) {
                results.remove(at);
                self.counters.entry(task.queue).or_default().results_evicted += 1;
            }
            if let Some(key) = task.key
                && self.keys.get(&(task.queue, key)) == Some(&id)
            {
                self.keys.remove(&(task.queue, key));
            }
        }
    }

    // ---- Results ----

    /// GetResult(task_id) without a wait: the state, output and attempts
    /// of a finished task, none while unfinished.
    pub(super) fn result(
        &self,
        id: TaskId,
    ) -> Result<Option<(TaskState, Bytes, u32)>, &'static str> {
        let task = self.tasks.get(&id).ok_or("not found")?;
        Ok(match &task.state {
            ModelState::Finished { state, output, .. } => {
                Some((*state, output.clone(), task.attempt))
            }
            _ => None,
        })
    }

    #[cfg(test)]
    /// How many results of each queue wait to be handed out by queue.
    pub(super) fn unclaimed_lengths(&self) -> Vec<(&'static str, usize)> {
        self.results.iter().map(|(q, r)| (*q, r.len())).collect()
    }

    #[cfg(test)]
    /// Results that finished together (`since`: the lengths before) go
    /// out by priority, then id: PostgreSQL's order for the results of
    /// one transaction, which share their finishing time.
    pub(super) fn tie_results_since(&mut self, since: &[(&'static str, usize)]) {
        let tasks = &self.tasks;
        for (queue, results) in &mut self.results {
            let from = since
                .iter()
                .find(|(q, _)| q == queue)
                .map_or(0, |(_, n)| *n)
                .min(results.len());
            results
                .make_contiguous()
                .get_mut(from..)
                .unwrap_or_default()
                .sort_by_key(|id| (std::cmp::Reverse(tasks[id].priority), *id));
        }
    }

    /// GetResult(queue) without a wait.
    pub(super) fn next_result(&mut self, queue: &'static str) -> Option<TaskId> {
        self.results.entry(queue).or_default().pop_front()
    }

    /// Results go to the result streams with room, in turns; a full one is
    /// marked to ask again when half empty.
    fn hand_out(&mut self, queue: &'static str) {
        while !self.results.entry(queue).or_default().is_empty() {
            let turns = self.result_turns.entry(queue).or_default();
            let mut chosen = None;
            for _ in 0..turns.len() {
                let r = turns.pop_front().unwrap();
                turns.push_back(r);
                let stream = self.result_streams.get_mut(&r).unwrap();
                if stream.in_hand.len() < RESULT_STREAM_WINDOW {
                    chosen = Some(r);
                    break;
                }
                stream.starved = true;
            }
            let Some(r) = chosen else { return };
            let id = self.results.get_mut(queue).unwrap().pop_front().unwrap();
            self.result_streams
                .get_mut(&r)
                .unwrap()
                .in_hand
                .push_back(id);
        }
    }

    pub(super) fn open_result_stream(&mut self, number: usize, queue: &'static str) {
        let stream = ModelResultStream {
            queue,
            in_hand: VecDeque::new(),
            starved: false,
            front: None,
        };
        self.result_streams.insert(number, stream);
        self.result_turns
            .entry(queue)
            .or_default()
            .push_back(number);
        self.hand_out(queue);
    }

    pub(super) fn take_result(&mut self, number: usize) -> Option<TaskId> {
        let stream = self.result_streams.get_mut(&number).unwrap();
        if let Some(id) = stream.front.take() {
            return Some(id);
        }
        let id = stream.in_hand.pop_front()?;
        if stream.in_hand.len() <= RESULT_STREAM_WINDOW / 2 && stream.starved {
            stream.starved = false;
            let queue = stream.queue;
            self.hand_out(queue);
        }
        Some(id)
    }

    pub(super) fn put_back_result(&mut self, number: usize, id: TaskId) {
        self.result_streams.get_mut(&number).unwrap().front = Some(id);
    }

    /// What the result stream held goes back to the head, in order: the
    /// result put back first. Results dropped meanwhile stay dropped.
    pub(super) fn drop_result_stream(&mut self, number: usize) {
        let stream = self.result_streams.remove(&number).unwrap();
        self.result_turns
            .get_mut(stream.queue)
            .unwrap()
            .retain(|r| *r != number);
        let results = self.results.entry(stream.queue).or_default();
        for id in stream.front.into_iter().chain(stream.in_hand).rev() {
            if self.tasks.contains_key(&id) {
                results.push_front(id);
            }
        }
        self.hand_out(stream.queue);
    }

    // ---- Worker streams ----

    /// Tasks of a queue go to its worker streams with room in their
    /// window, in turns, while any is pending.
    pub(super) fn dispatch(&mut self, queue: &'static str) {
        if self.paused.contains(queue) {
            return;
        }
        while self.lines.get(queue).is_some_and(|line| !line.is_empty()) {
            let turns = self.worker_turns.entry(queue).or_default();
            let mut chosen = None;
            for _ in 0..turns.len() {
                let n = turns.pop_front().unwrap();
                turns.push_back(n);
                let stream = &self.worker_streams[&n];
                if !stream.closing && stream.outstanding.len() < stream.window as usize {
                    chosen = Some(n);
                    break;
                }
            }
            let Some(n) = chosen else { return };
            let Some(id) = self.pop_ready(queue) else {
                return;
            };
            let delivery = self.start_lease(id, self.worker_streams[&n].lease_ms, Some(n));
            self.worker_streams
                .get_mut(&n)
                .unwrap()
                .channel
                .push_back(delivery);
        }
    }

    pub(super) fn open_worker_stream(
        &mut self,
        number: usize,
        queue: &'static str,
        lease_ms: u64,
        window: u32,
    ) {
        let stream = ModelWorkerStream {
            queue,
            lease_ms,
            window,
            outstanding: BTreeSet::new(),
            channel: VecDeque::new(),
            front: None,
            closing: false,
            cancels: VecDeque::new(),
        };
        self.worker_streams.insert(number, stream);
        self.worker_turns
            .entry(queue)
            .or_default()
            .push_back(number);
        self.dispatch(queue);
    }

    pub(super) fn set_window(&mut self, number: usize, window: u32) {
        let stream = self.worker_streams.get_mut(&number).unwrap();
        stream.window = window;
        let queue = stream.queue;
        self.dispatch(queue);
    }

    /// The next delivery the stream's handle hands on. One whose lease
    /// ended while it waited (past its deadline and no longer this
    /// stream's) is skipped.
    pub(super) fn take_task(&mut self, number: usize) -> Option<Delivery> {
        loop {
            let stream = self.worker_streams.get_mut(&number).unwrap();
            let delivery = stream.front.take().or_else(|| stream.channel.pop_front())?;
            let still_ours = self.tasks.get(&delivery.id).is_some_and(|t| {
                matches!(t.state, ModelState::Leased { seq, stream, .. }
                    if seq == delivery.seq && stream == Some(number))
            });
            if delivery.deadline > self.now || still_ours {
                return Some(delivery);
            }
        }
    }

    pub(super) fn put_back_task(&mut self, number: usize, delivery: Delivery) {
        self.worker_streams.get_mut(&number).unwrap().front = Some(delivery);
    }

    /// What a worker stream's handle sees: tasks leased through it now,
    /// and deliveries waiting to be taken.
    pub(super) fn worker_stream_view(&self, number: usize) -> (usize, usize) {
        let stream = &self.worker_streams[&number];
        let ready = stream.channel.len() + usize::from(stream.front.is_some());
        (stream.outstanding.len(), ready)
    }

    /// A worker stream dropped: deliveries never taken go back uncounted
    /// (the one put back first), then every task still leased through it
    /// goes back as if its lease ran out now, oldest first at the head.
    pub(super) fn drop_worker_stream(&mut self, number: usize) {
        let stream = self.worker_streams.get_mut(&number).unwrap();
        stream.closing = true;
        let unsent: Vec<Delivery> = stream
            .front
            .take()
            .into_iter()
            .chain(stream.channel.drain(..))
            .collect();
        for delivery in unsent {
            self.undo(delivery);
        }
        let stream = self.worker_streams.remove(&number).unwrap();
        self.worker_turns
            .get_mut(stream.queue)
            .unwrap()
            .retain(|n| *n != number);
        for id in stream.outstanding.into_iter().rev() {
            let ours = matches!(self.tasks[&id].state,
                ModelState::Leased { stream, .. } if stream == Some(number));
            if ours {
                self.lease_lost(id);
            }
        }
        self.dispatch(stream.queue);
    }

    // ---- Operators ----

    /// CancelTask: an unfinished task ends CANCELLED; a worker stream that
    /// holds it is told its lease. Returns the state it had.
    pub(super) fn cancel(&mut self, id: TaskId) -> Result<TaskState, &'static str> {
        let task = self.tasks.get(&id).ok_or("not found")?;
        let previous = match task.state {
            ModelState::Finished { .. } => return Err("finished"),
            ModelState::Pending | ModelState::Delayed { .. } => TaskState::Pending,
            ModelState::Leased { seq, stream, .. } => {
                if let Some(stream) = stream.and_then(|n| self.worker_streams.get_mut(&n)) {
                    stream.cancels.push_back((id, seq));
                }
                TaskState::Leased
            }
        };
        self.finish(id, TaskState::Cancelled, Bytes::new(), 0, None);
        Ok(previous)
    }

    /// The next cancelled lease a worker stream's handle hands on.
    pub(super) fn take_cancel(&mut self, number: usize) -> Option<(TaskId, u32)> {
        self.worker_streams.get_mut(&number)?.cancels.pop_front()
    }

    /// PauseQueue (`paused`) or ResumeQueue; whether it was paused.
    pub(super) fn set_paused(&mut self, queue: &'static str, paused: bool) -> bool {
        let was = if paused {
            !self.paused.insert(queue)
        } else {
            self.paused.remove(queue)
        };
        if was && !paused {
            self.dispatch(queue);
        }
        was
    }

    /// PurgeQueue: every pending or delayed task ends CANCELLED, by
    /// priority, then id.
    pub(super) fn purge(&mut self, queue: &'static str) -> u64 {
        let mut line: Vec<TaskId> = self
            .lines
            .get(queue)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        line.extend(
            self.tasks
                .iter()
                .filter(|(_, t)| t.queue == queue && matches!(t.state, ModelState::Delayed { .. }))
                .map(|(id, _)| *id),
        );
        line.sort_by_key(|id| (std::cmp::Reverse(self.tasks[id].priority), *id));
        for id in &line {
            self.finish(*id, TaskState::Cancelled, Bytes::new(), 0, None);
        }
        line.len() as u64
    }

    // ---- Counters ----

    pub(super) fn counts(&self, queue: &'static str) -> Counts {
        let mut counts = self.counters.get(queue).copied().unwrap_or_default();
        for t in self.tasks.values().filter(|t| t.queue == queue) {
            match t.state {
                ModelState::Pending => counts.pending += 1,
                ModelState::Delayed { .. } => counts.delayed += 1,
                ModelState::Leased { .. } => counts.leased += 1,
                ModelState::Finished { .. } => {}
            }
        }
        counts.results_unclaimed = self.results.get(queue).map_or(0, |r| r.len() as u64);
        counts
    }
}

/// An outcome as the report it makes: a failure without its wait.
fn report(outcome: &Outcome) -> Outcome {
    match outcome {
        Outcome::Failure { message, retry, .. } => Outcome::Failure {
            message: message.clone(),
            retry: *retry,
            retry_after: None,
        },
        other => other.clone(),
    }
}
