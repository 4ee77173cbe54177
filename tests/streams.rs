//! PutTasks, StreamTasks and WatchResults over real gRPC.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::{Client, TestServer};
use prost::Message as _;
use taskq::pb::{self, server_message::Msg as Out, worker_message::Msg as In};
use taskq::server::BrokerConfig;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(10);

fn task_req(queue: &str, payload: &str) -> pb::PutTaskRequest {
    pb::PutTaskRequest {
        queue: queue.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..Default::default()
    }
}

async fn put_many(client: &mut Client, queue: &str, n: usize) -> Vec<String> {
    let tasks = (0..n).map(|i| task_req(queue, &i.to_string())).collect();
    let response = client
        .put_tasks(pb::PutTasksRequest { tasks })
        .await
        .unwrap()
        .into_inner();
    response
        .outcomes
        .into_iter()
        .map(|o| match o.outcome {
            Some(pb::put_task_outcome::Outcome::Ok(ok)) => ok.task_id,
            other => panic!("not stored: {other:?}"),
        })
        .collect()
}

/// A worker's side of StreamTasks: a sender of messages and the server's
/// replies.
struct WorkerStream {
    tx: mpsc::Sender<pb::WorkerMessage>,
    rx: Streaming<pb::ServerMessage>,
}

impl WorkerStream {
    async fn open(client: &mut Client, queue: &str, worker: &str, window: u32) -> Self {
        let (tx, outbound) = mpsc::channel(64);
        tx.send(subscribe(queue, worker, window)).await.unwrap();
        let rx = client
            .stream_tasks(ReceiverStream::new(outbound))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    async fn send(&self, msg: In) {
        self.tx
            .send(pb::WorkerMessage { msg: Some(msg) })
            .await
            .unwrap();
    }

    async fn next(&mut self) -> Out {
        tokio::time::timeout(WAIT, self.rx.next())
            .await
            .expect("a message within 10s")
            .expect("the stream is open")
            .expect("not an error")
            .msg
            .unwrap()
    }

    async fn task(&mut self) -> pb::Task {
        match self.next().await {
            Out::Task(task) => task,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    async fn finish(&self, task: &pb::Task, output: &str) {
        self.send(In::Result(pb::PutResultRequest {
            task_id: task.id.clone(),
            lease_id: task.lease_id.clone(),
            outcome: Some(pb::put_result_request::Outcome::Output(
                Bytes::copy_from_slice(output.as_bytes()),
            )),
        }))
        .await;
    }
}

fn subscribe(queue: &str, worker: &str, window: u32) -> pb::WorkerMessage {
    pb::WorkerMessage {
        msg: Some(In::Subscribe(pb::Subscribe {
            queue: queue.into(),
            worker_id: worker.into(),
            lease: Some(Duration::from_secs(60).try_into().unwrap()),
            max_in_flight: window,
            max_batch: 0,
        })),
    }
}

async fn stats(client: &mut Client, queue: &str) -> pb::QueueStats {
    client
        .get_stats(pb::GetStatsRequest {
            queue: queue.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .queues
        .remove(0)
}

#[tokio::test]
async fn put_tasks_keeps_order_and_reports_each_error() {
    let server = TestServer::with_broker(BrokerConfig {
        max_payload: 8,
        ..BrokerConfig::default()
    })
    .await;
    let mut client = server.client().await;
    let tasks = vec![
        task_req("q", "first"),
        task_req("bad name", "x"),
        task_req("q", "far too long"),
        task_req("q", "last"),
    ];
    let outcomes = client
        .put_tasks(pb::PutTasksRequest { tasks })
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    use pb::put_task_outcome::Outcome;
    assert!(matches!(outcomes[0].outcome, Some(Outcome::Ok(_))));
    assert!(
        matches!(&outcomes[1].outcome, Some(Outcome::Error(e)) if e.code == Code::InvalidArgument as i32)
    );
    assert!(
        matches!(&outcomes[2].outcome, Some(Outcome::Error(e)) if e.code == Code::InvalidArgument as i32)
    );
    assert!(matches!(outcomes[3].outcome, Some(Outcome::Ok(_))));
    assert_eq!(stats(&mut client, "q").await.pending, 2);
    let too_many = (0..1001).map(|_| task_req("q", "x")).collect();
    let status = client
        .put_tasks(pb::PutTasksRequest { tasks: too_many })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("--max-batch"),
        "{}",
        status.message()
    );
    assert_eq!(
        stats(&mut client, "q").await.pending,
        2,
        "nothing of the refused batch stored"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_first_message_must_be_subscribe() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let (tx, outbound) = mpsc::channel(1);
    tx.send(pb::WorkerMessage {
        msg: Some(In::Window(pb::SetMaxInFlight { max_in_flight: 1 })),
    })
    .await
    .unwrap();
    let status = client
        .stream_tasks(ReceiverStream::new(outbound))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    server.shutdown().await;
}

/// Never more than `max_in_flight` outstanding; each result frees a slot;
/// acks come in order; window 0 pauses and a new window resumes.
#[tokio::test]
async fn flow_control_results_and_extensions() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    put_many(&mut client, "q", 6).await;
    let mut worker = WorkerStream::open(&mut client, "q", "w1", 2).await;
    let first = worker.task().await;
    let second = worker.task().await;
    assert_eq!(
        stats(&mut client, "q").await.leased,
        2,
        "two out, four held back"
    );

    worker
        .send(In::Extend(pb::ExtendLeaseRequest {
            task_id: first.id.clone(),
            lease_id: first.lease_id.clone(),
            extend_by: Some(Duration::from_secs(120).try_into().unwrap()),
        }))
        .await;
    match worker.next().await {
        Out::ExtendAck(ack) => {
            assert_eq!(ack.task_id, first.id);
            assert!(ack.error.is_none() && ack.lease_expires_at.is_some());
        }
        other => panic!("{other:?}"),
    }
    worker.finish(&first, "done").await;
    // The ack comes first, then the next task into the freed slot.
    match worker.next().await {
        Out::ResultAck(ack) => {
            assert_eq!(
                (ack.task_id.as_str(), ack.state()),
                (first.id.as_str(), pb::TaskState::Succeeded)
            );
            assert!(ack.error.is_none());
        }
        other => panic!("{other:?}"),
    }
    let third = worker.task().await;
    // An error is an ItemError in the ack, and the stream stays open.
    worker.finish(&first, "different").await;
    match worker.next().await {
        Out::ResultAck(ack) => {
            assert_eq!(ack.error.unwrap().code, Code::AlreadyExists as i32);
        }
        other => panic!("{other:?}"),
    }
    // Pause: results still go in, no new tasks come.
    worker
        .send(In::Window(pb::SetMaxInFlight { max_in_flight: 0 }))
        .await;
    worker.finish(&second, "2").await;
    worker.finish(&third, "3").await;
    for _ in 0..2 {
        assert!(matches!(worker.next().await, Out::ResultAck(_)));
    }
    let s = stats(&mut client, "q").await;
    assert_eq!((s.leased, s.pending, s.succeeded), (0, 3, 3));
    worker
        .send(In::Window(pb::SetMaxInFlight { max_in_flight: 3 }))
        .await;
    let mut got = HashSet::new();
    for _ in 0..3 {
        got.insert(worker.task().await.id);
    }
    assert_eq!(got.len(), 3);
    // A stream still holding tasks would keep the drain waiting for its
    // grace period.
    drop(worker);
    server.shutdown().await;
}

/// A stream that breaks gives its tasks back at once, not after the lease.
#[tokio::test]
async fn a_broken_stream_requeues_its_tasks_at_once() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let ids = put_many(&mut client, "q", 2).await;
    let mut doomed = WorkerStream::open(&mut client, "q", "doomed", 2).await;
    let a = doomed.task().await;
    let b = doomed.task().await;
    drop(doomed);
    // The lease is 60s; a 10s deadline only passes if the tasks came back
    // when the stream broke.
    let mut other = server.client().await;
    let mut back = Vec::new();
    for _ in 0..2 {
        let task = other
            .get_task(common::with_deadline(
                pb::GetTaskRequest {
                    queue: "q".into(),
                    ..Default::default()
                },
                WAIT,
            ))
            .await
            .unwrap()
            .into_inner()
            .task
            .expect("given back at once");
        assert_eq!(task.attempt, 2);
        back.push(task.id);
    }
    back.sort();
    let mut expected = vec![a.id, b.id];
    expected.sort();
    assert_eq!(back, expected);
    assert_eq!(ids.len(), 2);
    server.shutdown().await;
}

/// A broken stream's task on its last attempt is not handed out again: it
/// ends FAILED at once, saying why, as when its lease runs out.
#[tokio::test]
async fn a_broken_stream_fails_a_task_on_its_last_attempt() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let id = client
        .put_task(pb::PutTaskRequest {
            max_attempts: 1,
            ..task_req("last", "only once")
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let mut doomed = WorkerStream::open(&mut client, "last", "doomed", 1).await;
    assert_eq!(doomed.task().await.id, id);
    drop(doomed);
    let result = client
        .get_result(common::with_deadline(
            pb::GetResultRequest {
                target: Some(pb::get_result_request::Target::TaskId(id)),
                max_wait: Some(WAIT.try_into().unwrap()),
            },
            WAIT + Duration::from_secs(1),
        ))
        .await
        .unwrap()
        .into_inner()
        .result
        .expect("failed when the stream broke, not when the 60s lease ran out");
    assert_eq!(result.state, pb::TaskState::Failed as i32);
    assert_eq!(result.attempts, 1);
    assert!(result.error.contains("attempt 1 of 1"), "{}", result.error);
    server.shutdown().await;
}

/// A slow worker with a full window does not hold up others.
#[tokio::test]
async fn a_slow_worker_does_not_starve_others() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let mut slow = WorkerStream::open(&mut client, "q", "slow", 1).await;
    let mut fast = WorkerStream::open(&mut client, "q", "fast", 4).await;
    put_many(&mut client, "q", 5).await;
    let _held = slow.task().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(fast.task().await);
    }
    for task in &tasks {
        fast.finish(task, "ok").await;
    }
    for _ in 0..4 {
        assert!(matches!(fast.next().await, Out::ResultAck(_)));
    }
    assert_eq!(stats(&mut client, "q").await.succeeded, 4);
    drop((slow, fast));
    server.shutdown().await;
}

/// Opens a stream that asks for batches of at most `max_batch` tasks.
async fn open_batched(
    client: &mut Client,
    queue: &str,
    window: u32,
    max_batch: u32,
) -> WorkerStream {
    let (tx, outbound) = mpsc::channel(64);
    let mut first = subscribe(queue, "batched", window);
    if let Some(In::Subscribe(subscribe)) = &mut first.msg {
        subscribe.max_batch = max_batch;
    }
    tx.send(first).await.unwrap();
    let rx = client
        .stream_tasks(ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    WorkerStream { tx, rx }
}

impl WorkerStream {
    async fn batch(&mut self) -> Vec<pb::Task> {
        match self.next().await {
            Out::Tasks(batch) => batch.tasks,
            other => panic!("expected a batch of tasks, got {other:?}"),
        }
    }
}

fn output(task: &pb::Task, lease_id: &str, text: &str) -> pb::PutResultRequest {
    pb::PutResultRequest {
        task_id: task.id.clone(),
        lease_id: lease_id.into(),
        outcome: Some(pb::put_result_request::Outcome::Output(
            Bytes::copy_from_slice(text.as_bytes()),
        )),
    }
}

/// With `max_batch`, the tasks ready at once come together, never more
/// than `max_batch` per message nor than the window in all; a `results`
/// batch is acknowledged in one message, in order, each result on its own.
#[tokio::test]
async fn batches_of_tasks_and_results_keep_the_window_and_the_order() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    put_many(&mut client, "q", 10).await;
    let mut worker = open_batched(&mut client, "q", 8, 3).await;
    // All ten were waiting: the window's eight come in batches of three.
    let mut tasks = Vec::new();
    let mut sizes = Vec::new();
    while tasks.len() < 8 {
        let batch = worker.batch().await;
        sizes.push(batch.len());
        tasks.extend(batch);
    }
    assert_eq!(sizes, [3, 3, 2]);
    let s = stats(&mut client, "q").await;
    assert_eq!((s.leased, s.pending), (8, 2), "no task beyond the window");

    // Three results in one message, the middle one naming a wrong lease.
    worker
        .send(In::Results(pb::PutResultBatch {
            results: vec![
                output(&tasks[0], &tasks[0].lease_id, "a"),
                output(&tasks[1], &tasks[0].lease_id, "b"),
                output(&tasks[2], &tasks[2].lease_id, "c"),
            ],
        }))
        .await;
    let Out::ResultAcks(acks) = worker.next().await else {
        panic!("expected the batch's acks");
    };
    let seen: Vec<_> = acks
        .acks
        .iter()
        .map(|ack| (ack.task_id.as_str(), ack.error.as_ref().map(|e| e.code)))
        .collect();
    assert_eq!(
        seen,
        [
            (tasks[0].id.as_str(), None),
            (tasks[1].id.as_str(), Some(Code::Aborted as i32)),
            (tasks[2].id.as_str(), None),
        ]
    );
    assert_eq!(acks.acks[0].state(), pb::TaskState::Succeeded);
    // Two slots freed, two tasks left: they come in one batch.
    let rest = worker.batch().await;
    assert_eq!(rest.len(), 2);
    let s = stats(&mut client, "q").await;
    assert_eq!((s.leased, s.pending, s.succeeded), (8, 0, 2));
    drop(worker);
    server.shutdown().await;
}

/// A `results` message is completed a few hundred at a time under the
/// broker's lock; the acks still come as one message, one per result, in
/// order.
#[tokio::test]
async fn a_large_results_message_is_acknowledged_whole_and_in_order() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    put_many(&mut client, "q", 600).await;
    let mut worker = open_batched(&mut client, "q", 600, 600).await;
    let mut tasks = Vec::new();
    while tasks.len() < 600 {
        tasks.extend(worker.batch().await);
    }
    let results = tasks
        .iter()
        .map(|task| output(task, &task.lease_id, "r"))
        .collect();
    worker
        .send(In::Results(pb::PutResultBatch { results }))
        .await;
    let Out::ResultAcks(acks) = worker.next().await else {
        panic!("expected the batch's acks");
    };
    let acked: Vec<_> = acks.acks.iter().map(|a| a.task_id.as_str()).collect();
    let sent: Vec<_> = tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(acked, sent);
    assert!(acks.acks.iter().all(|a| a.error.is_none()));
    assert_eq!(stats(&mut client, "q").await.succeeded, 600);
    drop(worker);
    server.shutdown().await;
}

/// A batch of tasks stays within 1 MiB encoded, unless it holds one task.
#[tokio::test]
async fn a_batch_of_tasks_stays_within_one_mebibyte() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let payload = "x".repeat(400 * 1024);
    let tasks = (0..3).map(|_| task_req("big", &payload)).collect();
    client
        .put_tasks(pb::PutTasksRequest { tasks })
        .await
        .unwrap();
    let mut worker = open_batched(&mut client, "big", 3, 10).await;
    let first = worker.batch().await;
    let second = worker.batch().await;
    // Two fit in 1 MiB; the third waited for the next message.
    assert_eq!((first.len(), second.len()), (2, 1));
    let size = pb::TaskBatch { tasks: first }.encoded_len();
    assert!(size <= 1 << 20, "batch of {size} bytes");
    drop(worker);
    server.shutdown().await;
}

