//! The history check of the load tests with faults (tests/stream_chaos.rs
//! on one server, tests/postgres_chaos.rs on several servers of one
//! database): what the clients saw, recorded as they saw it, and the
//! counts that must be 0 once the load is over.
//!
//! The clients record every put a PutTasks answer acknowledged, every
//! result a reader by queue or a watch by ids received, every success the
//! server accepted (with its lease), when each lease reached its worker,
//! and every operation only the current lease may make (an extension, a
//! retried failure) that the server accepted. [`History::check`] then
//! counts, against every task's result read by id: lost tasks, conflicting
//! results (not the handler's output), failed tasks, results for ids never
//! put, results handed to two queue readers (or to one twice), two
//! different leases both told their success was accepted, and a task held
//! under two valid leases at once.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use taskq::pb;
use tokio::time::Instant;

use super::Client;

/// How many findings of each kind the checker prints (it counts them all).
const SHOWN: u64 = 10;

/// What the clients saw, for the checker.
#[derive(Default)]
pub struct History {
    /// Task id -> payload, for every task a PutTasks answer acknowledged.
    pub put: HashMap<String, Bytes>,
    /// Every result a reader by queue received: (task id, reader stream).
    pub queue_reads: Vec<(String, u64)>,
    /// Results received by a watch on ids.
    pub id_reads: Vec<pb::Result>,
    /// (task id, lease id) of every success the server accepted.
    pub accepted: Vec<(String, String)>,
    /// When each lease reached its worker: (task id, seq) -> instant.
    pub delivered: HashMap<(String, u32), Instant>,
    /// Operations that only the current lease may make (an extension, a
    /// retried failure), accepted: (task id, lease seq, when sent).
    pub current_ops: Vec<(String, u32, Instant)>,
    /// Deliveries of a lease id already delivered.
    pub same_lease_twice: u64,
}

impl History {
    /// Records that the leases of `tasks` reached a worker at `received`,
    /// an instant taken after the message arrived (the checker relies on
    /// a lease being made before it is recorded).
    pub fn delivered(&mut self, tasks: &[pb::Task], received: Instant) {
        for task in tasks {
            let key = (task.id.clone(), lease_seq(&task.lease_id));
            if self.delivered.insert(key, received).is_some() {
                // One lease handed out twice: two holders at once.
                self.same_lease_twice += 1;
            }
        }
    }

    /// The checker: every task put has one result, the right one, in
    /// `results` (read by id); the readers by queue got each result at
    /// most once; no lease acted as current once a later one was out.
    ///
    /// # Panics
    ///
    /// When fewer or more than `tasks` puts were acknowledged.
    pub fn check(&self, results: &HashMap<String, pb::Result>, tasks: usize) -> Verdict {
        assert_eq!(self.put.len(), tasks, "every put was acknowledged once");
        let mut verdict = Verdict::default();
        for (id, payload) in &self.put {
            let Some(result) = results.get(id) else {
                verdict.lost += 1;
                if verdict.lost <= SHOWN {
                    eprintln!("task {id}: no result");
                }
                continue;
            };
            if result.attempts > 1 {
                verdict.redelivered += 1;
            }
            match result.state() {
                pb::TaskState::Succeeded if result.output == output_for(payload) => {}
                pb::TaskState::Succeeded => {
                    verdict.conflicting += 1;
                    if verdict.conflicting <= SHOWN {
                        eprintln!("task {id}: output {:?} for {payload:?}", result.output);
                    }
                }
                state => {
                    verdict.failed += 1;
                    if verdict.failed <= SHOWN {
                        eprintln!("task {id}: {state:?} {}", result.error);
                    }
                }
            }
        }
        let mut read_by: HashMap<&String, u64> = HashMap::new();
        for (id, _) in &self.queue_reads {
            if !self.put.contains_key(id) {
                verdict.never_put += 1;
                eprintln!("result of {id}, never put, read by queue");
            }
            *read_by.entry(id).or_default() += 1;
        }
        for (id, n) in &read_by {
            if *n > 1 {
                verdict.read_twice += 1;
                eprintln!("result of {id} read {n} times by queue");
            }
        }
        verdict.unread_by_queue = self
            .put
            .keys()
            .filter(|id| !read_by.contains_key(id))
            .count();
        for result in &self.id_reads {
            if !self.put.contains_key(&result.task_id) {
                verdict.never_put += 1;
                eprintln!("result of {}, never put, read by id", result.task_id);
            }
        }
        let mut succeeded_under: HashMap<&String, HashSet<&String>> = HashMap::new();
        for (task, lease) in &self.accepted {
            succeeded_under.entry(task).or_default().insert(lease);
        }
        for (task, leases) in &succeeded_under {
            if leases.len() > 1 {
                verdict.doubly_accepted += 1;
                eprintln!("task {task}: successes accepted from {leases:?}");
            }
        }
        // A task held under two valid leases at once: an operation that only
        // the current lease may make, sent after a later lease had already
        // reached its worker, and accepted.
        verdict.double_leased = self.same_lease_twice;
        for (task, seq, sent) in &self.current_ops {
            let later = self
                .delivered
                .iter()
                .any(|((t, s), at)| t == task && s > seq && at < sent);
            if later {
                verdict.double_leased += 1;
                eprintln!("task {task}: lease {seq} acted as current after a later lease was out");
            }
        }
        verdict
    }
}

