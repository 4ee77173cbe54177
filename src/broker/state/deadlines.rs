//! Deadlines: leases that run out, ttls, delays that end, and results
//! past their retention. A child of the state machine, to use its
//! transitions (`finish`, `release`, `dispatch`); apart because only the
//! timer task calls in here.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::task::Ended;
use super::{State, Status};
use crate::broker::retention::Report;
use crate::broker::timers::TimerKind;
use crate::broker::types::{TaskId, TaskState};

impl State {
    /// Handles every lease, ttl and delay deadline that is due and drops
    /// results past their retention. Returns when to look again.
    pub fn fire_due(&mut self, now: Instant) -> Option<Instant> {
        while let Some(due) = self.timers.pop_due(now) {
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
                TimerKind::Due => self.delay_over(due.task, now),
            }
        }
        self.evict_results(now);
        match (self.timers.next_at(), self.results.next_eviction()) {
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

    /// A delayed task is due: into its line, in its place by id, and
    /// handed out if someone waits.
    fn delay_over(&mut self, id: TaskId, now: Instant) {
        let Some(entry) = self.tasks.get_mut(&id) else {
            return;
        };
        let Some(due) = entry.due() else {
            return;
        };
        if self.clock.instant(due) > now {
            return;
        }
        if let Some(extras) = entry.extras.as_mut() {
            extras.due = None;
            // It has waited for a hand-out since it was due.
            extras.ready_since = Some(due);
        }
        let (queue, priority) = (entry.queue.clone(), entry.priority);
        self.known_queue(&queue).due(id, priority);
        self.dispatch(&queue, now);
    }

    /// A leased task's lease is over (expired, or its stream closed): back
    /// in line (in its place by id) for another attempt, or FAILED when it has
    /// used its attempts or its ttl.
    pub(super) fn lease_lost(&mut self, id: TaskId, now: Instant) {
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
            let ended = Ended {
                state: TaskState::Failed,
                output: Bytes::new(),
                error,
                worker: Some(worker),
                by_lease: 0,
                report: Report::AttemptsUsed,
            };
            self.finish(id, ended, now);
        } else {
            tracing::debug!(task_id = %id, worker_id = %worker, "lease expired; task requeued");
            self.release(id, Duration::ZERO, now);
            let queue = self.tasks[&id].queue.clone();
            self.known_queue(&queue).retried_after_lease_expiry();
            self.dispatch(&queue, now);
        }
    }
}
