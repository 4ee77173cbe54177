//! Token auth over real gRPC: none, wrong and right tokens; health needs none.

mod common;

use common::TestServer;
use taskq::pb;
use taskq::server::BrokerConfig;
use taskq::server::ServerConfig;
use taskq::server::Tokens;
use tonic::Code;

const TOKEN: &str = "s3cret-token-for-tests";

async fn server_with_token() -> TestServer {
    let config = ServerConfig {
        tokens: Tokens::from_list(&format!("{TOKEN},second-token"), "test").unwrap(),
        ..ServerConfig::new(BrokerConfig::default())
    };
    TestServer::with_config(config).await
}

#[tokio::test]
async fn calls_without_a_token_are_unauthenticated() {
    let server = server_with_token().await;
    let mut client = server.client().await;
    let status = client
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("authorization"),
        "{}",
        status.message()
    );
    let put = client
        .put_task(pb::PutTaskRequest::default())
        .await
        .unwrap_err();
    assert_eq!(put.code(), Code::Unauthenticated);
    server.shutdown().await;
}

#[tokio::test]
async fn a_wrong_token_is_unauthenticated_and_not_echoed() {
    let server = server_with_token().await;
    let mut client = server.client_with_token("guess-token").await;
    let status = client
        .put_task(pb::PutTaskRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!status.message().contains("guess-token"));
    assert!(!status.message().contains(TOKEN));
    // A prefix of a real token is not a token.
    let mut prefix = server.client_with_token(&TOKEN[..6]).await;
    let status = prefix
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    server.shutdown().await;
}

#[tokio::test]
async fn every_configured_token_is_accepted() {
    let server = server_with_token().await;
    for token in [TOKEN, "second-token"] {
        let mut client = server.client_with_token(token).await;
        let put = client
            .put_task(pb::PutTaskRequest::default())
            .await
            .expect("the right token is accepted")
            .into_inner();
        assert!(!put.task_id.is_empty());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn health_needs_no_token() {
    let server = server_with_token().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "taskq.v1.TaskQueue".into(),
        })
        .await
        .expect("health is reachable without a token")
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    server.shutdown().await;
}

