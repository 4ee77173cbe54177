//! A task as the state machine holds it while it is unfinished: its
//! record, its status (pending, or leased under its current lease), and
//! the fields few tasks use, kept out of line so that a pending task stays
//! small (bench/README.md: bytes per pending task).

use std::collections::HashMap;

use bytes::Bytes;
use tokio::time::Instant;

use super::super::clock::{Clock, Stamp};
use super::super::retention::Report;
use super::super::timers::{TimerEntry, TimerKind};
use super::super::types::IdMap;
use super::super::waiters::{ResultWaiter, StreamId, Watcher};
use super::super::{QueueName, TaskId, TaskState, WorkerId};

/// The current lease of a leased task.
#[derive(Clone, Debug)]
pub(super) struct Lease {
    pub(super) seq: u32,
    /// When it was taken, for the run's duration.
    pub(super) leased_at: Instant,
    pub(super) expires_at: Instant,
    /// When this lease's one timer entry fires; an extension only adds an
    /// entry when it moves the expiry earlier, so the heap holds one live
    /// entry per lease however often it is extended.
    pub(super) scheduled: Instant,
    pub(super) worker: WorkerId,
    /// The worker stream it was leased through, if any.
    pub(super) stream: Option<StreamId>,
}

#[derive(Debug)]
/// Boxed variants keep a pending task small: most of a queue's tasks are
/// pending. A finished task leaves `tasks` for `results` ([`Finished`]).
pub(super) enum Status {
    Pending,
    Leased(Box<Lease>),
}

/// Fields most tasks never use, out of line so that a pending task stays
/// small (bench/README.md: bytes per pending task).
#[derive(Default)]
pub(super) struct Extras {
    pub(super) headers: HashMap<String, String>,
    pub(super) idempotency_key: Option<String>,
    /// The last lease whose failure was retried, with its message, so that
    /// the same report repeated is answered OK.
    pub(super) last_retry: Option<(u32, String)>,
    pub(super) result_waiters: Vec<ResultWaiter>,
    /// Watches (WatchResults by task ids) waiting for this task's result.
    pub(super) watchers: Vec<Watcher>,
    /// Who held each lease that ended without finishing the task (expired,
    /// retried, given back): index `seq - 1`. The current lease's holder is
    /// in its [`Lease`]. So a task handed out once and finished never
    /// allocates this.
    pub(super) holders: Vec<WorkerId>,
    /// When it last went back to the line (so only a task leased before
    /// has it), for the wait's duration; a task never leased has waited
    /// since its put.
    pub(super) ready_since: Option<Stamp>,
    /// Set while it waits out a delay or a retry's backoff (it is then in
    /// no line): when it is due. A delayed task is rare enough to pay for
    /// extras, so a pending task stays small.
    pub(super) due: Option<Stamp>,
}

/// An unfinished task.
pub(super) struct TaskEntry {
    pub(super) queue: QueueName,
    pub(super) payload: Bytes,
    pub(super) max_attempts: u32,
    pub(super) attempt: u32,
    pub(super) lease_seq: u32,
    /// Its line: higher first. (Fits beside the three counters, where the
    /// entry would otherwise pad.)
    pub(super) priority: i32,
    pub(super) created_at: Stamp,
    /// The ttl's deadline.
    pub(super) expires_at: Option<Stamp>,
    pub(super) status: Status,
    pub(super) extras: Option<Box<Extras>>,
}

impl TaskEntry {
    pub(super) fn expired(&self, clock: &Clock, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| clock.instant(at) <= now)
    }

    pub(super) fn extras_mut(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// When a delayed task is due; `None` for any other.
    pub(super) fn due(&self) -> Option<Stamp> {
        self.extras.as_ref().and_then(|x| x.due)
    }

    /// In line (pending and not delayed).
    pub(super) fn is_ready(&self) -> bool {
        matches!(self.status, Status::Pending) && self.due().is_none()
    }
}

/// How a task ended, for [`State::finish`].
pub(super) struct Ended {
    pub(super) state: TaskState,
    pub(super) output: Bytes,
    pub(super) error: String,
    pub(super) worker: Option<WorkerId>,
    /// The lease whose report ended it; 0 when the server did.
    pub(super) by_lease: u32,
    pub(super) report: Report,
}

pub(super) fn state_of(status: &Status) -> TaskState {
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
}

/// Whether a timer entry can still do anything: its task is unfinished
/// and, for a lease entry, the lease is current and scheduled at it.
pub(super) fn timer_is_live(tasks: &IdMap<TaskId, Box<TaskEntry>>, entry: &TimerEntry) -> bool {
    tasks
        .get(&entry.task)
        .is_some_and(|e| match (&e.status, entry.kind) {
            (Status::Leased(l), TimerKind::Lease(seq)) => l.seq == seq && l.scheduled == entry.at,
            (_, TimerKind::Ttl) => true,
            (Status::Pending, TimerKind::Due) => e.due().is_some(),
            (Status::Pending, TimerKind::Lease(_)) | (Status::Leased(_), TimerKind::Due) => false,
        })
}
