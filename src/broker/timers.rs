//! The one timer structure for every lease, ttl and delay deadline: a binary heap
//! driven by the broker's one timer task (no task or poll loop per lease).
//!
//! Rules:
//! - Entries are never removed when a lease ends or is extended: a stale
//!   entry is skipped when it comes due (the state checks it against the
//!   task). An extension that moves the expiry later pushes nothing; the
//!   entry already in the heap re-arms itself when it fires early.
//! - So that stale entries do not pile up, the heap is compacted when it
//!   holds more than twice what it kept at its last compaction (or twice
//!   what can still be live, if less) plus [`COMPACT_SLACK`]. Measured
//!   against what is live rather than against every task held (most of
//!   which, retained results, have no timer), the heap stays near the size
//!   of the work in progress, and each compaction is paid for by the pushes
//!   before it or by the stale entries it drops.
//! - The timer task is woken only when a deadline earlier than every other
//!   arrives.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::TaskId;

/// Slack before a structure with skipped (stale) entries is compacted: it
/// is rebuilt once it holds more than twice its live entries plus this.
pub(super) const COMPACT_SLACK: usize = 1024;

/// What a deadline is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum TimerKind {
    /// The lease with this sequence number may have run out.
    Lease(u32),
    /// The task's ttl has run out.
    Ttl,
    /// A delayed task's delay (or its retry's backoff) is over.
    Due,
}

/// One deadline.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct TimerEntry {
    pub at: Instant,
    pub task: TaskId,
    pub kind: TimerKind,
}

/// Every lease and ttl deadline, earliest first.
pub(super) struct TimerHeap {
    heap: BinaryHeap<Reverse<TimerEntry>>,
    /// Entries kept at the last compaction.
    kept: usize,
    /// Wakes the timer task when a deadline earlier than all others arrives.
    wake: Arc<Notify>,
}

impl TimerHeap {
    /// An empty heap that wakes the timer task through `wake`.
    pub(super) fn new(wake: Arc<Notify>) -> Self {
        Self {
            heap: BinaryHeap::new(),
            kept: 0,
            wake,
        }
    }

    /// Adds a deadline. `live` bounds how many entries can still do
    /// anything; `still_live` tells them apart, asked only when the heap
    /// is compacted.
    pub(super) fn schedule(
        &mut self,
        entry: TimerEntry,
        live: usize,
        still_live: impl FnMut(&TimerEntry) -> bool,
    ) {
        if self.heap.len() > 2 * self.kept.min(live) + COMPACT_SLACK {
            self.compact(still_live);
        }
        let earliest = self
            .heap
            .peek()
            .is_none_or(|Reverse(top)| entry.at < top.at);
        self.heap.push(Reverse(entry));
        if earliest {
            self.wake.notify_one();
        }
    }

    fn compact(&mut self, mut still_live: impl FnMut(&TimerEntry) -> bool) {
        self.heap.retain(|Reverse(entry)| still_live(entry));
        self.kept = self.heap.len();
    }

    /// Takes the earliest deadline if it is due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<TimerEntry> {
        if self.heap.peek()?.0.at > now {
            return None;
        }
        self.heap.pop().map(|Reverse(entry)| entry)
    }

    /// When the earliest deadline falls, if any.
    pub(super) fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(entry)| entry.at)
    }

    /// Wakes the timer task (something else it keeps, result retention,
    /// has a new earliest moment).
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Entries held, stale ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn entry(at: Instant, kind: TimerKind) -> TimerEntry {
        TimerEntry {
            at,
            task: TaskId::generate(),
            kind,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn due_entries_come_out_earliest_first() {
        let mut timers = TimerHeap::new(Arc::new(Notify::new()));
        let now = Instant::now();
        for secs in [3, 1, 2] {
            let at = now + Duration::from_secs(secs);
            timers.schedule(entry(at, TimerKind::Ttl), 10, |_| true);
        }
        assert_eq!(timers.next_at(), Some(now + Duration::from_secs(1)));
        assert!(timers.pop_due(now).is_none());
        let later = now + Duration::from_secs(2);
        let due: Vec<_> = std::iter::from_fn(|| timers.pop_due(later))
            .map(|e| e.at)
            .collect();
        assert_eq!(
            due,
            [now + Duration::from_secs(1), now + Duration::from_secs(2)]
        );
    }

    /// Stale entries are dropped once the heap passes twice what can be
    /// live plus the slack, and only then.
    #[tokio::test(start_paused = true)]
    async fn compaction_drops_stale_entries_past_the_bound() {
        let mut timers = TimerHeap::new(Arc::new(Notify::new()));
        let at = Instant::now() + Duration::from_secs(1);
        for _ in 0..=COMPACT_SLACK {
            timers.schedule(entry(at, TimerKind::Lease(1)), 0, |_| false);
        }
        assert_eq!(timers.len(), COMPACT_SLACK + 1);
        // The next push finds the heap past the bound and compacts first.
        timers.schedule(entry(at, TimerKind::Ttl), 0, |e| e.kind == TimerKind::Ttl);
        assert_eq!(timers.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_new_earliest_deadline_wakes_the_timer_task() {
        let wake = Arc::new(Notify::new());
        let mut timers = TimerHeap::new(wake.clone());
        let now = Instant::now();
        timers.schedule(
            entry(now + Duration::from_secs(5), TimerKind::Ttl),
            4,
            |_| true,
        );
        wake.notified().await; // the first entry is the earliest
        timers.schedule(
            entry(now + Duration::from_secs(9), TimerKind::Ttl),
            4,
            |_| true,
        );
        let woken = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
        assert!(woken.is_err(), "a later deadline woke the timer task");
    }
}
