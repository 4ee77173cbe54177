//! Model-based checking: sequences of operations run against the broker
//! and against a small reference model written for clarity, not speed
//! (`reference.rs`). After every step, what a client can observe (return
//! values, deliveries, results, queue counters, what a worker stream
//! holds) must agree, and the broker's bookkeeping must hold.
//!
//! The operations: put (with ttl, priority, delay, idempotency keys and
//! tasks the broker must refuse) and `put_many`, failures with and without
//! a `retry_after`, lease, extend, complete and
//! `complete_many`, results by id and by queue, result streams, worker
//! streams (open with a window, take deliveries, change the window, drop),
//! and time passing on the paused clock (leases and ttls running out).
//!
//! The operations come from a [`Choices`] source: a seeded generator in the
//! unit tests (a failure names the seed and the step), or the fuzzer's
//! bytes in `fuzz/` ([`replay`]), whose finds are kept in
//! `fuzz/corpus/engine_ops` and replayed by a unit test. Compiled only for
//! tests and the `fuzzing` feature.

#[cfg(test)]
mod on_store;
mod reference;

use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;

use super::*;
#[cfg(test)]
pub(crate) use on_store::{run_on_store, store_config};
use reference::{Admit, Counts, MAX_PAYLOAD, MAX_RESULTS, Model, QUEUE_CAPACITY, Spec};

/// Where a sequence's choices come from.
pub trait Choices {
    /// A number below `n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64;
    /// True when the source has nothing more to give: the sequence ends.
    fn exhausted(&self) -> bool;
}

/// xorshift64: reproducible sequences without a dependency.
#[cfg(test)]
pub(crate) struct Rng(pub(crate) u64);

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

/// The broker under test: limits small enough that short sequences reach
/// them (the model knows them).
fn config() -> BrokerConfig {
    BrokerConfig {
        queue_capacity: QUEUE_CAPACITY,
        max_payload: MAX_PAYLOAD,
        max_results: MAX_RESULTS,
        // Longer than any sequence runs (at most 4096 steps, each sleeping
        // at most 2.5 s): results leave by count only, as in the model.
        result_ttl: Duration::from_secs(24 * 3600),
        retry_backoff: crate::broker::RetryBackoff::NONE,
        ..BrokerConfig::default()
    }
}

fn kind(error: &BrokerError) -> &'static str {
    match error {
        BrokerError::TaskNotFound(_) => "not found",
        BrokerError::TaskFinished(_) => "finished",
        BrokerError::StaleLease { .. } => "stale",
        BrokerError::ResultConflict(_) => "conflict",
        BrokerError::PayloadTooLarge { .. } => "payload",
        BrokerError::InvalidArgument(_) => "invalid",
        BrokerError::QueueFull { .. } => "full",
        BrokerError::Cancelled(_) => "cancelled",
        _ => "other",
    }
}

const QUEUES: [&str; 2] = ["a", "b"];
/// Idempotency keys: few, so that they repeat.
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
/// Open streams of each kind at most.
const MAX_STREAMS: usize = 3;

fn queue_name(queue: &str) -> QueueName {
    QueueName::parse(queue).expect("the runner's queue names are valid")
}

impl Spec {
    /// A task to put, now and then one the broker must refuse.
    fn choose(rng: &mut impl Choices, queue: &'static str, step: usize) -> Self {
        let payload = if rng.below(10) == 0 {
            Bytes::from(vec![b'x'; MAX_PAYLOAD + 1])
        } else {
            Bytes::from(step.to_string())
        };
        let max_attempts = match rng.below(12) {
            0 => 0,
            1 => types::MAX_ATTEMPTS_LIMIT + 1,
            n => 1 + n as u32 % 3,
        };
        let ttl_ms = match rng.below(16) {
            0..=4 => Some(100 * (1 + rng.below(30))),
            5 => Some(0),
            _ => None,
        };
        let key = (rng.below(3) == 0).then(|| KEYS[rng.below(3) as usize]);
        let priority = [0, 0, 0, 3, -1][rng.below(5) as usize];
        let delay_ms = match rng.below(8) {
            0 => Some(100 * (1 + rng.below(20))),
            1 => Some(0),
            _ => None,
        };
        Self {
            queue,
            payload,
            max_attempts,
            ttl_ms,
            key,
            priority,
            delay_ms,
        }
    }

