//! The state's bookkeeping checked against the tasks themselves, after
//! every step of the model-based test and the fuzzer (tests and the
//! `fuzzing` feature only).

use std::collections::HashMap;

use super::{State, Status};
use crate::broker::QueueName;

impl State {
    /// Sizes of the structures that may hold skipped entries: timer heap,
    /// and the ready and unclaimed lines of all queues together.
    #[cfg(test)]
    pub fn footprint(&self) -> (usize, usize, usize) {
        let (ready, unclaimed) = self
            .queues
            .values()
            .map(super::QueueState::line_lengths)
            .fold((0, 0), |(r, u), (qr, qu)| (r + qr, u + qu));
        (self.timers.len(), ready, unclaimed)
    }

    /// Waiters registered now (their slots out): GetTask and GetResult
    /// calls, watches, worker and result streams.
    pub fn waiters(&self) -> usize {
        self.slots.out()
    }

    /// Returns what is wrong, if anything: counters that disagree with the
    /// tasks and results they count, a pending task not exactly once in its
    /// line, waiters' slots that disagree with the waiters registered.
    pub fn check_consistency(&self) -> Result<(), String> {
        if self.results.line_len() != self.results.len() {
            return Err(format!(
                "{} results held, {} in the retention line",
                self.results.len(),
                self.results.line_len()
            ));
        }
        let mut counts: HashMap<&QueueName, (u64, u64, u64)> = HashMap::new();
        for (id, entry) in &self.tasks {
            let c = counts.entry(&entry.queue).or_default();
            match &entry.status {
                Status::Pending if entry.due().is_some() => {
                    c.2 += 1;
                    let n = self.queues[&entry.queue].times_ready(id);
                    if n != 0 {
                        return Err(format!("delayed task {id} is in its queue {n} times"));
                    }
                }
                Status::Pending => {
                    c.0 += 1;
                    let n = self.queues[&entry.queue].times_ready(id);
                    if n != 1 {
                        return Err(format!("pending task {id} is in its queue {n} times"));
                    }
                }
                Status::Leased(_) => c.1 += 1,
            }
        }
        let mut unclaimed: HashMap<&QueueName, u64> = HashMap::new();
        for done in self.results.iter().filter(|done| done.unclaimed) {
            *unclaimed.entry(&done.result.queue).or_default() += 1;
        }
        for (name, q) in &self.queues {
            let results = unclaimed.get(name).copied().unwrap_or_default();
            if q.results_unclaimed() != results {
                return Err(format!(
                    "queue {name}: counter says {} results unclaimed, results say {results}",
                    q.results_unclaimed()
                ));
            }
            let (pending, leased, delayed) = counts.get(name).copied().unwrap_or_default();
            if q.delayed() != delayed {
                return Err(format!(
                    "queue {name}: counter says {} delayed, tasks say {delayed}",
                    q.delayed()
                ));
            }
            if (q.pending(), q.leased()) != (pending, leased) {
                return Err(format!(
                    "queue {name}: counters say {}/{} pending/leased, tasks say {pending}/{leased}",
                    q.pending(),
                    q.leased()
                ));
            }
        }
        let waiting: usize = self
            .queues
            .values()
            .map(|q| q.task_waiters.len() + q.result_waiters.len())
            .sum::<usize>()
            + self
                .tasks
                .values()
                .filter_map(|e| e.extras.as_ref())
                .map(|x| x.result_waiters.len() + x.watchers.len())
                .sum::<usize>()
            + self.streams.len()
            + self.result_streams.len();
        let held: usize = self.tasks.values().map(|e| e.payload.len()).sum::<usize>()
            + self
                .results
                .iter()
                .map(|done| done.result.output.len())
                .sum::<usize>();
        if held != self.held_bytes {
            return Err(format!(
                "{held} bytes held, counter says {}",
                self.held_bytes
            ));
        }
        if waiting != self.slots.out() {
            return Err(format!(
                "{waiting} waiters registered, {} slots out",
                self.slots.out()
            ));
        }
        Ok(())
    }
}
