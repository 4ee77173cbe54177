//! What this server's streams and their queue's dispatch share: windows,
//! what each stream holds, and the wake-ups between them. Plain data; the
//! dispatch loops are in `streams`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use crate::broker::{LeasedTask, TaskId, TaskResult, WorkerId};

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
    pub(crate) worker: WorkerId,
    pub(crate) lease: Option<Duration>,
    pub(crate) tx: mpsc::UnboundedSender<LeasedTask>,
    /// The dispatch to tell when room appears.
    pub(crate) dispatch: Arc<TaskDispatch>,
}

impl StreamShared {
    /// A task of this stream was reported.
    pub(crate) fn reported(&self, task: TaskId) {
        if lock(&self.held).remove(&task).is_some() {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
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
    /// A stream opened, ended, or gained room.
    pub(crate) changed: Notify,
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

/// One queue's result streams on this server, and their claimer.
#[derive(Debug, Default)]
pub(crate) struct ResultDispatch {
    pub(crate) streams: Mutex<Vec<Arc<ResultShared>>>,
    pub(crate) changed: Notify,
}
