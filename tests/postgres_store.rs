//! The PostgreSQL store with several servers on one database, restarts and
//! crashes: a real PostgreSQL the tests start (tests/common/postgres.rs)
//! and real servers, in this process or as `taskq serve` processes killed
//! with SIGKILL.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::postgres::{StopMode, TestDatabase};
use common::{Client, TestServer, with_deadline};
use taskq::pb::{self, get_result_request::Target, put_result_request::Outcome};
use taskq::server::{BrokerConfig, PostgresConfig, ServerConfig, StoreConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_stream::StreamExt;
use tonic::Code;

const LONG: Duration = Duration::from_secs(10);

fn on(database: &TestDatabase) -> ServerConfig {
    let mut config = ServerConfig::new(BrokerConfig::default());
    config.store = StoreConfig::Postgres(PostgresConfig::new(database.url()));
    config
}

fn new_task(queue: &str, payload: String, key: Option<String>) -> pb::PutTaskRequest {
    pb::PutTaskRequest {
        queue: queue.into(),
        payload: Bytes::from(payload),
        idempotency_key: key.unwrap_or_default(),
        ..Default::default()
    }
}

async fn put_many(client: &mut Client, queue: &str, payloads: &[String]) -> Vec<String> {
    let request = pb::PutTasksRequest {
        tasks: payloads
            .iter()
            .map(|p| new_task(queue, p.clone(), None))
            .collect(),
    };
    client
        .put_tasks(with_deadline(request, LONG))
        .await
        .unwrap()
        .into_inner()
        .outcomes
        .into_iter()
        .map(|o| match o.outcome {
            Some(pb::put_task_outcome::Outcome::Ok(ok)) => ok.task_id,
            other => panic!("put refused: {other:?}"),
        })
        .collect()
}

async fn lease(client: &mut Client, queue: &str, worker: &str) -> Option<pb::Task> {
    client
        .get_task(with_deadline(
            pb::GetTaskRequest {
                queue: queue.into(),
                worker_id: worker.into(),
                lease: Some(Duration::from_secs(60).try_into().unwrap()),
                max_wait: Some(Duration::ZERO.try_into().unwrap()),
            },
            LONG,
        ))
        .await
        .unwrap()
        .into_inner()
        .task
}

/// A worker stream subscribed to `queue` with `window`: its sender (the
/// stream ends when it is dropped) and the server's messages.
async fn worker_stream(
    client: &mut Client,
    queue: &str,
    window: u32,
) -> (
    tokio::sync::mpsc::Sender<pb::WorkerMessage>,
    tonic::Streaming<pb::ServerMessage>,
) {
    let (tx, outbound) = tokio::sync::mpsc::channel(4);
    tx.send(common::subscribe(queue, window)).await.unwrap();
    let inbound = client
        .stream_tasks(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

fn output_of(task: &pb::Task) -> pb::PutResultRequest {
    pb::PutResultRequest {
        task_id: task.id.clone(),
        lease_id: task.lease_id.clone(),
        outcome: Some(Outcome::Output(task.payload.clone())),
    }
}

async fn result_by_id(client: &mut Client, id: &str) -> Option<pb::Result> {
    client
        .get_result(with_deadline(
            pb::GetResultRequest {
                target: Some(Target::TaskId(id.into())),
                max_wait: Some(Duration::ZERO.try_into().unwrap()),
            },
            LONG,
        ))
        .await
        .unwrap()
        .into_inner()
        .result
}

async fn next_result(client: &mut Client, queue: &str) -> Option<pb::Result> {
    client
        .get_result(with_deadline(
            pb::GetResultRequest {
                target: Some(Target::Queue(queue.into())),
                max_wait: Some(Duration::ZERO.try_into().unwrap()),
            },
            LONG,
        ))
        .await
        .unwrap()
        .into_inner()
        .result
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

/// Put through one server, lease through a second, report through a
/// third, read anywhere: one queue, whichever server answers.
#[tokio::test]
async fn three_servers_on_one_database_are_one_queue() {
    let database = TestDatabase::start().await;
    let (a, b, c) = (
        TestServer::with_config(on(&database)).await,
        TestServer::with_config(on(&database)).await,
        TestServer::with_config(on(&database)).await,
    );
    let (mut ca, mut cb, mut cc) = (a.client().await, b.client().await, c.client().await);
    let payloads: Vec<String> = (0..20).map(|i| format!("task {i}")).collect();
    let ids = put_many(&mut ca, "q", &payloads).await;
    let mut leased = Vec::new();
    while let Some(task) = lease(&mut cb, "q", "w-b").await {
        leased.push(task);
    }
    // All of them, in the order they were put.
    assert_eq!(leased.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), ids);
    for task in &leased {
        let state = cc
            .put_result(output_of(task))
            .await
            .unwrap()
            .into_inner()
            .state;
        assert_eq!(state, pb::TaskState::Succeeded as i32);
    }
    // By id, from any server; by queue, each result once across servers.
    for (id, payload) in ids.iter().zip(&payloads) {
        let result = result_by_id(&mut ca, id).await.expect("finished");
        assert_eq!(result.output, payload.as_bytes());
        assert_eq!(result.worker_id, "w-b");
    }
    let mut read = HashSet::new();
    for turn in 0.. {
        let mut client = [&ca, &cb, &cc][turn % 3].clone();
        match next_result(&mut client, "q").await {
            Some(result) => assert!(read.insert(result.task_id), "a result read twice"),
            None => break,
        }
    }
    assert_eq!(read, ids.iter().cloned().collect());
    let q = stats(&mut cc, "q").await;
    assert_eq!((q.pending, q.leased, q.succeeded), (0, 0, 20));
    // A report through another server under a lease that is not current
    // is refused there too.
    let stale = cc
        .put_result(pb::PutResultRequest {
            outcome: Some(Outcome::Failure(pb::Failure {
                message: "late".into(),
                retry: true,
                retry_after: None,
            })),
            ..output_of(&leased[0])
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::AlreadyExists, "{stale:?}");
    for server in [a, b, c] {
        server.shutdown().await;
    }
}

/// `--max-queues` counts the queues of the database: two servers making
/// new queues at once make no more than the cap between them, and a queue
/// that exists stays usable through either.
#[tokio::test]
async fn max_queues_holds_across_servers_making_queues_at_once() {
    let database = TestDatabase::start().await;
    let capped = || {
        let mut config = on(&database);
        config.broker.max_queues = 3;
        config
    };
    let (a, b) = (
        TestServer::with_config(capped()).await,
        TestServer::with_config(capped()).await,
    );
    let mut puts = Vec::new();
    for n in 0..8 {
        let mut client = if n % 2 == 0 {
            a.client().await
        } else {
            b.client().await
        };
        puts.push(tokio::spawn(async move {
            let queue = format!("q{n}");
            let answer = client.put_task(new_task(&queue, "x".into(), None)).await;
            (queue, answer.map_err(|status| status.code()))
        }));
    }
    let mut made = Vec::new();
    for put in puts {
        match put.await.unwrap() {
            (queue, Ok(_)) => made.push(queue),
            (_, Err(code)) => assert_eq!(code, Code::ResourceExhausted),
        }
    }
    assert_eq!(made.len(), 3, "exactly the cap is made: {made:?}");
    let held = database
        .psql("SELECT count(*) FROM taskq.queue_counts WHERE shard = 0")
        .await;
    assert_eq!(held, "3", "the database holds the cap's queues");
    // The queues made work through both servers; another new one does not.
    let mut cb = b.client().await;
    let mut ca = a.client().await;
    for queue in &made {
        cb.put_task(new_task(queue, "y".into(), None))
            .await
            .unwrap();
        assert!(lease(&mut ca, queue, "w").await.is_some());
    }
    let refused = ca
        .put_task(new_task("another", "z".into(), None))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("--max-queues"), "{refused:?}");
    a.shutdown().await;
    b.shutdown().await;
}

/// Worker streams on three servers race for one queue: each task is
/// leased once (no lease runs out here), and every result is there.
#[tokio::test]
async fn workers_racing_through_servers_lease_each_task_once() {
    let database = TestDatabase::start().await;
    let servers = [
        TestServer::with_config(on(&database)).await,
        TestServer::with_config(on(&database)).await,
        TestServer::with_config(on(&database)).await,
    ];
    let tasks = 600;
    // Set once every result is in: the workers stop.
    let (all_done, done_rx) = tokio::sync::watch::channel(false);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let all_done = std::sync::Arc::new(all_done);
    let mut workers = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        for j in 0..2 {
            let mut client = server.client().await;
            let worker = format!("w{i}{j}");
            let (done, all_done, mut done_rx) = (done.clone(), all_done.clone(), done_rx.clone());
            workers.push(tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                tx.send(common::subscribe("race", 16)).await.unwrap();
                let mut inbound = client
                    .stream_tasks(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                let mut seen = Vec::new();
                let _ = worker;
                loop {
                    let message = tokio::select! {
                        message = tokio::time::timeout(LONG, inbound.next()) => message,
                        _ = done_rx.wait_for(|done| *done) => break,
                    };
                    let message = message.expect("tasks keep coming until all are done");
                    let message = message.expect("the stream stays open").expect("no error");
                    match message.msg {
                        Some(pb::server_message::Msg::Task(task)) => {
                            seen.push((task.id.clone(), task.lease_id.clone()));
                            tx.send(common::succeeded(&task, b"ok")).await.unwrap();
                        }
                        Some(pb::server_message::Msg::ResultAck(ack)) => {
                            assert!(ack.error.is_none(), "{ack:?}");
                            if done.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1 == tasks {
                                all_done.send_replace(true);
                            }
                        }
                        _ => {}
                    }
                }
                seen
            }));
        }
    }
    let mut producer = servers[0].client().await;
    let payloads: Vec<String> = (0..tasks).map(|i| i.to_string()).collect();
    let mut ids = Vec::new();
    for chunk in payloads.chunks(100) {
        ids.extend(put_many(&mut producer, "race", chunk).await);
    }
    let mut leases: HashMap<String, Vec<String>> = HashMap::new();
    for worker in workers {
        for (task, lease) in worker.await.unwrap() {
            leases.entry(task).or_default().push(lease);
        }
    }
    let twice: Vec<_> = leases.iter().filter(|(_, l)| l.len() > 1).collect();
    assert!(twice.is_empty(), "leased more than once: {twice:?}");
    assert_eq!(leases.len(), tasks, "every task leased");
    let mut reader = servers[2].client().await;
    for id in &ids {
        let result = result_by_id(&mut reader, id).await.expect("finished");
        assert_eq!(result.state, pb::TaskState::Succeeded as i32);
    }
    for server in servers {
        server.shutdown().await;
    }
}

/// Every server stopped and started again: pending tasks and unread
/// results are all still there.
#[tokio::test]
async fn restarting_every_server_loses_nothing() {
    let database = TestDatabase::start().await;
    let first = TestServer::with_config(on(&database)).await;
    let mut client = first.client().await;
    let payloads: Vec<String> = (0..12).map(|i| format!("p{i}")).collect();
    let ids = put_many(&mut client, "keep", &payloads).await;
    for _ in 0..4 {
        let task = lease(&mut client, "keep", "w").await.unwrap();
        client.put_result(output_of(&task)).await.unwrap();
    }
    first.shutdown().await;

    let second = TestServer::with_config(on(&database)).await;
    let mut client = second.client().await;
    let q = stats(&mut client, "keep").await;
    assert_eq!((q.pending, q.succeeded, q.results_unclaimed), (8, 4, 4));
    let mut unread = Vec::new();
    while let Some(result) = next_result(&mut client, "keep").await {
        unread.push(result.task_id);
    }
    assert_eq!(unread, ids[..4]);
    let mut pending = Vec::new();
    while let Some(task) = lease(&mut client, "keep", "w").await {
        pending.push(task.id);
    }
    assert_eq!(pending, ids[4..]);
    second.shutdown().await;
}

/// PostgreSQL restarted while a producer puts: calls in the gap answer
/// UNAVAILABLE naming the store, the server stays up, and every put it
/// acknowledged is there afterwards and gets done by a stream opened
/// before the restart.
#[tokio::test]
async fn a_database_restart_loses_no_acknowledged_put() {
    let database = TestDatabase::start_own_cluster().await;
    let server = TestServer::with_config(on(&database)).await;
    let mut client = server.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(common::subscribe("db", 8)).await.unwrap();
    let mut worker_client = server.client().await;
    let mut stream = worker_client
        .stream_tasks(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut acknowledged = Vec::new();
    let mut unavailable = 0;
    for i in 0..60 {
        if i == 20 {
            database.stop_cluster(StopMode::Fast).await;
        }
        if i == 40 {
            database.start_cluster().await;
        }
        // A producer retries with the same idempotency key until an answer.
        loop {
            let request = new_task("db", format!("{i}"), Some(format!("key-{i}")));
            match client.put_task(with_deadline(request, LONG)).await {
                Ok(put) => {
                    acknowledged.push(put.into_inner().task_id);
                    break;
                }
                Err(status) if status.code() == Code::Unavailable => {
                    assert!(status.message().contains("postgres"), "{status:?}");
                    unavailable += 1;
                    if (20..40).contains(&i) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("put failed: {status:?}"),
            }
        }
    }
    assert!(
        unavailable > 0,
        "the puts during the restart saw the database down"
    );
    let mut done = HashSet::new();
    while done.len() < acknowledged.len() {
        let message = tokio::time::timeout(LONG, stream.next())
            .await
            .expect("the stream carries on after the restart")
            .expect("open")
            .expect("no error");
        if let Some(pb::server_message::Msg::Task(task)) = message.msg {
            tx.send(common::succeeded(&task, b"done")).await.unwrap();
            done.insert(task.id);
        }
    }
    for id in &acknowledged {
        assert!(done.contains(id), "acknowledged put {id} was lost");
    }
    server.shutdown().await;
}

/// A `taskq serve` process on `database`, and its address once serving.
async fn serve_process(database: &TestDatabase) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskq"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "off",
            "--store",
            &database.url(),
        ])
        .env_remove("TASKQ_TOKENS")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(LONG, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("addr=").nth(1) {
                return rest.split_whitespace().next().unwrap().to_string();
            }
        }
        panic!("taskq serve exited before serving");
    })
    .await
    .expect("serving within 10s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("http://{addr}"))
}

