//! The worker table: who was seen, working on which queue, holding how many
//! tasks, for GetStats.
//!
//! Rules:
//! - Tracking is best effort; the work is not. Past `max_workers`, silent
//!   workers holding nothing are forgotten first; if that frees nothing, a
//!   new worker is not tracked, and its calls go on as usual.
//! - A worker holding a task is never forgotten.
//! - Known workers (nearly every call) cost one lookup.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::clock::Clock;
use super::types::NameMap;
use super::{QueueName, TaskId, WorkerId, WorkerInfo};

/// How many of a worker's leases its record names, for the status page.
pub const LEASES_NAMED: usize = 8;

struct WorkerRecord {
    queue: Option<QueueName>,
    last_seen: Instant,
    in_flight: u32,
    /// Up to [`LEASES_NAMED`] of the tasks it holds: those it took while
    /// fewer were named (a sample, not the oldest).
    leases: Vec<TaskId>,
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
    /// adds the task it `leased`, if any, to what it holds.
    pub(super) fn touch(
        &mut self,
        worker: &WorkerId,
        queue: Option<&QueueName>,
        leased: Option<TaskId>,
        now: Instant,
    ) {
        if let Some(record) = self.records.get_mut(worker) {
            record.last_seen = now;
            if let Some(task) = leased {
                record.in_flight = record.in_flight.saturating_add(1);
                if record.leases.len() < LEASES_NAMED {
                    record.leases.push(task);
                }
            }
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
                in_flight: u32::from(leased.is_some()),
                leases: leased.into_iter().collect(),
            },
        );
    }

    /// `worker`'s lease of `task` has ended.
    pub(super) fn lease_ended(&mut self, worker: &WorkerId, task: TaskId) {
        if let Some(record) = self.records.get_mut(worker) {
            record.in_flight = record.in_flight.saturating_sub(1);
            if let Some(at) = record.leases.iter().position(|t| *t == task) {
                record.leases.swap_remove(at);
            }
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
    /// `deadline` tells when a named lease runs out.
    pub(super) fn report(
        &mut self,
        only: Option<&[QueueName]>,
        clock: &Clock,
        now: Instant,
        deadline: impl Fn(TaskId) -> Option<SystemTime>,
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
                leases: w
                    .leases
                    .iter()
                    .filter_map(|&task| Some((task, deadline(task)?)))
                    .collect(),
            })
            .collect();
        workers.sort_by(|a, b| a.worker.cmp(&b.worker));
        workers
    }
}
