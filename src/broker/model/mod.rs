//! Model-based checking: sequences of operations run against the broker
//! and against a small reference model written for clarity, not speed.
//! After every step, what a client can observe (return values, results,
//! queue counters) must agree, and the broker's bookkeeping must hold.
//!
//! The operations come from a [`Choices`] source: a seeded generator in the
//! unit tests (a failure names the seed and the step), or the fuzzer's
//! bytes in `fuzz/` ([`replay`]), whose finds are kept in
//! `fuzz/corpus/engine_ops` and replayed by a unit test. Compiled only for
//! tests and the `fuzzing` feature.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use super::*;

/// Where a sequence's choices come from.
pub trait Choices {
    /// A number below `n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64;
    /// True when the source has nothing more to give: the sequence ends.
    fn exhausted(&self) -> bool;
}

/// xorshift64: reproducible sequences without a dependency.
#[cfg(test)]
struct Rng(u64);

#[cfg(test)]
impl Choices for Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn exhausted(&self) -> bool {
        false
    }
}

/// A fuzzer's input read as choices, one byte each.
struct Input<'a>(&'a [u8]);

impl Choices for Input<'_> {
    fn below(&mut self, n: u64) -> u64 {
        match self.0.split_first() {
            Some((byte, rest)) => {
                self.0 = rest;
                u64::from(*byte) % n
            }
            None => 0,
        }
    }

    fn exhausted(&self) -> bool {
        self.0.is_empty()
    }
}

/// Runs the operations `data` encodes against the broker and the model, on
/// a paused clock, panicking at the first disagreement or broken invariant.
/// The entry point of the `engine_ops` fuzz target.
pub fn replay(data: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(run_sequence(&mut Input(data), "fuzz input", 4096));
}

#[derive(Clone, Debug, PartialEq)]
enum ModelState {
    Pending,
    Leased {
        seq: u32,
        expires: u64,
    },
    Finished {
        state: TaskState,
        output: Bytes,
        error: String,
        by_lease: u32,
        outcome: Option<Outcome>,
    },
}

#[derive(Clone, Debug)]
struct ModelTask {
    queue: &'static str,
    attempt: u32,
    max_attempts: u32,
    lease_seq: u32,
    state: ModelState,
    last_retry: Option<(u32, String)>,
}

/// A WatchResults(queue) stream as the model sees it: the results set
/// aside for it, and whether it was passed over while full.
struct ModelResultStream {
    queue: &'static str,
    in_hand: VecDeque<TaskId>,
    starved: bool,
    /// A result taken and put back: the next one taken, outside the window.
    front: Option<TaskId>,
}

/// The reference: queues as plain lists, time as milliseconds.
#[derive(Default)]
struct Model {
    now: u64,
    tasks: BTreeMap<TaskId, ModelTask>,
    lines: BTreeMap<&'static str, VecDeque<TaskId>>,
    /// Results not handed out, in completion order.
    results: BTreeMap<&'static str, VecDeque<TaskId>>,
    /// Open result result_streams by number, and each queue's turn order.
    result_streams: BTreeMap<usize, ModelResultStream>,
    turns: BTreeMap<&'static str, VecDeque<usize>>,
}

impl Model {
    fn put(&mut self, id: TaskId, queue: &'static str, max_attempts: u32) {
        self.tasks.insert(
            id,
            ModelTask {
                queue,
                attempt: 0,
                max_attempts,
                lease_seq: 0,
                state: ModelState::Pending,
                last_retry: None,
            },
        );
        self.lines.entry(queue).or_default().push_back(id);
    }

    fn lease(&mut self, queue: &'static str, lease_ms: u64) -> Option<(TaskId, u32)> {
        let id = self.lines.entry(queue).or_default().pop_front()?;
        let task = self.tasks.get_mut(&id).unwrap();
        task.attempt += 1;
        task.lease_seq += 1;
        task.state = ModelState::Leased {
            seq: task.lease_seq,
            expires: self.now + lease_ms,
        };
        Some((id, task.attempt))
    }

    fn finish(
        &mut self,
        id: TaskId,
        state: TaskState,
        output: Bytes,
        error: String,
        by_lease: u32,
        outcome: Option<Outcome>,
    ) {
        let task = self.tasks.get_mut(&id).unwrap();
        if task.state == ModelState::Pending {
            self.lines.get_mut(task.queue).unwrap().retain(|t| *t != id);
        }
        task.state = ModelState::Finished {
            state,
            output,
            error,
            by_lease,
            outcome,
        };
        let queue = task.queue;
        self.results.entry(queue).or_default().push_back(id);
        self.hand_out(queue);
    }

