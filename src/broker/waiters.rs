//! Who waits on the broker: GetTask and GetResult calls, worker streams
//! (StreamTasks), result streams (WatchResults by queue) and watches
//! (WatchResults by task ids), with their typed ids and the one cap on
//! them all (`--max-waiters`).
//!
//! Rules:
//! - Every registered waiter holds a [`Slot`]: the count of waiters is the
//!   number of slots alive, so it cannot drift from the collections that
//!   hold them. Dropping an entry, whichever way it leaves its collection
//!   (answered, cancelled, swept as closed), gives its slot back.
//! - A new waiter is refused with `LimitReached` once `--max-waiters`
//!   slots are out.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::types::IdSet;
use super::{BrokerError, LeaseId, LeasedTask, QueueName, TaskId, TaskResult, WorkerId};

macro_rules! waiter_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $name(u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

waiter_id!(
    /// A waiting GetTask or GetResult call.
    WaiterId
);
waiter_id!(
    /// A worker stream (StreamTasks).
    StreamId
);
waiter_id!(
    /// A result stream (WatchResults by queue).
    ResultStreamId
);

/// One registered waiter's share of `--max-waiters`, given back when
/// dropped.
#[derive(Debug)]
pub(super) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        // Relaxed: every slot is made and dropped under the broker's lock.
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The slots handed out, and the numbers that name waiters.
pub(super) struct WaiterSlots {
    out: Arc<AtomicUsize>,
    limit: usize,
    last_id: u64,
}

impl WaiterSlots {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            out: Arc::new(AtomicUsize::new(0)),
            limit,
            last_id: 0,
        }
    }

    /// Slots out now: waiters registered.
    pub(super) fn out(&self) -> usize {
        self.out.load(Ordering::Relaxed)
    }

    /// Whether `n` more waiters fit.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] when they do not.
    pub(super) fn check_room(&self, n: usize) -> Result<(), BrokerError> {
        if self.out() + n > self.limit {
            return Err(BrokerError::waiters_full(self.limit));
        }
        Ok(())
    }

    /// A slot, once [`WaiterSlots::check_room`] said it fits.
    pub(super) fn take(&mut self) -> Slot {
        self.out.fetch_add(1, Ordering::Relaxed);
        Slot(self.out.clone())
    }

    /// A slot and a fresh number for a new waiter.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] past `--max-waiters`.
    pub(super) fn admit(&mut self) -> Result<(u64, Slot), BrokerError> {
        self.check_room(1)?;
        self.last_id += 1;
        Ok((self.last_id, self.take()))
    }

    pub(super) fn admit_waiter(&mut self) -> Result<(WaiterId, Slot), BrokerError> {
        self.admit().map(|(n, slot)| (WaiterId(n), slot))
    }

    pub(super) fn admit_stream(&mut self) -> Result<(StreamId, Slot), BrokerError> {
        self.admit().map(|(n, slot)| (StreamId(n), slot))
    }

    pub(super) fn admit_result_stream(&mut self) -> Result<(ResultStreamId, Slot), BrokerError> {
        self.admit().map(|(n, slot)| (ResultStreamId(n), slot))
    }
}

/// A GetTask call waiting for a task.
pub(super) struct TaskWaiter {
    pub id: WaiterId,
    pub worker: WorkerId,
    pub lease_duration: Duration,
    pub tx: oneshot::Sender<LeasedTask>,
    pub _slot: Slot,
}

/// A GetResult call waiting for a result (of a task, or of a queue).
pub(super) struct ResultWaiter {
    pub id: WaiterId,
    pub tx: oneshot::Sender<TaskResult>,
    pub _slot: Slot,
}

/// A watch (WatchResults by task ids) waiting for one task's result.
pub(super) struct Watcher {
    pub tx: mpsc::UnboundedSender<TaskResult>,
    pub _slot: Slot,
}

/// A worker stream as the broker keeps it: a waiter that may hold up to
/// `window` tasks at once. Its tasks' leases are tied to it: when it
/// closes they go back at once.
/// Where a worker stream's record sends: the tasks leased to it, and the
/// leases of its tasks that were cancelled.
pub(super) struct StreamSenders {
    pub tasks: mpsc::UnboundedSender<LeasedTask>,
    pub cancels: mpsc::UnboundedSender<LeaseId>,
}

