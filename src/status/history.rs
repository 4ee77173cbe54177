//! The status page's history: each queue's counters sampled at a fixed
//! interval, kept for [`HISTORY`], from which the page draws its rates and
//! sparklines without Prometheus.
//!
//! Bounded: at most [`HISTORY`] / interval samples, and at most the
//! `--metrics-max-queues` queues first seen with their own line; the
//! others are summed under `_other`, as in `/metrics`. Sampling reads one
//! snapshot (the queues' counters, no scan of tasks).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::broker::{QueueStats, Snapshot};

/// How far back the history goes.
pub const HISTORY: Duration = Duration::from_secs(3600);

/// Default interval between two samples.
pub const DEFAULT_SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// The label of the queues past the cap.
const OTHER: &str = "_other";

/// One queue's counters at a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tasks stored since start.
    pub enqueued: u64,
    /// Tasks finished with success since start.
    pub succeeded: u64,
    /// Tasks finished with failure (ttl expiry included) since start.
    pub failed: u64,
}

impl Counts {
    fn of(q: &QueueStats) -> Self {
        Self {
            enqueued: q.enqueued,
            succeeded: q.succeeded,
            failed: q.failed,
        }
    }

    fn add(&mut self, other: Self) {
        self.enqueued += other.enqueued;
        self.succeeded += other.succeeded;
        self.failed += other.failed;
    }
}

/// One queue's rates over the history, oldest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueHistory {
    /// Tasks stored per second, per interval.
    pub enqueued_per_second: Vec<f64>,
    /// Tasks finished per second, per interval.
    pub finished_per_second: Vec<f64>,
    /// Failed / finished over the whole history; `None` when nothing
    /// finished in it.
    pub failure_ratio: Option<f64>,
}

#[derive(Debug)]
struct Lines {
    /// Samples kept per queue.
    capacity: usize,
    /// Most queues with a line of their own.
    max_queues: usize,
    /// Each queue's samples, newest last; a queue first seen late has
    /// fewer than the others (its line starts then).
    queues: BTreeMap<String, VecDeque<Counts>>,
}

/// The sampled history; a cheap-clone handle.
#[derive(Clone, Debug)]
pub struct History {
    every: Duration,
    /// Taken by the sampler every interval and by a page's request, each
    /// for a copy of a few kilobytes; never by a call of the task queue.
    lines: Arc<Mutex<Lines>>,
}

impl History {
    /// A history sampled `every` interval (at least a millisecond), for at
    /// most `max_queues` queues of their own.
    pub fn new(every: Duration, max_queues: usize) -> Self {
        let every = every.max(Duration::from_millis(1));
        let capacity = usize::try_from(HISTORY.as_millis() / every.as_millis())
            .unwrap_or(usize::MAX)
            .saturating_add(1)
            .min(100_000);
        Self {
            every,
            lines: Arc::new(Mutex::new(Lines {
                capacity,
                max_queues,
                queues: BTreeMap::new(),
            })),
        }
    }

    /// The interval between samples.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Adds a sample of every queue in `snapshot`.
    pub fn record(&self, snapshot: &Snapshot) {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let mut sample: BTreeMap<&str, Counts> = BTreeMap::new();
        let mut own = lines.queues.keys().filter(|name| *name != OTHER).count();
        for q in &snapshot.queues {
            let name = if lines.queues.contains_key(&q.queue) {
                q.queue.as_str()
            } else if own < lines.max_queues {
                own += 1;
                q.queue.as_str()
            } else {
                OTHER
            };
            sample.entry(name).or_default().add(Counts::of(q));
        }
        let capacity = lines.capacity;
        for (name, counts) in sample {
            let line = lines.queues.entry(name.to_string()).or_default();
            if line.len() == capacity {
                line.pop_front();
            }
            line.push_back(counts);
        }
    }

    /// The rates of `queue` over the history.
    pub fn of(&self, queue: &str) -> QueueHistory {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(line) = lines.queues.get(queue).or_else(|| lines.queues.get(OTHER)) else {
            return QueueHistory::default();
        };
        let seconds = self.every.as_secs_f64();
        let per_second = |f: fn(&Counts) -> u64| -> Vec<f64> {
            line.iter()
                .zip(line.iter().skip(1))
                .map(|(a, b)| f(b).saturating_sub(f(a)) as f64 / seconds)
                .collect()
        };
        let finished = |c: &Counts| c.succeeded + c.failed;
        let failure_ratio = match (line.front(), line.back()) {
            (Some(first), Some(last)) if finished(last) > finished(first) => Some(
                (last.failed - first.failed) as f64 / (finished(last) - finished(first)) as f64,
            ),
            _ => None,
        };
        QueueHistory {
            enqueued_per_second: per_second(|c| c.enqueued),
            finished_per_second: per_second(finished),
            failure_ratio,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(queues: &[(&str, u64, u64, u64)]) -> Snapshot {
        Snapshot {
            queues: queues
                .iter()
                .map(|(name, enqueued, succeeded, failed)| QueueStats {
                    queue: (*name).into(),
                    enqueued: *enqueued,
                    succeeded: *succeeded,
                    failed: *failed,
                    ..QueueStats::default()
                })
                .collect(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn rates_come_from_consecutive_samples_and_the_window_is_bounded() {
        // Two samples an hour: the history keeps three (the ends included).
        let history = History::new(Duration::from_secs(1800), 10);
        history.record(&snapshot(&[("a", 0, 0, 0)]));
        history.record(&snapshot(&[("a", 1800, 900, 0)]));
        history.record(&snapshot(&[("a", 3600, 1800, 1800)]));
        history.record(&snapshot(&[("a", 5400, 2700, 1800)]));
        let a = history.of("a");
        assert_eq!(a.enqueued_per_second, [1.0, 1.0]);
        assert_eq!(a.finished_per_second, [1.5, 0.5]);
        // In the window kept: 3,600 finished, 1,800 of them failed.
        assert_eq!(a.failure_ratio, Some(0.5));
        assert_eq!(history.of("missing"), QueueHistory::default());
    }

    #[test]
    fn queues_past_the_cap_share_a_line() {
        let history = History::new(Duration::from_secs(10), 1);
        history.record(&snapshot(&[("a", 0, 0, 0), ("b", 0, 0, 0), ("c", 0, 0, 0)]));
        history.record(&snapshot(&[
            ("a", 10, 0, 0),
            ("b", 20, 0, 0),
            ("c", 30, 0, 0),
        ]));
        assert_eq!(history.of("a").enqueued_per_second, [1.0]);
        assert_eq!(history.of("b").enqueued_per_second, [5.0]);
        assert_eq!(history.of("c"), history.of("b"));
        assert_eq!(history.lines.lock().unwrap().queues.len(), 2);
    }
}
