//! The default path under faults, checked against its own history: the
//! path users and the Rust worker take (PutTasks; StreamTasks with batches;
//! WatchResultBatches by queue and WatchResults by ids).
//!
//! Producers put tasks in PutTasks batches (with idempotency keys, so a
//! batch whose answer was lost is put again without doubling), and read
//! results with WatchResultBatches by queue, cutting and reopening their
//! streams now and then; one also watches some of its tasks by id. Stream
//! workers in this process take batches and misbehave at random: they cut
//! their stream holding tasks, vanish (stop answering, so leases run out),
//! report retryable failures, hold tasks past their lease and report late,
//! and extend leases; two of them reach the server through a loopback proxy
//! that partitions them now and then. `taskq worker` processes run too, and
//! one is killed with SIGKILL mid-load. At the end a drain starts while
//! load still runs.
//!
//! The checker (tests/common/history.rs) reads every task's result by id
//! and counts, requiring 0 of each: lost tasks, conflicting results (not
//! the handler's output), results for ids never put, results handed to two
//! queue readers (or to one twice), two different leases both told their
//! success was accepted, and a task held under two valid leases at once (a
//! lease the server still treated as current after it handed out the next
//! one). It also requires that the faults and their effects happened, and
//! prints them.
//!
//! A short run is in the test suite (20,000 tasks). The soak:
//!
//! ```sh
//! TASKQ_CHAOS_TASKS=200000 cargo test --release --test stream_chaos -- --nocapture
//! ```

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::history::{History, Rng, lease_seq, output_for, results_by_id};
use common::proxy::{Fault, Proxy};
use common::{Client, TestServer};
use taskq::pb::{self, server_message::Msg as Out, worker_message::Msg as In};
use taskq::server::{BrokerConfig, ServerConfig, TransportConfig};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

const QUEUE: &str = "chaos";
const PRODUCERS: usize = 2;
const READERS: usize = 2;
const STREAM_WORKERS: usize = 4;
const PROXIED_WORKERS: usize = 2;
const PROCESS_WORKERS: usize = 2;
const LEASE: Duration = Duration::from_millis(600);
const BATCH: usize = 100;

#[derive(Default)]
struct Faults {
    stream_cuts: AtomicU64,
    vanished: AtomicU64,
    retryable_failures: AtomicU64,
    late_reports: AtomicU64,
    late_accepted: AtomicU64,
    extensions: AtomicU64,
    partitions: AtomicU64,
    killed: AtomicU64,
    watch_reopens: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

async fn channel(url: &str) -> Client {
    let channel = Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_millis(300))
        .keep_alive_timeout(Duration::from_millis(300))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Client::new(channel)
}

struct Shared {
    history: Mutex<History>,
    faults: Faults,
    /// Set when the load phase is over: workers and readers stop.
    done: AtomicBool,
}

/// One stream worker: a StreamTasks stream with batches, reconnecting after
/// each cut, until `done` or `stop`.
async fn stream_worker(url: String, seed: u64, shared: Arc<Shared>, stop: Instant) {
    let mut rng = Rng::new(seed);
    let worker_id = format!("stream-{seed}");
    while !shared.done.load(Ordering::Relaxed) && Instant::now() < stop {
        let mut client = channel(&url).await;
        let (tx, rx) = mpsc::channel(64);
        let subscribe = pb::Subscribe {
            queue: QUEUE.into(),
            worker_id: worker_id.clone(),
            max_in_flight: 32,
            max_batch: 16,
            lease: Some(LEASE.try_into().unwrap()),
        };
        let _ = tx.try_send(pb::WorkerMessage {
            msg: Some(In::Subscribe(subscribe)),
        });
        let opened = tokio::time::timeout(
            Duration::from_secs(2),
            client.stream_tasks(ReceiverStream::new(rx)),
        )
        .await;
        let Ok(Ok(response)) = opened else {
            continue;
        };
        serve_stream(&mut rng, &shared, tx, response.into_inner(), stop).await;
    }
}