pub(super) struct WorkerStreamRecord {
    pub queue: QueueName,
    pub worker: WorkerId,
    pub lease_duration: Duration,
    pub window: u32,
    /// Tasks leased through the stream now.
    pub outstanding: IdSet<TaskId>,
    pub tx: mpsc::UnboundedSender<LeasedTask>,
    /// Leases of tasks it holds that were cancelled.
    pub cancels: mpsc::UnboundedSender<LeaseId>,
    pub _slot: Slot,
}

impl WorkerStreamRecord {
    /// Whether the stream can take a task now: its handler is still there
    /// and its window has room.
    pub(super) fn has_room(&self) -> bool {
        !self.tx.is_closed() && (self.outstanding.len() as u64) < u64::from(self.window)
    }
}

/// Results a result stream may hold that its transport has not taken yet.
/// Results wait in the queue beyond that, where another reader can take
/// them, so a stalled stream claims at most this many.
#[cfg(not(any(test, feature = "fuzzing")))]
pub const RESULT_STREAM_WINDOW: usize = 64;
/// Small in tests and fuzzing, so that short sequences fill the window
/// (the logic does not depend on its size).
#[cfg(any(test, feature = "fuzzing"))]
pub const RESULT_STREAM_WINDOW: usize = 4;

/// A result stream as the broker keeps it: takes the queue's results as
/// they finish, while fewer than [`RESULT_STREAM_WINDOW`] of them are in
/// its hands.
pub(super) struct ResultStreamRecord {
    pub queue: QueueName,
    /// `None` once the broker closed: the stream ends after what it holds.
    pub tx: Option<mpsc::UnboundedSender<TaskResult>>,
    pub flow: Arc<ResultStreamFlow>,
    pub _slot: Slot,
}

impl ResultStreamRecord {
    /// Whether the stream's handler is gone or the broker closed it.
    pub(super) fn is_closed(&self) -> bool {
        self.tx
            .as_ref()
            .is_none_or(mpsc::UnboundedSender::is_closed)
    }
}

/// The window of a result stream, shared with its handle so that taking a
/// result needs no lock: the handle counts down, the broker counts up.
#[derive(Debug, Default)]
pub struct ResultStreamFlow {
    /// Results sent to the stream that it has not taken yet.
    in_hand: AtomicUsize,
    /// Set (under the lock) when the stream was passed over with its window
    /// full while results waited; the stream then asks for more once it is
    /// half empty, so refills come in batches, not one lock per result.
    starved: AtomicBool,
}

impl ResultStreamFlow {
    /// Counts one result taken by the stream; true when the broker should
    /// hand it more (it was passed over and the window is now half empty).
    pub fn taken(&self) -> bool {
        let left = self.in_hand.fetch_sub(1, Ordering::AcqRel) - 1;
        left <= RESULT_STREAM_WINDOW / 2 && self.starved.swap(false, Ordering::AcqRel)
    }

    /// Counts one result sent to the stream.
    pub(super) fn sent(&self) {
        self.in_hand.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes back the count of a result whose send failed.
    pub(super) fn unsent(&self) {
        self.in_hand.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether the window has room; if not, the stream is marked to ask
    /// again once half empty.
    pub(super) fn has_room(&self) -> bool {
        if self.in_hand.load(Ordering::Acquire) < RESULT_STREAM_WINDOW {
            return true;
        }
        self.starved.store(true, Ordering::Release);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_live_waiters_and_cap_them() {
        let mut slots = WaiterSlots::new(2);
        let (a, slot_a) = slots.admit_waiter().unwrap();
        let (b, _slot_b) = slots.admit_stream().unwrap();
        assert_ne!(a.0, b.0, "numbers are not reused across kinds");
        assert_eq!(slots.out(), 2);
        assert!(matches!(slots.admit(), Err(BrokerError::LimitReached(_))));
        drop(slot_a);
        assert_eq!(slots.out(), 1);
        assert!(slots.check_room(1).is_ok());
        assert!(slots.check_room(2).is_err());
    }
}
