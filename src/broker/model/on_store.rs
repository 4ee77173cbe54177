//! The model-based check through the seam (`store::Store`), for a store
//! whose clock cannot be paused: PostgreSQL, whose times are the
//! database's `now()`. The operations and the reference are those of
//! `run_sequence`, with three differences, each because the store's
//! answer would otherwise depend on timing rather than on the calls made:
//! - No time passes for the model, and every duration the store is given
//!   (ttl, delay, lease, extension, `retry_after`) is the model's scaled up
//!   [`SCALE`] times, 100 ms to an hour: nothing runs out or falls due
//!   during a run, on the store as in the model.
//! - No streams: on PostgreSQL a stream's tasks and results are claimed by
//!   a background dispatch, so what it holds at an instant is not a
//!   function of the calls before it. The contract, stream and chaos tests
//!   cover streams on both stores.
//! - Results are never dropped by count: PostgreSQL's retention drops them
//!   in the background.
//!
//! Run against the memory store too, so that a disagreement on PostgreSQL
//! is the store's, not this runner's. `TASKQ_MODEL_TRACE=1` prints each
//! step's operation, to follow a failing seed up to its step.

use std::time::Duration;

use super::*;
use crate::store::Store;

/// How much longer the store's durations are than the model's.
pub(crate) const SCALE: u32 = 36_000;

/// The store's limits, as the model knows them.
pub(crate) fn store_config() -> BrokerConfig {
    BrokerConfig {
        queue_capacity: QUEUE_CAPACITY,
        max_payload: MAX_PAYLOAD,
        max_results: 1_000_000,
        result_ttl: Duration::from_secs(30 * 24 * 3600),
        max_lease: Duration::from_secs(7 * 24 * 3600),
        retry_backoff: crate::broker::RetryBackoff::NONE,
        ..BrokerConfig::default()
    }
}

fn scaled(duration: Option<Duration>) -> Option<Duration> {
    duration.map(|d| d * SCALE)
}

fn scaled_task(spec: &Spec) -> NewTask {
    let mut task = spec.task();
    task.ttl = scaled(task.ttl);
    task.delay = scaled(task.delay);
    task
}

fn scaled_outcome(outcome: &Outcome) -> Outcome {
    match outcome {
        Outcome::Failure {
            message,
            retry,
            retry_after,
        } => Outcome::Failure {
            message: message.clone(),
            retry: *retry,
            retry_after: scaled(*retry_after),
        },
        other => other.clone(),
    }
}

/// A store and the model side by side, and what a client holds between
/// steps: every lease it was handed, the ids it put.
struct StoreRunner<'a, S> {
    store: &'a S,
    model: Model,
    leases: Vec<LeaseId>,
    ids: Vec<TaskId>,
}