/// Extensions and reports in flight on one stream: what to record when
/// their acks come.
#[derive(Default)]
struct Pending {
    /// Lease id -> when its extension was sent.
    extends: HashMap<String, Instant>,
    /// Lease id -> (sent at, retry failure?, late?).
    reports: HashMap<String, (Instant, bool, bool)>,
}

async fn serve_stream(
    rng: &mut Rng,
    shared: &Arc<Shared>,
    tx: mpsc::Sender<pb::WorkerMessage>,
    mut inbound: tonic::Streaming<pb::ServerMessage>,
    stop: Instant,
) {
    let mut pending = Pending::default();
    // Tasks held back to report late, with when to report.
    let mut late: Vec<(pb::Task, Instant)> = Vec::new();
    loop {
        if shared.done.load(Ordering::Relaxed) || Instant::now() >= stop {
            return;
        }
        let now = Instant::now();
        let (due, held): (Vec<_>, Vec<_>) = late.into_iter().partition(|(_, at)| *at <= now);
        late = held;
        for (task, _) in due {
            report(&tx, &mut pending, &task, Report::Late).await;
        }
        let message =
            match tokio::time::timeout(Duration::from_millis(300), inbound.message()).await {
                Ok(Ok(Some(message))) => message,
                // The stream ended or broke, or went silent (a partition, say,
                // or nothing to do): open a new one.
                Ok(Ok(None) | Err(_)) => return,
                Err(_) if late.is_empty() && pending.reports.is_empty() => {
                    if rng.below(4) == 0 {
                        return;
                    }
                    continue;
                }
                Err(_) => continue,
            };
        let tasks = match message.msg {
            Some(Out::Tasks(batch)) => batch.tasks,
            Some(Out::Task(task)) => vec![task],
            Some(Out::ResultAcks(acks)) => {
                for ack in acks.acks {
                    acked(shared, &mut pending, &ack.task_id, &ack.lease_id, ack.error);
                }
                continue;
            }
            Some(Out::ResultAck(ack)) => {
                acked(shared, &mut pending, &ack.task_id, &ack.lease_id, ack.error);
                continue;
            }
            Some(Out::ExtendAck(ack)) => {
                if let Some(sent) = pending.extends.remove(&ack.lease_id) {
                    if ack.error.is_none() {
                        let seq = lease_seq(&ack.lease_id);
                        let mut history = shared.history.lock().unwrap();
                        history.current_ops.push((ack.task_id, seq, sent));
                    }
                }
                continue;
            }
            _ => continue,
        };
        // When these leases reached this worker: after the server made
        // them (the checker relies on that order).
        let received = Instant::now();
        shared.history.lock().unwrap().delivered(&tasks, received);
        match rng.below(1000) {
            // Cut the stream holding this batch: it comes back at once.
            0..=9 => {
                count(&shared.faults.stream_cuts);
                return;
            }
            // Vanish: stop answering, holding the batch, until the leases
            // have run out; then leave.
            10..=14 => {
                count(&shared.faults.vanished);
                tokio::time::sleep(LEASE * 2).await;
                return;
            }
            _ => {}
        }
        for task in tasks {
            if task.payload.ends_with(b"-slow") {
                // Every worker takes longer than the lease over these, so
                // the lease runs out and the task is handed out again
                // while the first worker still runs it; the first one's
                // late success usually wins.
                late.push((task, Instant::now() + LEASE * 3 / 2));
                continue;
            }
            match rng.below(100) {
                0..=3 => report(&tx, &mut pending, &task, Report::Retry).await,
                4..=5 => {
                    // Past its lease, then report: accepted only if no
                    // other worker finished it first.
                    late.push((task, Instant::now() + LEASE + Duration::from_millis(200)));
                }
                6..=9 => {
                    let extend = pb::ExtendLeaseRequest {
                        task_id: task.id.clone(),
                        lease_id: task.lease_id.clone(),
                        extend_by: Some(LEASE.try_into().unwrap()),
                    };
                    pending
                        .extends
                        .insert(task.lease_id.clone(), Instant::now());
                    count(&shared.faults.extensions);
                    let _ = tx
                        .send(pb::WorkerMessage {
                            msg: Some(In::Extend(extend)),
                        })
                        .await;
                    report(&tx, &mut pending, &task, Report::Success).await;
                }
                _ => report(&tx, &mut pending, &task, Report::Success).await,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Report {
    Success,
    Retry,
    Late,
}

async fn report(
    tx: &mpsc::Sender<pb::WorkerMessage>,
    pending: &mut Pending,
    task: &pb::Task,
    kind: Report,
) {
    let outcome = match kind {
        Report::Retry => pb::put_result_request::Outcome::Failure(pb::Failure {
            message: "flaky".into(),
            retry: true,
            // At once: this test is about faults, not the backoff.
            retry_after: Some(prost_types::Duration::default()),
        }),
        Report::Success | Report::Late => {
            pb::put_result_request::Outcome::Output(output_for(&task.payload))
        }
    };
    pending.reports.insert(
        task.lease_id.clone(),
        (Instant::now(), kind == Report::Retry, kind == Report::Late),
    );
    let request = pb::PutResultRequest {
        task_id: task.id.clone(),
        lease_id: task.lease_id.clone(),
        outcome: Some(outcome),
    };
    let _ = tx
        .send(pb::WorkerMessage {
            msg: Some(In::Results(pb::PutResultBatch {
                results: vec![request],
            })),
        })
        .await;
}

fn acked(
    shared: &Shared,
    pending: &mut Pending,
    task_id: &str,
    lease_id: &str,
    error: Option<pb::ItemError>,
) {
    let Some((sent, retry, late)) = pending.reports.remove(lease_id) else {
        return;
    };
    if late {
        count(&shared.faults.late_reports);
    }
    if error.is_some() {
        return;
    }
    let mut history = shared.history.lock().unwrap();
    if retry {
        count(&shared.faults.retryable_failures);
        history
            .current_ops
            .push((task_id.to_string(), lease_seq(lease_id), sent));
    } else {
        if late {
            count(&shared.faults.late_accepted);
        }
        history
            .accepted
            .push((task_id.to_string(), lease_id.to_string()));
    }
}

/// A producer: PutTasks batches, each put again with the same idempotency
/// keys until one answer arrives.
async fn producer(url: String, p: usize, tasks: usize, shared: Arc<Shared>, stop: Instant) {
    let mut client = channel(&url).await;
    let mine: Vec<usize> = (p..tasks).step_by(PRODUCERS).collect();
    for chunk in mine.chunks(BATCH) {
        let requests: Vec<pb::PutTaskRequest> = chunk
            .iter()
            .map(|i| pb::PutTaskRequest {
                queue: QUEUE.into(),
                payload: Bytes::from(if i % 100 == 7 {
                    format!("task-{i}-slow")
                } else {
                    format!("task-{i}")
                }),
                idempotency_key: format!("task-{i}"),
                // Enough attempts that faults at these rates do not use
                // them up: a FAILED result would be a finding.
                max_attempts: 100,
                ..Default::default()
            })
            .collect();
        // Tasks refused for want of room are put again after a pause, as a
        // producer would; a batch whose answer is lost, whole.
        let mut left = requests;
        while !left.is_empty() && Instant::now() < stop {
            let batch = pb::PutTasksRequest {
                tasks: left.clone(),
            };
            let answer =
                tokio::time::timeout(Duration::from_secs(2), client.put_tasks(batch)).await;
            let Ok(Ok(answer)) = answer else {
                continue;
            };
            let mut full = Vec::new();
            {
                let mut history = shared.history.lock().unwrap();
                for (request, outcome) in left.into_iter().zip(answer.into_inner().outcomes) {
                    match outcome.outcome {
                        Some(pb::put_task_outcome::Outcome::Ok(ok)) => {
                            history.put.insert(ok.task_id, request.payload.clone());
                        }
                        Some(pb::put_task_outcome::Outcome::Error(e))
                            if e.code == tonic::Code::ResourceExhausted as i32 =>
                        {
                            full.push(request);
                        }
                        other => panic!("a put refused under load: {other:?}"),
                    }
                }
            }
            left = full;
            if !left.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A reader by queue: WatchResultBatches, cut and reopened now and then.
async fn reader(url: String, seed: u64, shared: Arc<Shared>, stop: Instant) {
    let mut rng = Rng::new(seed);
    let mut stream_number = seed << 32;
    let mut client = channel(&url).await;
    while !shared.done.load(Ordering::Relaxed) && Instant::now() < stop {
        let request = pb::WatchResultsRequest {
            target: Some(pb::watch_results_request::Target::Queue(QUEUE.into())),
        };
        let Ok(Ok(response)) =
            tokio::time::timeout(Duration::from_secs(2), client.watch_result_batches(request))
                .await
        else {
            continue;
        };
        stream_number += 1;
        let mut results = response.into_inner();
        loop {
            if shared.done.load(Ordering::Relaxed) {
                return;
            }
            let batch =
                match tokio::time::timeout(Duration::from_millis(300), results.message()).await {
                    Ok(Ok(Some(batch))) => batch,
                    Ok(_) => break,
                    Err(_) => continue,
                };
            {
                let mut history = shared.history.lock().unwrap();
                for result in batch.results {
                    history.queue_reads.push((result.task_id, stream_number));
                }
            }
            // Cut the stream now and then: what it set aside comes back.
            if rng.below(200) == 0 {
                count(&shared.faults.watch_reopens);
                break;
            }
        }
    }
}

/// A watch on some task ids, opened while the load runs.
async fn watcher(url: String, ids: Vec<String>, shared: Arc<Shared>, stop: Instant) {
    let mut client = channel(&url).await;
    let request = pb::WatchResultsRequest {
        target: Some(pb::watch_results_request::Target::TaskIds(pb::TaskIds {
            ids: ids.clone(),
        })),
    };
    let Ok(response) = client.watch_results(request).await else {
        return;
    };
    let mut results = response.into_inner();
    let mut left = ids.len();
    while left > 0 {
        let timeout = stop.saturating_duration_since(Instant::now());
        match tokio::time::timeout(timeout, results.message()).await {
            Ok(Ok(Some(result))) => {
                shared.history.lock().unwrap().id_reads.push(result);
                left -= 1;
            }
            _ => return,
        }
    }
}

fn worker_process(url: &str, n: usize) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_taskq"))
        .args(["worker", "--queue", QUEUE, "--builtin", "echo"])
        .args(["--server", url, "--lease", "600ms"])
        .args(["--worker-id", &format!("process-{n}")])
        .env("TASKQ_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the taskq binary runs")
}

/// The history check (tests/common/history.rs), and that the faults and
/// their effects happened.
fn check(shared: &Shared, results: &HashMap<String, pb::Result>, tasks: usize) {
    let verdict = shared.history.lock().unwrap().check(results, tasks);
    let faults = &shared.faults;
    let got = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "stream chaos: {tasks} tasks; faults: {} stream cuts, {} vanished, {} partitions, {} killed, \
         {} watch reopens, {} extensions; effects: {} retryable failures, {} late reports \
         ({} accepted); {verdict}",
        got(&faults.stream_cuts),
        got(&faults.vanished),
        got(&faults.partitions),
        got(&faults.killed),
        got(&faults.watch_reopens),
        got(&faults.extensions),
        got(&faults.retryable_failures),
        got(&faults.late_reports),
        got(&faults.late_accepted),
    );
    verdict.assert_nothing_broken();
    for (what, n) in [
        ("stream cuts", got(&faults.stream_cuts)),
        ("vanished workers", got(&faults.vanished)),
        ("partitions", got(&faults.partitions)),
        ("killed processes", got(&faults.killed)),
        ("watch reopens", got(&faults.watch_reopens)),
        ("retryable failures", got(&faults.retryable_failures)),
        ("late successes accepted", got(&faults.late_accepted)),
        ("redeliveries", verdict.redelivered),
    ] {
        assert!(n > 0, "no {what} happened: the test did not test them");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_path_loses_nothing_and_doubles_nothing_under_faults() {
    let tasks: usize = std::env::var("TASKQ_CHAOS_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    // Bounded in time as well as in count.
    let stop = Instant::now() + Duration::from_secs(90 + tasks as u64 / 500);
    let server = TestServer::with_config(ServerConfig {
        transport: TransportConfig {
            // A partitioned connection is found and dropped within 400 ms.
            keepalive_interval: Duration::from_millis(200),
            keepalive_timeout: Duration::from_millis(200),
            ..TransportConfig::default()
        },
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::new(BrokerConfig {
            max_results: tasks + 10_000,
            ..BrokerConfig::default()
        })
    })
    .await;
    let url = server.url();
    let shared = Arc::new(Shared {
        history: Mutex::new(History::default()),
        faults: Faults::default(),
        done: AtomicBool::new(false),
    });

    let mut load = tokio::task::JoinSet::new();
    for w in 0..STREAM_WORKERS {
        let seed = 0x5EED + w as u64 * 7919;
        load.spawn(stream_worker(url.clone(), seed, shared.clone(), stop));
    }
    let mut proxies = Vec::new();
    for w in 0..PROXIED_WORKERS {
        let proxy = Proxy::start(server.addr).await;
        let seed = 0xBEEF + w as u64 * 104_729;
        load.spawn(stream_worker(proxy.url(), seed, shared.clone(), stop));
        proxies.push(proxy);
    }
    let mut processes: Vec<_> = (0..PROCESS_WORKERS)
        .map(|n| worker_process(&url, n))
        .collect();
    for r in 0..READERS {
        load.spawn(reader(url.clone(), 0xEAD + r as u64, shared.clone(), stop));
    }
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        producers.spawn(producer(url.clone(), p, tasks, shared.clone(), stop));
    }

    // Faults driven from here while the load runs: partitions of the
    // proxied workers, and a worker process killed and replaced.
    let mut watched = false;
    // The count of finished tasks, and when it last moved: a run that
    // stops making progress goes to the checker instead of waiting out
    // its whole bound.
    let mut progress = (0, Instant::now());
    let mut killed = false;
    let mut tick = 0u64;
    loop {
        let (put, read) = {
            let history = shared.history.lock().unwrap();
            (history.put.len(), history.queue_reads.len())
        };
        if !watched && put >= tasks / 10 {
            // A watch by ids on tasks put early, while they run.
            let ids: Vec<String> = {
                let history = shared.history.lock().unwrap();
                history.put.keys().take(500).cloned().collect()
            };
            load.spawn(watcher(url.clone(), ids, shared.clone(), stop));
            watched = true;
        }
        if !killed && read >= tasks / 3 {
            processes[0].start_kill().unwrap(); // SIGKILL
            let _ = processes[0].wait().await;
            count(&shared.faults.killed);
            processes[0] = worker_process(&url, PROCESS_WORKERS);
            killed = true;
        }
        // Partitions: 300 ms of every 500, longer than keepalive takes to
        // find them.
        if tick % 5 == 2 {
            for proxy in &proxies {
                proxy.set(Fault::Partition);
            }
            count(&shared.faults.partitions);
        }
        if tick % 5 == 0 {
            for proxy in &proxies {
                proxy.set(Fault::None);
            }
        }
        tick += 1;
        // Done when every task is finished and every result handed out.
        let finished = producers.is_empty() && {
            let mut client = channel(&url).await;
            let request = pb::GetStatsRequest {
                queue: QUEUE.into(),
            };
            match client.get_stats(request).await {
                Ok(stats) => {
                    let q = &stats.get_ref().queues[0];
                    let finished = q.succeeded + q.failed;
                    if finished != progress.0 {
                        progress = (finished, Instant::now());
                    }
                    let stalled = progress.1.elapsed() > Duration::from_secs(10);
                    stalled || finished >= tasks as u64 && q.results_unclaimed == 0
                }
                Err(_) => false,
            }
        };
        if finished || Instant::now() >= stop {
            break;
        }
        tokio::select! {
            Some(done) = producers.join_next() => done.unwrap(),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    for proxy in &proxies {
        proxy.set(Fault::None);
    }

    // The checker: every task put has one result, the right one, read by
    // id; the readers by queue got each result at most once.
    let ids: Vec<String> = shared.history.lock().unwrap().put.keys().cloned().collect();
    let results = results_by_id(channel(&url).await, &ids, stop).await;
    shared.done.store(true, Ordering::Relaxed);
    check(&shared, &results, tasks);

    // A drain started while load still runs: new puts are refused with
    // UNAVAILABLE, reports of held tasks still go in, the streams end, and
    // the server stops within its grace.
    shared.done.store(false, Ordering::Relaxed);
    let drain_stop = Instant::now() + Duration::from_secs(30);
    for w in 0..STREAM_WORKERS {
        load.spawn(stream_worker(
            url.clone(),
            0xD0 + w as u64,
            shared.clone(),
            drain_stop,
        ));
    }
    let accepted_before = shared.history.lock().unwrap().accepted.len();
    let refused = Arc::new(AtomicU64::new(0));
    let mut tail = tokio::task::JoinSet::new();
    {
        let (url, refused) = (url.clone(), refused.clone());
        tail.spawn(async move {
            let mut client = channel(&url).await;
            for i in 0.. {
                if Instant::now() >= drain_stop {
                    return;
                }
                let batch = pb::PutTasksRequest {
                    tasks: vec![pb::PutTaskRequest {
                        queue: QUEUE.into(),
                        payload: Bytes::from(format!("tail-{i}")),
                        ..Default::default()
                    }],
                };
                match client.put_tasks(batch).await {
                    Ok(answer) => {
                        let outcome = &answer.get_ref().outcomes[0].outcome;
                        if let Some(pb::put_task_outcome::Outcome::Error(e)) = outcome {
                            assert_eq!(e.code, tonic::Code::Unavailable as i32, "{e:?}");
                            refused.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    Err(status) => {
                        // Refused by the draining server, or, for a call
                        // racing the close of its connection once the
                        // drain is done, a transport error, or a stream
                        // the server's GOAWAY (NO_ERROR) left unprocessed,
                        // which tonic reports as INTERNAL "h2 protocol
                        // error": in every case not acknowledged.
                        let transport = (status.code() == tonic::Code::Unknown
                            && status.message() == "transport error")
                            || (status.code() == tonic::Code::Internal
                                && status.message().starts_with("h2 protocol error"));
                        assert!(
                            status.code() == tonic::Code::Unavailable || transport,
                            "{status:?}"
                        );
                        refused.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        });
    }
    // Let the tail load reach the workers before the drain starts.
    common::eventually("the tail's tasks are being worked", || {
        let shared = shared.clone();
        async move { shared.history.lock().unwrap().accepted.len() > accepted_before + 50 }
    })
    .await;
    let drain_started = Instant::now();
    let mut server = server;
    server.signal_shutdown();
    while let Some(done) = tail.join_next().await {
        done.unwrap();
    }
    assert_eq!(
        refused.load(Ordering::Relaxed),
        1,
        "a put during the drain was refused"
    );
    server.shutdown().await;
    println!(
        "drain: stopped {:?} after it started; {} reports accepted during the tail",
        drain_started.elapsed(),
        shared.history.lock().unwrap().accepted.len() - accepted_before
    );
    shared.done.store(true, Ordering::Relaxed);
    load.abort_all();
    for mut process in processes {
        let _ = process.start_kill();
        let _ = process.wait().await;
    }
}