/// Servers killed with SIGKILL again and again while producers put and a
/// worker reports: every put and every result a server acknowledged is in
/// the database afterwards.
#[tokio::test]
async fn a_killed_server_keeps_everything_it_acknowledged() {
    let database = TestDatabase::start().await;
    let mut acknowledged_puts = Vec::new();
    let mut acknowledged_results = Vec::new();
    for round in 0..4 {
        let (mut child, url) = serve_process(&database).await;
        let mut client = taskq::pb::task_queue_client::TaskQueueClient::connect(url)
            .await
            .unwrap();
        let mut reporter = client.clone();
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let progress_seen = progress.clone();
        let producer = tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0.. {
                let payloads: Vec<String> = (0..8).map(|j| format!("{round}-{i}-{j}")).collect();
                let request = pb::PutTasksRequest {
                    tasks: payloads
                        .iter()
                        .map(|p| new_task("crash", p.clone(), None))
                        .collect(),
                };
                match client.put_tasks(request).await {
                    Ok(answer) => {
                        for outcome in answer.into_inner().outcomes {
                            if let Some(pb::put_task_outcome::Outcome::Ok(ok)) = outcome.outcome {
                                acked.push(ok.task_id);
                                progress.fetch_add(1, std::sync::atomic::Ordering::Release);
                            }
                        }
                    }
                    Err(_) => return acked,
                }
            }
            acked
        });
        let worker = tokio::spawn(async move {
            let mut acked = Vec::new();
            loop {
                let task = match reporter
                    .get_task(pb::GetTaskRequest {
                        queue: "crash".into(),
                        worker_id: "w".into(),
                        lease: None,
                        max_wait: Some(Duration::from_millis(200).try_into().unwrap()),
                    })
                    .await
                {
                    Ok(answer) => answer.into_inner().task,
                    Err(_) => return acked,
                };
                let Some(task) = task else { continue };
                match reporter.put_result(output_of(&task)).await {
                    Ok(_) => acked.push(task.id),
                    Err(_) => return acked,
                }
            }
        });
        // Kill without warning once puts are flowing, at a different point
        // each round.
        let after = 40 + 60 * round;
        common::eventually("puts acknowledged", || {
            let seen = progress_seen.load(std::sync::atomic::Ordering::Acquire);
            async move { seen >= after }
        })
        .await;
        child.start_kill().unwrap();
        let _ = child.wait().await;
        acknowledged_puts.extend(producer.await.unwrap());
        acknowledged_results.extend(worker.await.unwrap());
    }
    assert!(!acknowledged_puts.is_empty() && !acknowledged_results.is_empty());
    let (_child, url) = serve_process(&database).await;
    let mut client = taskq::pb::task_queue_client::TaskQueueClient::connect(url)
        .await
        .unwrap();
    for id in &acknowledged_puts {
        client
            .get_result(pb::GetResultRequest {
                target: Some(Target::TaskId(id.clone())),
                max_wait: Some(Duration::ZERO.try_into().unwrap()),
            })
            .await
            .unwrap_or_else(|status| panic!("acknowledged put {id} is gone: {status:?}"));
    }
    for id in &acknowledged_results {
        let result = result_by_id(&mut client, id)
            .await
            .unwrap_or_else(|| panic!("acknowledged result of {id} is gone"));
        assert_eq!(result.state, pb::TaskState::Succeeded as i32);
    }
    let rows = database
        .psql("SELECT count(*) FROM taskq.tasks")
        .await
        .trim()
        .parse::<usize>()
        .unwrap();
    assert!(rows >= acknowledged_puts.len());
}

