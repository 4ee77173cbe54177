//! Every field of every request, given bad values over real gRPC: each gets
//! its status code, and none changes what the server holds.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use common::{Client, TestServer};
use taskq::pb::{self, worker_message::Msg as In};
use taskq::server::BrokerConfig;
use taskq::server::ServerConfig;
use tokio_stream::StreamExt;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::{Code, Request, Status};

const MAX_PAYLOAD: usize = 1024;
const MAX_RESULT: usize = 2048;
const MAX_BATCH: usize = 10;

type Answer = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

fn put(queue: &str) -> pb::PutTaskRequest {
    pb::PutTaskRequest {
        queue: queue.into(),
        payload: Bytes::from_static(b"x"),
        ..Default::default()
    }
}

fn duration(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

fn get(queue: &str) -> pb::GetTaskRequest {
    pb::GetTaskRequest {
        queue: queue.into(),
        max_wait: duration(0, 0),
        ..Default::default()
    }
}

/// What a client can see of the server's holdings.
async fn holdings(client: &mut Client) -> Vec<(String, u64, u64, u64, u64)> {
    let stats = client
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut queues: Vec<_> = stats
        .queues
        .into_iter()
        .map(|q| (q.queue, q.pending, q.leased, q.succeeded, q.failed))
        .collect();
    queues.sort();
    queues
}

#[tokio::test]
async fn every_bad_field_gets_its_code_and_changes_nothing() {
    let server = TestServer::with_config(ServerConfig {
        max_batch: MAX_BATCH,
        ..ServerConfig::new(BrokerConfig {
            max_payload: MAX_PAYLOAD,
            max_result: MAX_RESULT,
            ..BrokerConfig::default()
        })
    })
    .await;
    let mut client = server.client().await;
    // What there is to aim at: a leased task and a pending one.
    client.put_task(put("q")).await.unwrap();
    client.put_task(put("q")).await.unwrap();
    let leased = client
        .get_task(get("q"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let before = holdings(&mut client).await;
    let unknown = "0190c0de-0000-7000-8000-000000000000".to_string();
    let task = leased.id.clone();
    let lease = leased.lease_id.clone();

    let mut cases: Vec<(&str, Code, Answer)> = Vec::new();
    macro_rules! case {
        ($name:expr, $code:expr, $method:ident, $request:expr) => {{
            let request = $request;
            let mut c = client.clone();
            cases.push((
                $name,
                $code,
                Box::pin(async move { c.$method(request).await.map(|_| ()) }),
            ));
        }};
    }
    use Code::*;

    // PutTask
    case!(
        "put: queue with a space",
        InvalidArgument,
        put_task,
        put("a b")
    );
    case!(
        "put: queue of 129 bytes",
        InvalidArgument,
        put_task,
        put(&"q".repeat(129))
    );
    case!(
        "put: queue not ASCII",
        InvalidArgument,
        put_task,
        put("réponse")
    );
    case!(
        "put: queue with NUL",
        InvalidArgument,
        put_task,
        put("a\0b")
    );
    case!(
        "put: queue with a slash",
        InvalidArgument,
        put_task,
        put("a/b")
    );
    case!(
        "put: payload one byte over",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            payload: Bytes::from(vec![7u8; MAX_PAYLOAD + 1]),
            ..put("q")
        }
    );
    case!(
        "put: idempotency key of 257 bytes",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            idempotency_key: "k".repeat(257),
            ..put("q")
        }
    );
    case!(
        "put: max_attempts 1001",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            max_attempts: 1001,
            ..put("q")
        }
    );
    case!(
        "put: max_attempts u32::MAX",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            max_attempts: u32::MAX,
            ..put("q")
        }
    );
    case!(
        "put: 65 headers",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            headers: (0..65).map(|i| (format!("h{i}"), "v".into())).collect(),
            ..put("q")
        }
    );
    case!(
        "put: headers one byte over 64KiB",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            headers: HashMap::from([("k".into(), "v".repeat(64 * 1024))]),
            ..put("q")
        }
    );
    case!(
        "put: negative ttl",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            ttl: duration(-1, 0),
            ..put("q")
        }
    );
    case!(
        "put: negative nanos ttl",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            ttl: duration(0, -1),
            ..put("q")
        }
    );
    case!(
        "put: nanos of a whole second",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            ttl: duration(1, 1_000_000_000),
            ..put("q")
        }
    );
    case!(
        "put: seconds and nanos of opposite signs",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            ttl: duration(5, -1),
            ..put("q")
        }
    );
    case!(
        "put: zero ttl",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            ttl: duration(0, 0),
            ..put("q")
        }
    );
    case!(
        "put: ttl of i64::MAX seconds",
        InvalidArgument,
        put_task,
        pb::PutTaskRequest {
            ttl: duration(i64::MAX, 999_999_999),
            ..put("q")
        }
    );

    // GetTask (a regression: i64::MIN seconds once panicked in the
    // duration conversion and came back INTERNAL)
    case!("get: bad queue", InvalidArgument, get_task, get("no good"));
    case!(
        "get: worker_id of 257 bytes",
        InvalidArgument,
        get_task,
        pb::GetTaskRequest {
            worker_id: "w".repeat(257),
            ..get("q")
        }
    );
    case!(
        "get: negative lease",
        InvalidArgument,
        get_task,
        pb::GetTaskRequest {
            lease: duration(-5, 0),
            ..get("q")
        }
    );
    case!(
        "get: negative max_wait",
        InvalidArgument,
        get_task,
        pb::GetTaskRequest {
            max_wait: duration(-1, 0),
            ..get("q")
        }
    );
    case!(
        "get: i64::MIN max_wait",
        InvalidArgument,
        get_task,
        pb::GetTaskRequest {
            max_wait: duration(i64::MIN, -999_999_999),
            ..get("q")
        }
    );

    // ExtendLease
    let extend = |task: &str, lease: &str, by| pb::ExtendLeaseRequest {
        task_id: task.into(),
        lease_id: lease.into(),
        extend_by: by,
    };
    case!(
        "extend: no task_id",
        InvalidArgument,
        extend_lease,
        extend("", &lease, None)
    );
    case!(
        "extend: task_id not a UUID",
        NotFound,
        extend_lease,
        extend("../../etc", &lease, None)
    );
    case!(
        "extend: unknown task",
        NotFound,
        extend_lease,
        extend(&unknown, &lease, None)
    );
    case!(
        "extend: no lease_id",
        InvalidArgument,
        extend_lease,
        extend(&task, "", None)
    );
    case!(
        "extend: garbage lease_id",
        Aborted,
        extend_lease,
        extend(&task, "\u{1F4A3}", None)
    );
    case!(
        "extend: negative extend_by",
        InvalidArgument,
        extend_lease,
        extend(&task, &lease, duration(-1, 0))
    );

    // PutResult
    let report = |task: &str, lease: &str, outcome| pb::PutResultRequest {
        task_id: task.into(),
        lease_id: lease.into(),
        outcome,
    };
    let output = |n: usize| {
        Some(pb::put_result_request::Outcome::Output(Bytes::from(
            vec![1u8; n],
        )))
    };
    case!(
        "result: no task_id",
        InvalidArgument,
        put_result,
        report("", &lease, output(1))
    );
    case!(
        "result: unknown task",
        NotFound,
        put_result,
        report(&unknown, &lease, output(1))
    );
    case!(
        "result: no lease_id",
        InvalidArgument,
        put_result,
        report(&task, "", output(1))
    );
    case!(
        "result: no outcome",
        InvalidArgument,
        put_result,
        report(&task, &lease, None)
    );
    case!(
        "result: output one byte over",
        InvalidArgument,
        put_result,
        report(&task, &lease, output(MAX_RESULT + 1))
    );
    case!(
        "result: lease of another task",
        Aborted,
        put_result,
        report(&task, &format!("{unknown}.1"), output(1))
    );

    // GetResult
    use pb::get_result_request::Target;
    let read = |target| pb::GetResultRequest {
        target,
        max_wait: duration(0, 0),
    };
    case!(
        "get result: no target",
        InvalidArgument,
        get_result,
        read(None)
    );
    case!(
        "get result: empty task_id",
        InvalidArgument,
        get_result,
        read(Some(Target::TaskId(String::new())))
    );
    case!(
        "get result: unknown task",
        NotFound,
        get_result,
        read(Some(Target::TaskId(unknown.clone())))
    );
    case!(
        "get result: bad queue",
        InvalidArgument,
        get_result,
        read(Some(Target::Queue("*".into())))
    );
    case!(
        "get result: negative max_wait",
        InvalidArgument,
        get_result,
        pb::GetResultRequest {
            max_wait: duration(-1, 0),
            ..read(Some(Target::Queue("q".into())))
        }
    );

    // GetStats
    case!(
        "stats: bad queue",
        InvalidArgument,
        get_stats,
        pb::GetStatsRequest {
            queue: "q q".into()
        }
    );

    // PutTasks
    case!(
        "put batch: one over --max-batch",
        InvalidArgument,
        put_tasks,
        pb::PutTasksRequest {
            tasks: vec![put("q"); MAX_BATCH + 1],
        }
    );

    // WatchResults
    use pb::watch_results_request::Target as Watch;
    let watch = |target| pb::WatchResultsRequest { target };
    case!(
        "watch: no target",
        InvalidArgument,
        watch_results,
        watch(None)
    );
    case!(
        "watch: bad queue",
        InvalidArgument,
        watch_results,
        watch(Some(Watch::Queue("no!".into())))
    );
    case!(
        "watch: unknown id",
        NotFound,
        watch_results,
        watch(Some(Watch::TaskIds(pb::TaskIds {
            ids: vec![task.clone(), unknown.clone()]
        })))
    );
    case!(
        "watch: ids over --max-batch",
        InvalidArgument,
        watch_results,
        watch(Some(Watch::TaskIds(pb::TaskIds {
            ids: vec![task.clone(); MAX_BATCH + 1]
        })))
    );

    // StreamTasks: the first message decides.
    let stream = |first: pb::WorkerMessage| tokio_stream::iter(vec![first]);
    let subscribe = |queue: &str, window: u32, lease| pb::WorkerMessage {
        msg: Some(In::Subscribe(pb::Subscribe {
            queue: queue.into(),
            worker_id: "w".into(),
            lease,
            max_in_flight: window,
            max_batch: 0,
        })),
    };
    case!(
        "stream: first message not subscribe",
        InvalidArgument,
        stream_tasks,
        stream(pb::WorkerMessage {
            msg: Some(In::Window(pb::SetMaxInFlight { max_in_flight: 1 })),
        })
    );
    case!(
        "stream: empty first message",
        InvalidArgument,
        stream_tasks,
        stream(pb::WorkerMessage { msg: None })
    );
    case!(
        "stream: bad queue",
        InvalidArgument,
        stream_tasks,
        stream(subscribe("a b", 1, None))
    );
    case!(
        "stream: window over 10000",
        InvalidArgument,
        stream_tasks,
        stream(subscribe("q", 10_001, None))
    );
    case!(
        "stream: max_batch over 10000",
        InvalidArgument,
        stream_tasks,
        stream(pb::WorkerMessage {
            msg: Some(In::Subscribe(pb::Subscribe {
                queue: "q".into(),
                max_in_flight: 1,
                max_batch: 10_001,
                ..Default::default()
            })),
        })
    );
    case!(
        "stream: negative lease",
        InvalidArgument,
        stream_tasks,
        stream(subscribe("q", 1, duration(-1, 0)))
    );
    case!(
        "stream: worker_id of 257 bytes",
        InvalidArgument,
        stream_tasks,
        stream(pb::WorkerMessage {
            msg: Some(In::Subscribe(pb::Subscribe {
                queue: "q".into(),
                worker_id: "w".repeat(257),
                lease: None,
                max_in_flight: 1,
                max_batch: 0,
            })),
        })
    );

    // Metadata: junk the server must ignore, not choke on.
    case!("metadata: binary junk header", Ok, get_stats, {
        let mut request = Request::new(pb::GetStatsRequest::default());
        request.metadata_mut().insert_bin(
            "x-junk-bin",
            BinaryMetadataValue::from_bytes(&[0, 255, 13, 10, 0]),
        );
        request
    });
    case!("metadata: malformed grpc-timeout", Ok, get_task, {
        let mut request = Request::new(get("q2"));
        request
            .metadata_mut()
            .insert("grpc-timeout", MetadataValue::from_static("99999999999Z"));
        request
    });

    let mut wrong = Vec::new();
    for (name, expected, answer) in cases {
        let got = match answer.await {
            std::result::Result::Ok(()) => Code::Ok,
            Err(status) => {
                // Every refusal says something an operator can act on.
                assert!(!status.message().is_empty(), "{name}: an empty message");
                status.code()
            }
        };
        if got != expected {
            wrong.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // The queues as they were (the empty queue `q2`, named by the valid
    // GetTask above, holds nothing), and the lease still the holder's.
    let after: Vec<_> = holdings(&mut client)
        .await
        .into_iter()
        .filter(|q| q.0 != "q2" || (q.1, q.2, q.3, q.4) != (0, 0, 0, 0))
        .collect();
    assert_eq!(after, before);
    client
        .put_result(report(&task, &lease, output(MAX_RESULT)))
        .await
        .expect("the holder's lease survived every bad call; a result of exactly the limit fits");
    server.shutdown().await;
}

async fn next(
    replies: &mut tonic::Streaming<pb::ServerMessage>,
) -> Result<pb::ServerMessage, Status> {
    tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("a reply within 10s")
        .expect("open")
}

/// A stream that sends bad messages after a good subscribe gets each
/// refused in its ack, or the stream ended with the code, and the task it
/// holds goes back.
#[tokio::test]
async fn bad_messages_on_an_open_stream() {
    let server = TestServer::spawn().await;
    let mut client = server.client().await;
    client.put_task(put("q")).await.unwrap();
    let (tx, outbound) = tokio::sync::mpsc::channel(8);
    tx.send(common::subscribe("q", 1)).await.unwrap();
    let mut replies = client
        .stream_tasks(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::server_message::Msg::Task(task)) = next(&mut replies).await.unwrap().msg else {
        panic!("a task first");
    };
    // A result with a garbage lease: refused in the ack, stream open.
    tx.send(pb::WorkerMessage {
        msg: Some(In::Result(pb::PutResultRequest {
            task_id: task.id.clone(),
            lease_id: "garbage".into(),
            outcome: Some(pb::put_result_request::Outcome::Output(Bytes::new())),
        })),
    })
    .await
    .unwrap();
    let Some(pb::server_message::Msg::ResultAck(ack)) = next(&mut replies).await.unwrap().msg
    else {
        panic!("an ack");
    };
    assert_eq!(ack.error.unwrap().code, Code::Aborted as i32);
    // A second subscribe: the stream ends with INVALID_ARGUMENT.
    tx.send(pb::WorkerMessage {
        msg: Some(In::Subscribe(pb::Subscribe::default())),
    })
    .await
    .unwrap();
    let ended = next(&mut replies).await.unwrap_err();
    assert_eq!(ended.code(), Code::InvalidArgument);
    // The task the stream held is back, its delivery counted.
    let again = client
        .get_task(pb::GetTaskRequest {
            queue: "q".into(),
            max_wait: duration(5, 0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .expect("the stream's task is back");
    assert_eq!((again.id, again.attempt), (task.id, 2));
    server.shutdown().await;
}

/// A message that is not protobuf (here: a field cut short) is INTERNAL,
/// as the gRPC status code table has it, and the server goes on serving.
#[tokio::test]
async fn a_message_that_does_not_parse_is_internal() {
    let server = TestServer::spawn().await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let request = http::Request::post(format!("http://{}/taskq.v1.TaskQueue/PutTask", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = h2.send_request(request, false).unwrap();
    // Not compressed, 2 bytes: field 1 (queue) says 127 bytes follow; none do.
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 2, 0x0A, 0x7F]), true)
        .unwrap();
    let response = response.await.unwrap();
    // A status that comes at once arrives in the headers; else in trailers.
    let status = match response.headers().get("grpc-status") {
        Some(status) => status.clone(),
        None => {
            let mut body = response.into_body();
            while body.data().await.is_some() {}
            body.trailers().await.unwrap().unwrap()["grpc-status"].clone()
        }
    };
    assert_eq!(status, "13");
    connection.abort();
    let mut client = server.client().await;
    client.put_task(put("q")).await.unwrap();
    server.shutdown().await;
}