    /// Results go to the result_streams with room, in turns; a full one is
    /// marked to ask again when half empty.
    fn hand_out(&mut self, queue: &'static str) {
        while !self.results.entry(queue).or_default().is_empty() {
            let turns = self.turns.entry(queue).or_default();
            let mut chosen = None;
            for _ in 0..turns.len() {
                let r = turns.pop_front().unwrap();
                turns.push_back(r);
                let stream = self.result_streams.get_mut(&r).unwrap();
                if stream.in_hand.len() < RESULT_STREAM_WINDOW {
                    chosen = Some(r);
                    break;
                }
                stream.starved = true;
            }
            let Some(r) = chosen else { return };
            let id = self.results.get_mut(queue).unwrap().pop_front().unwrap();
            self.result_streams
                .get_mut(&r)
                .unwrap()
                .in_hand
                .push_back(id);
        }
    }

    fn open_result_stream(&mut self, number: usize, queue: &'static str) {
        let stream = ModelResultStream {
            queue,
            in_hand: VecDeque::new(),
            starved: false,
            front: None,
        };
        self.result_streams.insert(number, stream);
        self.turns.entry(queue).or_default().push_back(number);
        self.hand_out(queue);
    }

    fn take(&mut self, number: usize) -> Option<TaskId> {
        let stream = self.result_streams.get_mut(&number).unwrap();
        if let Some(id) = stream.front.take() {
            return Some(id);
        }
        let id = stream.in_hand.pop_front()?;
        if stream.in_hand.len() <= RESULT_STREAM_WINDOW / 2 && stream.starved {
            stream.starved = false;
            let queue = stream.queue;
            self.hand_out(queue);
        }
        Some(id)
    }

    fn put_back(&mut self, number: usize, id: TaskId) {
        self.result_streams.get_mut(&number).unwrap().front = Some(id);
    }

    /// What the result stream held goes back to the head, in order: the result
    /// put back first.
    fn drop_result_stream(&mut self, number: usize) {
        let stream = self.result_streams.remove(&number).unwrap();
        self.turns
            .get_mut(stream.queue)
            .unwrap()
            .retain(|r| *r != number);
        let results = self.results.entry(stream.queue).or_default();
        for id in stream.in_hand.into_iter().rev() {
            results.push_front(id);
        }
        if let Some(id) = stream.front {
            results.push_front(id);
        }
        self.hand_out(stream.queue);
    }

    /// Leases that ran out by `now`, in deadline order (then id order, as
    /// the broker's heap pops them): back to the head, or FAILED.
    fn advance(&mut self, ms: u64) {
        self.now += ms;
        let mut due: Vec<(u64, TaskId)> = self
            .tasks
            .iter()
            .filter_map(|(id, t)| match t.state {
                ModelState::Leased { expires, .. } if expires <= self.now => Some((expires, *id)),
                _ => None,
            })
            .collect();
        due.sort();
        for (_, id) in due {
            let task = self.tasks.get_mut(&id).unwrap();
            if task.attempt >= task.max_attempts {
                self.finish(
                    id,
                    TaskState::Failed,
                    Bytes::new(),
                    "lease expired".into(),
                    0,
                    None,
                );
            } else {
                task.state = ModelState::Pending;
                self.lines.get_mut(task.queue).unwrap().push_front(id);
            }
        }
    }