    fn task(&self) -> NewTask {
        NewTask {
            queue: Some(queue_name(self.queue)),
            payload: self.payload.clone(),
            idempotency_key: self.key.map(String::from),
            max_attempts: self.max_attempts,
            ttl: self.ttl_ms.map(Duration::from_millis),
            priority: self.priority,
            delay: self.delay_ms.map(Duration::from_millis),
            ..NewTask::default()
        }
    }
}

fn outcome(rng: &mut impl Choices) -> Outcome {
    match rng.below(5) {
        4 => Outcome::Failure {
            message: "later".into(),
            retry: true,
            retry_after: Some(Duration::from_millis(100 * (1 + rng.below(10)))),
        },
        0 => Outcome::Success(Bytes::from_static(b"ok")),
        1 => Outcome::Success(Bytes::from_static(b"other")),
        2 => Outcome::Failure {
            message: "flaky".into(),
            retry: true,
            retry_after: None,
        },
        _ => Outcome::Failure {
            message: "broken".into(),
            retry: false,
            retry_after: None,
        },
    }
}

/// An index into a list of `len` (more than 0) items.
fn index(rng: &mut impl Choices, len: usize) -> usize {
    rng.below(len as u64) as usize
}

/// Drops one of `streams` (a client leaving), and returns its number.
fn drop_one<T>(rng: &mut impl Choices, streams: &mut Vec<(usize, T)>) -> usize {
    let (number, stream) = streams.remove(index(rng, streams.len()));
    drop(stream);
    number
}

/// One poll, as a response stream's transport would make it: what is
/// ready now, or nothing.
fn poll_now<T>(poll: impl FnOnce(&mut Context<'_>) -> Poll<Option<T>>) -> Option<T> {
    match poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(item) => item,
        Poll::Pending => None,
    }
}

/// A put's answer against the model's; a new task is stored in the model
/// under the store's id, and its id joins `ids`. `dispatch`: hand out at
/// once (a put alone), or not (a batch hands out per queue). True when a
/// task joined its queue's line.
fn check_put(
    model: &mut Model,
    ids: &mut Vec<TaskId>,
    spec: &Spec,
    got: &Result<PutOutcome, BrokerError>,
    dispatch: bool,
    at: &str,
) -> bool {
    match (model.admit(spec), got) {
        (Ok(Admit::New), Ok(out)) if !out.duplicate => {
            model.store(out.task_id, spec, dispatch);
            ids.push(out.task_id);
            return spec.delay_ms.is_none_or(|ms| ms == 0);
        }
        (Ok(Admit::Duplicate(id)), Ok(out)) if out.duplicate && out.task_id == id => {}
        (Err(expected), Err(error)) if kind(error) == expected => {}
        (expected, got) => {
            panic!("{at}: put {spec:?}: the model says {expected:?}, the store {got:?}")
        }
    }
    false
}

/// The broker and its model side by side, and what a client holds
/// between steps: every lease it was handed (so that stale and repeated
/// reports happen), the ids it put, its open streams (numbered as the
/// model's).
struct Runner {
    b: Broker,
    model: Model,
    leases: Vec<LeaseId>,
    ids: Vec<TaskId>,
    result_streams: Vec<(usize, ResultStream)>,
    worker_streams: Vec<(usize, WorkerStream)>,
    next_stream: usize,
}

impl Runner {
    fn check_put(
        &mut self,
        spec: &Spec,
        got: &Result<PutOutcome, BrokerError>,
        dispatch: bool,
        at: &str,
    ) -> bool {
        check_put(&mut self.model, &mut self.ids, spec, got, dispatch, at)
    }

    async fn put(&mut self, rng: &mut impl Choices, queue: &'static str, step: usize, at: &str) {
        let spec = Spec::choose(rng, queue, step);
        let got = self.b.put(spec.task(), Duration::ZERO).await;
        self.check_put(&spec, &got, true, at);
    }

