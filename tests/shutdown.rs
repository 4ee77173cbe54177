//! Graceful shutdown: health turns NOT_SERVING first, waiting calls are
//! answered at once, new calls are refused, and the server stops cleanly.

mod common;

use std::time::Duration;

use common::{TestServer, with_deadline};
use taskq::pb;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test]
async fn shutdown_drains_in_order() {
    let mut server = TestServer::spawn().await;
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
    let next = watch.next().await.unwrap().unwrap();
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
    drop(health);
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
    server.shutdown().await;
    connection.abort();
}