    fn extend(&mut self, id: TaskId, seq: u32, by_ms: u64) -> Result<(), &'static str> {
        let Some(task) = self.tasks.get_mut(&id) else {
            return Err("not found");
        };
        match &mut task.state {
            ModelState::Finished { .. } => Err("finished"),
            ModelState::Leased { seq: s, expires } if *s == seq && *expires > self.now => {
                *expires = self.now + by_ms;
                Ok(())
            }
            _ => Err("stale"),
        }
    }

    fn complete(
        &mut self,
        id: TaskId,
        seq: u32,
        outcome: Outcome,
    ) -> Result<TaskState, &'static str> {
        let now = self.now;
        let Some(task) = self.tasks.get_mut(&id) else {
            return Err("not found");
        };
        if let Outcome::Failure {
            message,
            retry: true,
        } = &outcome
        {
            if task
                .last_retry
                .as_ref()
                .is_some_and(|(s, m)| *s == seq && m == message)
            {
                return Ok(match &task.state {
                    ModelState::Pending => TaskState::Pending,
                    ModelState::Leased { .. } => TaskState::Leased,
                    ModelState::Finished { state, .. } => *state,
                });
            }
        }
        if let ModelState::Finished {
            state,
            by_lease,
            outcome: done,
            ..
        } = &task.state
        {
            return if *by_lease == seq && done.as_ref() == Some(&outcome) {
                Ok(*state)
            } else {
                Err("conflict")
            };
        }
        if seq == 0 || seq > task.lease_seq {
            return Err("stale");
        }
        let current = matches!(task.state, ModelState::Leased { seq: s, expires } if s == seq && expires > now);
        match outcome.clone() {
            Outcome::Success(output) => {
                self.finish(
                    id,
                    TaskState::Succeeded,
                    output,
                    String::new(),
                    seq,
                    Some(outcome),
                );
                Ok(TaskState::Succeeded)
            }
            Outcome::Failure { message, retry } => {
                if !current {
                    return Err("stale");
                }
                if retry && task.attempt < task.max_attempts {
                    task.state = ModelState::Pending;
                    task.last_retry = Some((seq, message));
                    let queue = task.queue;
                    self.lines.get_mut(queue).unwrap().push_front(id);
                    Ok(TaskState::Pending)
                } else {
                    self.finish(
                        id,
                        TaskState::Failed,
                        Bytes::new(),
                        message,
                        seq,
                        Some(outcome),
                    );
                    Ok(TaskState::Failed)
                }
            }
        }
    }

    fn next_result(&mut self, queue: &'static str) -> Option<TaskId> {
        self.results.entry(queue).or_default().pop_front()
    }

    fn counts(&self, queue: &str) -> (u64, u64, u64, u64) {
        let mut c = (0, 0, 0, 0);
        for t in self.tasks.values().filter(|t| t.queue == queue) {
            match &t.state {
                ModelState::Pending => c.0 += 1,
                ModelState::Leased { .. } => c.1 += 1,
                ModelState::Finished {
                    state: TaskState::Succeeded,
                    ..
                } => c.2 += 1,
                ModelState::Finished { .. } => c.3 += 1,
            }
        }
        c
    }
}

fn kind(error: &BrokerError) -> &'static str {
    match error {
        BrokerError::TaskNotFound(_) => "not found",
        BrokerError::TaskFinished(_) => "finished",
        BrokerError::StaleLease { .. } => "stale",
        BrokerError::ResultConflict(_) => "conflict",
        _ => "other",
    }
}

const QUEUES: [&str; 2] = ["a", "b"];