impl<S: Store> StoreRunner<'_, S> {
    async fn put(&mut self, rng: &mut impl Choices, queue: &'static str, step: usize, at: &str) {
        let spec = Spec::choose(rng, queue, step);
        let got = self.store.put(scaled_task(&spec), Duration::ZERO).await;
        check_put(&mut self.model, &mut self.ids, &spec, &got, true, at);
    }

    async fn put_many(&mut self, rng: &mut impl Choices, step: usize, at: &str) {
        let specs: Vec<Spec> = (0..1 + rng.below(4))
            .map(|_| {
                let queue = QUEUES[rng.below(2) as usize];
                Spec::choose(rng, queue, step)
            })
            .collect();
        let got = self
            .store
            .put_many(specs.iter().map(scaled_task).collect())
            .await;
        assert_eq!(got.len(), specs.len(), "{at}: put_many answers");
        for (spec, got) in specs.iter().zip(&got) {
            check_put(&mut self.model, &mut self.ids, spec, got, false, at);
        }
    }

    async fn lease(&mut self, rng: &mut impl Choices, queue: &'static str, at: &str) {
        let lease_ms = 1000 * (1 + rng.below(3));
        let request = LeaseRequest {
            queue: queue_name(queue),
            worker: WorkerId::new("w").unwrap(),
            lease_duration: scaled(Some(Duration::from_millis(lease_ms))),
        };
        let got = self.store.lease(request, Duration::ZERO).await;
        let got = got.unwrap_or_else(|error| panic!("{at}: lease: {error}"));
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

    async fn extend(&mut self, rng: &mut impl Choices, at: &str) {
        let lease = self.any_lease(rng);
        let by_ms = 1000 * (1 + rng.below(3));
        let got = self
            .store
            .extend(lease, scaled(Some(Duration::from_millis(by_ms))))
            .await;
        let expected = self.model.extend(lease.task, lease.seq, by_ms);
        assert_eq!(
            got.map(|_| ()).map_err(|e| kind(&e)),
            expected,
            "{at}: extend {lease}"
        );
    }

    async fn complete(&mut self, rng: &mut impl Choices, at: &str) {
        let lease = self.any_lease(rng);
        let outcome = outcome(rng);
        let got = self.store.complete(lease, scaled_outcome(&outcome)).await;
        let expected = self.model.complete(lease.task, lease.seq, outcome);
        assert_eq!(
            got.map_err(|e| kind(&e)),
            expected,
            "{at}: complete {lease}"
        );
    }

    async fn complete_many(&mut self, rng: &mut impl Choices, at: &str) {
        let reports: Vec<(LeaseId, Outcome)> = (0..1 + rng.below(3))
            .map(|_| (self.any_lease(rng), outcome(rng)))
            .collect();
        let before = self.model.unclaimed_lengths();
        let got = self
            .store
            .complete_many(
                reports
                    .iter()
                    .map(|(lease, outcome)| (*lease, scaled_outcome(outcome)))
                    .collect(),
            )
            .await;
        assert_eq!(got.len(), reports.len(), "{at}: complete_many answers");
        let batch = format!("{reports:?}");
        for ((lease, outcome), got) in reports.into_iter().zip(got) {
            let expected = self.model.complete(lease.task, lease.seq, outcome);
            assert_eq!(
                got.map_err(|e| kind(&e)),
                expected,
                "{at}: complete_many {lease} in {batch}"
            );
        }
        if self.store.kind() == "postgres" {
            self.model.tie_results_since(&before);
        }
    }

    async fn result(&mut self, rng: &mut impl Choices, at: &str) {
        let id = self.ids[index(rng, self.ids.len())];
        let got = self.store.result(id, Duration::ZERO).await;
        assert_eq!(
            got.map(|r| r.map(|r| (r.state, r.output, r.attempts)))
                .map_err(|e| kind(&e)),
            self.model.result(id),
            "{at}: result {id}"
        );
    }

    async fn next_result(&mut self, queue: &'static str, at: &str) {
        let got = self
            .store
            .next_result(queue_name(queue), Duration::ZERO)
            .await
            .unwrap_or_else(|error| panic!("{at}: next result: {error}"));
        let got = got.map(|r| r.task_id);
        let expected = self.model.next_result(queue);
        if got != expected {
            // What each would hand out next, to show where the orders part.
            let mut rest = Vec::new();
            while let Ok(Some(r)) = self
                .store
                .next_result(queue_name(queue), Duration::ZERO)
                .await
            {
                rest.push((r.task_id, r.finished_at, r.state));
            }
            let mut model_rest = Vec::new();
            while let Some(id) = self.model.next_result(queue) {
                model_rest.push(id);
            }
            panic!(
                "{at}: next result: the store {got:?} then {rest:?}, the model {expected:?} then \
                 {model_rest:?}"
            );
        }
    }

    async fn cancel(&mut self, rng: &mut impl Choices, at: &str) {
        let id = self.ids[index(rng, self.ids.len())];
        let got = self.store.cancel(id).await;
        assert_eq!(
            got.map_err(|e| kind(&e)),
            self.model.cancel(id),
            "{at}: cancel {id}"
        );
    }

    async fn pause(&mut self, rng: &mut impl Choices, queue: &'static str, at: &str) {
        let paused = rng.below(2) == 0;
        let got = self.store.set_paused(&queue_name(queue), paused).await;
        assert_eq!(
            got,
            Ok(self.model.set_paused(queue, paused)),
            "{at}: paused {queue}: {paused}"
        );
    }

    async fn purge(&mut self, queue: &'static str, at: &str) {
        assert_eq!(
            self.store.purge(&queue_name(queue)).await,
            Ok(self.model.purge(queue)),
            "{at}: purge {queue}"
        );
    }

    /// The queues' counters, against the model's.
    async fn compare(&self, at: &str) {
        for queue in QUEUES {
            let stats = self.store.stats(Some(&[queue_name(queue)])).await;
            let s = stats
                .unwrap_or_else(|error| panic!("{at}: stats: {error}"))
                .queues
                .remove(0);
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
    }
}

/// Runs one sequence of `steps` against `store` (empty at the start) and
/// the model; panics naming `source` and the step on the first
/// disagreement.
pub(crate) async fn run_on_store<S: Store>(
    store: &S,
    rng: &mut impl Choices,
    source: &str,
    steps: usize,
) {
    let mut run = StoreRunner {
        store,
        model: Model::keeping_all_results(),
        leases: Vec::new(),
        ids: Vec::new(),
    };
    for step in 0..steps {
        let at = format!("{source}, step {step}");
        let queue = QUEUES[rng.below(2) as usize];
        let leases = !run.leases.is_empty();
        let ids = !run.ids.is_empty();
        let pick = rng.below(100);
        if std::env::var_os("TASKQ_MODEL_TRACE").is_some() {
            eprintln!("{at}: op {pick} queue {queue}");
        }
        match pick {
            0..=19 => run.put(rng, queue, step, &at).await,
            20..=34 => run.lease(rng, queue, &at).await,
            35..=44 if leases => run.extend(rng, &at).await,
            45..=64 if leases => run.complete(rng, &at).await,
            65..=69 if leases => run.complete_many(rng, &at).await,
            70..=79 if ids => run.result(rng, &at).await,
            80..=84 => run.next_result(queue, &at).await,
            85..=92 => run.put_many(rng, step, &at).await,
            93..=95 if ids => run.cancel(rng, &at).await,
            96 => run.pause(rng, queue, &at).await,
            97 => run.purge(queue, &at).await,
            _ => {}
        }
        run.compare(&at).await;
    }
}

/// The runner agrees with the model on the memory store, whose own
/// model test (`random_sequences_agree_with_the_model`) is the stricter.
#[tokio::test]
async fn the_seam_agrees_with_the_model_on_the_memory_store() {
    for seed in 1..=30u64 {
        let seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let broker = Broker::new(store_config());
        run_on_store(
            &broker,
            &mut Rng(seed),
            &format!("memory, seed {seed}"),
            300,
        )
        .await;
    }
}
