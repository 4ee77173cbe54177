//! The `taskq.v1` contract over real gRPC: a server on 127.0.0.1:0 and the
//! generated tonic client, as any client in any language would see it.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::{Client, TestServer, with_deadline};
use taskq::pb::{self, get_result_request::Target, put_result_request::Outcome};
use taskq::server::BrokerConfig;
use tonic::Code;

const LONG: Duration = Duration::from_secs(10);

fn put_req(queue: &str, payload: &str) -> pb::PutTaskRequest {
    pb::PutTaskRequest {
        queue: queue.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..Default::default()
    }
}

fn get_req(queue: &str, worker: &str, lease: Duration) -> pb::GetTaskRequest {
    pb::GetTaskRequest {
        queue: queue.into(),
        worker_id: worker.into(),
        lease: Some(lease.try_into().unwrap()),
        max_wait: None,
    }
}

async fn put(client: &mut Client, queue: &str, payload: &str) -> String {
    client
        .put_task(with_deadline(put_req(queue, payload), LONG))
        .await
        .unwrap()
        .into_inner()
        .task_id
}

async fn get(client: &mut Client, queue: &str, lease: Duration) -> Option<pb::Task> {
    client
        .get_task(with_deadline(get_req(queue, "tester", lease), LONG))
        .await
        .unwrap()
        .into_inner()
        .task
}

fn success(task: &pb::Task, output: &str) -> pb::PutResultRequest {
    pb::PutResultRequest {
        task_id: task.id.clone(),
        lease_id: task.lease_id.clone(),
        outcome: Some(Outcome::Output(Bytes::copy_from_slice(output.as_bytes()))),
    }
}

fn failure(task: &pb::Task, message: &str, retry: bool) -> pb::PutResultRequest {
    pb::PutResultRequest {
        task_id: task.id.clone(),
        lease_id: task.lease_id.clone(),
        outcome: Some(Outcome::Failure(pb::Failure {
            message: message.into(),
            retry,
            retry_after: None,
        })),
    }
}

fn by_id(id: &str) -> pb::GetResultRequest {
    pb::GetResultRequest {
        target: Some(Target::TaskId(id.into())),
        max_wait: None,
    }
}

fn by_queue(queue: &str) -> pb::GetResultRequest {
    pb::GetResultRequest {
        target: Some(Target::Queue(queue.into())),
        max_wait: None,
    }
}