/// Two readers of a queue's results take turns: each result goes to one
/// of them, never to both (a stream that copied every result to every
/// reader would pass with one reader).
#[tokio::test]
async fn watch_results_by_queue_delivers_each_result_once() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let by_queue = || pb::WatchResultsRequest {
        target: Some(pb::watch_results_request::Target::Queue("q".into())),
    };
    // Opened one after the other: the first is first in turn.
    let mut first = client.watch_results(by_queue()).await.unwrap().into_inner();
    let mut second = client.watch_results(by_queue()).await.unwrap().into_inner();
    let ids = put_many(&mut client, "q", 5).await;
    let mut worker = WorkerStream::open(&mut client, "q", "w", 5).await;
    for _ in 0..5 {
        let task = worker.task().await;
        worker.finish(&task, "r").await;
    }
    let mut seen = HashSet::new();
    for turn in 0..5 {
        let watcher = if turn % 2 == 0 {
            &mut first
        } else {
            &mut second
        };
        let result = tokio::time::timeout(WAIT, watcher.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            seen.insert(result.task_id.clone()),
            "{} handed out twice",
            result.task_id
        );
    }
    assert_eq!(seen, ids.iter().cloned().collect());
    // Handed out once: GetResult(queue) finds nothing left.
    let left = client
        .get_result(common::with_deadline(
            pb::GetResultRequest {
                target: Some(pb::get_result_request::Target::Queue("q".into())),
                max_wait: Some(Duration::ZERO.try_into().unwrap()),
            },
            WAIT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(left.result.is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn watch_results_by_ids_ends_after_the_last_and_refuses_unknown_ids() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let ids = put_many(&mut client, "q", 3).await;
    let target = |ids: Vec<String>| pb::WatchResultsRequest {
        target: Some(pb::watch_results_request::Target::TaskIds(pb::TaskIds {
            ids,
        })),
    };
    let mut unknown = ids.clone();
    unknown.push("01890a5d-ac96-774b-bcce-b302099a8057".into());
    let status = client.watch_results(target(unknown)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let mut worker = WorkerStream::open(&mut client, "q", "w", 3).await;
    let first = worker.task().await;
    let others = [worker.task().await, worker.task().await];
    worker.finish(&first, "early").await;
    assert!(matches!(worker.next().await, Out::ResultAck(_)));
    let mut watcher = client
        .watch_results(target(ids.clone()))
        .await
        .unwrap()
        .into_inner();
    // The finished one comes at once.
    let early = tokio::time::timeout(WAIT, watcher.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(early.task_id, first.id);
    for task in &others {
        worker.finish(task, "late").await;
    }
    let mut rest = HashSet::new();
    for _ in 0..2 {
        rest.insert(
            tokio::time::timeout(WAIT, watcher.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
                .task_id,
        );
    }
    assert_eq!(rest.len(), 2);
    assert!(
        tokio::time::timeout(WAIT, watcher.next())
            .await
            .unwrap()
            .is_none(),
        "ends after the last"
    );
    server.shutdown().await;
}

/// Finishes `n` tasks of `queue` through a batched stream, each with
/// `output`, and waits for the acks. Returns the task ids.
async fn finish_batched(client: &mut Client, queue: &str, n: usize, output: &str) -> Vec<String> {
    let ids = put_many(client, queue, n).await;
    let mut worker = open_batched(client, queue, n as u32, n as u32).await;
    let mut tasks = Vec::new();
    while tasks.len() < n {
        tasks.extend(worker.batch().await);
    }
    let results = tasks
        .iter()
        .map(|task| self::output(task, &task.lease_id, output))
        .collect();
    worker
        .send(In::Results(pb::PutResultBatch { results }))
        .await;
    let Out::ResultAcks(acks) = worker.next().await else {
        panic!("expected the batch's acks");
    };
    assert!(acks.acks.iter().all(|ack| ack.error.is_none()));
    ids
}

async fn next_batch(batches: &mut Streaming<pb::ResultBatch>) -> Option<Vec<pb::Result>> {
    tokio::time::timeout(WAIT, batches.next())
        .await
        .expect("a message within 10s")
        .map(|batch| batch.expect("not an error").results)
}

/// WatchResultBatches is WatchResults with the results ready at once in
/// one message: by queue, each handed out once and the queue left empty.
#[tokio::test]
async fn watch_result_batches_by_queue_hands_out_each_result_once() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let ids = finish_batched(&mut client, "q", 6, "r").await;
    let mut batches = client
        .watch_result_batches(pb::WatchResultsRequest {
            target: Some(pb::watch_results_request::Target::Queue("q".into())),
        })
        .await
        .unwrap()
        .into_inner();
    // All six were finished before the call: one message holds them.
    let results = next_batch(&mut batches).await.unwrap();
    let seen: HashSet<_> = results.iter().map(|r| r.task_id.clone()).collect();
    assert_eq!((results.len(), seen), (6, ids.into_iter().collect()));
    let left = client
        .get_result(common::with_deadline(
            pb::GetResultRequest {
                target: Some(pb::get_result_request::Target::Queue("q".into())),
                max_wait: Some(Duration::ZERO.try_into().unwrap()),
            },
            WAIT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(left.result.is_none(), "handed out once");
    server.shutdown().await;
}

/// By task ids: NOT_FOUND before anything for an unknown id; results in
/// messages of at most 1 MiB unless one result is larger; the stream ends
/// after the last.
#[tokio::test]
async fn watch_result_batches_by_ids_split_at_one_mebibyte_and_end() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let big = "y".repeat(400 * 1024);
    let ids = finish_batched(&mut client, "q", 3, &big).await;
    let target = |ids: Vec<String>| pb::WatchResultsRequest {
        target: Some(pb::watch_results_request::Target::TaskIds(pb::TaskIds {
            ids,
        })),
    };
    let mut unknown = ids.clone();
    unknown.push("01890a5d-ac96-774b-bcce-b302099a8057".into());
    let status = client
        .watch_result_batches(target(unknown))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let mut batches = client
        .watch_result_batches(target(ids.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut sizes = Vec::new();
    let mut seen = HashSet::new();
    while let Some(results) = next_batch(&mut batches).await {
        let size = pb::ResultBatch {
            results: results.clone(),
        }
        .encoded_len();
        assert!(size <= 1 << 20 || results.len() == 1, "{size} bytes");
        sizes.push(results.len());
        seen.extend(results.into_iter().map(|r| r.task_id));
    }
    assert_eq!(sizes, [2, 1], "two fit in 1 MiB, then the stream ended");
    assert_eq!(seen, ids.into_iter().collect());
    server.shutdown().await;
}

/// During a drain a stream gets no new task, its results still go in, and
/// once it holds nothing the server ends it with UNAVAILABLE, so the drain
/// does not wait for the grace period.
#[tokio::test]
async fn a_draining_server_lets_streams_report_then_ends_them() {
    let config = taskq::server::ServerConfig {
        // Longer than TestServer::shutdown waits: only the drain itself
        // can let the server stop in time.
        shutdown_grace: Duration::from_secs(60),
        ..taskq::server::ServerConfig::new(BrokerConfig::default())
    };
    let mut server = TestServer::with_config(config).await;
    let mut client = server.client().await;
    // One task only: whether the drain starts before or after the result,
    // the stream then holds nothing and no other task can reach it.
    put_many(&mut client, "q", 1).await;
    let mut worker = WorkerStream::open(&mut client, "q", "w", 1).await;
    let task = worker.task().await;
    server.signal_shutdown();
    worker.finish(&task, "done").await;
    match worker.next().await {
        Out::ResultAck(ack) => assert!(ack.error.is_none(), "{ack:?}"),
        other => panic!("{other:?}"),
    }
    let end = tokio::time::timeout(WAIT, worker.rx.next()).await.unwrap();
    match end {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    drop(worker);
    drop(client);
    server.shutdown().await;
}

/// A task cancelled while a worker stream holds it: the stream gets a
/// `cancel` naming the task and its lease, and the place in the window is
/// free again (window 1: the next task comes).
#[tokio::test]
async fn a_cancelled_task_is_taken_back_from_its_stream() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    let ids = put_many(&mut client, "cancel-stream", 2).await;
    let mut worker = WorkerStream::open(&mut client, "cancel-stream", "w", 1).await;
    let task = worker.task().await;
    assert_eq!(task.id, ids[0]);
    let previous = client
        .cancel_task(pb::CancelTaskRequest {
            task_id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(previous.previous_state(), pb::TaskState::Leased);
    // The cancel, and the second task in the place it freed (window 1),
    // in either order: they travel apart.
    let (mut cancels, mut tasks) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        match worker.next().await {
            Out::Cancel(cancel) => cancels.push(cancel),
            Out::Task(task) => tasks.push(task),
            other => panic!("expected a cancel or a task, got {other:?}"),
        }
    }
    assert_eq!(cancels.len(), 1, "one cancel");
    assert_eq!(cancels[0].task_id, task.id);
    assert_eq!(cancels[0].lease_id, task.lease_id);
    assert_eq!(tasks.len(), 1, "one task");
    assert_eq!(tasks[0].id, ids[1]);
    // A report of the cancelled task is refused in its ack.
    worker.finish(&task, "too late").await;
    match worker.next().await {
        Out::ResultAck(ack) => {
            let error = ack.error.expect("refused");
            assert_eq!(error.code, Code::FailedPrecondition as i32, "{error:?}");
        }
        other => panic!("expected an ack, got {other:?}"),
    }
    server.shutdown().await;
}