    /// A batch, its tasks in either queue: each answer as a put one after
    /// another would give it; the tasks are handed out per run of one
    /// queue, so a run goes out by priority.
    fn put_many(&mut self, rng: &mut impl Choices, step: usize, at: &str) {
        let specs: Vec<Spec> = (0..1 + rng.below(4))
            .map(|_| {
                let queue = QUEUES[rng.below(2) as usize];
                Spec::choose(rng, queue, step)
            })
            .collect();
        let got = self.b.put_many(specs.iter().map(Spec::task).collect());
        assert_eq!(got.len(), specs.len(), "{at}: put_many answers");
        let mut stored: Option<&'static str> = None;
        for (spec, got) in specs.iter().zip(&got) {
            if self.check_put(spec, got, false, at)
                && let Some(before) = stored.replace(spec.queue)
                && before != spec.queue
            {
                self.model.dispatch(before);
            }
        }
        if let Some(queue) = stored {
            self.model.dispatch(queue);
        }
    }

    async fn lease(&mut self, rng: &mut impl Choices, queue: &'static str, at: &str) {
        let lease_ms = 1000 * (1 + rng.below(3));
        let request = LeaseRequest {
            queue: queue_name(queue),
            worker: WorkerId::new("w").unwrap(),
            lease_duration: Some(Duration::from_millis(lease_ms)),
        };
        let got = self.b.lease(request, Duration::ZERO).await.unwrap();
        let expected = self.model.lease(queue, lease_ms);
        assert_eq!(
            got.as_ref().map(|t| (t.id, t.attempt)),
            expected,
            "{at}: lease"
        );
        if let Some(t) = got {
            self.leases.push(t.lease_id);
        }
    }

    fn any_lease(&self, rng: &mut impl Choices) -> LeaseId {
        self.leases[index(rng, self.leases.len())]
    }

    fn extend(&mut self, rng: &mut impl Choices, at: &str) {
        let lease = self.any_lease(rng);
        let by_ms = 1000 * (1 + rng.below(3));
        let got = self.b.extend(lease, Some(Duration::from_millis(by_ms)));
        let expected = self.model.extend(lease.task, lease.seq, by_ms);
        assert_eq!(
            got.map(|_| ()).map_err(|e| kind(&e)),
            expected,
            "{at}: extend {lease}"
        );
    }

    fn complete(&mut self, rng: &mut impl Choices, at: &str) {
        let lease = self.any_lease(rng);
        let outcome = outcome(rng);
        let got = self.b.complete(lease, outcome.clone());
        let expected = self.model.complete(lease.task, lease.seq, outcome);
        assert_eq!(
            got.map_err(|e| kind(&e)),
            expected,
            "{at}: complete {lease}"
        );
    }

    /// A worker's `results` batch: each answer as `complete` one after
    /// another would give it.
    fn complete_many(&mut self, rng: &mut impl Choices, at: &str) {
        let reports: Vec<(LeaseId, Outcome)> = (0..1 + rng.below(3))
            .map(|_| (self.any_lease(rng), outcome(rng)))
            .collect();
        let got = self.b.complete_many(reports.clone());
        assert_eq!(got.len(), reports.len(), "{at}: complete_many answers");
        for ((lease, outcome), got) in reports.into_iter().zip(got) {
            let expected = self.model.complete(lease.task, lease.seq, outcome);
            assert_eq!(
                got.map_err(|e| kind(&e)),
                expected,
                "{at}: complete_many {lease}"
            );
        }
    }

    async fn result(&mut self, rng: &mut impl Choices, at: &str) {
        let id = self.ids[index(rng, self.ids.len())];
        let got = self.b.result(id, Duration::ZERO).await;
        assert_eq!(
            got.map(|r| r.map(|r| (r.state, r.output, r.attempts)))
                .map_err(|e| kind(&e)),
            self.model.result(id),
            "{at}: result {id}"
        );
    }

