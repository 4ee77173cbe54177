//! Engine tests on Tokio's paused clock: leases and deadlines in
//! milliseconds of real time, with exact instants.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::types::{DEFAULT_QUEUE, MAX_ATTEMPTS_LIMIT, MAX_HEADER_BYTES, MAX_HEADERS};
use super::*;

const SEC: Duration = Duration::from_secs(1);

/// A broker whose retried failures go back at once: these tests are about
/// other things (`schedule_tests` covers the backoff).
fn broker() -> Broker {
    Broker::new(BrokerConfig {
        retry_backoff: RetryBackoff::NONE,
        ..BrokerConfig::default()
    })
}

fn q(name: &str) -> QueueName {
    QueueName::parse(name).unwrap()
}

fn task(queue: &str, payload: &str) -> NewTask {
    NewTask {
        queue: Some(q(queue)),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..NewTask::default()
    }
}

fn req(queue: &str, worker: &str, lease: Duration) -> LeaseRequest {
    LeaseRequest {
        queue: q(queue),
        worker: WorkerId::new(worker).unwrap(),
        lease_duration: Some(lease),
    }
}

/// Waits (from now, up to a minute) for a task of "q" to be handed out
/// again; returns it and how long that took.
async fn redelivered(b: &Broker) -> (LeasedTask, Duration) {
    let started = Instant::now();
    let again = b
        .lease(req("q", "w2", SEC), 60 * SEC)
        .await
        .unwrap()
        .unwrap();
    (again, started.elapsed())
}

/// The unclaimed results of "q" are exactly `ids`, handed out in order.
async fn assert_unclaimed_in_order(b: &Broker, ids: &[TaskId]) {
    assert_eq!(stats(b, "q").results_unclaimed, ids.len() as u64);
    for id in ids {
        let result = b.next_result(q("q"), Duration::ZERO).await.unwrap();
        assert_eq!(result.unwrap().task_id, *id);
    }
    b.check();
}

async fn put(b: &Broker, queue: &str, payload: &str) -> TaskId {
    b.put(task(queue, payload), Duration::ZERO)
        .await
        .unwrap()
        .task_id
}

async fn take(b: &Broker, queue: &str, lease: Duration) -> LeasedTask {
    b.lease(req(queue, "w1", lease), Duration::ZERO)
        .await
        .unwrap()
        .expect("a task is ready")
}

fn ok(output: &str) -> Outcome {
    Outcome::Success(Bytes::copy_from_slice(output.as_bytes()))
}

fn fail(message: &str, retry: bool) -> Outcome {
    Outcome::Failure {
        message: message.into(),
        retry,
        retry_after: None,
    }
}

fn stats(b: &Broker, queue: &str) -> QueueStats {
    b.stats(Some(&[q(queue)])).queues.remove(0)
}

#[tokio::test(start_paused = true)]
async fn hands_out_tasks_in_fifo_order() {
    let b = broker();
    let ids = [
        put(&b, "q", "a").await,
        put(&b, "q", "b").await,
        put(&b, "q", "c").await,
    ];
    for (id, payload) in ids.iter().zip(["a", "b", "c"]) {
        let t = take(&b, "q", SEC).await;
        assert_eq!(
            (t.id, &t.payload[..], t.attempt),
            (*id, payload.as_bytes(), 1)
        );
    }
    b.check();
}

#[tokio::test(start_paused = true)]
async fn ids_sort_by_creation() {
    let b = broker();
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(put(&b, "q", "x").await);
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 100);
}

#[tokio::test(start_paused = true)]
async fn queues_are_separate_and_empty_name_means_default() {
    let b = broker();
    put(&b, "a", "1").await;
    let id = b
        .put(NewTask::default(), Duration::ZERO)
        .await
        .unwrap()
        .task_id;
    assert!(
        b.lease(req("b", "w", SEC), Duration::ZERO)
            .await
            .unwrap()
            .is_none()
    );
    let t = take(&b, "", SEC).await;
    assert_eq!((t.id, t.queue.as_str()), (id, "default"));
    assert_eq!(take(&b, "a", SEC).await.payload, "1");
}