/// A server whose token file gives each role, and queue-limited tokens.
async fn server_with_roles() -> TestServer {
    // One directory per server, so tests running in parallel never share it.
    let dir = std::env::temp_dir().join(format!(
        "taskq-roles-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokens");
    std::fs::write(
        &path,
        "# role tokens for tests\n\
         producer-token producer\n\
         worker-token worker\n\
         admin-token admin\n\
         emails-producer producer emails\n\
         emails-worker worker emails,default-not\n\
         sa1-admin admin sa1\n\
         mine-producer producer mine\n\
         mine-worker worker mine\n\
         mine-admin admin mine\n",
    )
    .unwrap();
    let tokens = Tokens::from_file(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let config = ServerConfig {
        tokens,
        ..ServerConfig::new(BrokerConfig::default())
    };
    TestServer::with_config(config).await
}

fn put(queue: &str) -> pb::PutTaskRequest {
    pb::PutTaskRequest {
        queue: queue.into(),
        payload: b"job".to_vec().into(),
        ..Default::default()
    }
}

fn get(queue: &str) -> pb::GetTaskRequest {
    pb::GetTaskRequest {
        queue: queue.into(),
        max_wait: Some(prost_types::Duration::default()),
        ..Default::default()
    }
}

fn denied<T: std::fmt::Debug>(answer: Result<T, tonic::Status>, what: &str) {
    let status = answer.expect_err(what);
    assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
}

#[tokio::test]
async fn each_role_reaches_its_calls_only() {
    let server = server_with_roles().await;
    let mut producer = server.client_with_token("producer-token").await;
    let mut worker = server.client_with_token("worker-token").await;
    let mut admin = server.client_with_token("admin-token").await;

    let id = producer
        .put_task(put("jobs"))
        .await
        .unwrap()
        .into_inner()
        .task_id;
    denied(worker.put_task(put("jobs")).await, "a worker may not put");
    denied(
        worker
            .put_tasks(pb::PutTasksRequest {
                tasks: vec![put("jobs")],
            })
            .await,
        "a worker may not put a batch",
    );
    denied(
        producer.get_task(get("jobs")).await,
        "a producer may not take",
    );
    denied(
        producer.get_stats(pb::GetStatsRequest::default()).await,
        "a producer may not read stats",
    );
    denied(
        worker.get_stats(pb::GetStatsRequest::default()).await,
        "a worker may not read stats",
    );
    let task = worker
        .get_task(get("jobs"))
        .await
        .unwrap()
        .into_inner()
        .task
        .expect("the producer's task");
    assert_eq!(task.id, id);
    let result = pb::PutResultRequest {
        task_id: task.id.clone(),
        lease_id: task.lease_id.clone(),
        outcome: Some(pb::put_result_request::Outcome::Output(
            b"done".to_vec().into(),
        )),
    };
    denied(
        producer.put_result(result.clone()).await,
        "a producer may not report",
    );
    denied(
        producer
            .extend_lease(pb::ExtendLeaseRequest {
                task_id: task.id.clone(),
                lease_id: task.lease_id.clone(),
                extend_by: None,
            })
            .await,
        "a producer may not extend",
    );
    worker.put_result(result).await.unwrap();
    let read = pb::GetResultRequest {
        target: Some(pb::get_result_request::Target::TaskId(id.clone())),
        ..Default::default()
    };
    denied(
        worker.get_result(read.clone()).await,
        "a worker may not read results",
    );
    let got = producer.get_result(read).await.unwrap().into_inner();
    assert_eq!(got.result.unwrap().task_id, id);
    let watch = pb::WatchResultsRequest {
        target: Some(pb::watch_results_request::Target::TaskIds(pb::TaskIds {
            ids: vec![id.clone()],
        })),
    };
    denied(
        worker.watch_result_batches(watch.clone()).await,
        "a worker may not watch results in batches",
    );
    let mut batches = producer
        .watch_result_batches(watch)
        .await
        .unwrap()
        .into_inner();
    let batch = batches
        .message()
        .await
        .unwrap()
        .expect("the finished result");
    assert_eq!(batch.results[0].task_id, id);
    let stats = admin
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(stats.queues.iter().any(|q| q.queue == "jobs"));
    // Admin may do everything a producer or worker may.
    admin.put_task(put("jobs")).await.unwrap();
    assert!(
        admin
            .get_task(get("jobs"))
            .await
            .unwrap()
            .into_inner()
            .task
            .is_some()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn queue_limited_tokens_touch_only_their_queues() {
    let server = server_with_roles().await;
    let mut producer = server.client_with_token("emails-producer").await;
    let mut worker = server.client_with_token("emails-worker").await;
    let mut anywhere = server.client_with_token("producer-token").await;
    let mut any_worker = server.client_with_token("worker-token").await;

    producer.put_task(put("emails")).await.unwrap();
    denied(
        producer.put_task(put("billing")).await,
        "put outside the list",
    );
    denied(
        producer.put_task(put("")).await,
        "the default queue is not listed",
    );

    // A batch: each task on its own, the allowed one stored.
    let outcomes = producer
        .put_tasks(pb::PutTasksRequest {
            tasks: vec![put("billing"), put("emails")],
        })
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    use pb::put_task_outcome::Outcome;
    match &outcomes[0].outcome {
        Some(Outcome::Error(error)) => assert_eq!(error.code, Code::PermissionDenied as i32),
        other => panic!("billing task: {other:?}"),
    }
    assert!(matches!(outcomes[1].outcome, Some(Outcome::Ok(_))));

    denied(
        worker.get_task(get("billing")).await,
        "take outside the list",
    );
    let task = worker
        .get_task(get("emails"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.queue, "emails");

    // A task of another queue, named by id: neither its lease nor its
    // result is reachable.
    let billing_id = anywhere
        .put_task(put("billing"))
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let billing = any_worker
        .get_task(get("billing"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(billing.id, billing_id);
    denied(
        worker
            .put_result(pb::PutResultRequest {
                task_id: billing.id.clone(),
                lease_id: billing.lease_id.clone(),
                outcome: Some(pb::put_result_request::Outcome::Output(Default::default())),
            })
            .await,
        "report on another queue's task",
    );
    denied(
        worker
            .extend_lease(pb::ExtendLeaseRequest {
                task_id: billing.id.clone(),
                lease_id: billing.lease_id.clone(),
                extend_by: None,
            })
            .await,
        "extend another queue's task",
    );
    denied(
        producer
            .get_result(pb::GetResultRequest {
                target: Some(pb::get_result_request::Target::TaskId(billing_id.clone())),
                ..Default::default()
            })
            .await,
        "read another queue's result by id",
    );
    denied(
        producer
            .get_result(pb::GetResultRequest {
                target: Some(pb::get_result_request::Target::Queue("billing".into())),
                ..Default::default()
            })
            .await,
        "read another queue's results",
    );
    denied(
        producer
            .watch_results(pb::WatchResultsRequest {
                target: Some(pb::watch_results_request::Target::TaskIds(pb::TaskIds {
                    ids: vec![billing_id.clone()],
                })),
            })
            .await,
        "watch another queue's task",
    );
    denied(
        producer
            .watch_results(pb::WatchResultsRequest {
                target: Some(pb::watch_results_request::Target::Queue("billing".into())),
            })
            .await,
        "watch another queue",
    );
    denied(
        producer
            .watch_result_batches(pb::WatchResultsRequest {
                target: Some(pb::watch_results_request::Target::Queue("billing".into())),
            })
            .await,
        "watch another queue in batches",
    );
    // The lease was not touched by the refused calls: its holder finishes.
    any_worker
        .put_result(pb::PutResultRequest {
            task_id: billing.id.clone(),
            lease_id: billing.lease_id.clone(),
            outcome: Some(pb::put_result_request::Outcome::Output(Default::default())),
        })
        .await
        .unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_worker_stream_is_limited_to_its_role_and_queues() {
    use pb::worker_message::Msg;
    let server = server_with_roles().await;
    let subscribe = |queue: &str| pb::WorkerMessage {
        msg: Some(Msg::Subscribe(pb::Subscribe {
            queue: queue.into(),
            max_in_flight: 1,
            ..Default::default()
        })),
    };
    let open = |token: &'static str, queue: &'static str| {
        let server = &server;
        async move {
            let mut client = server.client_with_token(token).await;
            let messages = tokio_stream::iter(vec![subscribe(queue)]);
            client.stream_tasks(messages).await.map(|_| ())
        }
    };
    denied(
        open("producer-token", "emails").await,
        "a producer may not stream tasks",
    );
    denied(
        open("emails-worker", "billing").await,
        "subscribe outside the list",
    );
    assert!(open("emails-worker", "emails").await.is_ok());
    server.shutdown().await;
}

/// GetStats used to ignore a token's queue list: an admin token limited to
/// `sa1` got OK for `GetStats(queue="sb")` and saw every queue.
#[tokio::test]
async fn a_queue_limited_admin_sees_the_stats_of_its_queues_only() {
    let server = server_with_roles().await;
    let mut admin = server.client_with_token("admin-token").await;
    for (queue, worker) in [("sa1", "w-a"), ("sb", "w-b")] {
        admin.put_task(put(queue)).await.unwrap();
        let mut take = get(queue);
        take.worker_id = worker.into();
        assert!(
            admin
                .get_task(take)
                .await
                .unwrap()
                .into_inner()
                .task
                .is_some()
        );
    }
    let mut scoped = server.client_with_token("sa1-admin").await;
    let of = |queue: &str| pb::GetStatsRequest {
        queue: queue.into(),
    };
    denied(scoped.get_stats(of("sb")).await, "another queue's stats");
    let own = scoped.get_stats(of("sa1")).await.unwrap().into_inner();
    assert_eq!(own.queues.len(), 1);
    assert_eq!(
        (own.queues[0].queue.as_str(), own.queues[0].leased),
        ("sa1", 1)
    );
    let all = scoped.get_stats(of("")).await.unwrap().into_inner();
    let queues: Vec<_> = all.queues.iter().map(|q| q.queue.as_str()).collect();
    let workers: Vec<_> = all.workers.iter().map(|w| w.worker_id.as_str()).collect();
    assert_eq!(queues, ["sa1"], "only the token's queues");
    assert_eq!(workers, ["w-a"], "only the workers seen on them");
    // An unlimited admin still sees everything.
    let every = admin.get_stats(of("")).await.unwrap().into_inner();
    assert_eq!(every.queues.len(), 2);
    assert_eq!(every.workers.len(), 2);
    server.shutdown().await;
}

/// One call of the table below, on `queue`, as a token sees it: `Ok` when
/// the call got past authorization (whatever the engine said then), the
/// PERMISSION_DENIED status when it did not.
async fn try_call(
    client: &mut common::AuthClient,
    call: &str,
    queue: &str,
    task: &str,
) -> Result<(), tonic::Status> {
    use pb::worker_message::Msg;
    let denied = |status: tonic::Status| {
        if status.code() == Code::PermissionDenied {
            Err(status)
        } else {
            Ok(())
        }
    };
    let by_queue = || pb::WatchResultsRequest {
        target: Some(pb::watch_results_request::Target::Queue(queue.into())),
    };
    // A lease of the task that is not its current one: past authorization
    // the engine answers ABORTED, never PERMISSION_DENIED.
    let stale_lease = format!("{task}/99");
    let answer = match call {
        "PutTask" => client.put_task(put(queue)).await.map(drop),
        "PutTasks" => {
            let batch = pb::PutTasksRequest {
                tasks: vec![put(queue)],
            };
            match client.put_tasks(batch).await {
                Ok(answer) => match &answer.get_ref().outcomes[0].outcome {
                    Some(pb::put_task_outcome::Outcome::Error(e))
                        if e.code == Code::PermissionDenied as i32 =>
                    {
                        return Err(tonic::Status::permission_denied(e.message.clone()));
                    }
                    _ => Ok(()),
                },
                Err(status) => Err(status),
            }
        }
        "GetResult" => {
            let request = pb::GetResultRequest {
                target: Some(pb::get_result_request::Target::Queue(queue.into())),
                max_wait: Some(prost_types::Duration::default()),
            };
            client.get_result(request).await.map(drop)
        }
        "WatchResults" => client.watch_results(by_queue()).await.map(drop),
        "WatchResultBatches" => client.watch_result_batches(by_queue()).await.map(drop),
        "GetTask" => client.get_task(get(queue)).await.map(drop),
        "StreamTasks" => {
            let subscribe = pb::WorkerMessage {
                msg: Some(Msg::Subscribe(pb::Subscribe {
                    queue: queue.into(),
                    max_in_flight: 0,
                    ..Default::default()
                })),
            };
            client
                .stream_tasks(tokio_stream::iter(vec![subscribe]))
                .await
                .map(drop)
        }
        "ExtendLease" => client
            .extend_lease(pb::ExtendLeaseRequest {
                task_id: task.into(),
                lease_id: stale_lease,
                extend_by: None,
            })
            .await
            .map(drop),
        "PutResult" => client
            .put_result(pb::PutResultRequest {
                task_id: task.into(),
                lease_id: stale_lease,
                outcome: Some(pb::put_result_request::Outcome::Output(
                    b"x".to_vec().into(),
                )),
            })
            .await
            .map(drop),
        "CancelTask" => client
            .cancel_task(pb::CancelTaskRequest {
                task_id: task.into(),
            })
            .await
            .map(drop),
        "ResumeQueue" => client
            .resume_queue(pb::QueueRequest {
                queue: queue.into(),
            })
            .await
            .map(drop),
        "GetStats" => client
            .get_stats(pb::GetStatsRequest {
                queue: queue.into(),
            })
            .await
            .map(drop),
        other => panic!("no such call in the table: {other}"),
    };
    answer.or_else(denied)
}

/// Every call x every role x a token for all queues and one limited to
/// `mine`, on `mine` and on `other`: a call gets past authorization exactly
/// when its role may make it (admin: all) and its queue is the token's.
#[tokio::test]
async fn every_call_by_every_role_and_scope_follows_the_table() {
    let server = server_with_roles().await;
    // A task in each queue, for the calls that name a task.
    let mut admin = server.client_with_token("admin-token").await;
    let mut tasks = std::collections::HashMap::new();
    for queue in ["mine", "other"] {
        let id = admin
            .put_task(put(queue))
            .await
            .unwrap()
            .into_inner()
            .task_id;
        tasks.insert(queue, id);
    }
    let calls = [
        ("PutTask", "producer"),
        ("PutTasks", "producer"),
        ("GetResult", "producer"),
        ("WatchResults", "producer"),
        ("WatchResultBatches", "producer"),
        ("GetTask", "worker"),
        ("StreamTasks", "worker"),
        ("ExtendLease", "worker"),
        ("PutResult", "worker"),
        ("CancelTask", "producer"),
        ("ResumeQueue", "admin"),
        ("GetStats", "admin"),
    ];
    let mut checked = 0;
    for role in ["producer", "worker", "admin"] {
        for (token, limited) in [
            (format!("{role}-token"), false),
            (format!("mine-{role}"), true),
        ] {
            let mut client = server.client_with_token(&token).await;
            for (call, needs) in calls {
                for queue in ["mine", "other"] {
                    let role_may = role == "admin" || role == needs;
                    let queue_may = !limited || queue == "mine";
                    let answer = try_call(&mut client, call, queue, &tasks[queue]).await;
                    assert_eq!(
                        answer.is_ok(),
                        role_may && queue_may,
                        "{token} calling {call} on {queue}: {answer:?}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 3 * 2 * 12 * 2);
    server.shutdown().await;
}
