//! Finished tasks, held for their results until retention drops them.
//!
//! Rules:
//! - A finished task is one allocation, [`Finished`]: its result, the kind
//!   of report that finished it, whether a reader by queue took it, and only
//!   when present its idempotency key and last retried failure.
//! - Results are dropped oldest first, by age (`--result-ttl`) and by
//!   count (`--max-results`), from a line in completion order: never by
//!   scanning the map.
//! - What is dropped is handed back to the caller ([`Retained::evict_next`]),
//!   which adjusts its own counters (bytes held, a queue's unclaimed
//!   results, its idempotency keys).
//! - Apart from the unfinished tasks, so that the map the hot path works in
//!   holds only the work in progress and stays small and in cache, however
//!   many results are kept.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::types::IdMap;
use super::{Outcome, TaskId, TaskResult};

/// A finished task, held for its result until retention drops it.
#[derive(Debug)]
pub(super) struct Finished {
    pub result: TaskResult,
    /// The lease whose report finished the task; 0 when the server did.
    pub by_lease: u32,
    /// What that report was, to tell it repeated from a different one.
    pub report: Report,
    /// Not yet handed out by GetResult(queue) or WatchResults(queue).
    pub unclaimed: bool,
    /// Kept only when the task had any of it.
    pub rest: Option<Box<FinishedRest>>,
}

/// What few finished tasks need kept.
#[derive(Debug)]
pub(super) struct FinishedRest {
    /// Forgotten with the result.
    pub idempotency_key: Option<String>,
    /// The last lease whose failure was retried, with its message, so that
    /// the same report repeated is still answered OK.
    pub last_retry: Option<(u32, String)>,
}

/// The report that finished a task, without its output or message: those
/// are in the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Report {
    /// The server failed it: its ttl ran out.
    Expired,
    /// The server failed it: its last lease ran out.
    AttemptsUsed,
    /// CancelTask took it back.
    Cancelled,
    Success,
    Failure {
        retry: bool,
    },
}

impl Finished {
    /// Whether `outcome` is the report that finished the task.
    pub(super) fn finished_by(&self, outcome: &Outcome) -> bool {
        match (self.report, outcome) {
            (Report::Success, Outcome::Success(output)) => self.result.output == *output,
            (
                Report::Failure { retry },
                Outcome::Failure {
                    message, retry: r, ..
                },
            ) => retry == *r && self.result.error == *message,
            _ => false,
        }
    }

    /// The last retried failure of the task, if it had one.
    pub(super) fn last_retry(&self) -> Option<&(u32, String)> {
        self.rest.as_ref()?.last_retry.as_ref()
    }

    /// The task's idempotency key, if it had one.
    pub(super) fn idempotency_key(&self) -> Option<&String> {
        self.rest.as_ref()?.idempotency_key.as_ref()
    }
}

/// How long and how many results are kept.
#[derive(Clone, Copy, Debug)]
pub(super) struct RetentionLimits {
    pub result_ttl: Duration,
    pub max_results: usize,
}

/// The finished tasks held, by id and in completion order.
pub(super) struct Retained {
    by_id: IdMap<TaskId, Box<Finished>>,
    /// Finished tasks in completion order, for retention by age and count.
    line: VecDeque<(Instant, TaskId)>,
    limits: RetentionLimits,
}

impl Retained {
    pub(super) fn new(limits: RetentionLimits) -> Self {
        Self {
            by_id: IdMap::default(),
            line: VecDeque::new(),
            limits,
        }
    }

    /// Holds a task finished at `now`. True when nothing was held before:
    /// the timer must then look at retention again.
    pub(super) fn insert(&mut self, id: TaskId, finished: Box<Finished>, now: Instant) -> bool {
        let was_empty = self.line.is_empty();
        self.by_id.insert(id, finished);
        self.line.push_back((now, id));
        was_empty
    }

    /// The oldest result past the count limit or the age limit at `now`,
    /// dropped. Called until it returns `None`.
    pub(super) fn evict_next(&mut self, now: Instant) -> Option<(TaskId, Box<Finished>)> {
        loop {
            let &(finished_at, id) = self.line.front()?;
            let too_many = self.line.len() > self.limits.max_results;
            let too_old = now.duration_since(finished_at) >= self.limits.result_ttl;
            if !(too_many || too_old) {
                return None;
            }
            self.line.pop_front();
            if let Some(done) = self.by_id.remove(&id) {
                return Some((id, done));
            }
        }
    }

    /// When the oldest result held reaches its age limit.
    pub(super) fn next_eviction(&self) -> Option<Instant> {
        self.line
            .front()
            .map(|&(at, _)| at + self.limits.result_ttl)
    }

    pub(super) fn get(&self, id: &TaskId) -> Option<&Finished> {
        self.by_id.get(id).map(Box::as_ref)
    }

    pub(super) fn get_mut(&mut self, id: &TaskId) -> Option<&mut Finished> {
        self.by_id.get_mut(id).map(Box::as_mut)
    }

    pub(super) fn contains(&self, id: &TaskId) -> bool {
        self.by_id.contains_key(id)
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Every finished task held.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn iter(&self) -> impl Iterator<Item = &Finished> {
        self.by_id.values().map(Box::as_ref)
    }

    /// Entries in the completion line (one per result held).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn line_len(&self) -> usize {
        self.line.len()
    }
}