#[tokio::test(start_paused = true)]
async fn a_leased_task_goes_to_no_one_else() {
    let b = broker();
    put(&b, "q", "x").await;
    take(&b, "q", 10 * SEC).await;
    let started = Instant::now();
    let none = b.lease(req("q", "w2", SEC), 2 * SEC).await.unwrap();
    assert!(none.is_none());
    assert_eq!(started.elapsed(), 2 * SEC, "the wait lasts exactly `wait`");
    assert_eq!(stats(&b, "q").leased, 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_call_gets_a_task_put_later() {
    let b = broker();
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.lease(req("q", "w", SEC), 10 * SEC).await }
    });
    tokio::time::sleep(SEC).await;
    let id = put(&b, "q", "late").await;
    let got = waiting.await.unwrap().unwrap().unwrap();
    assert_eq!(got.id, id);
    assert_eq!(stats(&b, "q").leased, 1);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_redelivers_exactly_at_expiry_to_the_head() {
    let b = broker();
    let first = put(&b, "q", "first").await;
    let t = take(&b, "q", 5 * SEC).await;
    let second = put(&b, "q", "second").await;
    // The second task is free now; the first comes back only at expiry.
    assert_eq!(take(&b, "q", 60 * SEC).await.id, second);
    let (again, waited) = redelivered(&b).await;
    assert_eq!(again.id, first);
    assert_eq!(again.attempt, 2);
    assert_ne!(again.lease_id, t.lease_id);
    // Leased at t=0 for 5s; this call started at t=0 too.
    assert_eq!(waited, 5 * SEC, "redelivered at expiry, not before");
    assert_eq!(stats(&b, "q").redelivered, 1);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn redelivery_goes_ahead_of_newer_tasks() {
    let b = broker();
    let first = put(&b, "q", "first").await;
    take(&b, "q", SEC).await;
    put(&b, "q", "second").await;
    tokio::time::sleep(2 * SEC).await;
    assert_eq!(take(&b, "q", SEC).await.id, first);
}

#[tokio::test(start_paused = true)]
async fn the_last_lease_expiry_fails_the_task_visibly() {
    let b = broker();
    let mut t = task("q", "x");
    t.max_attempts = 2;
    let id = b.put(t, Duration::ZERO).await.unwrap().task_id;
    take(&b, "q", SEC).await;
    tokio::time::sleep(2 * SEC).await;
    assert_eq!(take(&b, "q", SEC).await.attempt, 2);
    let result = b.result(id, 10 * SEC).await.unwrap().unwrap();
    assert_eq!(result.state, TaskState::Failed);
    assert_eq!(result.attempts, 2);
    assert!(result.error.contains("lease expired"), "{}", result.error);
    assert_eq!(result.worker.unwrap().as_str(), "w1");
    let s = stats(&b, "q");
    assert_eq!((s.failed, s.pending, s.leased, s.redelivered), (1, 0, 0, 1));
    b.check();
}

#[tokio::test(start_paused = true)]
async fn zero_max_attempts_means_the_default_of_three() {
    let b = broker();
    put(&b, "q", "x").await;
    assert_eq!(take(&b, "q", SEC).await.max_attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn extend_moves_expiry_for_the_holder_only() {
    let b = broker();
    let id = put(&b, "q", "x").await;
    let t = take(&b, "q", 2 * SEC).await;
    tokio::time::sleep(SEC).await;
    b.extend(t.lease_id, Some(5 * SEC)).unwrap();
    // The old expiry (t=2s) passes without redelivery; the new one is t=6s.
    let (again, waited) = redelivered(&b).await;
    assert_eq!(waited, 5 * SEC);
    assert_eq!(again.attempt, 2);
    // The first holder's lease is no longer current.
    assert!(matches!(
        b.extend(t.lease_id, None),
        Err(BrokerError::StaleLease { .. })
    ));
    b.complete(again.lease_id, ok("done")).unwrap();
    assert_eq!(
        b.extend(again.lease_id, None),
        Err(BrokerError::TaskFinished(id))
    );
    let unknown = LeaseId {
        task: TaskId::generate(),
        seq: 1,
    };
    assert!(matches!(
        b.extend(unknown, None),
        Err(BrokerError::TaskNotFound(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn leases_are_clamped_to_the_maximum() {
    let b = Broker::new(BrokerConfig {
        max_lease: 10 * SEC,
        default_lease: 3 * SEC,
        ..BrokerConfig::default()
    });
    put(&b, "q", "x").await;
    let now = std::time::SystemTime::now();
    let t = take(&b, "q", 3600 * SEC).await;
    let granted = t.lease_expires_at.duration_since(now).unwrap();
    assert!(
        granted <= 10 * SEC + Duration::from_millis(50),
        "{granted:?}"
    );
    let extended = b.extend(t.lease_id, Some(3600 * SEC)).unwrap();
    assert!(extended.duration_since(now).unwrap() <= 10 * SEC + Duration::from_millis(50));
    // No lease given: the default.
    put(&b, "q", "y").await;
    let t = b
        .lease(
            LeaseRequest {
                lease_duration: None,
                ..req("q", "w", SEC)
            },
            Duration::ZERO,
        )
        .await
        .unwrap()
        .unwrap();
    let granted = t.lease_expires_at.duration_since(now).unwrap();
    assert!(
        granted >= 3 * SEC - Duration::from_millis(50)
            && granted <= 3 * SEC + Duration::from_millis(50)
    );
}

#[tokio::test(start_paused = true)]
async fn results_are_write_once() {
    let b = broker();
    let id = put(&b, "q", "x").await;
    let t = take(&b, "q", SEC).await;
    assert_eq!(b.complete(t.lease_id, ok("out")), Ok(TaskState::Succeeded));
    // The same call again: a client retrying after a lost answer.
    assert_eq!(b.complete(t.lease_id, ok("out")), Ok(TaskState::Succeeded));
    assert_eq!(
        b.complete(t.lease_id, ok("other")),
        Err(BrokerError::ResultConflict(id))
    );
    assert_eq!(
        b.complete(t.lease_id, fail("no", false)),
        Err(BrokerError::ResultConflict(id))
    );
    let result = b.result(id, Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(
        (&result.output[..], result.state),
        (&b"out"[..], TaskState::Succeeded)
    );
    assert_eq!(result.attempts, 1);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_late_success_counts_but_a_late_failure_is_stale() {
    let b = broker();
    let id = put(&b, "q", "x").await;
    let old = take(&b, "q", SEC).await;
    tokio::time::sleep(2 * SEC).await;
    let current = take(&b, "q", SEC).await;
    assert_eq!(current.attempt, 2);
    assert!(matches!(
        b.complete(old.lease_id, fail("late", false)),
        Err(BrokerError::StaleLease { .. })
    ));
    assert_eq!(
        b.complete(old.lease_id, ok("late")),
        Ok(TaskState::Succeeded)
    );
    let result = b.result(id, Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(result.worker.unwrap().as_str(), "w1");
    // The current holder's report now conflicts.
    assert_eq!(
        b.complete(current.lease_id, ok("mine")),
        Err(BrokerError::ResultConflict(id))
    );
    assert_eq!(stats(&b, "q").leased, 0);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_lease_never_issued_is_stale() {
    let b = broker();
    let id = put(&b, "q", "x").await;
    take(&b, "q", SEC).await;
    let forged = LeaseId { task: id, seq: 7 };
    assert!(matches!(
        b.complete(forged, ok("x")),
        Err(BrokerError::StaleLease { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn retried_failures_go_to_the_front_until_attempts_run_out() {
    let b = broker();
    let mut t = task("q", "x");
    t.max_attempts = 2;
    let id = b.put(t, Duration::ZERO).await.unwrap().task_id;
    put(&b, "q", "behind").await;
    let first = take(&b, "q", SEC).await;
    assert_eq!(
        b.complete(first.lease_id, fail("flaky", true)),
        Ok(TaskState::Pending)
    );
    // Repeating the same report is answered the same way and changes nothing.
    assert_eq!(
        b.complete(first.lease_id, fail("flaky", true)),
        Ok(TaskState::Pending)
    );
    let second = take(&b, "q", SEC).await;
    assert_eq!((second.id, second.attempt), (id, 2));
    assert_eq!(
        b.complete(second.lease_id, fail("flaky", true)),
        Ok(TaskState::Failed)
    );
    let result = b.result(id, Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(
        (result.state, result.error.as_str()),
        (TaskState::Failed, "flaky")
    );
    let s = stats(&b, "q");
    assert_eq!((s.failed, s.redelivered, s.pending), (1, 1, 1));
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_failure_without_retry_is_final() {
    let b = broker();
    let id = put(&b, "q", "x").await;
    let t = take(&b, "q", SEC).await;
    assert_eq!(
        b.complete(t.lease_id, fail("bad input", false)),
        Ok(TaskState::Failed)
    );
    assert_eq!(
        b.result(id, Duration::ZERO).await.unwrap().unwrap().error,
        "bad input"
    );
}

#[tokio::test(start_paused = true)]
async fn idempotency_keys_deduplicate_per_queue_while_held() {
    let b = Broker::new(BrokerConfig {
        result_ttl: 10 * SEC,
        ..BrokerConfig::default()
    });
    let keyed = |queue: &str| NewTask {
        idempotency_key: Some("k1".into()),
        ..task(queue, "x")
    };
    let first = b.put(keyed("q"), Duration::ZERO).await.unwrap();
    let again = b.put(keyed("q"), Duration::ZERO).await.unwrap();
    assert!(!first.duplicate);
    assert_eq!((again.task_id, again.duplicate), (first.task_id, true));
    assert_eq!(stats(&b, "q").pending, 1);
    let other = b.put(keyed("other"), Duration::ZERO).await.unwrap();
    assert!(!other.duplicate);
    // Still a duplicate while the result is held...
    let t = take(&b, "q", SEC).await;
    b.complete(t.lease_id, ok("done")).unwrap();
    assert!(b.put(keyed("q"), Duration::ZERO).await.unwrap().duplicate);
    // ...and a new task once it is gone.
    tokio::time::sleep(11 * SEC).await;
    let later = b.put(keyed("q"), Duration::ZERO).await.unwrap();
    assert!(!later.duplicate);
    assert_ne!(later.task_id, first.task_id);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_or_waits_for_room() {
    let b = Broker::new(BrokerConfig {
        queue_capacity: 2,
        ..BrokerConfig::default()
    });
    put(&b, "q", "1").await;
    put(&b, "q", "2").await;
    assert!(matches!(
        b.put(task("q", "3"), Duration::ZERO).await,
        Err(BrokerError::QueueFull { capacity: 2, .. })
    ));
    // A leased task still counts against capacity.
    let t = take(&b, "q", 60 * SEC).await;
    let started = Instant::now();
    assert!(matches!(
        b.put(task("q", "3"), 3 * SEC).await,
        Err(BrokerError::QueueFull { .. })
    ));
    assert_eq!(started.elapsed(), 3 * SEC);
    // Other queues are not affected.
    put(&b, "other", "x").await;
    // A waiting put goes in as soon as a task finishes.
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.put(task("q", "3"), 60 * SEC).await }
    });
    tokio::time::sleep(SEC).await;
    assert!(!waiting.is_finished());
    b.complete(t.lease_id, ok("done")).unwrap();
    let stored = waiting.await.unwrap().unwrap();
    assert!(!stored.duplicate);
    assert_eq!(stats(&b, "q").pending, 2);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn puts_waiting_for_room_each_go_in_as_room_comes() {
    let b = Broker::new(BrokerConfig {
        queue_capacity: 1,
        ..BrokerConfig::default()
    });
    put(&b, "q", "1").await;
    let waiting: Vec<_> = ["2", "3"]
        .into_iter()
        .map(|payload| {
            let b = b.clone();
            tokio::spawn(async move { b.put(task("q", payload), 60 * SEC).await })
        })
        .collect();
    tokio::task::yield_now().await;
    // One finish makes room for one: the other put finds the queue full
    // again and must be woken by the next finish, not left to its deadline.
    let started = Instant::now();
    let next = || async {
        let request = req("q", "w1", 60 * SEC);
        b.lease(request, 60 * SEC).await.unwrap().expect("a task")
    };
    let first = next().await;
    b.complete(first.lease_id, ok("done")).unwrap();
    let second = next().await;
    b.complete(second.lease_id, ok("done")).unwrap();
    let third = next().await;
    assert_eq!(started.elapsed(), Duration::ZERO);
    b.complete(third.lease_id, ok("done")).unwrap();
    for put in waiting {
        assert!(put.await.unwrap().is_ok());
    }
    assert_eq!(stats(&b, "q").succeeded, 3);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn bad_tasks_are_refused_with_reasons() {
    let b = Broker::new(BrokerConfig {
        max_payload: 10,
        ..BrokerConfig::default()
    });
    assert_eq!(
        b.put(task("q", "01234567890"), Duration::ZERO).await,
        Err(BrokerError::PayloadTooLarge {
            size: 11,
            limit: 10
        })
    );
    let too_many = NewTask {
        max_attempts: MAX_ATTEMPTS_LIMIT + 1,
        ..task("q", "x")
    };
    assert!(matches!(
        b.put(too_many, Duration::ZERO).await,
        Err(BrokerError::InvalidArgument(_))
    ));
    let headers = (0..=MAX_HEADERS)
        .map(|i| (i.to_string(), String::new()))
        .collect();
    let many_headers = NewTask {
        headers,
        ..task("q", "x")
    };
    assert!(matches!(
        b.put(many_headers, Duration::ZERO).await,
        Err(BrokerError::InvalidArgument(_))
    ));
    let big_header = NewTask {
        headers: [("k".to_string(), "v".repeat(MAX_HEADER_BYTES))].into(),
        ..task("q", "x")
    };
    assert!(matches!(
        b.put(big_header, Duration::ZERO).await,
        Err(BrokerError::InvalidArgument(_))
    ));
    assert_eq!(stats(&b, "q").pending, 0, "nothing stored");
    for bad in ["", "a b", "ü", "a/b", &"x".repeat(129)] {
        if !bad.is_empty() {
            assert!(QueueName::parse(bad).is_err(), "{bad:?}");
        }
    }
    assert!(QueueName::parse(&"x".repeat(128)).is_ok());
    assert!(QueueName::parse("A-z_0.9").is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_pending_task_expires_at_its_ttl() {
    let b = broker();
    let with_ttl = NewTask {
        ttl: Some(5 * SEC),
        ..task("q", "x")
    };
    let id = b.put(with_ttl, Duration::ZERO).await.unwrap().task_id;
    let started = Instant::now();
    let result = b.result(id, 60 * SEC).await.unwrap().unwrap();
    assert_eq!(started.elapsed(), 5 * SEC);
    assert_eq!(result.state, TaskState::Failed);
    assert!(result.error.contains("expired"), "{}", result.error);
    assert_eq!(result.attempts, 0);
    assert!(
        b.lease(req("q", "w", SEC), Duration::ZERO)
            .await
            .unwrap()
            .is_none()
    );
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_task_past_its_ttl_is_not_redelivered() {
    let b = broker();
    let with_ttl = NewTask {
        ttl: Some(3 * SEC),
        ..task("q", "x")
    };
    let id = b.put(with_ttl, Duration::ZERO).await.unwrap().task_id;
    let t = take(&b, "q", 10 * SEC).await;
    assert!(t.expires_at.is_some());
    // The ttl passes while leased; the lease's expiry then ends the task.
    let result = b.result(id, 60 * SEC).await.unwrap().unwrap();
    assert!(result.error.contains("expired"), "{}", result.error);
    assert!(
        b.lease(req("q", "w", SEC), Duration::ZERO)
            .await
            .unwrap()
            .is_none()
    );
    // A retried failure after the ttl ends it too.
    let with_ttl = NewTask {
        ttl: Some(3 * SEC),
        ..task("q", "y")
    };
    b.put(with_ttl, Duration::ZERO).await.unwrap();
    let t = take(&b, "q", 10 * SEC).await;
    tokio::time::sleep(4 * SEC).await;
    assert_eq!(
        b.complete(t.lease_id, fail("try again", true)),
        Ok(TaskState::Failed)
    );
    b.check();
}

#[tokio::test(start_paused = true)]
async fn results_by_id_wait_and_repeat() {
    let b = broker();
    let id = put(&b, "q", "x").await;
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.result(id, 60 * SEC).await }
    });
    let t = take(&b, "q", SEC).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    b.complete(t.lease_id, ok("42")).unwrap();
    let result = waiting.await.unwrap().unwrap().unwrap();
    assert_eq!(&result.output[..], b"42");
    assert_eq!(b.result(id, Duration::ZERO).await.unwrap().unwrap(), result);
    assert!(matches!(
        b.result(TaskId::generate(), Duration::ZERO).await,
        Err(BrokerError::TaskNotFound(_))
    ));
    // An unfinished task's wait ends empty at the deadline.
    let other = put(&b, "q", "y").await;
    assert_eq!(b.result(other, 2 * SEC).await.unwrap(), None);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn queue_results_come_in_completion_order_once_each() {
    let b = broker();
    let a = put(&b, "q", "a").await;
    let c = put(&b, "q", "c").await;
    let ta = take(&b, "q", SEC).await;
    let tc = take(&b, "q", SEC).await;
    b.complete(tc.lease_id, ok("C")).unwrap();
    b.complete(ta.lease_id, fail("A", false)).unwrap();
    assert_eq!(stats(&b, "q").results_unclaimed, 2);
    let first = b
        .next_result(q("q"), Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    let second = b
        .next_result(q("q"), Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.task_id, second.task_id), (c, a));
    assert_eq!(second.state, TaskState::Failed);
    assert_eq!(b.next_result(q("q"), SEC).await.unwrap(), None);
    // By id they are still there.
    assert!(b.result(a, Duration::ZERO).await.unwrap().is_some());
    // A waiting reader gets the next one as it finishes.
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.next_result(q("q"), 60 * SEC).await }
    });
    let id = put(&b, "q", "d").await;
    let t = take(&b, "q", SEC).await;
    tokio::time::sleep(SEC).await;
    b.complete(t.lease_id, ok("D")).unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().unwrap().task_id, id);
    assert_eq!(stats(&b, "q").results_unclaimed, 0);
    b.check();
}

/// Puts, takes and completes `n` tasks of `queue`; their ids in
/// completion order.
async fn finish_tasks(b: &Broker, queue: &str, n: usize) -> Vec<TaskId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = put(b, queue, &i.to_string()).await;
        let t = take(b, queue, SEC).await;
        b.complete(t.lease_id, ok("done")).unwrap();
        ids.push(id);
    }
    ids
}

#[tokio::test(start_paused = true)]
async fn result_streams_take_turns_and_each_result_goes_out_once() {
    let b = broker();
    let mut one = b.open_result_stream(&q("q")).unwrap();
    let mut two = b.open_result_stream(&q("q")).unwrap();
    let ids = finish_tasks(&b, "q", 4).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(one.next().await.unwrap().task_id);
        got.push(two.next().await.unwrap().task_id);
    }
    // Round robin: the first reader got the 1st and 3rd, the second the
    // 2nd and 4th.
    assert_eq!(got, [ids[0], ids[1], ids[2], ids[3]]);
    assert_eq!(b.next_result(q("q"), Duration::ZERO).await.unwrap(), None);
    // A waiting GetResult(queue) call comes before the streams.
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.next_result(q("q"), 60 * SEC).await }
    });
    tokio::time::sleep(SEC).await;
    let next = finish_tasks(&b, "q", 1).await;
    assert_eq!(waiting.await.unwrap().unwrap().unwrap().task_id, next[0]);
    drop((one, two));
    assert_eq!(stats(&b, "q").results_unclaimed, 0);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_result_stream_holds_at_most_its_window_and_is_refilled() {
    let b = broker();
    let half = RESULT_STREAM_WINDOW / 2;
    let ids = finish_tasks(&b, "q", RESULT_STREAM_WINDOW + half).await;
    let mut stream = b.open_result_stream(&q("q")).unwrap();
    // The window's worth is in the stream's hands; the rest waits in the
    // queue, where another result stream could take it.
    let waiting = half as u64;
    assert_eq!(stats(&b, "q").results_unclaimed, waiting);
    let mut got = Vec::new();
    for _ in 0..half - 1 {
        got.push(stream.next().await.unwrap().task_id);
    }
    // Not refilled one result at a time...
    assert_eq!(stats(&b, "q").results_unclaimed, waiting);
    got.push(stream.next().await.unwrap().task_id);
    // ...but once half empty, with all that waited.
    assert_eq!(stats(&b, "q").results_unclaimed, 0);
    while got.len() < ids.len() {
        got.push(stream.next().await.unwrap().task_id);
    }
    assert_eq!(got, ids, "every result once, in completion order");
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_dropped_result_stream_gives_back_what_it_held_in_order() {
    let b = broker();
    let ids = finish_tasks(&b, "q", 3).await;
    let mut stream = b.open_result_stream(&q("q")).unwrap();
    assert_eq!(stream.next().await.unwrap().task_id, ids[0]);
    assert_eq!(stats(&b, "q").results_unclaimed, 0);
    drop(stream);
    assert_unclaimed_in_order(&b, &ids[1..]).await;
}

/// A result put back (it did not fit a batch) is the next one taken, and
/// goes back first, ahead of the rest, if the stream is dropped.
#[tokio::test(start_paused = true)]
async fn a_result_put_back_comes_next_or_goes_back_first() {
    let b = broker();
    let ids = finish_tasks(&b, "q", 3).await;
    let mut stream = b.open_result_stream(&q("q")).unwrap();
    let first = stream.next().await.unwrap();
    stream.put_back(first);
    assert_eq!(stream.next().await.unwrap().task_id, ids[0]);
    let second = stream.next().await.unwrap();
    stream.put_back(second);
    drop(stream);
    assert_unclaimed_in_order(&b, &ids[1..]).await;
}

#[tokio::test(start_paused = true)]
async fn closing_ends_result_streams_after_what_they_hold() {
    let b = broker();
    let ids = finish_tasks(&b, "q", 1).await;
    let mut stream = b.open_result_stream(&q("q")).unwrap();
    b.close();
    assert_eq!(stream.next().await.unwrap().task_id, ids[0]);
    assert_eq!(stream.next().await, None);
    drop(stream);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn results_are_dropped_by_age_and_by_count() {
    let b = Broker::new(BrokerConfig {
        result_ttl: 60 * SEC,
        max_results: 2,
        ..BrokerConfig::default()
    });
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = put(&b, "q", &i.to_string()).await;
        let t = take(&b, "q", SEC).await;
        b.complete(t.lease_id, ok("r")).unwrap();
        ids.push(id);
    }
    // The count bound dropped the oldest result.
    assert!(matches!(
        b.result(ids[0], Duration::ZERO).await,
        Err(BrokerError::TaskNotFound(_))
    ));
    assert!(b.result(ids[1], Duration::ZERO).await.unwrap().is_some());
    let s = stats(&b, "q");
    assert_eq!((s.results_unclaimed, s.results_evicted), (2, 1));
    assert_eq!(b.holdings().results, 2);
    // The age bound drops the rest.
    tokio::time::sleep(61 * SEC).await;
    assert!(b.result(ids[2], Duration::ZERO).await.is_err());
    assert_eq!(b.holdings().results, 0);
    assert_eq!(b.next_result(q("q"), Duration::ZERO).await.unwrap(), None);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiting_call_takes_no_task() {
    let b = broker();
    // Poll the lease future once (it registers as a waiter), then drop it.
    {
        let fut = b.lease(req("q", "w", SEC), 60 * SEC);
        tokio::pin!(fut);
        assert!(futures_poll_once(fut.as_mut()).await.is_none());
    }
    let id = put(&b, "q", "x").await;
    assert_eq!(take(&b, "q", SEC).await.id, id);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_task_handed_to_a_call_that_is_gone_goes_back_at_once() {
    let b = broker();
    let mut fut = Box::pin(b.lease(req("q", "gone", SEC), 60 * SEC));
    assert!(futures_poll_once(fut.as_mut()).await.is_none());
    // The put hands the task to the waiting call inside the lock...
    let id = put(&b, "q", "x").await;
    assert_eq!(stats(&b, "q").leased, 1);
    // ...which is dropped before it returns: the task is back, first
    // delivery not counted.
    drop(fut);
    let t = take(&b, "q", SEC).await;
    assert_eq!((t.id, t.attempt), (id, 1));
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_result_handed_to_a_call_that_is_gone_goes_back() {
    let b = broker();
    let mut fut = Box::pin(b.next_result(q("q"), 60 * SEC));
    assert!(futures_poll_once(fut.as_mut()).await.is_none());
    let id = put(&b, "q", "x").await;
    let t = take(&b, "q", SEC).await;
    b.complete(t.lease_id, ok("r")).unwrap();
    drop(fut);
    let result = b
        .next_result(q("q"), Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(result.task_id, id);
    b.check();
}

/// Every waiting call, polled k times and then dropped, for every k up to
/// its completion, leaves the broker consistent and takes nothing with it.
#[tokio::test(start_paused = true)]
async fn every_waiting_call_is_cancellation_safe() {
    for k in 0..4 {
        let b = Broker::new(BrokerConfig {
            queue_capacity: 1,
            ..BrokerConfig::default()
        });
        // A task waiting for a result, and a full queue "q".
        let unfinished = put(&b, "q", "x").await;

        assert!(!poll_then_drop(k, b.lease(req("empty", "w", SEC), 10 * SEC)).await);
        b.check();
        let id = put(&b, "empty", "y").await;
        let s = stats(&b, "empty");
        assert_eq!(
            (s.pending, s.leased),
            (1, 0),
            "k={k}: a dropped call took a task"
        );

        assert!(!poll_then_drop(k, b.put(task("q", "z"), 10 * SEC)).await);
        b.check();
        assert_eq!(
            stats(&b, "q").pending,
            1,
            "k={k}: a dropped put stored a task"
        );

        assert!(!poll_then_drop(k, b.result(unfinished, 10 * SEC)).await);
        b.check();

        assert!(!poll_then_drop(k, b.next_result(q("empty"), 10 * SEC)).await);
        b.check();
        let t = take(&b, "empty", SEC).await;
        assert_eq!(t.id, id);
        b.complete(t.lease_id, ok("r")).unwrap();
        assert_eq!(
            stats(&b, "empty").results_unclaimed,
            1,
            "k={k}: a dropped call took a result"
        );
        b.check();
    }
}

/// The other half of cancellation safety: every waiting call, polled k
/// times, then handed what it waits for (inside the lock, as the broker
/// does), then dropped before it is polled again, for every k up to the
/// poll that completes it. What it was handed goes back; nothing is taken
/// or stored by a call nobody reads; and polled on, it completes.
#[tokio::test(start_paused = true)]
async fn every_waiting_call_gives_back_what_it_was_handed_when_dropped() {
    for k in 1..=3 {
        for drop_it in [true, false] {
            let b = Broker::new(BrokerConfig {
                queue_capacity: 1,
                ..BrokerConfig::default()
            });
            let what = format!("k={k}, dropped={drop_it}");

            // GetTask: a task arrives for it, then it is dropped.
            // Boxed, so that dropping it drops the call.
            let mut lease = Box::pin(b.lease(req("a", "w", SEC), 10 * SEC));
            for _ in 0..k {
                assert!(futures_poll_once(lease.as_mut()).await.is_none());
            }
            let id = put(&b, "a", "task").await;
            if drop_it {
                drop(lease);
                let s = stats(&b, "a");
                assert_eq!((s.pending, s.leased), (1, 0), "{what}: the task came back");
                let again = take(&b, "a", SEC).await;
                assert_eq!((again.id, again.attempt), (id, 1), "{what}: not counted");
            } else {
                let leased = lease.await.unwrap().expect("handed the task");
                assert_eq!(leased.id, id);
            }
            b.check();

            // A put waiting for room: room comes, then it is dropped.
            let held = put(&b, "full", "first").await;
            let mut waiting_put = Box::pin(b.put(task("full", "second"), 10 * SEC));
            for _ in 0..k {
                assert!(futures_poll_once(waiting_put.as_mut()).await.is_none());
            }
            let t = take(&b, "full", SEC).await;
            assert_eq!(t.id, held);
            b.complete(t.lease_id, ok("done")).unwrap();
            if drop_it {
                drop(waiting_put);
                assert_eq!(stats(&b, "full").pending, 0, "{what}: a dropped put stored");
            } else {
                waiting_put.await.expect("stored once room came");
                assert_eq!(stats(&b, "full").pending, 1);
            }
            b.check();

            // GetResult by id: the result comes, then it is dropped.
            let unfinished = put(&b, "r", "x").await;
            let mut by_id = Box::pin(b.result(unfinished, 10 * SEC));
            for _ in 0..k {
                assert!(futures_poll_once(by_id.as_mut()).await.is_none());
            }
            let t = take(&b, "r", SEC).await;
            b.complete(t.lease_id, ok("out")).unwrap();
            if drop_it {
                drop(by_id);
            } else {
                let result = by_id.await.unwrap().expect("the result");
                assert_eq!(result.output, Bytes::from("out"));
            }
            // Not consumed either way: it is still there by id and by queue.
            assert!(
                b.result(unfinished, Duration::ZERO)
                    .await
                    .unwrap()
                    .is_some()
            );
            assert_eq!(stats(&b, "r").results_unclaimed, 1, "{what}");
            b.check();

            // GetResult by queue: the result is handed to it, then it is
            // dropped: the result goes back to the head of the queue's.
            let mut by_queue = Box::pin(b.next_result(q("n"), 10 * SEC));
            for _ in 0..k {
                assert!(futures_poll_once(by_queue.as_mut()).await.is_none());
            }
            let done = put(&b, "n", "y").await;
            let t = take(&b, "n", SEC).await;
            b.complete(t.lease_id, ok("y")).unwrap();
            if drop_it {
                drop(by_queue);
                assert_eq!(stats(&b, "n").results_unclaimed, 1, "{what}: given back");
                let next = b.next_result(q("n"), Duration::ZERO).await.unwrap();
                assert_eq!(next.map(|r| r.task_id), Some(done));
            } else {
                let result = by_queue.await.unwrap().expect("the result");
                assert_eq!(result.task_id, done);
                assert_eq!(stats(&b, "n").results_unclaimed, 0);
            }
            b.check();
        }
    }
}

/// Polls `fut` up to k times, then drops it. True if it finished.
async fn poll_then_drop<F: std::future::Future>(k: usize, fut: F) -> bool {
    tokio::pin!(fut);
    for _ in 0..k {
        if futures_poll_once(fut.as_mut()).await.is_some() {
            return true;
        }
    }
    false
}

/// Polls a future once; `Some` if it finished.
async fn futures_poll_once<F: std::future::Future>(
    fut: std::pin::Pin<&mut F>,
) -> Option<F::Output> {
    let mut fut = Some(fut);
    std::future::poll_fn(move |cx| {
        let f = fut.take().expect("polled once");
        std::task::Poll::Ready(match f.poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn closing_answers_waiting_calls_at_once() {
    let b = broker();
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.lease(req("q", "w", SEC), 600 * SEC).await }
    });
    tokio::time::sleep(SEC).await;
    let started = Instant::now();
    b.close();
    assert_eq!(waiting.await.unwrap().unwrap(), None);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(
        b.put(task("q", "x"), Duration::ZERO).await,
        Err(BrokerError::ShuttingDown)
    );
}

#[tokio::test(start_paused = true)]
async fn stats_report_workers_and_their_liveness() {
    let b = Broker::new(BrokerConfig {
        worker_timeout: 10 * SEC,
        ..BrokerConfig::default()
    });
    put(&b, "q", "x").await;
    let t = take(&b, "q", 60 * SEC).await;
    let worker = &b.stats(None).workers[0];
    assert_eq!(
        (worker.worker.as_str(), worker.in_flight, worker.alive),
        ("w1", 1, true)
    );
    assert_eq!(worker.queue.as_ref().unwrap().as_str(), "q");
    tokio::time::sleep(11 * SEC).await;
    assert!(!b.stats(None).workers[0].alive);
    b.extend(t.lease_id, None).unwrap();
    assert!(
        b.stats(None).workers[0].alive,
        "an extension counts as a sign of life"
    );
    b.complete(t.lease_id, ok("r")).unwrap();
    assert_eq!(b.stats(None).workers[0].in_flight, 0);
    put(&b, "q", "y").await;
    tokio::time::sleep(5 * SEC).await;
    let s = stats(&b, "q");
    assert_eq!(s.oldest_pending_age, 5 * SEC);
    assert_eq!((s.succeeded, s.pending), (1, 1));
    // An unknown queue reports zeros rather than an error.
    assert_eq!(stats(&b, "nothing").pending, 0);
}

/// Many producers and consumers on a multi-threaded runtime: every task is
/// completed exactly once and none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_producers_and_consumers_complete_every_task_once() {
    const PRODUCERS: usize = 4;
    const CONSUMERS: usize = 4;
    const PER_PRODUCER: usize = 500;
    let b = broker();
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let b = b.clone();
        producers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..PER_PRODUCER {
                let t = task("q", &format!("{p}-{i}"));
                ids.push(b.put(t, 10 * SEC).await.unwrap().task_id);
            }
            ids
        }));
    }
    let completed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut consumers = Vec::new();
    for c in 0..CONSUMERS {
        let b = b.clone();
        let completed = completed.clone();
        consumers.push(tokio::spawn(async move {
            let worker = format!("w{c}");
            while let Some(t) = b
                .lease(req("q", &worker, 30 * SEC), Duration::from_millis(200))
                .await
                .unwrap()
            {
                b.complete(t.lease_id, Outcome::Success(t.payload.clone()))
                    .unwrap();
                completed.lock().unwrap().push(t.id);
            }
        }));
    }
    let mut put_ids = HashSet::new();
    for p in producers {
        put_ids.extend(p.await.unwrap());
    }
    for c in consumers {
        c.await.unwrap();
    }
    let completed = completed.lock().unwrap();
    let unique: HashSet<_> = completed.iter().copied().collect();
    assert_eq!(put_ids.len(), PRODUCERS * PER_PRODUCER);
    assert_eq!(completed.len(), unique.len(), "a task completed twice");
    assert_eq!(unique, put_ids, "a task was lost");
    let s = stats(&b, "q");
    assert_eq!(
        (s.succeeded, s.pending, s.leased),
        ((PRODUCERS * PER_PRODUCER) as u64, 0, 0)
    );
    b.check();
}

// ---- Regression tests from review: each guards one bug found there. ----

/// A ttl near the largest a Duration holds once overflowed `now + ttl`
/// under the lock, leaving counters and the idempotency map broken.
#[tokio::test(start_paused = true)]
async fn an_enormous_ttl_is_refused_not_a_panic() {
    let b = broker();
    let huge = NewTask {
        ttl: Some(Duration::from_secs(i64::MAX as u64)),
        idempotency_key: Some("k".into()),
        ..task("q", "x")
    };
    assert!(matches!(
        b.put(huge, Duration::ZERO).await,
        Err(BrokerError::InvalidArgument(_))
    ));
    let s = stats(&b, "q");
    assert_eq!(s.pending, 0);
    let again = NewTask {
        idempotency_key: Some("k".into()),
        ..task("q", "x")
    };
    assert!(!b.put(again, Duration::ZERO).await.unwrap().duplicate);
    b.check();
}

/// Every extension used to push a heap entry that stayed until its time.
#[tokio::test(start_paused = true)]
async fn extending_often_keeps_one_timer_entry() {
    let b = broker();
    put(&b, "q", "x").await;
    let t = take(&b, "q", 10 * SEC).await;
    for _ in 0..10_000 {
        b.extend(t.lease_id, Some(10 * SEC)).unwrap();
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    assert!(b.footprint().0 <= 2, "timer heap: {}", b.footprint().0);
    // The extended lease still expires, exactly 10s after the last extension.
    let (again, waited) = redelivered(&b).await;
    assert_eq!(again.attempt, 2);
    assert_eq!(waited, 10 * SEC - Duration::from_millis(1));
}

/// A lease shortened by an extension expires at the shorter time.
#[tokio::test(start_paused = true)]
async fn an_extension_can_shorten_a_lease() {
    let b = broker();
    put(&b, "q", "x").await;
    let t = take(&b, "q", 60 * SEC).await;
    b.extend(t.lease_id, Some(2 * SEC)).unwrap();
    let started = Instant::now();
    b.lease(req("q", "w2", SEC), 60 * SEC)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(started.elapsed(), 2 * SEC);
}

/// Results evicted without ever being read by queue left their ids in the
/// queue's line for good; expired pending tasks did the same in `ready`,
/// and finished tasks' ttl entries in the timer heap.
#[tokio::test(start_paused = true)]
async fn skipped_entries_do_not_pile_up() {
    let b = Broker::new(BrokerConfig {
        max_results: 10,
        ..BrokerConfig::default()
    });
    for _ in 0..5000 {
        let with_ttl = NewTask {
            ttl: Some(3600 * SEC),
            ..task("done", "x")
        };
        b.put(with_ttl, Duration::ZERO).await.unwrap();
        let t = take(&b, "done", SEC).await;
        b.complete(t.lease_id, ok("r")).unwrap();
    }
    for _ in 0..5000 {
        let with_ttl = NewTask {
            ttl: Some(Duration::from_millis(1)),
            ..task("nobody", "x")
        };
        b.put(with_ttl, Duration::ZERO).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (timers, ready, unclaimed) = b.footprint();
    assert!(timers < 3000, "timer heap: {timers}");
    assert!(ready < 3000, "ready lines: {ready}");
    assert!(unclaimed < 3000, "unclaimed lines: {unclaimed}");
    assert_eq!(stats(&b, "nobody").failed, 5000);
    b.check();
}

/// Retained results have no timers, so the heap is compacted against
/// what it kept last time, not against every task held: with the default
/// 100,000 results kept, finished leases' entries used to pile up to twice
/// that before the heap was compacted.
#[tokio::test(start_paused = true)]
async fn finished_leases_do_not_pile_up_behind_retained_results() {
    let b = broker();
    for _ in 0..20_000 {
        put(&b, "q", "x").await;
        let t = take(&b, "q", 60 * SEC).await;
        b.complete(t.lease_id, ok("r")).unwrap();
    }
    assert_eq!(stats(&b, "q").succeeded, 20_000);
    let (timers, _, _) = b.footprint();
    assert!(timers < 3000, "timer heap: {timers}");
    // Live entries are kept through compactions: 5,000 leases held at once
    // all still expire.
    for _ in 0..5000 {
        put(&b, "held", "x").await;
        take(&b, "held", 60 * SEC).await;
    }
    tokio::time::advance(60 * SEC).await;
    tokio::task::yield_now().await;
    let held = stats(&b, "held");
    assert_eq!((held.pending, held.leased), (5000, 0));
    // After a burst of long-lived ttl entries ends, what can still be live
    // bounds the heap, not the size it had during the burst.
    for _ in 0..5000 {
        let t = take(&b, "held", 60 * SEC).await;
        b.complete(t.lease_id, ok("r")).unwrap();
    }
    for _ in 0..10_000 {
        let with_ttl = NewTask {
            ttl: Some(3600 * SEC),
            ..task("burst", "x")
        };
        b.put(with_ttl, Duration::ZERO).await.unwrap();
    }
    for _ in 0..10_000 {
        let t = take(&b, "burst", 60 * SEC).await;
        b.complete(t.lease_id, ok("r")).unwrap();
    }
    put(&b, "q", "x").await;
    take(&b, "q", 60 * SEC).await;
    let (timers, _, _) = b.footprint();
    assert!(timers < 3000, "timer heap after the burst: {timers}");
    b.check();
}

/// A result put back by a cancelled reader used to wait for the next
/// completion instead of going to the reader already waiting.
#[tokio::test(start_paused = true)]
async fn a_returned_result_goes_to_the_next_waiting_reader() {
    let b = broker();
    let mut first = Box::pin(b.next_result(q("q"), 60 * SEC));
    assert!(futures_poll_once(first.as_mut()).await.is_none());
    let second = tokio::spawn({
        let b = b.clone();
        async move { b.next_result(q("q"), 60 * SEC).await }
    });
    tokio::task::yield_now().await;
    let id = put(&b, "q", "x").await;
    let t = take(&b, "q", SEC).await;
    b.complete(t.lease_id, ok("r")).unwrap();
    drop(first);
    let started = Instant::now();
    let got = second.await.unwrap().unwrap().unwrap();
    assert_eq!(got.task_id, id);
    assert_eq!(started.elapsed(), Duration::ZERO);
    b.check();
}

/// A retried failure repeated after the task finished elsewhere used to be
/// ALREADY_EXISTS; it is the same call, so OK.
#[tokio::test(start_paused = true)]
async fn a_repeated_retry_is_ok_even_after_the_task_finished() {
    let b = broker();
    put(&b, "q", "x").await;
    let first = take(&b, "q", SEC).await;
    assert_eq!(
        b.complete(first.lease_id, fail("flaky", true)),
        Ok(TaskState::Pending)
    );
    let second = take(&b, "q", SEC).await;
    b.complete(second.lease_id, ok("done")).unwrap();
    assert_eq!(
        b.complete(first.lease_id, fail("flaky", true)),
        Ok(TaskState::Succeeded)
    );
    assert!(matches!(
        b.complete(first.lease_id, fail("other", true)),
        Err(BrokerError::ResultConflict(_))
    ));
}

/// A malformed lease id (sequence 0) on a finished or unknown task gets
/// the task's answer, not ABORTED.
#[tokio::test(start_paused = true)]
async fn a_malformed_lease_gets_the_tasks_answer() {
    let b = broker();
    let id = put(&b, "q", "x").await;
    let bad = LeaseId { task: id, seq: 0 };
    assert!(matches!(
        b.complete(bad, ok("r")),
        Err(BrokerError::StaleLease { .. })
    ));
    let t = take(&b, "q", SEC).await;
    b.complete(t.lease_id, ok("r")).unwrap();
    assert_eq!(
        b.complete(bad, ok("r")),
        Err(BrokerError::ResultConflict(id))
    );
    assert_eq!(b.extend(bad, None), Err(BrokerError::TaskFinished(id)));
    let unknown = LeaseId {
        task: TaskId::generate(),
        seq: 0,
    };
    assert!(matches!(
        b.complete(unknown, ok("r")),
        Err(BrokerError::TaskNotFound(_))
    ));
}

/// A task whose ttl ran out while it sat with a call that is gone used to
/// go back to the queue with no timer left to fail it.
#[tokio::test(start_paused = true)]
async fn a_task_given_back_after_its_ttl_fails() {
    let b = broker();
    let mut gone = Box::pin(b.lease(req("q", "gone", 60 * SEC), 60 * SEC));
    assert!(futures_poll_once(gone.as_mut()).await.is_none());
    let with_ttl = NewTask {
        ttl: Some(SEC),
        ..task("q", "x")
    };
    let id = b.put(with_ttl, Duration::ZERO).await.unwrap().task_id;
    tokio::time::advance(2 * SEC).await;
    drop(gone);
    let result = b
        .result(id, Duration::ZERO)
        .await
        .unwrap()
        .expect("finished");
    assert!(result.error.contains("expired"), "{}", result.error);
    assert_eq!(stats(&b, "q").pending, 0);
    b.check();
}

/// A lease past its expiry cannot be extended even before the timer runs.
#[tokio::test(start_paused = true)]
async fn an_expired_lease_cannot_be_extended() {
    let b = broker();
    put(&b, "q", "x").await;
    let t = take(&b, "q", SEC).await;
    tokio::time::advance(SEC).await;
    assert!(matches!(
        b.extend(t.lease_id, None),
        Err(BrokerError::StaleLease { .. })
    ));
}

// ---- Worker streams and batches ----

async fn next_now(sub: &mut WorkerStream) -> Option<LeasedTask> {
    tokio::time::timeout(Duration::from_millis(1), sub.next())
        .await
        .ok()
        .flatten()
}

#[tokio::test(start_paused = true)]
async fn a_stream_holds_at_most_its_window() {
    let b = broker();
    let mut sub = b.open_worker_stream(req("q", "s1", 60 * SEC), 2).unwrap();
    for i in 0..5 {
        put(&b, "q", &i.to_string()).await;
    }
    let first = next_now(&mut sub).await.unwrap();
    let second = next_now(&mut sub).await.unwrap();
    assert_eq!(
        (&first.payload[..], &second.payload[..]),
        (&b"0"[..], &b"1"[..])
    );
    assert!(
        next_now(&mut sub).await.is_none(),
        "no third task while two are out"
    );
    assert_eq!(sub.control().outstanding(), 2);
    // Any outcome frees a slot.
    b.complete(first.lease_id, fail("no", false)).unwrap();
    assert_eq!(&next_now(&mut sub).await.unwrap().payload[..], b"2");
    assert!(next_now(&mut sub).await.is_none());
    b.check();
}

#[tokio::test(start_paused = true)]
async fn window_zero_pauses_and_a_new_window_resumes() {
    let b = broker();
    let mut sub = b.open_worker_stream(req("q", "s1", 60 * SEC), 0).unwrap();
    put(&b, "q", "x").await;
    assert!(next_now(&mut sub).await.is_none());
    sub.control().set_window(1);
    assert!(next_now(&mut sub).await.is_some());
    sub.control().set_window(0);
    put(&b, "q", "y").await;
    assert!(next_now(&mut sub).await.is_none());
    assert_eq!(stats(&b, "q").pending, 1);
}

/// A task put back (it did not fit a batch) is the next one taken; if the
/// stream ends first it goes back as undelivered: its attempt not counted.
#[tokio::test(start_paused = true)]
async fn a_task_put_back_comes_next_or_goes_back_undelivered() {
    let b = broker();
    let mut sub = b.open_worker_stream(req("q", "s1", 3600 * SEC), 2).unwrap();
    let a = put(&b, "q", "a").await;
    let z = put(&b, "q", "z").await;
    let got = next_now(&mut sub).await.unwrap();
    sub.put_back(got);
    let again = next_now(&mut sub).await.unwrap();
    assert_eq!((again.id, again.attempt), (a, 1));
    let second = next_now(&mut sub).await.unwrap();
    assert_eq!(second.id, z);
    sub.put_back(second);
    drop(sub);
    // "a" was handed on, so its delivery counts; "z" was put back, so it
    // does not.
    let mut back = [take(&b, "q", SEC).await, take(&b, "q", SEC).await];
    back.sort_by_key(|t| t.payload.clone());
    assert_eq!((back[0].id, back[0].attempt), (a, 2));
    assert_eq!((back[1].id, back[1].attempt), (z, 1));
    assert_eq!(stats(&b, "q").redelivered, 1);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_closed_stream_gives_its_tasks_back_at_once() {
    let b = broker();
    let mut sub = b.open_worker_stream(req("q", "s1", 3600 * SEC), 3).unwrap();
    let a = put(&b, "q", "a").await;
    put(&b, "q", "b").await;
    // Two delivered to the stream's handler; one more queued for it unread.
    let got_a = next_now(&mut sub).await.unwrap();
    assert_eq!(got_a.id, a);
    put(&b, "later", "x").await;
    drop(sub);
    // At once, not after the hour-long lease: "a" was handed on (its
    // delivery counts), "b" was never read from the stream (it does not).
    let again = take(&b, "q", SEC).await;
    let next = take(&b, "q", SEC).await;
    assert_eq!((again.id, again.attempt), (a, 2));
    assert_eq!(next.attempt, 1);
    assert_eq!(stats(&b, "q").redelivered, 1);
    b.check();
}

/// Regression: a closed stream gave its tasks back in the order of a hash
/// set, so the queue's order after a close was anyone's guess.
#[tokio::test(start_paused = true)]
async fn a_closed_stream_gives_its_tasks_back_oldest_first() {
    let b = broker();
    let mut sub = b.open_worker_stream(req("q", "s1", 3600 * SEC), 8).unwrap();
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(put(&b, "q", &i.to_string()).await);
    }
    for id in &ids {
        assert_eq!(next_now(&mut sub).await.unwrap().id, *id);
    }
    drop(sub);
    for id in &ids {
        assert_eq!(take(&b, "q", SEC).await.id, *id);
    }
    b.check();
}

#[tokio::test(start_paused = true)]
async fn streams_take_turns_and_waiting_calls_go_first() {
    let b = broker();
    let mut fast = b
        .open_worker_stream(req("q", "fast", 60 * SEC), 10)
        .unwrap();
    let mut slow = b.open_worker_stream(req("q", "slow", 60 * SEC), 1).unwrap();
    for i in 0..4 {
        put(&b, "q", &i.to_string()).await;
    }
    let mut fast_got = 0;
    while next_now(&mut fast).await.is_some() {
        fast_got += 1;
    }
    assert!(
        next_now(&mut slow).await.is_some(),
        "the slow stream is not starved"
    );
    assert_eq!(fast_got, 3);
    // A waiting GetTask is served before the streams.
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.lease(req("q", "unary", SEC), 10 * SEC).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let id = put(&b, "q", "for the waiting call").await;
    assert_eq!(waiting.await.unwrap().unwrap().unwrap().id, id);
    b.check();
}

#[tokio::test(start_paused = true)]
async fn an_expired_stream_lease_frees_its_slot() {
    let b = broker();
    let mut sub = b.open_worker_stream(req("q", "s1", SEC), 1).unwrap();
    put(&b, "q", "a").await;
    put(&b, "q", "b").await;
    let first = next_now(&mut sub).await.unwrap();
    tokio::time::sleep(2 * SEC).await;
    // The expired task went back to the head and came round again.
    let again = next_now(&mut sub).await.unwrap();
    assert_eq!((again.id, again.attempt), (first.id, 2));
    b.check();
}

#[tokio::test(start_paused = true)]
async fn put_many_keeps_order_and_per_item_errors() {
    let b = Broker::new(BrokerConfig {
        queue_capacity: 2,
        max_payload: 4,
        ..BrokerConfig::default()
    });
    let outcomes = b.put_many(vec![
        task("q", "a"),
        task("q", "too long"),
        task("q", "b"),
        task("q", "c"),
        task("other", "d"),
    ]);
    assert!(outcomes[0].is_ok());
    assert!(matches!(
        outcomes[1],
        Err(BrokerError::PayloadTooLarge { .. })
    ));
    assert!(outcomes[2].is_ok());
    assert!(matches!(outcomes[3], Err(BrokerError::QueueFull { .. })));
    assert!(outcomes[4].is_ok());
    assert_eq!(take(&b, "q", SEC).await.payload, "a");
    assert_eq!(take(&b, "q", SEC).await.payload, "b");
    b.check();
}

#[tokio::test(start_paused = true)]
async fn a_watch_gets_each_result_once_as_it_exists() {
    let b = broker();
    let done = put(&b, "q", "a").await;
    let later = put(&b, "q", "b").await;
    let t = take(&b, "q", SEC).await;
    b.complete(t.lease_id, ok("A")).unwrap();
    assert!(matches!(
        b.watch(&[done, TaskId::generate()]),
        Err(BrokerError::TaskNotFound(_))
    ));
    b.check();
    let mut watch = b.watch(&[done, later]).unwrap();
    assert_eq!(
        watch.recv().await.unwrap().task_id,
        done,
        "finished: at once"
    );
    let t = take(&b, "q", SEC).await;
    b.complete(t.lease_id, ok("B")).unwrap();
    assert_eq!(watch.recv().await.unwrap().task_id, later);
    // Not consumed: the results are still there by id.
    assert!(b.result(later, Duration::ZERO).await.unwrap().is_some());
    b.check();
    // A dropped watch leaves nothing behind once its tasks finish.
    let pending = put(&b, "q", "c").await;
    drop(b.watch(&[pending]).unwrap());
    let t = take(&b, "q", SEC).await;
    b.complete(t.lease_id, ok("C")).unwrap();
    b.check();
}

// ---- Regression tests from the second review ----

/// A task whose lease ran out while it waited in a stream's channel used
/// to be delivered anyway, next to its redelivered copy.
#[tokio::test(start_paused = true)]
async fn a_stale_copy_in_a_stream_is_skipped() {
    let b = broker();
    let mut sub = b.open_worker_stream(req("q", "slow", SEC), 1).unwrap();
    let id = put(&b, "q", "x").await;
    // The stream's handler does not read for 1.5 s: the lease runs out at
    // 1 s and the task is dispatched to the stream again, leased to 2 s.
    tokio::time::sleep(SEC + SEC / 2).await;
    let got = next_now(&mut sub).await.unwrap();
    assert_eq!(
        (got.id, got.attempt),
        (id, 2),
        "the current lease, not the stale one"
    );
    assert!(next_now(&mut sub).await.is_none());
    b.check();
}

/// A draining broker gives streams nothing, whatever window they ask for.
#[tokio::test(start_paused = true)]
async fn a_closed_broker_feeds_no_stream() {
    let b = broker();
    let mut sub = b.open_worker_stream(req("q", "s", 60 * SEC), 0).unwrap();
    put(&b, "q", "x").await;
    b.close();
    sub.control().set_window(5);
    assert!(next_now(&mut sub).await.is_none());
    assert_eq!(stats(&b, "q").pending, 1);
}

/// A dropped watch on unfinished tasks used to keep its place among the
/// waiting calls until those tasks finished.
#[tokio::test(start_paused = true)]
async fn a_dropped_watch_frees_its_waiter_places() {
    let b = Broker::new(BrokerConfig {
        max_waiters: 3,
        ..BrokerConfig::default()
    });
    let ids = [
        put(&b, "q", "a").await,
        put(&b, "q", "b").await,
        put(&b, "q", "c").await,
    ];
    let watch = b.watch(&ids).unwrap();
    assert!(matches!(
        b.watch(&ids[..1]),
        Err(BrokerError::LimitReached(_))
    ));
    drop(watch);
    b.check();
    assert!(b.watch(&ids).is_ok());
}

/// A failure message over the result limit used to be refused, leaving the
/// task to expire; it is cut to the limit instead. Outputs are still refused.
#[tokio::test(start_paused = true)]
async fn an_overlong_failure_message_is_cut_not_refused() {
    let b = Broker::new(BrokerConfig {
        max_result: 10,
        ..BrokerConfig::default()
    });
    let id = put(&b, "q", "x").await;
    let t = take(&b, "q", SEC).await;
    assert!(matches!(
        b.complete(t.lease_id, ok("eleven byte")),
        Err(BrokerError::ResultTooLarge {
            size: 11,
            limit: 10
        })
    ));
    assert_eq!(
        b.complete(t.lease_id, fail("ééééééé", false)),
        Ok(TaskState::Failed)
    );
    let result = b.result(id, Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(result.error, "ééééé", "cut at a character boundary");
}

#[tokio::test(start_paused = true)]
async fn the_bytes_held_in_all_are_bounded() {
    let b = Broker::new(BrokerConfig {
        max_held_bytes: 10,
        ..BrokerConfig::default()
    });
    put(&b, "a", "12345").await;
    put(&b, "b", "12345").await;
    assert!(matches!(
        b.put(task("c", "1"), Duration::ZERO).await,
        Err(BrokerError::LimitReached(_))
    ));
    // A finished task holds its output instead of its payload.
    let t = take(&b, "a", SEC).await;
    b.complete(t.lease_id, ok("1")).unwrap();
    put(&b, "c", "1234").await;
    b.check();
}

/// A panic while the engine's lock is held (a bug) poisons the mutex; the
/// broker keeps serving from the state as it is rather than turning every
/// later call into a panic too.
#[tokio::test]
async fn a_panic_under_the_lock_poisons_nothing() {
    let b = broker();
    let id = put(&b, "q", "before").await;
    let holder = b.clone();
    let panicked = std::thread::spawn(move || {
        let _state = holder.state();
        panic!("a bug while holding the lock");
    })
    .join();
    assert!(panicked.is_err());
    assert!(b.is_poisoned());
    let leased = take(&b, "q", SEC).await;
    assert_eq!(leased.id, id);
    assert_eq!(
        b.complete(leased.lease_id, ok("done")).unwrap(),
        TaskState::Succeeded
    );
    let second = put(&b, "q", "after").await;
    assert_eq!(take(&b, "q", SEC).await.id, second);
}

/// Ids from the broker's maker are UUIDv7 with the creation millisecond,
/// never repeat, and sort in the order they were made within one
/// millisecond.
#[test]
fn ids_are_unique_v7_and_stamped() {
    let mut maker = super::types::IdMaker::new();
    let mut seen = HashSet::new();
    let mut last = None;
    let ms = 1_790_000_000_123;
    for _ in 0..100_000 {
        let id = maker.next(ms);
        let uuid = uuid::Uuid::parse_str(&id.to_string()).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        let (secs, nanos) = uuid.get_timestamp().unwrap().to_unix();
        assert_eq!(secs * 1000 + u64::from(nanos) / 1_000_000, ms);
        assert!(seen.insert(id), "an id repeated");
        assert!(last.is_none_or(|last| last < id), "ids out of order");
        last = Some(id);
    }
    // Two makers (two processes) do not start on the same ids.
    let mut other = super::types::IdMaker::new();
    assert!(!seen.contains(&other.next(ms)));
}

/// The hot path's `to_text` writes exactly what `Display` writes, so ids
/// and leases read back the same whichever wrote them.
#[test]
fn to_text_matches_display() {
    let mut maker = super::types::IdMaker::new();
    for seq in [0, 1, 9, 10, 99, 1_000, 65_536, u32::MAX] {
        let lease = super::types::LeaseId {
            task: maker.next(1_790_000_000_123),
            seq,
        };
        assert_eq!(lease.task.to_text(), lease.task.to_string());
        assert_eq!(lease.to_text(), lease.to_string());
        // Sequence 0 is never issued, and never parsed.
        let expected = (seq > 0).then_some(lease);
        assert_eq!(super::types::LeaseId::parse(&lease.to_text()), expected);
    }
}

/// Names made apart are equal, hash alike and sort by text, as the
/// derived impls over the text did; names that differ stay apart even in a
/// map that uses their stored hash as it is.
#[test]
fn names_made_apart_compare_and_hash_by_text() {
    use std::hash::BuildHasher;
    let hasher = std::hash::BuildHasherDefault::<super::types::IdHasher>::default();
    let (a, b) = (q("emails"), q("emails"));
    assert_eq!(a, b);
    assert_eq!(hasher.hash_one(&a), hasher.hash_one(&b));
    assert_ne!(a, q("email"));
    assert_eq!(q(""), q(DEFAULT_QUEUE));
    let mut names = [q("b"), q("a-2"), q("a"), q("B")];
    names.sort();
    let texts: Vec<_> = names.iter().map(QueueName::as_str).collect();
    assert_eq!(texts, ["B", "a", "a-2", "b"]);
    assert_eq!(format!("{a:?}"), "QueueName(\"emails\")");
    let worker = |id| WorkerId::new(id).unwrap();
    assert_eq!(worker("w@host"), worker("w@host"));
    assert_ne!(worker("w@host"), worker("w@host2"));
    assert_eq!(worker("").as_str(), "");
    let mut map = super::types::NameMap::default();
    for i in 0..1_000 {
        map.insert(q(&format!("queue-{i}")), i);
    }
    assert!((0..1_000).all(|i| map[&q(&format!("queue-{i}"))] == i));
}

/// The wait runs from the put, or from going back to the line; the run
/// from the lease to the report that ends the task; the whole trip from
/// the put, on the engine's clock.
#[tokio::test(start_paused = true)]
async fn task_durations_are_measured_from_put_requeue_and_lease() {
    let b = broker();
    put(&b, "q", "a").await;
    tokio::time::advance(2 * SEC).await;
    let first = take(&b, "q", 60 * SEC).await;
    tokio::time::advance(20 * SEC).await;
    b.complete(first.lease_id, fail("again", true)).unwrap();
    tokio::time::advance(40 * SEC).await;
    let second = take(&b, "q", 60 * SEC).await;
    tokio::time::advance(4 * SEC).await;
    b.complete(second.lease_id, ok("done")).unwrap();

    let d = stats(&b, "q").durations;
    let bucket = |seconds: f64| {
        TASK_DURATION_BUCKETS
            .iter()
            .position(|&bound| bound == seconds)
            .unwrap()
    };
    // Waits of 2 s (from the put) and 40 s (from the retry, not the put).
    assert_eq!(d.wait.count(), 2);
    assert_eq!(d.wait.buckets[bucket(2.5)], 1);
    assert_eq!(d.wait.buckets[bucket(60.0)], 1);
    assert_eq!(d.wait.sum_nanos, 42 * 1_000_000_000);
    // One run: only the lease that finished the task counts.
    assert_eq!(d.run.count(), 1);
    assert_eq!(d.run.buckets[bucket(5.0)], 1);
    assert_eq!(d.run.sum_nanos, 4 * 1_000_000_000);
    assert_eq!(d.end_to_end.count(), 1);
    assert_eq!(d.end_to_end.sum_nanos, 66 * 1_000_000_000);
    b.check();
}

/// A worker's record names up to 8 of its leases, each with its deadline,
/// and forgets one when it ends.
#[tokio::test(start_paused = true)]
async fn a_worker_names_up_to_eight_of_its_leases() {
    let b = broker();
    for i in 0..10 {
        put(&b, "q", &i.to_string()).await;
    }
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(take(&b, "q", 30 * SEC).await);
    }
    let worker = |b: &Broker| b.stats(None).workers.remove(0);
    let w = worker(&b);
    assert_eq!(w.in_flight, 10);
    assert_eq!(w.leases.len(), 8);
    assert_eq!(w.leases[0], (held[0].id, held[0].lease_expires_at));
    b.complete(held[0].lease_id, ok("done")).unwrap();
    let w = worker(&b);
    assert_eq!(w.in_flight, 9);
    assert_eq!(w.leases.len(), 7);
    assert!(w.leases.iter().all(|(id, _)| *id != held[0].id));
    b.check();
}

/// Cancel: a pending task ends CANCELLED and is never handed out; a task
/// leased through a stream ends CANCELLED, the stream is told its lease,
/// its place is free, and reports under the lease are refused; a finished
/// task cannot be cancelled.
#[tokio::test(start_paused = true)]
async fn cancel_ends_pending_and_leased_tasks() {
    let b = broker();
    let pending = put(&b, "q", "a").await;
    assert_eq!(b.cancel(pending), Ok(TaskState::Pending));
    let result = b.result(pending, Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(result.state, TaskState::Cancelled);
    assert_eq!(b.cancel(pending), Err(BrokerError::TaskFinished(pending)));

    let held = put(&b, "q", "b").await;
    let next = put(&b, "q", "c").await;
    let mut stream = b.open_worker_stream(req("q", "w", SEC), 1).unwrap();
    let task = stream.next().await.unwrap();
    assert_eq!(task.id, held);
    assert_eq!(b.cancel(held), Ok(TaskState::Leased));
    let cancelled = std::future::poll_fn(|cx| stream.poll_cancelled(cx)).await;
    assert_eq!(cancelled, Some(task.lease_id));
    // The window of 1 has room again.
    assert_eq!(stream.next().await.unwrap().id, next);
    assert_eq!(
        b.complete(task.lease_id, ok("late")),
        Err(BrokerError::Cancelled(held))
    );
    assert_eq!(
        b.extend(task.lease_id, None),
        Err(BrokerError::Cancelled(held))
    );
    let s = stats(&b, "q");
    assert_eq!((s.cancelled, s.failed, s.leased, s.pending), (2, 0, 1, 0));
    assert_eq!(
        b.cancel(TaskId::parse("0190c0de-0000-7000-8000-000000000000").unwrap()),
        Err(BrokerError::TaskNotFound(
            "0190c0de-0000-7000-8000-000000000000".into()
        ))
    );
    b.check();
}

/// A paused queue hands out nothing, to calls or streams, while puts go
/// in; resume hands out at once. Purge cancels what is pending only.
#[tokio::test(start_paused = true)]
async fn pause_holds_hand_outs_and_purge_cancels_pending_tasks() {
    let b = broker();
    assert_eq!(b.pause(&q("q")), Ok(false));
    let first = put(&b, "q", "a").await;
    put(&b, "q", "b").await;
    let mut stream = b.open_worker_stream(req("q", "w", 60 * SEC), 1).unwrap();
    assert!(
        b.lease(req("q", "w2", SEC), Duration::ZERO)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(stream.ready(), 0, "nothing handed to the stream");
    assert!(stats(&b, "q").paused);
    assert_eq!(b.resume(&q("q")), Ok(true));
    assert_eq!(stream.next().await.unwrap().id, first);
    assert_eq!(b.resume(&q("q")), Ok(false));
    let third = put(&b, "q", "c").await;
    // One leased (the stream's window is 1), two pending: purged.
    assert_eq!(b.purge(&q("q")), Ok(2));
    let result = b.result(third, Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(result.state, TaskState::Cancelled);
    let s = stats(&b, "q");
    assert_eq!((s.pending, s.leased, s.cancelled), (0, 1, 2));
    assert_eq!(b.purge(&q("nothing-here")), Ok(0));
    b.check();
}
