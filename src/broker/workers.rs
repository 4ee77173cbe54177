//! The worker table: who was seen, working on which queue, holding how many
//! tasks, for GetStats.
//!
//! Rules:
//! - Tracking is best effort; the work is not. Past `max_workers`, silent
//!   workers holding nothing are forgotten first; if that frees nothing, a
//!   new worker is not tracked, and its calls go on as usual.
//! - A worker holding a task is never forgotten.
//! - Known workers (nearly every call) cost one lookup.

use std::time::Duration;

use tokio::time::Instant;

use super::clock::Clock;
use super::types::NameMap;
use super::{QueueName, WorkerId, WorkerInfo};

struct WorkerRecord {
    queue: Option<QueueName>,
    last_seen: Instant,
    in_flight: u32,
}

/// The workers seen lately.
pub(super) struct WorkerTable {
    records: NameMap<WorkerId, WorkerRecord>,
    max_workers: usize,
    /// Silence after which a worker is reported not alive.
    timeout: Duration,
}

impl WorkerTable {
    pub(super) fn new(max_workers: usize, timeout: Duration) -> Self {
        Self {
            records: NameMap::default(),
            max_workers,
            timeout,
        }
    }

    /// Records that `worker` was seen now, working on `queue` if given, and
    /// adds `leased` to what it holds.
    pub(super) fn touch(
        &mut self,
        worker: &WorkerId,
        queue: Option<&QueueName>,
        leased: u32,
        now: Instant,
    ) {
        if let Some(record) = self.records.get_mut(worker) {
            record.last_seen = now;
            record.in_flight = record.in_flight.saturating_add(leased);
            if let Some(queue) = queue {
                record.queue = Some(queue.clone());
            }
            return;
        }
        if self.records.len() >= self.max_workers {
            self.prune(now);
            if self.records.len() >= self.max_workers {
                return;
            }
        }
        self.records.insert(
            worker.clone(),
            WorkerRecord {
                queue: queue.cloned(),
                last_seen: now,
                in_flight: leased,
            },
        );
    }

    /// A lease of `worker`'s has ended.
    pub(super) fn lease_ended(&mut self, worker: &WorkerId) {
        if let Some(record) = self.records.get_mut(worker) {
            record.in_flight = record.in_flight.saturating_sub(1);
        }
    }

    /// Forgets workers that are silent and hold nothing.
    fn prune(&mut self, now: Instant) {
        let timeout = self.timeout;
        self.records
            .retain(|_, w| w.in_flight > 0 || now.duration_since(w.last_seen) < timeout);
    }

    /// How many workers were seen within the timeout: one pass over the
    /// table, which `--max-workers` bounds.
    pub(super) fn alive(&self, now: Instant) -> u64 {
        let alive = self.records.values();
        alive
            .filter(|w| now.duration_since(w.last_seen) < self.timeout)
            .count() as u64
    }

    /// The workers last seen on a queue of `only` (or all), sorted by id,
    /// after forgetting the silent idle ones.
    pub(super) fn report(
        &mut self,
        only: Option<&[QueueName]>,
        clock: &Clock,
        now: Instant,
    ) -> Vec<WorkerInfo> {
        self.prune(now);
        let mut workers: Vec<WorkerInfo> = self
            .records
            .iter()
            .filter(|(_, w)| {
                only.is_none_or(|names| w.queue.as_ref().is_some_and(|q| names.contains(q)))
            })
            .map(|(id, w)| WorkerInfo {
                worker: id.clone(),
                queue: w.queue.clone(),
                last_seen: clock.wall(w.last_seen),
                in_flight: w.in_flight,
                alive: now.duration_since(w.last_seen) < self.timeout,
            })
            .collect();
        workers.sort_by(|a, b| a.worker.cmp(&b.worker));
        workers
    }
}
