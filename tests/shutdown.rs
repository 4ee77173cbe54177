//! Graceful shutdown: health turns NOT_SERVING first, waiting calls are
//! answered at once, new calls are refused, and the server stops cleanly.

mod common;

use std::time::Duration;

use common::{TestServer, with_deadline};
use taskq::pb;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_client::HealthClient};

/// A watch on the task-queue service's health, past its first answer
/// (SERVING).
async fn serving_watch(server: &TestServer) -> tonic::Streaming<HealthCheckResponse> {
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "taskq.v1.TaskQueue".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    watch
}

#[tokio::test]
async fn shutdown_drains_in_order() {
    // A grace far longer than any wait below: the drain (held open by the
    // health watch's own connection) cannot end before health is checked.
    let config = taskq::server::ServerConfig {
        shutdown_grace: Duration::from_secs(60),
        ..taskq::server::ServerConfig::new(taskq::server::BrokerConfig::default())
    };
    let mut server = TestServer::with_config(config).await;
    let mut watch = serving_watch(&server).await;

    // A worker long-polling with a one-minute deadline.
    let mut worker = server.client().await;
    let waiting = tokio::spawn(async move {
        worker
            .get_task(with_deadline(
                pb::GetTaskRequest {
                    queue: "q".into(),
                    ..Default::default()
                },
                Duration::from_secs(60),
            ))
            .await
    });
    let mut client = server.client().await;
    for _ in 0..10_000 {
        let stats = client
            .get_stats(pb::GetStatsRequest { queue: "q".into() })
            .await
            .unwrap()
            .into_inner();
        if stats.queues[0].waiting_workers == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }

    // A producer reading the queue's results as a stream.
    let mut results = client
        .watch_results(pb::WatchResultsRequest {
            target: Some(pb::watch_results_request::Target::Queue("q".into())),
        })
        .await
        .unwrap()
        .into_inner();

    server.signal_shutdown();
    // Guards against health turned only once the drain is over: a probe
    // must see NOT_SERVING while calls are still being drained.
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("health turns NOT_SERVING as the drain starts, not when it ends")
        .unwrap()
        .unwrap();
    assert_eq!(
        next.status(),
        ServingStatus::NotServing,
        "health turns first"
    );
    // The long-poll is answered at once, OK and empty, long before its deadline.
    let answered = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting call is answered during the drain")
        .unwrap()
        .expect("answered OK");
    assert!(answered.into_inner().task.is_none());
    // The results stream ends UNAVAILABLE: reconnect elsewhere.
    let ended = tokio::time::timeout(Duration::from_secs(5), results.message())
        .await
        .expect("the results stream ends during the drain");
    assert_eq!(ended.unwrap_err().code(), tonic::Code::Unavailable);
    drop(watch);
    drop(client);
    server.shutdown().await;
}

#[tokio::test]
async fn after_shutdown_new_calls_are_refused() {
    let server = TestServer::spawn().await;
    let addr = server.addr;
    server.shutdown().await;
    let connect = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    assert!(connect.is_err(), "the listener is closed");
}

/// A call that never finishes (a client that opened a PutTask and never
/// sent its message) cannot hold the server past `--shutdown-grace`.
#[tokio::test]
async fn a_stuck_call_is_cut_off_after_the_grace_period() {
    let config = taskq::server::ServerConfig {
        shutdown_grace: Duration::from_millis(300),
        ..taskq::server::ServerConfig::new(taskq::server::BrokerConfig::default())
    };
    let server = TestServer::with_config(config).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut h2, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping = connection.ping_pong().unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::post(format!("http://{}/taskq.v1.TaskQueue/PutTask", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    // The request's headers go out with no end of stream: the body never comes.
    let (_response, _body) = h2.send_request(request, false).unwrap();
    // Frames are handled in order: once the ping is answered, the server
    // has the open stream.
    ping.ping(h2::Ping::opaque()).await.unwrap();
    let started = std::time::Instant::now();
    server.shutdown().await;
    let took = started.elapsed();
    // The stuck call held the drain for the whole grace, and no longer
    // than the grace and a generous margin.
    assert!(took >= Duration::from_millis(300), "stopped after {took:?}");
    assert!(took < Duration::from_secs(10), "stopped after {took:?}");
    connection.abort();
}

/// New calls are refused while the drain is still going (here held open
/// by a worker stream with a task it has not reported), not only once the
/// server has stopped; the report still goes in and ends the drain.
#[tokio::test]
async fn during_the_drain_new_calls_are_refused_and_reports_go_in() {
    use pb::server_message::Msg as Out;
    let mut server = TestServer::spawn().await;
    let mut client = server.client().await;
    let put = |payload: &str| pb::PutTaskRequest {
        queue: "q".into(),
        payload: payload.as_bytes().to_vec().into(),
        ..Default::default()
    };
    client.put_task(put("held")).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(common::subscribe("q", 1)).await.unwrap();
    let mut worker = server.client().await;
    let mut inbound = worker
        .stream_tasks(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let task = match inbound.message().await.unwrap().unwrap().msg {
        Some(Out::Task(task)) => task,
        other => panic!("expected the task, got {other:?}"),
    };
    let mut watch = serving_watch(&server).await;

    server.signal_shutdown();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    // The drain is on (the stream still holds its task): a new call is not
    // served, on the stream's own connection (the server sent it GOAWAY)
    // or on a new one (the listener is closed). How a client words that is
    // its transport's: tonic says CANCELLED or UNAVAILABLE, or UNKNOWN for
    // a reset connection; every one of them means "go elsewhere".
    // Refused at once: a new connection is not left in the listen queue
    // until the server stops (the drain here lasts until the report).
    let at_once = Duration::from_secs(5);
    let mut stream_connection = worker.clone();
    let on_the_stream_connection = stream_connection.put_task(put("late"));
    let on_a_new_connection = client.put_task(put("late"));
    for refused in [
        tokio::time::timeout(at_once, on_the_stream_connection).await,
        tokio::time::timeout(at_once, on_a_new_connection).await,
    ] {
        let refused = refused
            .expect("refused at once, not held until the stop")
            .unwrap_err();
        let transport = refused.message().contains("transport error")
            || refused.message().contains("canceled")
            || refused.code() == tonic::Code::Unavailable;
        assert!(
            transport,
            "a call during the drain was answered: {refused:?}"
        );
    }
    // The worker's report still goes in, and then its stream is let go.
    tx.send(common::succeeded(&task, b"ok")).await.unwrap();
    match inbound.message().await.unwrap().unwrap().msg {
        Some(Out::ResultAck(ack)) => {
            assert!(ack.error.is_none(), "{ack:?}");
            assert_eq!(ack.state, pb::TaskState::Succeeded as i32);
        }
        other => panic!("expected the result's ack, got {other:?}"),
    }
    let ended = inbound.message().await.unwrap_err();
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    drop((watch, client, worker, tx, inbound));
    server.shutdown().await;
}
