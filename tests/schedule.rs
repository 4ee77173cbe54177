//! When tasks are handed out, over real gRPC on the store under test
//! (`scripts/test` runs this file on memory and on PostgreSQL): priorities,
//! delays, and the backoff of retried failures. Times are checked on the
//! server's own clock (the database's on PostgreSQL) where it reports them:
//! a task's `created_at` and its lease's start.

mod common;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{Client, TestServer, with_deadline};
use taskq::pb::{self, put_result_request::Outcome};
use taskq::server::{BrokerConfig, RetryBackoff};
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(10);
const LEASE: Duration = Duration::from_secs(30);

fn put_req(
    queue: &str,
    payload: String,
    priority: i32,
    delay: Option<Duration>,
) -> pb::PutTaskRequest {
    pb::PutTaskRequest {
        queue: queue.into(),
        payload: Bytes::from(payload),
        priority,
        delay: delay.map(|d| d.try_into().unwrap()),
        ..Default::default()
    }
}

/// The next task of `queue`, waiting at most `wait` for one.
async fn get(client: &mut Client, queue: &str, wait: Duration) -> Option<pb::Task> {
    let request = pb::GetTaskRequest {
        queue: queue.into(),
        worker_id: "tester".into(),
        lease: Some(LEASE.try_into().unwrap()),
        max_wait: Some(wait.try_into().unwrap()),
    };
    client
        .get_task(with_deadline(request, LONG + wait))
        .await
        .unwrap()
        .into_inner()
        .task
}

/// When the task's lease began, on the server's clock.
fn leased_at(task: &pb::Task) -> SystemTime {
    SystemTime::try_from(task.lease_expires_at.unwrap()).unwrap() - LEASE
}

fn created_at(task: &pb::Task) -> SystemTime {
    SystemTime::try_from(task.created_at.unwrap()).unwrap()
}

async fn stats(client: &mut Client, queue: &str) -> pb::QueueStats {
    let request = pb::GetStatsRequest {
        queue: queue.into(),
    };
    let mut stats = client
        .get_stats(with_deadline(request, LONG))
        .await
        .unwrap()
        .into_inner();
    stats.queues.remove(0)
}

async fn fail(client: &mut Client, task: &pb::Task, retry_after: Option<Duration>) -> i32 {
    let request = pb::PutResultRequest {
        task_id: task.id.clone(),
        lease_id: task.lease_id.clone(),
        outcome: Some(Outcome::Failure(pb::Failure {
            message: "flaky".into(),
            retry: true,
            retry_after: retry_after.map(|d| d.try_into().unwrap()),
        })),
    };
    client
        .put_result(with_deadline(request, LONG))
        .await
        .unwrap()
        .into_inner()
        .state
}

/// 300 tasks over five priorities, put in one batch while no worker waits,
/// come out highest priority first and in put order within each.
#[tokio::test]
async fn tasks_come_out_by_priority_then_in_put_order() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let tasks: Vec<pb::PutTaskRequest> = (0..300)
        .map(|i: i32| put_req("prio", format!("{i}"), (i * 7) % 5 - 2, None))
        .collect();
    let put = client
        .put_tasks(with_deadline(pb::PutTasksRequest { tasks }, LONG))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.outcomes.len(), 300);
    let mut order = Vec::new();
    while let Some(task) = get(&mut client, "prio", Duration::ZERO).await {
        order.push(
            std::str::from_utf8(&task.payload)
                .unwrap()
                .parse::<i32>()
                .unwrap(),
        );
    }
    let mut expected: Vec<i32> = (0..300).collect();
    expected.sort_by_key(|i| (-((i * 7) % 5 - 2), *i));
    assert_eq!(order, expected);
    server.shutdown().await;
}