/// Runs one sequence against both; panics naming its source and the step
/// on the first disagreement.
async fn run_sequence(rng: &mut impl Choices, source: &str, steps: usize) {
    let b = Broker::new(BrokerConfig::default());
    let mut model = Model::default();
    // Every lease ever handed out, so stale and repeated reports happen.
    let mut leases: Vec<LeaseId> = Vec::new();
    let mut ids: Vec<TaskId> = Vec::new();
    // Open result result_streams: (number, stream), numbered as the model's.
    let mut result_streams: Vec<(usize, ResultStream)> = Vec::new();
    let mut next_stream = 0;
    for step in 0..steps {
        if rng.exhausted() {
            break;
        }
        let at = format!("{source}, step {step}");
        let queue = QUEUES[rng.below(2) as usize];
        match rng.below(112) {
            0..=19 => {
                let max_attempts = 1 + rng.below(3) as u32;
                let task = NewTask {
                    queue: Some(QueueName::parse(queue).unwrap()),
                    payload: Bytes::from(step.to_string()),
                    max_attempts,
                    ..NewTask::default()
                };
                let id = b.put(task, Duration::ZERO).await.unwrap().task_id;
                model.put(id, queue, max_attempts);
                ids.push(id);
            }
            20..=39 => {
                let lease_ms = 1000 * (1 + rng.below(3));
                let request = LeaseRequest {
                    queue: QueueName::parse(queue).unwrap(),
                    worker: WorkerId::new("w").unwrap(),
                    lease_duration: Some(Duration::from_millis(lease_ms)),
                };
                let got = b.lease(request, Duration::ZERO).await.unwrap();
                let expected = model.lease(queue, lease_ms);
                assert_eq!(
                    got.as_ref().map(|t| (t.id, t.attempt)),
                    expected,
                    "{at}: lease"
                );
                if let Some(t) = got {
                    leases.push(t.lease_id);
                }
            }
            40..=49 if !leases.is_empty() => {
                let lease = leases[rng.below(leases.len() as u64) as usize];
                let by_ms = 1000 * (1 + rng.below(3));
                let got = b.extend(lease, Some(Duration::from_millis(by_ms)));
                let expected = model.extend(lease.task, lease.seq, by_ms);
                assert_eq!(
                    got.map(|_| ()).map_err(|e| kind(&e)),
                    expected,
                    "{at}: extend {lease}"
                );
            }
            50..=74 if !leases.is_empty() => {
                let lease = leases[rng.below(leases.len() as u64) as usize];
                let outcome = match rng.below(4) {
                    0 => Outcome::Success(Bytes::from_static(b"ok")),
                    1 => Outcome::Success(Bytes::from_static(b"other")),
                    2 => Outcome::Failure {
                        message: "flaky".into(),
                        retry: true,
                    },
                    _ => Outcome::Failure {
                        message: "broken".into(),
                        retry: false,
                    },
                };
                let got = b.complete(lease, outcome.clone());
                let expected = model.complete(lease.task, lease.seq, outcome);
                assert_eq!(
                    got.map_err(|e| kind(&e)),
                    expected,
                    "{at}: complete {lease}"
                );
            }
            75..=84 if !ids.is_empty() => {
                let id = ids[rng.below(ids.len() as u64) as usize];
                let got = b.result(id, Duration::ZERO).await.unwrap();
                let expected = match &model.tasks[&id].state {
                    ModelState::Finished { state, output, .. } => Some((*state, output.clone())),
                    _ => None,
                };
                assert_eq!(
                    got.map(|r| (r.state, r.output)),
                    expected,
                    "{at}: result {id}"
                );
            }
            85..=89 => {
                let got = b
                    .next_result(QueueName::parse(queue).unwrap(), Duration::ZERO)
                    .await
                    .unwrap();
                assert_eq!(
                    got.map(|r| r.task_id),
                    model.next_result(queue),
                    "{at}: next result"
                );
            }
            100..=102 if result_streams.len() < 3 => {
                let stream = b
                    .open_result_stream(&QueueName::parse(queue).unwrap())
                    .unwrap();
                result_streams.push((next_stream, stream));
                model.open_result_stream(next_stream, queue);
                next_stream += 1;
            }
            103 if !result_streams.is_empty() => {
                let (number, stream) =
                    result_streams.remove(rng.below(result_streams.len() as u64) as usize);
                drop(stream);
                model.drop_result_stream(number);
            }
            104..=111 if !result_streams.is_empty() => {
                let at_stream = rng.below(result_streams.len() as u64) as usize;
                let (number, stream) = &mut result_streams[at_stream];
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                let got = match stream.poll_next_result(&mut cx) {
                    std::task::Poll::Ready(result) => result,
                    std::task::Poll::Pending => None,
                };
                let id = got.as_ref().map(|r| r.task_id);
                assert_eq!(
                    id,
                    model.take(*number),
                    "{at}: result stream {number} takes"
                );
                // Now and then the result does not fit a batch: put back.
                if let Some(result) = got
                    && rng.below(3) == 0
                {
                    model.put_back(*number, result.task_id);
                    stream.put_back(result);
                }
            }
            _ => {
                let ms = 100 * rng.below(26);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                // Let the timer task handle what fell due at this instant.
                for _ in 0..4 {
                    tokio::task::yield_now().await;
                }
                model.advance(ms);
            }
        }
        b.check();
        for q in QUEUES {
            let s = b
                .stats(Some(&[QueueName::parse(q).unwrap()]))
                .queues
                .remove(0);
            assert_eq!(
                (s.pending, s.leased, s.succeeded, s.failed),
                model.counts(q),
                "{at}: counts of {q}"
            );
        }
    }
}

#[cfg(test)]
#[tokio::test(start_paused = true)]
async fn random_sequences_agree_with_the_model() {
    for seed in 1..=60u64 {
        let seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        run_sequence(&mut Rng(seed), &format!("seed {seed}"), 400).await;
    }
}

#[cfg(test)]
/// Replays every input the fuzzer kept (`fuzz/corpus/engine_ops`): what it
/// once found stays found.
#[test]
fn the_fuzz_corpus_replays_cleanly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/engine_ops");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/engine_ops exists") {
        let path = entry.unwrap().path();
        // The committed inputs; the fuzzer's local corpus is not replayed.
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("seed-") || name.starts_with("regression-") {
            replay(&std::fs::read(&path).unwrap());
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no inputs in {}", dir.display());
}
