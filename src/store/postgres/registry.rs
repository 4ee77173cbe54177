//! What this server's streams and their queue's dispatch share: windows,
//! what each stream holds, and the wake-ups between them. Plain data; the
//! dispatch loops are in `streams`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use crate::broker::{LeaseId, LeasedTask, QueueName, TaskId, TaskResult, WorkerId};

/// The lock, even if a panic poisoned it: the data stays usable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a worker stream and its queue's dispatch share.
#[derive(Debug)]
pub(crate) struct StreamShared {
    pub(crate) window: AtomicU32,
    /// Tasks leased through the stream and not reported.
    pub(crate) outstanding: AtomicUsize,
    /// Leases held (task → sequence), to give back when the stream ends.
    pub(crate) held: Mutex<HashMap<TaskId, u32>>,
    pub(crate) ended: AtomicBool,
    pub(crate) queue: QueueName,
    pub(crate) worker: WorkerId,
    pub(crate) lease: Option<Duration>,
    pub(crate) tx: mpsc::UnboundedSender<LeasedTask>,
    /// Leases of its tasks that were cancelled.
    pub(crate) cancels: mpsc::UnboundedSender<LeaseId>,
    /// The dispatch to tell when room appears.
    pub(crate) dispatch: Arc<TaskDispatch>,
}

/// This server's leases held by its worker streams (`Inner::stream_leases`).
pub(crate) type StreamLeases = HashMap<TaskId, (u32, Arc<StreamShared>)>;

impl StreamShared {
    /// Records `task`, handed to this stream, as held by it (and in the
    /// server's table of stream leases, so that its report frees a place).
    /// A stream of this server that still counts an older lease of the task
    /// (it ran out, or a retried failure put the task back, and the new
    /// lease came before the report's answer) frees that place now.
    pub(crate) fn hold(self: &Arc<Self>, task: &LeasedTask, leases: &mut StreamLeases) {
        if let Some((seq, before)) = leases.insert(task.id, (task.lease_id.seq, Arc::clone(self))) {
            before.ended(task.id, seq);
        }
        lock(&self.held).insert(task.id, task.lease_id.seq);
    }

    /// Lease `seq` of `task` ended without a report through this server
    /// (it ran out, it was reported through another server, or a newer
    /// lease of the task was handed out): its place is free, if this stream
    /// still counts it.
    pub(crate) fn ended(&self, task: TaskId, seq: u32) {
        let mut held = lock(&self.held);
        if held.get(&task) == Some(&seq) {
            held.remove(&task);
            drop(held);
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            self.dispatch.changed.notify_one();
        }
    }

    /// A task of this stream was reported.
    pub(crate) fn reported(&self, task: TaskId) {
        if lock(&self.held).remove(&task).is_some() {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            self.dispatch.changed.notify_one();
        }
    }

    /// Reserves up to `want` places in the window for tasks handed over in
    /// a transaction (counted as outstanding at once); how many it got.
    pub(crate) fn reserve(&self, want: usize) -> usize {
        let window = self.window.load(Ordering::Acquire) as usize;
        reserve_within(&self.outstanding, window, want, &self.ended)
    }

    /// Gives back places reserved and not used.
    pub(crate) fn unreserve(&self, n: usize) {
        if n > 0 {
            self.outstanding.fetch_sub(n, Ordering::AcqRel);
            self.dispatch.changed.notify_one();
        }
    }

    pub(crate) fn room(&self) -> usize {
        if self.ended.load(Ordering::Acquire) {
            return 0;
        }
        (self.window.load(Ordering::Acquire) as usize)
            .saturating_sub(self.outstanding.load(Ordering::Acquire))
    }
}