    async fn next_result(&mut self, queue: &'static str, at: &str) {
        let got = self
            .b
            .next_result(queue_name(queue), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(
            got.map(|r| r.task_id),
            self.model.next_result(queue),
            "{at}: next result"
        );
    }

    fn open_result_stream(&mut self, queue: &'static str) {
        let stream = self.b.open_result_stream(&queue_name(queue)).unwrap();
        self.result_streams.push((self.next_stream, stream));
        self.model.open_result_stream(self.next_stream, queue);
        self.next_stream += 1;
    }

    fn drop_result_stream(&mut self, rng: &mut impl Choices) {
        let number = drop_one(rng, &mut self.result_streams);
        self.model.drop_result_stream(number);
    }

    fn take_result(&mut self, rng: &mut impl Choices, at: &str) {
        let i = index(rng, self.result_streams.len());
        let (number, stream) = &mut self.result_streams[i];
        let got = poll_now(|cx| stream.poll_next_result(cx));
        let id = got.as_ref().map(|r| r.task_id);
        assert_eq!(
            id,
            self.model.take_result(*number),
            "{at}: result stream {number} takes"
        );
        // Now and then the result does not fit a batch: put back.
        if let Some(result) = got
            && rng.below(3) == 0
        {
            self.model.put_back_result(*number, result.task_id);
            stream.put_back(result);
        }
    }

    fn open_worker_stream(&mut self, rng: &mut impl Choices, queue: &'static str) {
        let window = rng.below(5) as u32;
        // Some leases long enough that the stream still holds its tasks
        // when it is dropped.
        let lease_ms = [1000, 3000, 20_000][rng.below(3) as usize];
        let request = LeaseRequest {
            queue: queue_name(queue),
            worker: WorkerId::new("s").unwrap(),
            lease_duration: Some(Duration::from_millis(lease_ms)),
        };
        let stream = self.b.open_worker_stream(request, window).unwrap();
        self.worker_streams.push((self.next_stream, stream));
        self.model
            .open_worker_stream(self.next_stream, queue, lease_ms, window);
        self.next_stream += 1;
    }

    fn drop_worker_stream(&mut self, rng: &mut impl Choices) {
        let number = drop_one(rng, &mut self.worker_streams);
        self.model.drop_worker_stream(number);
    }

    fn set_window(&mut self, rng: &mut impl Choices) {
        let (number, stream) = &self.worker_streams[index(rng, self.worker_streams.len())];
        let window = rng.below(5) as u32;
        stream.control().set_window(window);
        self.model.set_window(*number, window);
    }

    /// The worker stream's handle polled once, as its response stream
    /// would; the lease taken joins those reported on.
    fn take_task(&mut self, rng: &mut impl Choices, at: &str) {
        let i = index(rng, self.worker_streams.len());
        let (number, stream) = &mut self.worker_streams[i];
        let got = poll_now(|cx| stream.poll_next_task(cx));
        let expected = self.model.take_task(*number);
        assert_eq!(
            got.as_ref().map(|t| (t.id, t.attempt, t.lease_id.seq)),
            expected.map(|d| (d.id, d.attempt, d.seq)),
            "{at}: worker stream {number} takes"
        );
        let (Some(task), Some(delivery)) = (got, expected) else {
            return;
        };
        self.leases.push(task.lease_id);
        // Now and then the task does not fit a batch: put back.
        if rng.below(4) == 0 {
            stream.put_back(task);
            self.model.put_back_task(*number, delivery);
        }
    }

    fn cancel(&mut self, rng: &mut impl Choices, at: &str) {
        let id = self.ids[index(rng, self.ids.len())];
        let got = self.b.cancel(id);
        assert_eq!(
            got.map_err(|e| kind(&e)),
            self.model.cancel(id),
            "{at}: cancel {id}"
        );
    }

    /// The worker stream's cancels, polled once as its response stream
    /// would.
    fn take_cancel(&mut self, rng: &mut impl Choices, at: &str) {
        let i = index(rng, self.worker_streams.len());
        let (number, stream) = &mut self.worker_streams[i];
        let got = poll_now(|cx| stream.poll_cancelled(cx));
        assert_eq!(
            got.map(|lease| (lease.task, lease.seq)),
            self.model.take_cancel(*number),
            "{at}: worker stream {number} takes a cancel"
        );
    }

    fn pause(&mut self, rng: &mut impl Choices, queue: &'static str, at: &str) {
        let paused = rng.below(2) == 0;
        let name = queue_name(queue);
        let got = if paused {
            self.b.pause(&name)
        } else {
            self.b.resume(&name)
        };
        assert_eq!(
            got,
            Ok(self.model.set_paused(queue, paused)),
            "{at}: paused {queue}: {paused}"
        );
    }

    fn purge(&mut self, queue: &'static str, at: &str) {
        assert_eq!(
            self.b.purge(&queue_name(queue)),
            Ok(self.model.purge(queue)),
            "{at}: purge {queue}"
        );
    }

    async fn sleep(&mut self, rng: &mut impl Choices) {
        let ms = 100 * rng.below(26);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        // Let the timer task handle what fell due at this instant.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        self.model.advance(ms);
    }

    /// What a client can see without changing anything, against the
    /// model, and the broker's own bookkeeping.
    fn compare(&self, at: &str) {
        self.b.check();
        for queue in QUEUES {
            let s = self.b.stats(Some(&[queue_name(queue)])).queues.remove(0);
            let got = Counts {
                pending: s.pending,
                delayed: s.delayed,
                leased: s.leased,
                succeeded: s.succeeded,
                failed: s.failed,
                redelivered: s.redelivered,
                results_unclaimed: s.results_unclaimed,
                results_evicted: s.results_evicted,
                cancelled: s.cancelled,
            };
            assert_eq!(got, self.model.counts(queue), "{at}: counts of {queue}");
        }
        for (number, stream) in &self.worker_streams {
            assert_eq!(
                (stream.control().outstanding(), stream.ready()),
                self.model.worker_stream_view(*number),
                "{at}: worker stream {number}: leased through it, ready"
            );
        }
    }
}

/// Runs one sequence against both; panics naming its source and the step
/// on the first disagreement.
async fn run_sequence(rng: &mut impl Choices, source: &str, steps: usize) {
    let mut run = Runner {
        b: Broker::new(config()),
        model: Model::default(),
        leases: Vec::new(),
        ids: Vec::new(),
        result_streams: Vec::new(),
        worker_streams: Vec::new(),
        next_stream: 0,
    };
    for step in 0..steps {
        if rng.exhausted() {
            break;
        }
        let at = format!("{source}, step {step}");
        let queue = QUEUES[rng.below(2) as usize];
        let leases = !run.leases.is_empty();
        let results = !run.result_streams.is_empty();
        let workers = !run.worker_streams.is_empty();
        match rng.below(130) {
            0..=19 => run.put(rng, queue, step, &at).await,
            20..=34 => run.lease(rng, queue, &at).await,
            35..=44 if leases => run.extend(rng, &at),
            45..=64 if leases => run.complete(rng, &at),
            65..=69 if leases => run.complete_many(rng, &at),
            70..=79 if !run.ids.is_empty() => run.result(rng, &at).await,
            80..=84 => run.next_result(queue, &at).await,
            85..=89 => run.put_many(rng, step, &at),
            90..=92 if !run.ids.is_empty() => run.cancel(rng, &at),
            93 => run.pause(rng, queue, &at),
            94 => run.purge(queue, &at),
            95..=96 if workers => run.take_cancel(rng, &at),
            100..=102 if run.result_streams.len() < MAX_STREAMS => run.open_result_stream(queue),
            103 if results => run.drop_result_stream(rng),
            104..=111 if results => run.take_result(rng, &at),
            112..=114 if run.worker_streams.len() < MAX_STREAMS => {
                run.open_worker_stream(rng, queue);
            }
            115..=116 if workers => run.drop_worker_stream(rng),
            117 if workers => run.set_window(rng),
            118..=129 if workers => run.take_task(rng, &at),
            _ => run.sleep(rng).await,
        }
        run.compare(&at);
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