/// The counts of [`History::check`]: all but `redelivered` and
/// `unread_by_queue` must be 0.
#[derive(Debug, Default)]
pub struct Verdict {
    pub lost: u64,
    /// SUCCEEDED with an output that is not the handler's for the payload.
    pub conflicting: u64,
    /// FAILED or CANCELLED (the tests give every task attempts enough).
    pub failed: u64,
    /// Results, by queue or by id, for task ids no put acknowledged.
    pub never_put: u64,
    /// Results handed to two readers by queue, or to one twice.
    pub read_twice: u64,
    /// Tasks whose success was accepted from two different leases.
    pub doubly_accepted: u64,
    /// Tasks held under two valid leases at once (or a lease delivered
    /// twice).
    pub double_leased: u64,
    /// Tasks handed out more than once (attempts > 1): an effect of the
    /// faults, not a failure.
    pub redelivered: u64,
    /// Results no reader by queue received: sent on a stream that was cut,
    /// or set aside by a server that died (read by id instead).
    pub unread_by_queue: usize,
}

impl Verdict {
    /// Panics naming the counts unless every one that must be 0 is.
    pub fn assert_nothing_broken(&self) {
        assert_eq!(
            (
                self.lost,
                self.conflicting,
                self.failed,
                self.never_put,
                self.read_twice,
                self.doubly_accepted,
                self.double_leased
            ),
            (0, 0, 0, 0, 0, 0, 0),
            "lost, conflicting, failed, never put, read twice, two accepted successes, \
             double-leased"
        );
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} redelivered (attempts > 1), {} results unread by queue (read by id); lost {}, \
             conflicting {}, failed {}, never put {}, read twice by queue {}, two accepted \
             successes {}, double-leased {}",
            self.redelivered,
            self.unread_by_queue,
            self.lost,
            self.conflicting,
            self.failed,
            self.never_put,
            self.read_twice,
            self.doubly_accepted,
            self.double_leased
        )
    }
}

/// The handler every worker of these tests runs (`taskq worker --builtin
/// echo` too).
pub fn output_for(payload: &[u8]) -> Bytes {
    Bytes::copy_from_slice(payload)
}

/// The sequence number in a lease id (`TASK/SEQ`).
pub fn lease_seq(lease_id: &str) -> u32 {
    lease_id
        .rsplit('/')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// xorshift64: faults at random, reproducible per seed.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value; 0 is made odd).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Every result of `ids` that the server behind `client` holds, read by id
/// (WatchResults, 1,000 ids a call; where a call refuses an id it does not
/// know, each id of that chunk is asked for with GetResult). Gives up on a
/// chunk at `stop`.
///
/// # Panics
///
/// When a watch is refused for another reason than an unknown id.
pub async fn results_by_id(
    mut client: Client,
    ids: &[String],
    stop: Instant,
) -> HashMap<String, pb::Result> {
    let mut found = HashMap::new();
    for chunk in ids.chunks(1000) {
        let request = pb::WatchResultsRequest {
            target: Some(pb::watch_results_request::Target::TaskIds(pb::TaskIds {
                ids: chunk.to_vec(),
            })),
        };
        let mut results = match client.watch_results(request).await {
            Ok(results) => results.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                for id in chunk {
                    let request = pb::GetResultRequest {
                        target: Some(pb::get_result_request::Target::TaskId(id.clone())),
                        max_wait: Some(Duration::ZERO.try_into().unwrap()),
                    };
                    if let Ok(answer) = client.get_result(request).await {
                        if let Some(result) = answer.into_inner().result {
                            found.insert(id.clone(), result);
                        }
                    }
                }
                continue;
            }
            Err(status) => panic!("reading results by id: {status}"),
        };
        for _ in 0..chunk.len() {
            let timeout = stop.saturating_duration_since(Instant::now());
            match tokio::time::timeout(timeout, results.message()).await {
                Ok(Ok(Some(result))) => {
                    found.insert(result.task_id.clone(), result);
                }
                _ => break,
            }
        }
    }
    found
}