/// A delayed task is counted apart from the pending ones and is not leased
/// before its put plus its delay, on the server's clock, even to a worker
/// waiting all along.
#[tokio::test]
async fn a_delayed_task_waits_its_delay() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let delay = Duration::from_millis(800);
    let request = put_req("later", "x".into(), 0, Some(delay));
    client.put_task(with_deadline(request, LONG)).await.unwrap();
    let s = stats(&mut client, "later").await;
    assert_eq!((s.pending, s.delayed), (0, 1));
    assert!(get(&mut client, "later", Duration::ZERO).await.is_none());
    let task = get(&mut client, "later", LONG)
        .await
        .expect("handed out after its delay");
    let waited = leased_at(&task).duration_since(created_at(&task)).unwrap();
    assert!(
        waited >= delay,
        "leased {waited:?} after its put, before its delay {delay:?}"
    );
    let s = stats(&mut client, "later").await;
    assert_eq!((s.pending, s.delayed, s.leased), (0, 0, 1));
    server.shutdown().await;
}

/// A delay not shorter than the ttl is INVALID_ARGUMENT, as is a negative
/// one, and neither stores anything.
#[tokio::test]
async fn a_delay_past_the_ttl_is_refused() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let mut request = put_req("bad", "x".into(), 0, Some(Duration::from_secs(5)));
    request.ttl = Some(Duration::from_secs(5).try_into().unwrap());
    let refused = client
        .put_task(with_deadline(request, LONG))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("ttl"), "{}", refused.message());
    let mut request = put_req("bad", "x".into(), 0, None);
    request.delay = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    let refused = client
        .put_task(with_deadline(request, LONG))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let s = stats(&mut client, "bad").await;
    assert_eq!((s.pending, s.delayed), (0, 0));
    server.shutdown().await;
}

/// A retried failure waits between half its backoff step and the whole of
/// it (the step doubles per failure), or exactly the worker's
/// `retry_after`; a delayed task can be cancelled and purged.
#[tokio::test]
async fn retried_failures_wait_their_backoff() {
    let step = Duration::from_millis(400);
    let server = TestServer::with_broker(BrokerConfig {
        retry_backoff: RetryBackoff {
            base: step,
            max: Duration::from_secs(60),
        },
        ..BrokerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    let request = pb::PutTaskRequest {
        max_attempts: 5,
        ..put_req("flaky", "x".into(), 0, None)
    };
    client.put_task(with_deadline(request, LONG)).await.unwrap();
    let mut task = get(&mut client, "flaky", Duration::ZERO).await.unwrap();
    for (wait, retry_after) in [(step, None), (2 * step, None), (step, Some(step))] {
        let failed_at = Instant::now();
        assert_eq!(
            fail(&mut client, &task, retry_after).await,
            pb::TaskState::Pending as i32
        );
        let s = stats(&mut client, "flaky").await;
        assert_eq!(
            (s.pending, s.delayed),
            (0, 1),
            "a retry waiting out its backoff"
        );
        task = get(&mut client, "flaky", LONG)
            .await
            .expect("back after its backoff");
        // At least half the step (all of it for an exact wait), measured
        // from before the failure was sent: never less than the server
        // waited.
        let least = if retry_after.is_some() {
            wait
        } else {
            wait / 2
        };
        let waited = failed_at.elapsed();
        assert!(
            waited >= least,
            "attempt {} back after {waited:?}",
            task.attempt
        );
    }
    assert_eq!(task.attempt, 4);
    // A delayed task cancelled, another purged.
    fail(&mut client, &task, Some(Duration::from_secs(60))).await;
    let request = pb::CancelTaskRequest {
        task_id: task.id.clone(),
    };
    let cancelled = client
        .cancel_task(with_deadline(request, LONG))
        .await
        .unwrap();
    assert_eq!(
        cancelled.into_inner().previous_state,
        pb::TaskState::Pending as i32
    );
    let request = put_req("flaky", "y".into(), 0, Some(Duration::from_secs(60)));
    client.put_task(with_deadline(request, LONG)).await.unwrap();
    let request = pb::QueueRequest {
        queue: "flaky".into(),
    };
    let purged = client
        .purge_queue(with_deadline(request, LONG))
        .await
        .unwrap();
    assert_eq!(purged.into_inner().purged, 1);
    let s = stats(&mut client, "flaky").await;
    assert_eq!((s.pending, s.delayed, s.leased), (0, 0, 0));
    server.shutdown().await;
}
