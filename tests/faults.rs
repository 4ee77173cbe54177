//! Network faults without leaving loopback: a proxy between client and
//! server stalls or cuts connections, and nothing is lost or doubled.
//!
//! The server runs on real sockets, so these tests run in real time; the
//! timers involved (keepalive, leases) are set to a few hundred
//! milliseconds and every wait is bounded.

mod common;

use std::time::Duration;

use common::proxy::{Fault, Proxy};
use common::{Client, TestServer, eventually, with_deadline};
use taskq::pb::{self, server_message::Msg as Out, worker_message::Msg as In};
use taskq::server::BrokerConfig;
use taskq::server::{ServerConfig, TransportConfig};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Endpoint;

/// A server that pings idle connections every 200 ms and drops those that
/// do not answer within 200 ms.
async fn server() -> TestServer {
    TestServer::with_config(ServerConfig {
        transport: TransportConfig {
            keepalive_interval: Duration::from_millis(200),
            keepalive_timeout: Duration::from_millis(200),
            ..TransportConfig::default()
        },
        ..ServerConfig::new(BrokerConfig::default())
    })
    .await
}

/// A client whose connection goes through `proxy`.
async fn client_through(proxy: &Proxy) -> Client {
    let channel = Endpoint::from_shared(proxy.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    Client::new(channel)
}

async fn queue_stats(client: &mut Client, queue: &str) -> Option<pb::QueueStats> {
    client
        .get_stats(pb::GetStatsRequest {
            queue: queue.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .queues
        .into_iter()
        .find(|q| q.queue == queue)
}

fn put(queue: &str, payload: &str) -> pb::PutTaskRequest {
    pb::PutTaskRequest {
        queue: queue.into(),
        payload: payload.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

fn get(queue: &str, lease: Duration) -> pb::GetTaskRequest {
    pb::GetTaskRequest {
        queue: queue.into(),
        lease: Some(lease.try_into().unwrap()),
        ..Default::default()
    }
}

/// A task from `jobs` under a minute's lease, waiting up to 10 s.
async fn take(client: &mut Client) -> Option<pb::Task> {
    client
        .get_task(with_deadline(
            get("jobs", Duration::from_secs(60)),
            Duration::from_secs(10),
        ))
        .await
        .unwrap()
        .into_inner()
        .task
}

/// Opens a worker stream on queue `jobs` with hour-long leases.
async fn open_stream(
    client: &mut Client,
    worker: &str,
    window: u32,
) -> (
    mpsc::Sender<pb::WorkerMessage>,
    tonic::Streaming<pb::ServerMessage>,
) {
    let (tx, outbound) = mpsc::channel(8);
    tx.send(pb::WorkerMessage {
        msg: Some(In::Subscribe(pb::Subscribe {
            queue: "jobs".into(),
            worker_id: worker.into(),
            lease: Some(Duration::from_secs(3600).try_into().unwrap()),
            max_in_flight: window,
            max_batch: 0,
        })),
    })
    .await
    .unwrap();
    let replies = client
        .stream_tasks(ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    (tx, replies)
}

/// A worker partitioned from the server while it holds a long-poll: the
/// server's keepalive finds the dead connection and frees the waiter, so a
/// task put afterwards goes to a live worker instead of a vanished one.
#[tokio::test]
async fn a_partitioned_long_poll_is_freed_by_keepalive() {
    let server = server().await;
    let proxy = Proxy::start(server.addr).await;
    let mut direct = server.client().await;
    let mut partitioned = client_through(&proxy).await;
    let poll = tokio::spawn(async move {
        partitioned
            .get_task(with_deadline(
                get("jobs", Duration::from_secs(60)),
                Duration::from_secs(60),
            ))
            .await
    });
    eventually("the long-poll waits on the server", || {
        let mut direct = direct.clone();
        async move {
            queue_stats(&mut direct, "jobs")
                .await
                .is_some_and(|q| q.waiting_workers == 1)
        }
    })
    .await;

    proxy.set(Fault::Partition);
    eventually("keepalive drops the partitioned connection", || {
        let mut direct = direct.clone();
        async move {
            queue_stats(&mut direct, "jobs")
                .await
                .is_some_and(|q| q.waiting_workers == 0)
        }
    })
    .await;
    let id = direct
        .put_task(put("jobs", "after the partition"))
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let task = take(&mut direct)
        .await
        .expect("the task went to the live worker");
    assert_eq!((task.id, task.attempt), (id, 1));
    poll.abort();
    drop(proxy);
    server.shutdown().await;
}

/// A worker stream that is partitioned, or cut, while it holds tasks under
/// hour-long leases: the tasks are back in their queue within a second,
/// with the next attempt, and a live worker finishes them.
#[tokio::test]
async fn a_stream_partitioned_or_cut_gives_its_tasks_back_at_once() {
    for fault in [Fault::Partition, Fault::Cut] {
        let server = server().await;
        let proxy = Proxy::start(server.addr).await;
        let mut direct = server.client().await;
        let mut partitioned = client_through(&proxy).await;
        let ids: Vec<String> = {
            let mut ids = Vec::new();
            for i in 0..3 {
                let put = direct.put_task(put("jobs", &i.to_string())).await.unwrap();
                ids.push(put.into_inner().task_id);
            }
            ids
        };
        let (tx, mut replies) = open_stream(&mut partitioned, "partitioned", 3).await;
        for _ in 0..3 {
            let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
                .await
                .expect("a task within 10s")
                .unwrap()
                .unwrap();
            assert!(matches!(reply.msg, Some(Out::Task(_))));
        }
        assert_eq!(queue_stats(&mut direct, "jobs").await.unwrap().leased, 3);

        proxy.set(fault);
        eventually("the stream's tasks are back in the queue", || {
            let mut direct = direct.clone();
            async move {
                let q = queue_stats(&mut direct, "jobs").await.unwrap();
                q.pending == 3 && q.leased == 0
            }
        })
        .await;
        let mut finished = Vec::new();
        for _ in 0..3 {
            let task = take(&mut direct).await.unwrap();
            assert_eq!(task.attempt, 2, "{fault:?}: one delivery was lost");
            direct
                .put_result(pb::PutResultRequest {
                    task_id: task.id.clone(),
                    lease_id: task.lease_id,
                    outcome: Some(pb::put_result_request::Outcome::Output(
                        b"done".to_vec().into(),
                    )),
                })
                .await
                .unwrap();
            finished.push(task.id);
        }
        finished.sort();
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(finished, expected, "{fault:?}");
        drop(tx);
        drop(proxy);
        server.shutdown().await;
    }
}

/// The call ended at its deadline without an answer: tonic's client says
/// CANCELLED ("Timeout expired") when its own timer fires first, a server
/// DEADLINE_EXCEEDED.
fn gave_up(status: &tonic::Status) {
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
}

/// Replies that never arrive: a put whose answer is lost is retried with
/// its idempotency key and stored once; a task whose delivery is lost
/// comes back when its lease ends.
#[tokio::test]
async fn lost_replies_lose_and_double_nothing() {
    // Default keepalive (30 s): the connection whose replies are lost stays
    // up, so each call ends by its own deadline.
    let server = TestServer::spawn().await;
    let proxy = Proxy::start(server.addr).await;
    let mut direct = server.client().await;
    let mut cut_off = client_through(&proxy).await;
    proxy.set(Fault::DropReplies);

    let keyed = pb::PutTaskRequest {
        idempotency_key: "order-17".into(),
        ..put("jobs", "charge order 17")
    };
    let lost = cut_off
        .put_task(with_deadline(keyed.clone(), Duration::from_millis(500)))
        .await
        .unwrap_err();
    gave_up(&lost);
    // The producer cannot know whether the put went in; the retry with the
    // same key tells it, and does not store a second task.
    let retried = direct.put_task(keyed).await.unwrap().into_inner();
    assert!(
        retried.duplicate,
        "the lost put was stored: the retry is a duplicate"
    );
    assert_eq!(queue_stats(&mut direct, "jobs").await.unwrap().pending, 1);

    // A delivery whose answer is lost: the task was leased to a worker that
    // never saw it, and comes back after the 300 ms lease.
    let lost = cut_off
        .get_task(with_deadline(
            get("jobs", Duration::from_millis(300)),
            Duration::from_millis(500),
        ))
        .await
        .unwrap_err();
    gave_up(&lost);
    let task = take(&mut direct)
        .await
        .expect("the task comes back when the unseen lease ends");
    assert_eq!((task.id, task.attempt), (retried.task_id, 2));
    // The proxy holds the server's GOAWAY too: close it so the server's
    // drain does not wait out its grace period.
    drop(proxy);
    server.shutdown().await;
}

/// `--max-connection-age`: an old connection is sent away (GOAWAY), so the
/// client's new calls open a fresh one, while a worker stream on the old
/// connection goes on undisturbed and its results are accepted.
#[tokio::test]
async fn an_aged_connection_moves_new_calls_and_keeps_its_streams() {
    let server = TestServer::with_config(ServerConfig {
        transport: TransportConfig {
            max_connection_age: Some(Duration::from_millis(300)),
            ..TransportConfig::default()
        },
        ..ServerConfig::new(BrokerConfig::default())
    })
    .await;
    let proxy = Proxy::start(server.addr).await;
    let mut client = client_through(&proxy).await;
    let (tx, mut replies) = open_stream(&mut client, "long-lived", 1).await;
    client.put_task(put("jobs", "one")).await.unwrap();
    let Some(Out::Task(task)) = replies.next().await.unwrap().unwrap().msg else {
        panic!("a task");
    };
    // Unary calls until one goes out on a second connection: the first was
    // sent away when it reached its age.
    eventually("a new call opens a fresh connection", || {
        let mut client = client.clone();
        let proxy = &proxy;
        async move {
            let _ = client.get_stats(pb::GetStatsRequest::default()).await;
            proxy.connections() >= 2
        }
    })
    .await;
    tx.send(common::succeeded(&task, b"ok")).await.unwrap();
    let Some(Out::ResultAck(ack)) = replies.next().await.unwrap().unwrap().msg else {
        panic!("an ack on the old connection's stream");
    };
    assert_eq!((ack.task_id, ack.error), (task.id, None));
    drop(tx);
    drop(replies);
    drop(proxy);
    server.shutdown().await;
}
