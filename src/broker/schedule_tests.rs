//! Engine tests of when tasks are handed out: priorities, delays and the
//! backoff of retried failures, on Tokio's paused clock (exact instants,
//! milliseconds of real time).

use std::time::Duration;

use bytes::Bytes;

use super::*;

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

fn q(name: &str) -> QueueName {
    QueueName::parse(name).unwrap()
}

fn task(payload: &str, priority: i32, delay: Option<Duration>) -> NewTask {
    NewTask {
        queue: Some(q("q")),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        priority,
        delay,
        ..NewTask::default()
    }
}

fn req(lease: Duration) -> LeaseRequest {
    LeaseRequest {
        queue: q("q"),
        worker: WorkerId::new("w").unwrap(),
        lease_duration: Some(lease),
    }
}

async fn put(b: &Broker, payload: &str, priority: i32, delay: Option<Duration>) -> TaskId {
    b.put(task(payload, priority, delay), Duration::ZERO)
        .await
        .unwrap()
        .task_id
}

/// The next task's payload, if one is ready now.
async fn next(b: &Broker) -> Option<LeasedTask> {
    b.lease(req(60 * SEC), Duration::ZERO).await.unwrap()
}

async fn payload_of_next(b: &Broker) -> Option<String> {
    next(b)
        .await
        .map(|t| String::from_utf8(t.payload.to_vec()).unwrap())
}

fn retry(after: Option<Duration>) -> Outcome {
    Outcome::Failure {
        message: "flaky".into(),
        retry: true,
        retry_after: after,
    }
}

fn stats(b: &Broker) -> QueueStats {
    b.stats(Some(&[q("q")])).queues.remove(0)
}

#[tokio::test(start_paused = true)]
async fn higher_priorities_go_first_and_fifo_within_one() {
    let b = Broker::new(BrokerConfig::default());
    for (payload, priority) in [("a0", 0), ("b5", 5), ("c-1", -1), ("d5", 5), ("e0", 0)] {
        put(&b, payload, priority, None).await;
    }
    let mut order = Vec::new();
    while let Some(payload) = payload_of_next(&b).await {
        order.push(payload);
    }
    assert_eq!(order, ["b5", "d5", "a0", "e0", "c-1"]);
    b.check();
}

/// A task whose lease ran out goes back to the head of its priority, not
/// behind the tasks of its priority put after it, nor before a higher one.
#[tokio::test(start_paused = true)]
async fn a_redelivered_task_keeps_its_place_at_the_head_of_its_priority() {
    let b = Broker::new(BrokerConfig::default());
    put(&b, "first", 1, None).await;
    put(&b, "second", 1, None).await;
    let first = b.lease(req(SEC), Duration::ZERO).await.unwrap().unwrap();
    put(&b, "urgent", 9, None).await;
    put(&b, "third", 1, None).await;
    tokio::time::advance(SEC + MS).await;
    tokio::task::yield_now().await;
    assert_eq!(stats(&b).pending, 4, "the lease ran out");
    let mut order = Vec::new();
    while let Some(t) = next(&b).await {
        order.push(String::from_utf8(t.payload.to_vec()).unwrap());
    }
    assert_eq!(order, ["urgent", "first", "second", "third"]);
    assert_eq!(first.attempt, 1);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_delayed_task_is_not_handed_out_before_its_time() {
    let b = Broker::new(BrokerConfig::default());
    let id = put(&b, "later", 0, Some(10 * SEC)).await;
    let s = stats(&b);
    assert_eq!((s.pending, s.delayed), (0, 1));
    // A worker waits from the start; it gets the task at 10 s, not before.
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.lease(req(60 * SEC), 60 * SEC).await })
    };
    tokio::time::advance(10 * SEC - MS).await;
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished(), "handed out before its delay");
    assert_eq!(stats(&b).delayed, 1);
    tokio::time::advance(MS).await;
    let got = waiting.await.unwrap().unwrap().unwrap();
    assert_eq!(got.id, id);
    let s = stats(&b);
    assert_eq!((s.pending, s.delayed, s.leased), (0, 0, 1));
    // Its wait for a worker counts from when it was due: none.
    assert_eq!(s.durations.wait.sum_nanos, 0);
    b.check();
}