/// A queue paused through one server hands out nothing through another,
/// to a waiting call or a new claim; the resume through a third wakes the
/// waiting call at once. A cancel through one server reaches a worker
/// stream on another.
#[tokio::test]
async fn pause_and_cancel_hold_for_every_server() {
    let database = TestDatabase::start().await;
    let (a, b, c) = (
        TestServer::with_config(on(&database)).await,
        TestServer::with_config(on(&database)).await,
        TestServer::with_config(on(&database)).await,
    );
    let (mut ca, mut cb, mut cc) = (a.client().await, b.client().await, c.client().await);
    let held = pb::QueueRequest {
        queue: "held".into(),
    };
    assert!(
        !ca.pause_queue(held.clone())
            .await
            .unwrap()
            .into_inner()
            .was_paused
    );
    let ids = put_many(&mut ca, "held", &["a".to_string()]).await;
    assert!(lease(&mut cb, "held", "w-b").await.is_none(), "paused");
    assert!(stats(&mut cb, "held").await.paused);
    let mut waiter = cb.clone();
    let waiting = tokio::spawn(async move {
        waiter
            .get_task(with_deadline(
                pb::GetTaskRequest {
                    queue: "held".into(),
                    worker_id: "w-wait".into(),
                    lease: None,
                    max_wait: Some(LONG.try_into().unwrap()),
                },
                LONG,
            ))
            .await
            .unwrap()
            .into_inner()
            .task
    });
    assert!(cc.resume_queue(held).await.unwrap().into_inner().was_paused);
    let task = waiting.await.unwrap().expect("handed out after the resume");
    assert_eq!(task.id, ids[0]);

    // A stream on server b holds a task; the cancel goes through server c.
    let ids = put_many(&mut ca, "streamed", &["s".to_string()]).await;
    let (tx, mut inbound) = worker_stream(&mut cb, "streamed", 1).await;
    let first = tokio::time::timeout(LONG, inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(pb::server_message::Msg::Task(task)) = first.msg else {
        panic!("expected a task: {first:?}");
    };
    assert_eq!(task.id, ids[0]);
    let previous = cc
        .cancel_task(pb::CancelTaskRequest {
            task_id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(previous.previous_state(), pb::TaskState::Leased);
    let next = tokio::time::timeout(LONG, inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match next.msg {
        Some(pb::server_message::Msg::Cancel(cancel)) => {
            assert_eq!((cancel.task_id, cancel.lease_id), (task.id, task.lease_id));
        }
        other => panic!("expected the cancel: {other:?}"),
    }
    drop(tx);
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

/// A task made ready with no notification (as if it were lost on the way)
/// still reaches a worker stream that waits on its drained queue: the
/// queue's claimer looks again when its belief that the queue is drained
/// expires (`BELIEVED_EMPTY`, a second), even though nothing else happens.
#[tokio::test]
async fn a_task_whose_notification_is_lost_still_reaches_a_waiting_stream() {
    let database = TestDatabase::start().await;
    let server = TestServer::with_config(on(&database)).await;
    let mut client = server.client().await;
    let ids = put_many(&mut client, "quiet", &["first".to_string()]).await;
    let (tx, mut inbound) = worker_stream(&mut client, "quiet", 4).await;
    let next_task = async |inbound: &mut tonic::Streaming<pb::ServerMessage>| {
        let message = tokio::time::timeout(LONG, inbound.message())
            .await
            .expect("a task within 10 s")
            .unwrap()
            .unwrap();
        match message.msg {
            Some(pb::server_message::Msg::Task(task)) => task,
            other => panic!("expected a task: {other:?}"),
        }
    };
    // The stream's claim took the one task and found the queue drained;
    // its window still has room for three.
    assert_eq!(next_task(&mut inbound).await.id, ids[0]);
    // A task ready behind the store's back: inserted pending, no NOTIFY.
    database
        .psql(
            "INSERT INTO taskq.tasks (id, queue, payload, max_attempts) \
             VALUES (gen_random_uuid(), 'quiet', 'unannounced', 3)",
        )
        .await;
    let task = next_task(&mut inbound).await;
    assert_eq!(task.payload, "unannounced".as_bytes());
    assert_eq!(task.attempt, 1);
    drop(tx);
    server.shutdown().await;
}

/// A connection of the test's own, for a transaction the test holds open
/// while a server's put runs against it.
async fn raw_connection(database: &TestDatabase) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&database.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Waits until a statement of the database waits on a lock (the server's
/// put, behind the test's open transaction), at most 10 s.
async fn until_a_statement_waits_on_a_lock(database: &TestDatabase) {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let waiting = database
            .psql(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await;
        if waiting != "0" {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no statement waited on the test's transaction within 10 s"
        );
        tokio::task::yield_now().await;
    }
}

/// Another server's put of the same idempotency key commits while this
/// server's put (assumed to fit, its snapshot taken before) waits on the
/// queue's put shard: the insert meets the key, runs again, and answers a
/// duplicate of the other task; the queue's count holds each task once.
#[tokio::test]
async fn a_put_racing_another_put_of_its_key_answers_the_first_task() {
    let database = TestDatabase::start().await;
    let server = TestServer::with_config(on(&database)).await;
    let mut client = server.client().await;
    put_many(&mut client, "race", &["before".to_string()]).await;
    let raw = raw_connection(&database).await;
    let theirs = uuid::Uuid::now_v7();
    raw.batch_execute("BEGIN").await.unwrap();
    raw.execute(
        "INSERT INTO taskq.tasks (id, queue, payload, max_attempts, idempotency_key) \
         VALUES ($1, 'race', 'theirs', 3, 'k1')",
        &[&theirs],
    )
    .await
    .unwrap();
    raw.batch_execute(
        "UPDATE taskq.queue_counts SET unfinished = unfinished + 1 \
         WHERE queue = 'race' AND shard = 0",
    )
    .await
    .unwrap();
    let mut putter = server.client().await;
    let put = tokio::spawn(async move {
        putter
            .put_task(with_deadline(
                new_task("race", "ours".into(), Some("k1".into())),
                LONG,
            ))
            .await
    });
    until_a_statement_waits_on_a_lock(&database).await;
    raw.batch_execute("COMMIT").await.unwrap();
    let answer = put.await.unwrap().unwrap().into_inner();
    assert!(answer.duplicate, "{answer:?}");
    assert_eq!(answer.task_id, theirs.to_string());
    assert_eq!(
        database
            .psql("SELECT sum(unfinished) FROM taskq.queue_counts WHERE queue = 'race'")
            .await,
        "2"
    );
    assert_eq!(
        database
            .psql("SELECT count(*) FROM taskq.tasks WHERE queue = 'race'")
            .await,
        "2"
    );
    server.shutdown().await;
}

/// Another server's put commits while this server's batch (assumed to
/// fit when its snapshot was taken) waits on the queue's put shard: the
/// capacity is checked against the count as it is after that commit, so
/// the batch takes only the room left and the queue never holds more
/// than its capacity.
#[tokio::test]
async fn a_batch_racing_another_put_takes_only_the_room_left() {
    let database = TestDatabase::start().await;
    let mut config = on(&database);
    config.broker.queue_capacity = 3;
    let server = TestServer::with_config(config).await;
    let mut client = server.client().await;
    put_many(&mut client, "tight", &["before".to_string()]).await;
    let raw = raw_connection(&database).await;
    raw.batch_execute(
        "BEGIN;
         INSERT INTO taskq.tasks (id, queue, payload, max_attempts)
             VALUES (gen_random_uuid(), 'tight', 'theirs', 3);
         UPDATE taskq.queue_counts SET unfinished = unfinished + 1
             WHERE queue = 'tight' AND shard = 0",
    )
    .await
    .unwrap();
    let mut putter = server.client().await;
    let put = tokio::spawn(async move {
        let request = pb::PutTasksRequest {
            tasks: vec![
                new_task("tight", "a".into(), None),
                new_task("tight", "b".into(), None),
            ],
        };
        putter.put_tasks(with_deadline(request, LONG)).await
    });
    until_a_statement_waits_on_a_lock(&database).await;
    raw.batch_execute("COMMIT").await.unwrap();
    let outcomes: Vec<_> = put
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .outcomes
        .into_iter()
        .map(|o| match o.outcome {
            Some(pb::put_task_outcome::Outcome::Ok(_)) => "ok".to_string(),
            Some(pb::put_task_outcome::Outcome::Error(e)) => format!("error {}", e.code),
            None => "none".to_string(),
        })
        .collect();
    assert_eq!(outcomes, ["ok", "error 8"]);
    assert_eq!(
        database
            .psql("SELECT sum(unfinished) FROM taskq.queue_counts WHERE queue = 'tight'")
            .await,
        "3"
    );
    assert_eq!(
        database
            .psql("SELECT count(*) FROM taskq.tasks WHERE queue = 'tight'")
            .await,
        "3"
    );
    server.shutdown().await;
}
