//! The engine's caps that had no test of their own (Guarantees, I9): each
//! answers with its code, names its flag, and changes nothing.
//! `--max-queues`, the tracked workers' cap, and `--max-waiters` for every
//! kind of waiting call: GetTask, GetResult by id and by queue, and the
//! streams that count as waiters (StreamTasks, WatchResults).

mod common;

use std::time::Duration;

use common::{Client, TestServer, eventually};
use taskq::pb::{self, get_result_request::Target};
use taskq::server::BrokerConfig;
use tokio_stream::StreamExt as _;
use tonic::Code;

fn put(queue: &str) -> pb::PutTaskRequest {
    pb::PutTaskRequest {
        queue: queue.into(),
        payload: b"x".to_vec().into(),
        ..Default::default()
    }
}

fn get(queue: &str, worker: &str, max_wait: Duration) -> pb::GetTaskRequest {
    pb::GetTaskRequest {
        queue: queue.into(),
        worker_id: worker.into(),
        max_wait: Some(max_wait.try_into().unwrap()),
        ..Default::default()
    }
}

fn result_of(target: Target, max_wait: Duration) -> pb::GetResultRequest {
    pb::GetResultRequest {
        target: Some(target),
        max_wait: Some(max_wait.try_into().unwrap()),
    }
}

fn watch(target: pb::watch_results_request::Target) -> pb::WatchResultsRequest {
    pb::WatchResultsRequest {
        target: Some(target),
    }
}

async fn stream_on(client: &mut Client, queue: &str) -> Result<(), tonic::Status> {
    let subscribe = pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Subscribe(pb::Subscribe {
            queue: queue.into(),
            max_in_flight: 1,
            ..Default::default()
        })),
    };
    let outbound = tokio_stream::iter([subscribe]).chain(tokio_stream::pending());
    client.stream_tasks(outbound).await.map(drop)
}

/// The status of a refused call: RESOURCE_EXHAUSTED naming `flag`.
fn exhausted<T: std::fmt::Debug>(answer: Result<T, tonic::Status>, flag: &str, what: &str) {
    let status = answer.expect_err(what);
    assert_eq!(status.code(), Code::ResourceExhausted, "{what}: {status:?}");
    assert!(status.message().contains(flag), "{what}: {status:?}");
}

async fn queues(client: &mut Client) -> Vec<String> {
    let stats = client
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    stats.queues.into_iter().map(|q| q.queue).collect()
}

