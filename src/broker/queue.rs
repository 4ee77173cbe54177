//! One queue's lines and counters: its ready tasks in hand-out order, its
//! results not yet handed out, who waits on it, and the counts GetStats
//! reports (kept as tasks move, so stats never scan).
//!
//! Rules:
//! - Lines hold ids, and an id can go stale (a pending task that expired,
//!   a result evicted) without being looked for in the line: stale entries
//!   are skipped when popped, and a line is compacted once it holds more
//!   than twice its live entries plus [`COMPACT_SLACK`], so a queue nobody
//!   takes from still does not keep them.
//! - `pending`, `delayed` and `leased` move only through the transitions
//!   below, which the state calls as a task changes state.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::ready::ReadyLines;
use super::retention::Report;
use super::timers::COMPACT_SLACK;
use super::waiters::{ResultStreamId, ResultWaiter, StreamId, TaskWaiter, WaiterId};
use super::{QueueName, QueueStats, TaskDurations, TaskId};

/// Where an unfinished task was when it finished.
#[derive(Clone, Copy, Debug)]
pub(super) enum Unfinished {
    /// In line.
    Pending,
    /// Waiting out a delay or backoff.
    Delayed,
    /// Leased; its last lease had run this long.
    Leased { ran: Duration },
}

#[derive(Default)]
pub(super) struct QueueState {
    /// Tasks in hand-out order. Entries of tasks that are no longer pending
    /// (finished while waiting, say by ttl) are skipped when popped.
    ready: ReadyLines,
    pending: u64,
    /// Tasks waiting out a delay or a retry's backoff: in no line.
    delayed: u64,
    leased: u64,
    /// Tasks stored since start.
    enqueued: u64,
    /// Hand-outs since start, redeliveries included.
    delivered: u64,
    succeeded: u64,
    /// Failures since start, those whose ttl ran out included.
    failed: u64,
    /// Failures because the task's ttl ran out (also in `failed`).
    expired: u64,
    cancelled: u64,
    retried_after_error: u64,
    retried_after_lease_expiry: u64,
    results_evicted: u64,
    durations: TaskDurations,
    /// PauseQueue: nothing is handed out until ResumeQueue.
    pub paused: bool,
    pub task_waiters: VecDeque<TaskWaiter>,
    /// Worker streams on this queue, in round-robin order.
    pub streams: VecDeque<StreamId>,
    pub result_waiters: VecDeque<ResultWaiter>,
    /// Result streams on this queue, in round-robin order.
    pub result_streams: VecDeque<ResultStreamId>,
    /// Finished tasks whose result no reader by queue has taken, in
    /// completion order. Entries of evicted results are skipped.
    unclaimed: VecDeque<TaskId>,
    results_unclaimed: u64,
    pub idempotency: HashMap<String, TaskId>,
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
    pub(super) fn pending(&self) -> u64 {
        self.pending
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn leased(&self) -> u64 {
        self.leased
    }

    pub(super) fn results_unclaimed(&self) -> u64 {
        self.results_unclaimed
    }

    pub(super) fn delayed(&self) -> u64 {
        self.delayed
    }

    /// Tasks not finished: what counts against the queue's capacity.
    pub(super) fn unfinished(&self) -> u64 {
        self.pending + self.delayed + self.leased
    }

    /// A new pending task at the tail of its priority's line. `is_pending`
    /// tells live entries from stale ones if the line is compacted first.
    pub(super) fn push_new(
        &mut self,
        id: TaskId,
        priority: i32,
        is_pending: impl FnMut(&TaskId) -> bool,
    ) {
        self.ready
            .push_new(id, priority, self.pending as usize, is_pending);
        self.pending += 1;
        self.enqueued += 1;
    }

    /// A new task that waits out a delay before it joins a line.
    pub(super) fn push_delayed(&mut self) {
        self.delayed += 1;
        self.enqueued += 1;
    }

    /// A delayed task is due: into its line, in its place by id.
    pub(super) fn due(&mut self, id: TaskId, priority: i32) {
        self.delayed -= 1;
        self.pending += 1;
        self.ready.insert(id, priority);
    }

    /// Empties the ready lines (PurgeQueue): the ids of their pending
    /// tasks, stale entries included, in hand-out order.
    pub(super) fn take_ready(&mut self) -> Vec<TaskId> {
        self.ready.take_all()
    }

    /// The entry at the head of the ready lines (it may be stale).
    pub(super) fn pop_ready(&mut self) -> Option<TaskId> {
        self.ready.pop()
    }

    /// The first pending tasks of each line, stale entries included, for
    /// the age of the oldest.
    pub(super) fn ready_heads(&self, n: usize) -> impl Iterator<Item = &TaskId> {
        self.ready.heads(n)
    }

    /// A pending task was leased, after `waited` in line.
    pub(super) fn leased_one(&mut self, waited: Duration) {
        self.pending -= 1;
        self.leased += 1;
        self.delivered += 1;
        self.durations.wait.observe(waited);
    }

    /// A leased task's failure was retried: it is going back to the line.
    pub(super) fn retried_after_error(&mut self) {
        self.retried_after_error += 1;
    }

    /// A leased task's lease ran out with attempts left: it is going back
    /// to the line.
    pub(super) fn retried_after_lease_expiry(&mut self) {
        self.retried_after_lease_expiry += 1;
    }

    /// A leased task goes back in line, in its place by id.
    pub(super) fn released(&mut self, id: TaskId, priority: i32) {
        self.leased -= 1;
        self.pending += 1;
        self.ready.insert(id, priority);
    }

    /// A leased task waits out a retry's backoff before it goes back.
    pub(super) fn released_delayed(&mut self) {
        self.leased -= 1;
        self.delayed += 1;
    }

    /// A task finished, from `was`; wakes puts waiting for room. Its
    /// result joins the line of unclaimed results, behind those not yet
    /// handed out, so that readers by queue get them in completion order.
    /// `took` is how long since its put.
    pub(super) fn finished(&mut self, id: TaskId, was: Unfinished, took: Duration, report: Report) {
        match was {
            Unfinished::Pending => self.pending -= 1,
            Unfinished::Delayed => self.delayed -= 1,
            Unfinished::Leased { ran } => {
                self.leased -= 1;
                self.durations.run.observe(ran);
            }
        }
        self.durations.end_to_end.observe(took);
        match report {
            Report::Success => self.succeeded += 1,
            Report::Expired => {
                self.failed += 1;
                self.expired += 1;
            }
            Report::AttemptsUsed | Report::Failure { .. } => self.failed += 1,
            Report::Cancelled => self.cancelled += 1,
        }
        if self.room_wanted {
            self.room_wanted = false;
            self.room.notify_waiters();
        }
        self.unclaimed.push_back(id);
        self.results_unclaimed += 1;
    }

    /// The signal a refused put waits on for room; finishing tasks wake it
    /// from now on.
    pub(super) fn want_room(&mut self) -> Arc<Notify> {
        self.room_wanted = true;
        self.room.clone()
    }

    /// The signal puts waiting for room wait on, to wake them at close.
    pub(super) fn room(&self) -> Arc<Notify> {
        self.room.clone()
    }

    /// The oldest unclaimed result's task. `is_unclaimed` tells live
    /// entries from stale ones; stale ones are skipped (and compacted
    /// away past the bound).
    pub(super) fn pop_unclaimed(
        &mut self,
        mut is_unclaimed: impl FnMut(&TaskId) -> bool,
    ) -> Option<TaskId> {
        if self.unclaimed.len() > 2 * self.results_unclaimed as usize + COMPACT_SLACK {
            self.unclaimed.retain(&mut is_unclaimed);
        }
        loop {
            let id = self.unclaimed.pop_front()?;
            if is_unclaimed(&id) {
                self.results_unclaimed -= 1;
                return Some(id);
            }
        }
    }

    /// A result handed out and given back: the head of the line again.
    pub(super) fn unclaimed_again(&mut self, id: TaskId) {
        self.unclaimed.push_front(id);
        self.results_unclaimed += 1;
    }

    /// An unclaimed result was evicted. Evictions go in completion order,
    /// so its entry is usually at the head; anything else is swept by
    /// compaction.
    pub(super) fn unclaimed_evicted(&mut self, id: TaskId) {
        self.results_unclaimed -= 1;
        self.results_evicted += 1;
        if self.unclaimed.front() == Some(&id) {
            self.unclaimed.pop_front();
        }
    }

    /// The queue's counters for GetStats.
    pub(super) fn stats(&self, name: &QueueName, oldest_pending_age: Duration) -> QueueStats {
        QueueStats {
            queue: name.to_string(),
            pending: self.pending,
            delayed: self.delayed,
            leased: self.leased,
            succeeded: self.succeeded,
            failed: self.failed,
            redelivered: self.retried_after_error + self.retried_after_lease_expiry,
            oldest_pending_age,
            results_unclaimed: self.results_unclaimed,
            results_evicted: self.results_evicted,
            waiting_workers: self.task_waiters.len() as u64,
            enqueued: self.enqueued,
            delivered: self.delivered,
            expired: self.expired,
            cancelled: self.cancelled,
            retried_after_error: self.retried_after_error,
            retried_after_lease_expiry: self.retried_after_lease_expiry,
            worker_streams: self.streams.len() as u64,
            durations: self.durations,
            paused: self.paused,
        }
    }

    /// Removes a waiting GetTask call; true if it was there.
    pub(super) fn remove_task_waiter(&mut self, id: WaiterId) -> bool {
        let pos = self.task_waiters.iter().position(|w| w.id == id);
        pos.and_then(|pos| self.task_waiters.remove(pos)).is_some()
    }

    /// Removes a waiting GetResult(queue) call; true if it was there.
    pub(super) fn remove_result_waiter(&mut self, id: WaiterId) -> bool {
        let pos = self.result_waiters.iter().position(|w| w.id == id);
        pos.and_then(|pos| self.result_waiters.remove(pos))
            .is_some()
    }

    /// Sizes of the lines that may hold stale entries: ready, unclaimed.
    #[cfg(test)]
    pub(super) fn line_lengths(&self) -> (usize, usize) {
        (self.ready.len(), self.unclaimed.len())
    }

    /// How many times `id` is in the ready lines.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn times_ready(&self, id: &TaskId) -> usize {
        self.ready.count(id)
    }
}
