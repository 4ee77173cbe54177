//! Caps on connections and calls over real sockets: idle connections
//! (a slow-loris) cannot hold the server, calls past the global cap are
//! shed while health still answers, and 10,000 long-polls on one
//! connection are bounded by the streams per connection.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Client, TestServer, eventually, with_deadline};
use taskq::pb;
use taskq::server::BrokerConfig;
use taskq::server::{ServerConfig, TransportConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn server_with(transport: TransportConfig) -> ServerConfig {
    ServerConfig {
        transport,
        ..ServerConfig::new(BrokerConfig::default())
    }
}

fn get(queue: &str, max_wait: Duration) -> pb::GetTaskRequest {
    pb::GetTaskRequest {
        queue: queue.into(),
        max_wait: Some(max_wait.try_into().unwrap()),
        ..Default::default()
    }
}

async fn healthy(server: &TestServer) -> bool {
    let mut health = HealthClient::new(server.channel().await);
    let answer = health
        .check(HealthCheckRequest {
            service: "taskq.v1.TaskQueue".into(),
        })
        .await
        .unwrap()
        .into_inner();
    answer.status() == ServingStatus::Serving
}

/// Connections past `--max-connections` are closed on accept; silent ones
/// are closed after the handshake timeout, which frees their slots.
#[tokio::test]
async fn idle_connections_cannot_hold_the_server() {
    let server = TestServer::with_config(server_with(TransportConfig {
        max_connections: 3,
        handshake_timeout: Duration::from_millis(300),
        ..TransportConfig::default()
    }))
    .await;
    // A slow-loris: connections that never send a byte, or only one.
    let mut idle = Vec::new();
    for i in 0..3 {
        let mut socket = TcpStream::connect(server.addr).await.unwrap();
        if i == 0 {
            socket.write_all(b"P").await.unwrap();
        }
        idle.push(socket);
    }
    // A fourth connection, past the cap, is closed at once: a client on it
    // gets no answer.
    let refused = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await;
    match refused {
        Err(_) => {}
        Ok(channel) => {
            let status = Client::new(channel)
                .get_stats(pb::GetStatsRequest::default())
                .await
                .unwrap_err();
            // The connection was closed under the call.
            assert!(
                matches!(status.code(), Code::Unavailable | Code::Cancelled),
                "{status:?}"
            );
        }
    }
    // Each silent connection is closed by the server: after its HTTP/2
    // settings, reading it ends.
    for mut socket in idle {
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut sink))
            .await
            .expect("the server closes a silent connection within 10s");
        assert!(
            sink.len() < 1024,
            "only the server's preface: {} bytes",
            sink.len()
        );
        drop(read);
    }
    // Slots are free again: a real client is served.
    let mut client = server.client().await;
    client
        .put_task(pb::PutTaskRequest::default())
        .await
        .expect("served once the idle connections are gone");
    server.shutdown().await;
}

/// Past `--max-calls` calls in progress, a call is shed at once with
/// RESOURCE_EXHAUSTED naming the flag; health is never shed; a call that
/// ends frees its slot.
#[tokio::test]
async fn calls_past_the_global_cap_are_shed_and_health_still_answers() {
    let server = TestServer::with_config(server_with(TransportConfig {
        max_calls: 4,
        ..TransportConfig::default()
    }))
    .await;
    // Four long-polls, each on its own connection.
    let mut polls = Vec::new();
    for _ in 0..4 {
        let mut client = server.client().await;
        polls.push(tokio::spawn(async move {
            client
                .get_task(with_deadline(
                    get("slow", Duration::from_secs(60)),
                    Duration::from_secs(60),
                ))
                .await
        }));
    }
    let probe = server.client().await;
    eventually("the four long-polls hold every slot", || {
        let mut probe = probe.clone();
        async move {
            match probe.get_task(get("probe", Duration::ZERO)).await {
                Ok(_) => false,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert!(status.message().contains("--max-calls"), "{status:?}");
                    true
                }
            }
        }
    })
    .await;
    assert!(healthy(&server).await, "health is exempt from the cap");
    // One long-poll leaves (its client gives up): its slot is free again.
    polls.pop().unwrap().abort();
    eventually("a freed slot serves a new call", || {
        let mut probe = probe.clone();
        async move { probe.put_task(pb::PutTaskRequest::default()).await.is_ok() }
    })
    .await;
    for poll in polls {
        poll.abort();
    }
    server.shutdown().await;
}

/// 10,000 long-polls on one connection: the server runs at most
/// `max_concurrent_streams` of them at once (the client queues the rest),
/// health on another connection answers meanwhile, and every one of them
/// is served exactly once when tasks arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_long_polls_on_one_connection_are_bounded() {
    const POLLS: usize = 10_000;
    const STREAMS: u32 = 500;
    let server = TestServer::with_config(server_with(TransportConfig {
        max_streams_per_connection: STREAMS,
        ..TransportConfig::default()
    }))
    .await;
    let one_connection = server.client().await;
    let mut polls = tokio::task::JoinSet::new();
    for _ in 0..POLLS {
        let mut client = one_connection.clone();
        polls.spawn(async move {
            client
                .get_task(with_deadline(
                    get("many", Duration::from_secs(120)),
                    Duration::from_secs(120),
                ))
                .await
                .map(|answer| answer.into_inner().task.map(|task| task.id))
        });
    }
    let mut admin = server.client().await;
    let waiting = |admin: &mut Client| {
        let mut admin = admin.clone();
        async move {
            admin
                .get_stats(pb::GetStatsRequest {
                    queue: "many".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .queues
                .first()
                .map_or(0, |q| q.waiting_workers)
        }
    };
    eventually("the connection's streams are all waiting", || {
        let w = waiting(&mut admin);
        async move { w.await == u64::from(STREAMS) }
    })
    .await;
    assert!(
        healthy(&server).await,
        "health answers on another connection"
    );
    assert_eq!(waiting(&mut admin).await, u64::from(STREAMS), "never more");

    // Tasks for all of them, in batches; each poll gets exactly one.
    let mut put = HashSet::new();
    for _ in 0..POLLS / 1000 {
        let tasks = (0..1000).map(|_| pb::PutTaskRequest {
            queue: "many".into(),
            ..Default::default()
        });
        let outcomes = admin
            .put_tasks(pb::PutTasksRequest {
                tasks: tasks.collect(),
            })
            .await
            .unwrap()
            .into_inner()
            .outcomes;
        for outcome in outcomes {
            match outcome.outcome {
                Some(pb::put_task_outcome::Outcome::Ok(ok)) => assert!(put.insert(ok.task_id)),
                other => panic!("not stored: {other:?}"),
            }
        }
    }
    let mut served = HashSet::new();
    let all = async {
        while let Some(answer) = polls.join_next().await {
            let id = answer.unwrap().unwrap().expect("a task for every poll");
            assert!(served.insert(id), "a task served twice");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("all polls served within 120s");
    assert_eq!(served, put);
    server.shutdown().await;
}