/// A new queue past `--max-queues` is refused by every call that would
/// make it, and none of them makes it.
#[tokio::test]
async fn max_queues_refuses_a_new_queue_on_every_call_and_makes_none() {
    let server = TestServer::with_broker(BrokerConfig {
        max_queues: 2,
        ..BrokerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    client.put_task(put("q1")).await.unwrap();
    client.put_task(put("q2")).await.unwrap();
    let flag = "--max-queues";
    exhausted(client.put_task(put("q3")).await, flag, "PutTask");
    let batch = pb::PutTasksRequest {
        tasks: vec![put("q3")],
    };
    let outcome = client.put_tasks(batch).await.unwrap().into_inner().outcomes;
    match &outcome[0].outcome {
        Some(pb::put_task_outcome::Outcome::Error(error)) => {
            assert_eq!(error.code, Code::ResourceExhausted as i32, "{error:?}");
        }
        other => panic!("PutTasks stored a task in a queue past the cap: {other:?}"),
    }
    exhausted(
        client.get_task(get("q3", "w", Duration::ZERO)).await,
        flag,
        "GetTask",
    );
    exhausted(
        client
            .get_result(result_of(Target::Queue("q3".into()), Duration::ZERO))
            .await,
        flag,
        "GetResult by queue",
    );
    exhausted(
        client
            .watch_results(watch(pb::watch_results_request::Target::Queue("q3".into())))
            .await,
        flag,
        "WatchResults by queue",
    );
    exhausted(stream_on(&mut client, "q3").await, flag, "StreamTasks");
    assert_eq!(queues(&mut client).await, ["q1", "q2"], "no queue was made");
    // The queues that exist still work.
    let task = client
        .get_task(get("q1", "w", Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    assert!(task.task.is_some());
    server.shutdown().await;
}

/// Past the tracked workers' cap, a new worker's calls still work; only
/// its tracking is skipped (workers holding tasks are never forgotten).
#[tokio::test]
async fn past_the_worker_cap_work_goes_on_untracked() {
    let server = TestServer::with_broker(BrokerConfig {
        max_workers: 2,
        ..BrokerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    let mut leases = Vec::new();
    for worker in ["w1", "w2", "w3"] {
        client.put_task(put("q")).await.unwrap();
        let task = client
            .get_task(get("q", worker, Duration::ZERO))
            .await
            .unwrap()
            .into_inner()
            .task
            .expect("every worker gets its task, tracked or not");
        leases.push(task);
    }
    let stats = client
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let tracked: Vec<_> = stats.workers.iter().map(|w| w.worker_id.as_str()).collect();
    assert_eq!(tracked, ["w1", "w2"], "the third is not tracked");
    assert_eq!(stats.queues[0].leased, 3, "its lease is real");
    // The untracked worker's report is taken like any other.
    let third = &leases[2];
    let report = pb::PutResultRequest {
        task_id: third.id.clone(),
        lease_id: third.lease_id.clone(),
        outcome: Some(pb::put_result_request::Outcome::Output(
            b"ok".to_vec().into(),
        )),
    };
    let state = client.put_result(report).await.unwrap().into_inner().state;
    assert_eq!(state, pb::TaskState::Succeeded as i32);
    server.shutdown().await;
}

/// With `--max-waiters` calls waiting, every kind of call that would wait
/// is refused, none of them is registered, and the calls already waiting
/// are served as before.
#[tokio::test]
async fn max_waiters_refuses_every_kind_of_waiting_call_and_changes_nothing() {
    let server = TestServer::with_broker(BrokerConfig {
        max_waiters: 2,
        ..BrokerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    // An unfinished task, whose result a GetResult by id would wait for.
    let unfinished = client
        .put_task(put("other"))
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let mut waiting = Vec::new();
    for worker in ["w1", "w2"] {
        let mut waiter = server.client().await;
        waiting.push(tokio::spawn(async move {
            waiter
                .get_task(get("q", worker, Duration::from_secs(30)))
                .await
                .map(|answer| answer.into_inner().task.map(|t| t.id))
        }));
    }
    eventually("both GetTask calls wait", || {
        let mut client = client.clone();
        async move {
            let stats = client
                .get_stats(pb::GetStatsRequest { queue: "q".into() })
                .await
                .unwrap()
                .into_inner();
            stats.queues[0].waiting_workers == 2
        }
    })
    .await;
    let flag = "--max-waiters";
    let wait = Duration::from_secs(5);
    exhausted(client.get_task(get("q", "w3", wait)).await, flag, "GetTask");
    exhausted(
        client
            .get_result(result_of(Target::TaskId(unfinished.clone()), wait))
            .await,
        flag,
        "GetResult by id",
    );
    exhausted(
        client
            .get_result(result_of(Target::Queue("q".into()), wait))
            .await,
        flag,
        "GetResult by queue",
    );
    exhausted(
        client
            .watch_results(watch(pb::watch_results_request::Target::Queue("q".into())))
            .await,
        flag,
        "WatchResults by queue",
    );
    exhausted(
        client
            .watch_results(watch(pb::watch_results_request::Target::TaskIds(
                pb::TaskIds {
                    ids: vec![unfinished.clone()],
                },
            )))
            .await,
        flag,
        "WatchResults by task ids",
    );
    exhausted(stream_on(&mut client, "q").await, flag, "StreamTasks");
    // Nothing was registered: the two calls still wait, and are served in
    // turn by the next two tasks.
    let stats = client
        .get_stats(pb::GetStatsRequest { queue: "q".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.queues[0].waiting_workers, 2);
    let mut put_ids = Vec::new();
    for _ in 0..2 {
        put_ids.push(
            client
                .put_task(put("q"))
                .await
                .unwrap()
                .into_inner()
                .task_id,
        );
    }
    let mut served = Vec::new();
    for call in waiting {
        served.push(
            call.await
                .unwrap()
                .unwrap()
                .expect("a waiting call gets a task"),
        );
    }
    served.sort();
    put_ids.sort();
    assert_eq!(served, put_ids);
    // Calls that do not wait are never refused by the cap.
    let now = client
        .get_result(result_of(Target::TaskId(unfinished), Duration::ZERO))
        .await
        .unwrap()
        .into_inner();
    assert!(now.result.is_none(), "unfinished, answered at once");
    server.shutdown().await;
}