/// One queue's worker streams on this server, and their claimer.
#[derive(Debug, Default)]
pub(crate) struct TaskDispatch {
    pub(crate) streams: Mutex<Vec<Arc<StreamShared>>>,
    /// Whose turn is first: places go to the streams in turns, across
    /// claims and hand-overs as within one.
    pub(crate) turn: AtomicUsize,
    /// A stream opened, ended, or gained room.
    pub(crate) changed: Notify,
    /// The last claim found no more ready tasks, and none was notified
    /// since: a put may then hand its tasks to these streams without
    /// first asking whether older ones wait.
    pub(crate) drained: AtomicBool,
}

/// What a result stream and its queue's dispatch share.
#[derive(Debug)]
pub(crate) struct ResultShared {
    /// Results claimed for the stream and not yet taken by its reader.
    pub(crate) buffered: AtomicUsize,
    pub(crate) ended: AtomicBool,
    /// Taken when the store drains, which ends the stream once its reader
    /// has what was sent.
    pub(crate) tx: Mutex<Option<mpsc::UnboundedSender<TaskResult>>>,
    pub(crate) dispatch: Arc<ResultDispatch>,
}

/// Results a result stream holds ahead of its reader, places reserved by
/// write transactions not yet committed included. Larger than the memory
/// store's window (64): the writers reserve places for a whole batch of
/// reports before its update, and with 64, batches in flight together
/// found the windows full for about one result in six, which then took a
/// claim and a commit of their own (bench/README.md, session 14). A reader
/// that stalls holds at most this many claimed results until it ends.
pub(crate) const RESULT_WINDOW: usize = 256;

impl ResultShared {
    /// Reserves up to `want` places for results handed over in a
    /// transaction; how many it got.
    pub(crate) fn reserve(&self, want: usize) -> usize {
        reserve_within(&self.buffered, RESULT_WINDOW, want, &self.ended)
    }

    /// Gives back places reserved and not used.
    pub(crate) fn unreserve(&self, n: usize) {
        if n > 0 {
            self.buffered.fetch_sub(n, Ordering::AcqRel);
            self.dispatch.changed.notify_one();
        }
    }
}

/// Adds up to `want` to `count` without passing `limit` (nothing once
/// `ended`): how many it added. A compare-and-swap loop, so places taken by
/// a dispatch and by a writer at once never overfill a window.
fn reserve_within(count: &AtomicUsize, limit: usize, want: usize, ended: &AtomicBool) -> usize {
    let mut current = count.load(Ordering::Acquire);
    loop {
        if ended.load(Ordering::Acquire) {
            return 0;
        }
        let take = limit.saturating_sub(current).min(want);
        if take == 0 {
            return 0;
        }
        match count.compare_exchange(current, current + take, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return take,
            Err(now) => current = now,
        }
    }
}

/// Places taken in turns from `streams` (one each per round, starting at
/// `turn`, which moves on by the places taken), up to `want`: the streams
/// that get them, one entry per place.
pub(crate) fn places<T>(
    streams: &[Arc<T>],
    turn: &AtomicUsize,
    want: usize,
    reserve: impl Fn(&T, usize) -> usize,
) -> Vec<Arc<T>> {
    let mut got = Vec::new();
    if streams.is_empty() {
        return got;
    }
    let first = turn.load(Ordering::Relaxed) % streams.len();
    let mut open: Vec<&Arc<T>> = streams[first..].iter().chain(&streams[..first]).collect();
    while got.len() < want && !open.is_empty() {
        open.retain(|stream| {
            if got.len() < want && reserve(stream, 1) == 1 {
                got.push(Arc::clone(stream));
                true
            } else {
                false
            }
        });
    }
    turn.fetch_add(got.len(), Ordering::Relaxed);
    got
}

/// One queue's result streams on this server, and their claimer.
#[derive(Debug, Default)]
pub(crate) struct ResultDispatch {
    pub(crate) streams: Mutex<Vec<Arc<ResultShared>>>,
    /// Whose turn is first (as [`TaskDispatch::turn`]).
    pub(crate) turn: AtomicUsize,
    pub(crate) changed: Notify,
}