/// A delayed task that comes due goes before the tasks put after it (its
/// place is its put), and its ttl runs from the put.
#[tokio::test(start_paused = true)]
async fn a_due_task_takes_its_place_by_put_and_its_ttl_runs_from_the_put() {
    let b = Broker::new(BrokerConfig::default());
    put(&b, "delayed", 0, Some(5 * SEC)).await;
    put(&b, "plain", 0, None).await;
    let mut short = task("short-lived", 0, Some(5 * SEC));
    short.ttl = Some(6 * SEC);
    let short = b.put(short, Duration::ZERO).await.unwrap().task_id;
    tokio::time::advance(5 * SEC).await;
    assert_eq!(payload_of_next(&b).await.as_deref(), Some("delayed"));
    assert_eq!(payload_of_next(&b).await.as_deref(), Some("plain"));
    tokio::time::advance(SEC).await;
    tokio::task::yield_now().await;
    // Put at 0 with a 6 s ttl: expired at 6 s, though due only at 5 s.
    let result = b.result(short, Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(result.state, TaskState::Failed);
    assert!(result.error.contains("expired"), "{}", result.error);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_delay_not_shorter_than_the_ttl_is_refused() {
    let b = Broker::new(BrokerConfig::default());
    let mut t = task("x", 0, Some(6 * SEC));
    t.ttl = Some(6 * SEC);
    let refused = b.put(t, Duration::ZERO).await.unwrap_err();
    assert!(
        matches!(&refused, BrokerError::InvalidArgument(m) if m.contains("ttl")),
        "{refused:?}"
    );
    let too_long = task("x", 0, Some(400 * 24 * 3600 * SEC));
    assert!(matches!(
        b.put(too_long, Duration::ZERO).await,
        Err(BrokerError::InvalidArgument(_))
    ));
    assert_eq!(stats(&b).enqueued, 0, "a refused put stores nothing");
}

/// Each retried failure waits a random point of the upper half of its
/// step: 1 s, then 2 s, then 4 s (the default backoff).
#[tokio::test(start_paused = true)]
async fn retried_failures_back_off_within_their_jitter_bounds() {
    let b = Broker::new(BrokerConfig::default());
    let mut t = task("x", 0, None);
    t.max_attempts = 4;
    b.put(t, Duration::ZERO).await.unwrap();
    let mut leased = next(&b).await.expect("ready");
    for step in [SEC, 2 * SEC, 4 * SEC] {
        assert_eq!(
            b.complete(leased.lease_id, retry(None)),
            Ok(TaskState::Pending)
        );
        let s = stats(&b);
        assert_eq!((s.pending, s.delayed), (0, 1));
        let started = tokio::time::Instant::now();
        // Nothing before half the step; by the whole step, the task.
        tokio::time::advance(step / 2 - MS).await;
        tokio::task::yield_now().await;
        assert!(next(&b).await.is_none(), "back before half of {step:?}");
        leased = b.lease(req(60 * SEC), step).await.unwrap().expect("back");
        let waited = started.elapsed();
        assert!(
            waited >= step / 2 && waited <= step,
            "waited {waited:?} for a step of {step:?}"
        );
    }
    assert_eq!(leased.attempt, 4);
    assert_eq!(stats(&b).retried_after_error, 3);
    b.check();
}

/// A worker's `retry_after` is the exact wait; a lease that ran out goes
/// back at once (the worker died, not the task).
#[tokio::test(start_paused = true)]
async fn retry_after_is_exact_and_a_lost_lease_goes_back_at_once() {
    let b = Broker::new(BrokerConfig::default());
    put(&b, "x", 0, None).await;
    let leased = next(&b).await.unwrap();
    b.complete(leased.lease_id, retry(Some(7 * SEC))).unwrap();
    tokio::time::advance(7 * SEC - MS).await;
    tokio::task::yield_now().await;
    assert!(next(&b).await.is_none());
    tokio::time::advance(MS).await;
    tokio::task::yield_now().await;
    let again = b.lease(req(SEC), Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(again.attempt, 2);
    tokio::time::advance(SEC).await;
    tokio::task::yield_now().await;
    let s = stats(&b);
    assert_eq!(
        (s.pending, s.delayed, s.retried_after_lease_expiry),
        (1, 0, 1)
    );
    assert_eq!(next(&b).await.unwrap().attempt, 3);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn cancel_and_purge_end_delayed_tasks() {
    let b = Broker::new(BrokerConfig::default());
    let cancelled = put(&b, "a", 0, Some(60 * SEC)).await;
    put(&b, "b", 0, Some(60 * SEC)).await;
    put(&b, "c", 3, None).await;
    assert_eq!(b.cancel(cancelled), Ok(TaskState::Pending));
    assert_eq!(b.purge(&q("q")), Ok(2));
    let s = stats(&b);
    assert_eq!((s.pending, s.delayed, s.cancelled), (0, 0, 3));
    // Their timers find nothing when they come due.
    tokio::time::advance(60 * SEC).await;
    assert!(next(&b).await.is_none());
    b.check();
}