/// The seed's scenario: a master puts 10 numbers, two workers square them,
/// the master reads 10 results from the result queue.
#[tokio::test]
async fn the_seed_scenario_ten_tasks_two_workers() {
    let server = TestServer::spawn().await;
    let mut master = server.client().await;
    let mut inputs = HashMap::new();
    for i in 0..10u64 {
        let n = (i * 7919 + 13) % 10_000;
        let id = put(&mut master, "squares", &n.to_string()).await;
        inputs.insert(id, n);
    }
    let mut workers = Vec::new();
    for w in 0..2 {
        let mut client = server.client().await;
        workers.push(tokio::spawn(async move {
            let mut done = 0;
            loop {
                let request = with_deadline(
                    get_req("squares", &format!("worker-{w}"), LONG),
                    Duration::from_millis(500),
                );
                let Some(task) = client.get_task(request).await.unwrap().into_inner().task else {
                    return done;
                };
                let n: u64 = std::str::from_utf8(&task.payload).unwrap().parse().unwrap();
                let answer = success(&task, &(n * n).to_string());
                client
                    .put_result(with_deadline(answer, LONG))
                    .await
                    .unwrap();
                done += 1;
            }
        }));
    }
    let mut results = HashMap::new();
    for _ in 0..10 {
        let result = master
            .get_result(with_deadline(by_queue("squares"), LONG))
            .await
            .unwrap()
            .into_inner()
            .result
            .expect("a result within 10s");
        assert_eq!(result.state(), pb::TaskState::Succeeded);
        results.insert(result.task_id.clone(), result);
    }
    let mut done = 0;
    for worker in workers {
        done += worker.await.unwrap();
    }
    assert_eq!(done, 10, "each task ran exactly once");
    assert_eq!(results.len(), 10);
    for (id, n) in &inputs {
        let output = std::str::from_utf8(&results[id].output).unwrap();
        assert_eq!(output, (n * n).to_string());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_arguments_are_refused_and_store_nothing() {
    let server = TestServer::with_broker(BrokerConfig {
        max_payload: 1024,
        ..BrokerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    let bad_queue = client
        .put_task(put_req("no spaces", "x"))
        .await
        .unwrap_err();
    assert_eq!(bad_queue.code(), Code::InvalidArgument);
    assert!(
        bad_queue.message().contains("queue name"),
        "{}",
        bad_queue.message()
    );
    let bad_get = client
        .get_task(get_req(&"q".repeat(129), "w", LONG))
        .await
        .unwrap_err();
    assert_eq!(bad_get.code(), Code::InvalidArgument);

    // A payload over --max-payload gets the clear error naming both sizes,
    // not a transport error.
    let big = pb::PutTaskRequest {
        payload: Bytes::from(vec![0u8; 5000]),
        ..put_req("q", "")
    };
    let too_big = client.put_task(big).await.unwrap_err();
    assert_eq!(too_big.code(), Code::InvalidArgument);
    assert!(
        too_big.message().contains("5000") && too_big.message().contains("1024"),
        "{}",
        too_big.message()
    );

    let negative_ttl = pb::PutTaskRequest {
        ttl: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
        ..put_req("q", "x")
    };
    assert_eq!(
        client.put_task(negative_ttl).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let no_target = pb::GetResultRequest::default();
    assert_eq!(
        client.get_result(no_target).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let id = put(&mut client, "q", "x").await;
    let task = get(&mut client, "q", LONG).await.unwrap();
    assert_eq!(task.id, id);
    let no_outcome = pb::PutResultRequest {
        outcome: None,
        ..success(&task, "")
    };
    assert_eq!(
        client.put_result(no_outcome).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let no_lease = pb::PutResultRequest {
        lease_id: String::new(),
        ..success(&task, "")
    };
    assert_eq!(
        client.put_result(no_lease).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let no_id = pb::ExtendLeaseRequest::default();
    assert_eq!(
        client.extend_lease(no_id).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let stats = client
        .get_stats(pb::GetStatsRequest { queue: "q".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stats.queues[0].pending, stats.queues[0].leased),
        (0, 1),
        "only the valid task"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_tasks_are_not_found() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let unknown = "01890a5d-ac96-774b-bcce-b302099a8057";
    for id in [unknown, "not-a-task-id"] {
        let status = client.get_result(by_id(id)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{id}");
        let extend = pb::ExtendLeaseRequest {
            task_id: id.into(),
            lease_id: format!("{id}/1"),
            extend_by: None,
        };
        assert_eq!(
            client.extend_lease(extend).await.unwrap_err().code(),
            Code::NotFound
        );
        let report = pb::PutResultRequest {
            task_id: id.into(),
            lease_id: format!("{id}/1"),
            outcome: Some(Outcome::Output(Bytes::new())),
        };
        assert_eq!(
            client.put_result(report).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn lease_rules_aborted_failed_precondition_already_exists() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let id = put(&mut client, "q", "x").await;
    let first = get(&mut client, "q", Duration::from_millis(100))
        .await
        .unwrap();
    // Its lease runs out; the next GetTask gets it again under a new lease.
    let second = get(&mut client, "q", LONG).await.unwrap();
    assert_eq!((second.id.as_str(), second.attempt), (id.as_str(), 2));
    assert_ne!(second.lease_id, first.lease_id);

    let stale_failure = client
        .put_result(failure(&first, "late", false))
        .await
        .unwrap_err();
    assert_eq!(stale_failure.code(), Code::Aborted);
    let stale_extend = pb::ExtendLeaseRequest {
        task_id: first.id.clone(),
        lease_id: first.lease_id.clone(),
        extend_by: None,
    };
    assert_eq!(
        client.extend_lease(stale_extend).await.unwrap_err().code(),
        Code::Aborted
    );
    let foreign_lease = pb::PutResultRequest {
        lease_id: "someone-else".into(),
        ..failure(&second, "x", false)
    };
    assert_eq!(
        client.put_result(foreign_lease).await.unwrap_err().code(),
        Code::Aborted
    );

    let extended = client
        .extend_lease(pb::ExtendLeaseRequest {
            task_id: second.id.clone(),
            lease_id: second.lease_id.clone(),
            extend_by: Some(Duration::from_secs(60).try_into().unwrap()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(extended.lease_expires_at.unwrap().seconds >= second.lease_expires_at.unwrap().seconds);

    let state = client
        .put_result(success(&second, "42"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.state(), pb::TaskState::Succeeded);
    // The same report again is OK; a different one is ALREADY_EXISTS.
    let again = client
        .put_result(success(&second, "42"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state(), pb::TaskState::Succeeded);
    let different = client.put_result(success(&second, "43")).await.unwrap_err();
    assert_eq!(different.code(), Code::AlreadyExists);
    let finished_extend = pb::ExtendLeaseRequest {
        task_id: second.id.clone(),
        lease_id: second.lease_id.clone(),
        extend_by: None,
    };
    assert_eq!(
        client
            .extend_lease(finished_extend)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let result = client
        .get_result(by_id(&id))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!((&result.output[..], result.attempts), (&b"42"[..], 2));
    assert_eq!(result.worker_id, "tester");

    let stats = client
        .get_stats(pb::GetStatsRequest { queue: "q".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (stats.queues[0].redelivered, stats.queues[0].succeeded),
        (1, 1)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn retry_and_final_failures() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let request = pb::PutTaskRequest {
        max_attempts: 2,
        ..put_req("q", "x")
    };
    let id = client.put_task(request).await.unwrap().into_inner().task_id;
    let t = get(&mut client, "q", LONG).await.unwrap();
    assert_eq!(t.max_attempts, 2);
    let retried = client
        .put_result(failure(&t, "flaky", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.state(), pb::TaskState::Pending);
    let t = get(&mut client, "q", LONG).await.unwrap();
    assert_eq!(t.attempt, 2);
    let last = client
        .put_result(failure(&t, "flaky", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(last.state(), pb::TaskState::Failed);
    let result = client
        .get_result(by_id(&id))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(
        (result.state(), result.error.as_str()),
        (pb::TaskState::Failed, "flaky")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_is_resource_exhausted_at_the_deadline() {
    let server = TestServer::with_broker(BrokerConfig {
        queue_capacity: 1,
        ..BrokerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    put(&mut client, "q", "1").await;
    let status = client
        .put_task(with_deadline(put_req("q", "2"), Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--queue-capacity"),
        "{}",
        status.message()
    );
    server.shutdown().await;
}

/// Waits end OK and empty a little before the caller's deadline, never as
/// DEADLINE_EXCEEDED.
#[tokio::test]
async fn blocking_calls_answer_empty_before_the_deadline() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let short = Duration::from_millis(300);
    let empty = client
        .get_task(with_deadline(get_req("idle", "w", LONG), short))
        .await
        .expect("OK, not DEADLINE_EXCEEDED")
        .into_inner();
    assert!(empty.task.is_none());
    let id = put(&mut client, "q", "x").await;
    let no_result = client
        .get_result(with_deadline(by_id(&id), short))
        .await
        .expect("OK, not DEADLINE_EXCEEDED")
        .into_inner();
    assert!(no_result.result.is_none());
    let no_queue_result = client
        .get_result(with_deadline(by_queue("idle"), short))
        .await
        .expect("OK, not DEADLINE_EXCEEDED")
        .into_inner();
    assert!(no_queue_result.result.is_none());
    server.shutdown().await;
}

async fn waiting_workers(client: &mut Client, queue: &str) -> u64 {
    let stats = client
        .get_stats(pb::GetStatsRequest {
            queue: queue.into(),
        })
        .await
        .unwrap()
        .into_inner();
    stats.queues[0].waiting_workers
}

/// Polls stats until the queue has `n` waiting GetTask calls. Bounded: at
/// most 10,000 stats calls.
async fn until_waiting(client: &mut Client, queue: &str, n: u64) {
    for _ in 0..10_000 {
        if waiting_workers(client, queue).await == n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("queue {queue} never had {n} waiting calls");
}

/// `max_wait` caps the wait below the deadline; zero answers at once.
#[tokio::test]
async fn max_wait_caps_the_wait() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let started = std::time::Instant::now();
    let request = pb::GetTaskRequest {
        max_wait: Some(Duration::ZERO.try_into().unwrap()),
        ..get_req("idle", "w", LONG)
    };
    let empty = client
        .get_task(with_deadline(request, Duration::from_secs(60)))
        .await
        .unwrap()
        .into_inner();
    assert!(empty.task.is_none());
    // Answered at once, not after most of the 60s deadline.
    assert!(started.elapsed() < Duration::from_secs(30));
    let negative = pb::GetTaskRequest {
        max_wait: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
        ..get_req("idle", "w", LONG)
    };
    assert_eq!(
        client.get_task(negative).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    server.shutdown().await;
}

/// A GetTask abandoned by its client stops waiting at once and takes no
/// task with it.
#[tokio::test]
async fn an_abandoned_get_task_takes_nothing() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let mut waiting = server.client().await;
    let call = tokio::spawn(async move {
        waiting
            .get_task(with_deadline(
                get_req("q", "gone", LONG),
                Duration::from_secs(60),
            ))
            .await
    });
    until_waiting(&mut client, "q", 1).await;
    call.abort();
    let _ = call.await;
    until_waiting(&mut client, "q", 0).await;
    let id = put(&mut client, "q", "x").await;
    let task = get(&mut client, "q", LONG)
        .await
        .expect("the task is ready");
    assert_eq!((task.id, task.attempt), (id, 1));
    server.shutdown().await;
}

#[tokio::test]
async fn idempotency_keys_return_the_first_task() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let keyed = || pb::PutTaskRequest {
        idempotency_key: "order-17".into(),
        ..put_req("q", "x")
    };
    let first = client.put_task(keyed()).await.unwrap().into_inner();
    let second = client.put_task(keyed()).await.unwrap().into_inner();
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(first.task_id, second.task_id);
    server.shutdown().await;
}

#[tokio::test]
async fn a_task_ttl_travels_with_it_and_ends_it() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let request = pb::PutTaskRequest {
        ttl: Some(Duration::from_millis(300).try_into().unwrap()),
        headers: [("trace".to_string(), "abc".to_string())].into(),
        ..put_req("q", "x")
    };
    let id = client.put_task(request).await.unwrap().into_inner().task_id;
    let task = get(&mut client, "q", Duration::from_millis(100))
        .await
        .unwrap();
    let created = task.created_at.unwrap();
    let expires = task.expires_at.unwrap();
    let ttl_ms = (expires.seconds - created.seconds) * 1000
        + i64::from(expires.nanos - created.nanos) / 1_000_000;
    assert_eq!(ttl_ms, 300);
    assert_eq!(task.headers["trace"], "abc");
    // The lease runs out after the ttl: the task is not handed out again.
    let result = client
        .get_result(with_deadline(by_id(&id), LONG))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(result.state(), pb::TaskState::Failed);
    assert!(result.error.contains("expired"), "{}", result.error);
    let none = client
        .get_task(with_deadline(
            get_req("q", "w", LONG),
            Duration::from_millis(200),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(none.task.is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn stats_report_queues_and_workers() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    put(&mut client, "a", "1").await;
    put(&mut client, "b", "2").await;
    put(&mut client, "b", "3").await;
    let task = get(&mut client, "b", LONG).await.unwrap();
    let stats = client
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let queues: Vec<_> = stats
        .queues
        .iter()
        .map(|q| (q.queue.as_str(), q.pending, q.leased))
        .collect();
    assert_eq!(queues, [("a", 1, 0), ("b", 1, 1)]);
    let worker = &stats.workers[0];
    assert_eq!(
        (worker.worker_id.as_str(), worker.queue.as_str()),
        ("tester", "b")
    );
    assert_eq!((worker.in_flight, worker.alive), (1, true));
    client.put_result(success(&task, "ok")).await.unwrap();
    let b = client
        .get_stats(pb::GetStatsRequest { queue: "b".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.queues.len(), 1);
    assert_eq!(
        (b.queues[0].succeeded, b.queues[0].results_unclaimed),
        (1, 1)
    );
    assert_eq!(b.workers[0].in_flight, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn health_reports_serving_without_a_token() {
    let server = TestServer::spawn().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    for service in ["", "taskq.v1.TaskQueue"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            status.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    server.shutdown().await;
}

async fn cancel(client: &mut Client, id: &str) -> Result<pb::TaskState, tonic::Status> {
    client
        .cancel_task(with_deadline(
            pb::CancelTaskRequest { task_id: id.into() },
            LONG,
        ))
        .await
        .map(|r| r.into_inner().previous_state())
}

/// CancelTask: a pending task ends CANCELLED and is never handed out; a
/// leased one too, and its lease answers FAILED_PRECONDITION naming the
/// cancellation; a finished task cannot be cancelled; an unknown id is
/// NOT_FOUND. Whoever waits for the result gets CANCELLED.
#[tokio::test]
async fn cancel_takes_back_pending_and_leased_tasks() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;

    // Pending: a waiting GetResult learns it.
    let pending = put(&mut client, "cancel", "a").await;
    let mut waiter = client.clone();
    let waiting = {
        let pending = pending.clone();
        tokio::spawn(async move {
            let mut request = by_id(&pending);
            request.max_wait = Some(LONG.try_into().unwrap());
            waiter
                .get_result(with_deadline(request, LONG))
                .await
                .unwrap()
                .into_inner()
                .result
                .expect("the result arrives")
        })
    };
    assert_eq!(
        cancel(&mut client, &pending).await.unwrap(),
        pb::TaskState::Pending
    );
    let result = waiting.await.unwrap();
    assert_eq!(result.state(), pb::TaskState::Cancelled);
    assert!(result.error.contains("cancelled"), "{}", result.error);
    assert_eq!(result.attempts, 0);

    // Leased: the lease is revoked.
    let leased = put(&mut client, "cancel", "b").await;
    let task = get(&mut client, "cancel", LONG).await.expect("b is ready");
    assert_eq!(task.id, leased);
    assert_eq!(
        cancel(&mut client, &leased).await.unwrap(),
        pb::TaskState::Leased
    );
    let extend = client
        .extend_lease(pb::ExtendLeaseRequest {
            task_id: task.id.clone(),
            lease_id: task.lease_id.clone(),
            extend_by: None,
        })
        .await
        .unwrap_err();
    assert_eq!(extend.code(), Code::FailedPrecondition, "{extend:?}");
    assert!(extend.message().contains("cancelled"), "{extend:?}");
    for report in [success(&task, "late"), failure(&task, "late", true)] {
        let refused = client.put_result(report).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("cancelled"), "{refused:?}");
    }
    let result = client
        .get_result(by_id(&leased))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(result.state(), pb::TaskState::Cancelled);
    assert_eq!(result.worker_id, "tester");

    // Nothing cancelled is handed out; the queue is empty.
    let mut now_only = get_req("cancel", "tester", LONG);
    now_only.max_wait = Some(Duration::ZERO.try_into().unwrap());
    let none = client.get_task(now_only).await.unwrap().into_inner();
    assert!(none.task.is_none(), "{none:?}");

    // Finished (cancelled, or succeeded): FAILED_PRECONDITION, and the
    // result stays as it was.
    let done = put(&mut client, "cancel", "c").await;
    let task = get(&mut client, "cancel", LONG).await.unwrap();
    client.put_result(success(&task, "out")).await.unwrap();
    for id in [&pending, &done] {
        let refused = cancel(&mut client, id).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    }
    let result = client.get_result(by_id(&done)).await.unwrap().into_inner();
    assert_eq!(result.result.unwrap().state(), pb::TaskState::Succeeded);

    // Unknown and malformed ids.
    let unknown = cancel(&mut client, "0190c0de-0000-7000-8000-000000000000")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let empty = cancel(&mut client, "").await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");
    server.shutdown().await;
}

async fn pause(client: &mut Client, queue: &str, paused: bool) -> bool {
    let request = pb::QueueRequest {
        queue: queue.into(),
    };
    let state = if paused {
        client.pause_queue(request).await
    } else {
        client.resume_queue(request).await
    };
    state.unwrap().into_inner().was_paused
}

/// PauseQueue holds a queue's hand-outs (puts go in, GetTask waits);
/// ResumeQueue hands out at once to the call that waits. Both say what
/// the queue was before, so repeating them is harmless.
#[tokio::test]
async fn a_paused_queue_hands_out_nothing_until_resumed() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    assert!(!pause(&mut client, "held", true).await);
    assert!(pause(&mut client, "held", true).await, "paused already");
    let id = put(&mut client, "held", "a").await;
    let mut now_only = get_req("held", "tester", LONG);
    now_only.max_wait = Some(Duration::ZERO.try_into().unwrap());
    let none = client.get_task(now_only).await.unwrap().into_inner();
    assert!(none.task.is_none(), "{none:?}");
    let stats = client
        .get_stats(pb::GetStatsRequest {
            queue: "held".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stats.queues[0].paused);
    assert_eq!(stats.queues[0].pending, 1);

    // A worker waits; the resume hands it the task.
    let mut worker = client.clone();
    let waiting = tokio::spawn(async move { get(&mut worker, "held", LONG).await });
    until_waiting(&mut client, "held", 1).await;
    assert!(pause(&mut client, "held", false).await);
    let task = waiting.await.unwrap().expect("handed out on resume");
    assert_eq!(task.id, id);
    assert!(
        !pause(&mut client, "held", false).await,
        "not paused any more"
    );
    let bad = client
        .pause_queue(pb::QueueRequest {
            queue: "no spaces".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    server.shutdown().await;
}

/// PurgeQueue drops the pending tasks (each ends CANCELLED, so a waiting
/// producer learns it) and leaves leased ones running.
#[tokio::test]
async fn purge_cancels_the_pending_tasks_only() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let leased_id = put(&mut client, "purged", "a").await;
    let pending = [
        put(&mut client, "purged", "b").await,
        put(&mut client, "purged", "c").await,
    ];
    let leased = get(&mut client, "purged", LONG).await.unwrap();
    assert_eq!(leased.id, leased_id);
    let mut producer = client.clone();
    let waited = pending[1].clone();
    let waiting = tokio::spawn(async move {
        let mut request = by_id(&waited);
        request.max_wait = Some(LONG.try_into().unwrap());
        producer
            .get_result(with_deadline(request, LONG))
            .await
            .unwrap()
            .into_inner()
            .result
            .expect("the result arrives")
    });
    let purged = client
        .purge_queue(pb::QueueRequest {
            queue: "purged".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, 2);
    assert_eq!(waiting.await.unwrap().state(), pb::TaskState::Cancelled);
    let first = client
        .get_result(by_id(&pending[0]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.result.unwrap().state(), pb::TaskState::Cancelled);
    // The leased task runs on and reports.
    let state = client
        .put_result(success(&leased, "done"))
        .await
        .unwrap()
        .into_inner()
        .state();
    assert_eq!(state, pb::TaskState::Succeeded);
    let again = client
        .purge_queue(pb::QueueRequest {
            queue: "purged".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.purged, 0);
    server.shutdown().await;
}
