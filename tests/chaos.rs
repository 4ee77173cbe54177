//! A bounded load test with faults, checked against its own history.
//!
//! Producers put tasks over real gRPC on loopback; workers take them with
//! short leases and misbehave at random: they vanish mid-task (no result),
//! drop their connection, or report retryable failures. Every call is
//! recorded; at the end a checker reads every task's result and reports
//! lost tasks (no result), conflicting results (not the output any worker
//! computed for it), unexpected ids, and duplicate completions (two
//! different leases both told their success was accepted). The test
//! requires 0 of each.
//!
//! Short by default (it runs in the test suite). The soak version is the
//! same test, bigger and still bounded:
//!
//! ```sh
//! TASKQ_CHAOS_TASKS=100000 cargo test --release --test chaos -- --nocapture
//! ```

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::TestServer;
use taskq::client::{Client, ClientOptions};
use taskq::pb::{self, put_result_request::Outcome};
use tokio::time::Instant;

const PRODUCERS: usize = 4;
const WORKERS: usize = 6;
const LEASE: Duration = Duration::from_millis(300);

/// What every call did, for the checker.
#[derive(Default)]
struct History {
    /// Task id -> payload, for every put that returned OK.
    put: HashMap<String, Bytes>,
    /// (task id, lease id) of every success report the server accepted.
    accepted: Vec<(String, String)>,
    vanished: u64,
    reconnects: u64,
    failures_reported: u64,
}

fn expected_output(payload: &[u8]) -> Bytes {
    let mut out = b"done:".to_vec();
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// xorshift64 per worker: faults at random but reproducible per seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn worker(url: String, seed: u64, history: Arc<Mutex<History>>, stop: Instant) {
    let mut rng = seed | 1;
    let mut client = Client::connect(&url, ClientOptions::default())
        .await
        .unwrap();
    while Instant::now() < stop {
        let request = pb::GetTaskRequest {
            queue: "chaos".into(),
            worker_id: format!("chaos-{seed}"),
            lease: prost_types::Duration::try_from(LEASE).ok(),
            max_wait: None,
        };
        let task = match client.get_task(request, Duration::from_millis(500)).await {
            Ok(Some(task)) => task,
            Ok(None) => continue,
            Err(_) => continue,
        };
        match next(&mut rng) % 100 {
            // Vanish: never report; the lease runs out.
            0..=9 => history.lock().unwrap().vanished += 1,
            // Drop the connection mid-task and come back on a new one.
            10..=14 => {
                client = Client::connect(&url, ClientOptions::default())
                    .await
                    .unwrap();
                history.lock().unwrap().reconnects += 1;
            }
            // A retryable failure.
            15..=19 => {
                let failure = pb::Failure {
                    message: "flaky".into(),
                    retry: true,
                    // At once: this test is about faults, not the backoff.
                    retry_after: Some(prost_types::Duration::default()),
                };
                if client
                    .put_result(&task, Outcome::Failure(failure))
                    .await
                    .is_ok()
                {
                    history.lock().unwrap().failures_reported += 1;
                }
            }
            // Work, sometimes slower than the lease, then report success.
            roll => {
                if roll >= 95 {
                    tokio::time::sleep(LEASE + Duration::from_millis(50)).await;
                }
                let output = expected_output(&task.payload);
                if client
                    .put_result(&task, Outcome::Output(output))
                    .await
                    .is_ok()
                {
                    history
                        .lock()
                        .unwrap()
                        .accepted
                        .push((task.id.clone(), task.lease_id.clone()));
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_task_is_lost_or_answered_twice_under_worker_faults() {
    let tasks: usize = std::env::var("TASKQ_CHAOS_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    // Bounded in time as well as in count.
    let deadline = Instant::now() + Duration::from_secs(60 + tasks as u64 / 200);
    let server = TestServer::spawn().await;
    let url = server.url();
    let history = Arc::new(Mutex::new(History::default()));

    let mut workers = Vec::new();
    for w in 0..WORKERS {
        workers.push(tokio::spawn(worker(
            url.clone(),
            0x5EED + w as u64 * 7919,
            history.clone(),
            deadline,
        )));
    }
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (url, history) = (url.clone(), history.clone());
        producers.push(tokio::spawn(async move {
            let client = Client::connect(&url, ClientOptions::default())
                .await
                .unwrap();
            for i in (p..tasks).step_by(PRODUCERS) {
                let payload = Bytes::from(format!("p{p}-t{i}"));
                let request = pb::PutTaskRequest {
                    queue: "chaos".into(),
                    payload: payload.clone(),
                    // Enough attempts that faults at these rates do not
                    // exhaust them: a FAILED result would be a finding.
                    max_attempts: 50,
                    ..Default::default()
                };
                if let Ok(put) = client.put_task(request).await {
                    history.lock().unwrap().put.insert(put.task_id, payload);
                }
            }
        }));
    }
    for producer in producers {
        producer.await.unwrap();
    }

    // The checker: every task put must get one result, the right one.
    let checker = Client::connect(&url, ClientOptions::default())
        .await
        .unwrap();
    let put: Vec<(String, Bytes)> = history.lock().unwrap().put.clone().into_iter().collect();
    assert_eq!(put.len(), tasks, "every put was acknowledged");
    let (mut lost, mut conflicting, mut failed) = (0, 0, 0);
    for chunk in put.chunks(1000) {
        let ids: Vec<String> = chunk.iter().map(|(id, _)| id.clone()).collect();
        let want: HashMap<&String, &Bytes> = chunk.iter().map(|(id, p)| (id, p)).collect();
        let target = pb::watch_results_request::Target::TaskIds(pb::TaskIds { ids });
        let mut results = checker.watch_results(target).await.unwrap();
        let mut seen = HashSet::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, results.message()).await {
                Ok(Ok(Some(result))) => {
                    let payload = want
                        .get(&result.task_id)
                        .expect("a result for an id that was put");
                    assert!(
                        seen.insert(result.task_id.clone()),
                        "a result delivered twice"
                    );
                    match result.state() {
                        pb::TaskState::Succeeded if result.output == expected_output(payload) => {}
                        pb::TaskState::Succeeded => conflicting += 1,
                        _ => failed += 1,
                    }
                }
                Ok(Ok(None)) => break,
                Ok(Err(status)) => panic!("watch failed: {status}"),
                Err(_) => break,
            }
        }
        lost += chunk.len() - seen.len();
    }
    for w in workers {
        w.abort();
    }

    let (duplicated, unexpected, vanished, reconnects, failures) = {
        let history = history.lock().unwrap();
        let mut per_task: HashMap<&String, HashSet<&String>> = HashMap::new();
        for (task, lease) in &history.accepted {
            per_task.entry(task).or_default().insert(lease);
        }
        (
            per_task.values().filter(|leases| leases.len() > 1).count(),
            per_task
                .keys()
                .filter(|id| !history.put.contains_key(**id))
                .count(),
            history.vanished,
            history.reconnects,
            history.failures_reported,
        )
    };
    println!(
        "chaos: {tasks} tasks; faults: {vanished} vanished, {reconnects} reconnects, {failures} retryable failures; \
         lost {lost}, conflicting {conflicting}, duplicated completions {duplicated}, unexpected ids {unexpected}, failed {failed}"
    );
    assert!(vanished > 0 && reconnects > 0, "the faults happened");
    assert_eq!(
        (lost, conflicting, duplicated, unexpected, failed),
        (0, 0, 0, 0, 0)
    );
    server.shutdown().await;
}
