//! The PostgreSQL store under faults: `taskq serve` processes (the real
//! binary, on free ports of 127.0.0.1) on one database of a real
//! PostgreSQL the tests start (tests/common/postgres.rs), killed with
//! SIGKILL, drained with SIGTERM, and the database restarted and crashed
//! under them.
//!
//! - A server killed mid-load on the stream path, then started again
//!   (`a_server_killed_mid_load_loses_and_doubles_nothing`), and PostgreSQL
//!   restarted, then crashed, mid-load
//!   (`a_database_restart_mid_load_loses_and_doubles_nothing`): producers
//!   put with PutTasks (idempotency keys: a batch whose answer was lost is
//!   put again, through another server, without doubling), read results
//!   with WatchResultBatches by queue, and stream workers take batches and
//!   report them; a client whose server died moves to another one and
//!   carries on, sending the reports whose answers it lost again there
//!   under the same lease. Then the history check of
//!   tests/common/history.rs (0 lost, conflicting, failed, never put, read
//!   twice by queue, two accepted successes, double-leased) and a count of
//!   the database's rows (0 doubled puts). Each also requires that its
//!   fault happened and hit work in flight, and prints the counts.
//! - Every server stopped at once (one with SIGTERM, the others with
//!   SIGKILL) and started again (`every_server_stopped_at_once_loses_nothing`):
//!   every pending task, lease and unread result is still there.
//! - One server SIGKILLed 30 times at seeded random points while a client
//!   puts and reports through it
//!   (`many_kills_lose_no_acknowledged_put_or_result`): every put and
//!   result it acknowledged is read back through another server.
//! - What the load tests found, each in a small test: a drained server
//!   leaves its worker streams' tasks leased
//!   (`a_drained_servers_stream_gives_its_tasks_back_at_once`), and a
//!   worker stream's window keeps the places of leases that ended where
//!   its server did not see it (`a_stream_whose_leases_ran_out_gets_tasks_again`,
//!   `a_stream_whose_tasks_were_reported_elsewhere_gets_tasks_again`).
//!
//! Every load is bounded in count and in time (`TASKQ_CHAOS_TASKS` sets
//! the load tests' tasks, 15,000 by default); the file runs in about half
//! a minute on 2 cores.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::history::{History, Rng, Verdict, lease_seq, output_for, results_by_id};
use common::postgres::{StopMode, TestDatabase};
use common::{Client, with_deadline};
use taskq::pb::{self, server_message::Msg as Out, worker_message::Msg as In};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Endpoint;

const QUEUE: &str = "chaos";
/// Servers at the start of the load tests; one more slot for the killed
/// server started again.
const SERVERS: usize = 3;
const SLOTS: usize = SERVERS + 1;
const PRODUCERS: usize = 2;
const READERS: usize = 2;
const WORKERS: usize = 6;
const BATCH: usize = 100;
/// The worker streams' lease: a killed server's leases come back after it.
const LEASE: Duration = Duration::from_millis(1500);
/// How long a worker works on a slow batch before reporting it (shorter
/// than the lease): tasks are in flight on every server most of the time.
const SLOW_WORK: Duration = Duration::from_millis(200);
/// Every call's deadline: a call to a server that died hangs no longer.
const CALL: Duration = Duration::from_secs(5);
/// A client's pause before trying again after UNAVAILABLE (a retry
/// policy, not a wait for a condition).
const BACKOFF: Duration = Duration::from_millis(50);

/// A `taskq serve` process on a database, on a free port of 127.0.0.1.
struct ServeProcess {
    child: Child,
    url: String,
    /// Its log lines at WARN and ERROR (the first 100), for the report.
    warnings: Arc<Mutex<Vec<String>>>,
}

impl ServeProcess {
    /// Starts one and returns once it has logged its address (it opened
    /// the store before).
    async fn start(database: &TestDatabase) -> ServeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_taskq"))
            .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "off"])
            .args(["--store", &database.url(), "--shutdown-grace", "2s"])
            .env_remove("TASKQ_TOKENS")
            .env_remove("TASKQ_LOG")
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the taskq binary runs");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.split("addr=").nth(1) {
                    return rest.split_whitespace().next().unwrap().to_string();
                }
            }
            panic!("taskq serve exited before serving");
        })
        .await
        .expect("taskq serve serves within 30s");
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let kept = warnings.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut kept = kept.lock().unwrap();
                if (line.contains(" WARN ") || line.contains(" ERROR ")) && kept.len() < 100 {
                    kept.push(line);
                }
            }
        });
        ServeProcess {
            child,
            url: format!("http://{addr}"),
            warnings,
        }
    }

    /// SIGKILL, and waits until the process is gone.
    async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL sent");
        let _ = self.child.wait().await;
    }

    /// SIGTERM, and its exit status (within 30 s).
    async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().expect("still running").to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("taskq serve exits within 30s of SIGTERM")
            .unwrap()
    }

    /// Whether it still runs (it did not exit on its own).
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// How many WARN and ERROR lines it logged, and the first of them.
    fn warning_summary(&self) -> String {
        let warnings = self.warnings.lock().unwrap();
        match warnings.first() {
            Some(first) => format!("{} warnings, first: {first}", warnings.len()),
            None => "no warnings".to_string(),
        }
    }
}

/// A client of `url` that connects on first use; keepalive finds a server
/// that vanished.
fn channel(url: &str) -> Client {
    let channel = Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_millis(500))
        .keep_alive_timeout(Duration::from_millis(500))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Client::new(channel)
}

/// The servers as the clients find them (a load balancer's view): slot ->
/// address, `None` while that server is down.
struct Servers(Mutex<Vec<Option<String>>>);

impl Servers {
    fn new(urls: Vec<String>) -> Servers {
        Servers(Mutex::new(urls.into_iter().map(Some).collect()))
    }

    /// The first server up from slot `from` on: (slot, address).
    fn pick(&self, from: usize) -> (usize, String) {
        let slots = self.0.lock().unwrap();
        (0..slots.len())
            .map(|k| (from + k) % slots.len())
            .find_map(|slot| slots[slot].clone().map(|url| (slot, url)))
            .expect("a server is up")
    }

    /// The server up with the fewest of `streams` open, the first from
    /// slot `from` on among equals (a least-connections balancer).
    fn least_loaded(&self, streams: &[AtomicI64; SLOTS], from: usize) -> (usize, String) {
        let slots = self.0.lock().unwrap();
        (0..slots.len())
            .map(|k| (from + k) % slots.len())
            .filter_map(|slot| slots[slot].clone().map(|url| (slot, url)))
            .min_by_key(|(slot, _)| streams[*slot].load(Ordering::Relaxed))
            .expect("a server is up")
    }

    fn take_down(&self, slot: usize) {
        self.0.lock().unwrap()[slot] = None;
    }

    /// A new server in a new slot.
    fn add(&self, url: String) -> usize {
        let mut slots = self.0.lock().unwrap();
        slots.push(Some(url));
        slots.len() - 1
    }
}

/// What the clients of the load tests count, beside the history.
#[derive(Default)]
struct Counts {
    /// PutTasks calls whose answer was lost (or that were refused whole),
    /// put again with the same keys.
    puts_again: AtomicU64,
    /// Puts answered `duplicate`: a batch put again had gone in before.
    duplicates: AtomicU64,
    /// Calls, items or acks answered UNAVAILABLE (the database was away).
    unavailable: AtomicU64,
    /// Reports (and finished work) left unanswered by a stream that broke,
    /// sent again with PutResult under the same lease.
    reports_again: AtomicU64,
    /// Of those, answered OK.
    reports_again_accepted: AtomicU64,
    /// Of those, refused (the task had been finished under another lease).
    reports_again_refused: AtomicU64,
    /// Reports and held tasks on streams to the killed server when it
    /// died: work in flight there.
    orphaned_by_kill: AtomicU64,
    /// Of those, accepted when sent again through another server.
    orphans_accepted: AtomicU64,
    /// Clients whose server was killed and that then got an answer from
    /// another one.
    moved_off_killed: AtomicU64,
    /// Worker and reader streams that broke (not cut by the client).
    streams_broken: AtomicU64,
    /// Streams the clients left, to move to another server: worker
    /// streams once all they held was answered, reader streams at once.
    streams_cut: AtomicU64,
    /// Worker streams cut holding a batch (given back at once).
    abrupt_cuts: AtomicU64,
    extensions: AtomicU64,
    retryable_failures: AtomicU64,
    /// Tasks delivered to worker streams, by server slot.
    delivered: [AtomicU64; SLOTS],
    /// Puts acknowledged, by server slot.
    puts: [AtomicU64; SLOTS],
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn got(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// What the clients of the load tests share.
struct Shared {
    history: Mutex<History>,
    counts: Counts,
    /// Tasks held by worker streams on each server slot, not yet answered.
    in_flight: [AtomicI64; SLOTS],
    /// Worker streams open on each server slot.
    streams: [AtomicI64; SLOTS],
    /// The slot of the server killed (`usize::MAX` until then).
    killed: AtomicUsize,
    /// Set when the load is over: workers and readers stop.
    done: AtomicBool,
}

impl Shared {
    /// A client whose call through slot `from` failed got an answer
    /// through `to`.
    fn moved(&self, from: usize, to: usize) {
        if from != to && from == self.killed.load(Ordering::Relaxed) {
            count(&self.counts.moved_off_killed);
        }
    }
}

/// A producer: PutTasks batches, each to the next server in turn, put
/// again with the same idempotency keys (through another server) until an
/// answer arrives, or `stop`.
async fn producer(
    servers: Arc<Servers>,
    p: usize,
    tasks: usize,
    shared: Arc<Shared>,
    stop: Instant,
) {
    let mut clients: HashMap<String, Client> = HashMap::new();
    let mine: Vec<usize> = (p..tasks).step_by(PRODUCERS).collect();
    let mut failed_at = None;
    for (n, chunk) in mine.chunks(BATCH).enumerate() {
        let mut left: Vec<pb::PutTaskRequest> = chunk
            .iter()
            .map(|i| pb::PutTaskRequest {
                queue: QUEUE.into(),
                payload: Bytes::from(format!("task-{i}")),
                idempotency_key: format!("task-{i}"),
                // Enough that the faults do not use them up: a FAILED result
                // would be a finding.
                max_attempts: 100,
                ..Default::default()
            })
            .collect();
        let mut slot = p + n;
        while !left.is_empty() {
            if Instant::now() >= stop {
                return;
            }
            let (at, url) = servers.pick(slot);
            let mut client = clients
                .entry(url.clone())
                .or_insert_with(|| channel(&url))
                .clone();
            let request = pb::PutTasksRequest {
                tasks: left.clone(),
            };
            let answer = match client.put_tasks(with_deadline(request, CALL)).await {
                Ok(answer) => answer.into_inner(),
                Err(status) => {
                    // Lost or refused whole: the same batch again, elsewhere.
                    if status.code() == Code::Unavailable {
                        count(&shared.counts.unavailable);
                    }
                    count(&shared.counts.puts_again);
                    failed_at = Some(at);
                    slot = at + 1;
                    tokio::time::sleep(BACKOFF).await;
                    continue;
                }
            };
            if let Some(from) = failed_at.take() {
                shared.moved(from, at);
            }
            let mut again = Vec::new();
            {
                let mut history = shared.history.lock().unwrap();
                for (request, outcome) in left.into_iter().zip(answer.outcomes) {
                    match outcome.outcome {
                        Some(pb::put_task_outcome::Outcome::Ok(ok)) => {
                            if ok.duplicate {
                                count(&shared.counts.duplicates);
                            }
                            count(&shared.counts.puts[at]);
                            history.put.insert(ok.task_id, request.payload);
                        }
                        Some(pb::put_task_outcome::Outcome::Error(e))
                            if e.code == Code::Unavailable as i32 =>
                        {
                            count(&shared.counts.unavailable);
                            again.push(request);
                        }
                        other => panic!("a put refused under load: {other:?}"),
                    }
                }
            }
            left = again;
            if !left.is_empty() {
                slot = at + 1;
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }
}

/// A reader by queue: WatchResultBatches, moving to another server when
/// its stream breaks, and now and then by its own choice.
async fn reader(servers: Arc<Servers>, r: usize, shared: Arc<Shared>) {
    let mut rng = Rng::new(0xEAD + r as u64);
    let mut stream_number = (r as u64) << 32;
    let mut slot = r + 1;
    let mut failed_at = None;
    while !shared.done.load(Ordering::Relaxed) {
        let (at, url) = servers.pick(slot);
        let mut client = channel(&url);
        let request = pb::WatchResultsRequest {
            target: Some(pb::watch_results_request::Target::Queue(QUEUE.into())),
        };
        let opened =
            tokio::time::timeout(Duration::from_secs(2), client.watch_result_batches(request))
                .await;
        let Ok(Ok(response)) = opened else {
            if let Ok(Err(status)) = opened {
                if status.code() == Code::Unavailable {
                    count(&shared.counts.unavailable);
                }
            }
            failed_at = Some(at);
            slot = at + 1;
            tokio::time::sleep(BACKOFF).await;
            continue;
        };
        stream_number += 1;
        let mut results = response.into_inner();
        loop {
            if shared.done.load(Ordering::Relaxed) {
                return;
            }
            let batch =
                match tokio::time::timeout(Duration::from_millis(200), results.message()).await {
                    Ok(Ok(Some(batch))) => batch,
                    Ok(_) => {
                        count(&shared.counts.streams_broken);
                        failed_at = Some(at);
                        slot = at + 1;
                        break;
                    }
                    Err(_) => continue,
                };
            if let Some(from) = failed_at.take() {
                shared.moved(from, at);
            }
            {
                let mut history = shared.history.lock().unwrap();
                for result in batch.results {
                    history.queue_reads.push((result.task_id, stream_number));
                }
            }
            if rng.below(40) == 0 {
                count(&shared.counts.streams_cut);
                slot = at + 1;
                break;
            }
        }
    }
}

/// A report made on a worker stream and not yet answered.
#[derive(Clone)]
struct Report {
    request: pb::PutResultRequest,
    /// When it was first sent: the checker's time for an operation only
    /// the current lease may make (a repeat of it is the same operation).
    sent: Instant,
    /// A retried failure (else a success).
    retry: bool,
    /// Left unanswered by a stream to the server that was killed.
    orphaned: bool,
}

/// Records a report the server accepted.
fn accepted(shared: &Shared, report: &Report) {
    let task = report.request.task_id.clone();
    let mut history = shared.history.lock().unwrap();
    if report.retry {
        count(&shared.counts.retryable_failures);
        let seq = lease_seq(&report.request.lease_id);
        history.current_ops.push((task, seq, report.sent));
    } else {
        history
            .accepted
            .push((task, report.request.lease_id.clone()));
    }
}

/// How a worker stream ended.
#[derive(PartialEq)]
enum StreamEnd {
    /// It broke or the server ended it.
    Broke,
    /// The worker cut it, to move to another server.
    Cut,
    /// The load is over.
    Over,
}

/// One stream worker: StreamTasks with batches, moving to another server
/// when its stream breaks (or now and then by its own choice); what a
/// broken stream left unanswered is reported again through the next
/// server with PutResult, under the same lease.
async fn stream_worker(servers: Arc<Servers>, w: usize, shared: Arc<Shared>) {
    let mut rng = Rng::new(0x5EED + w as u64 * 7919);
    let worker_id = format!("stream-{w}");
    let mut slot = w;
    let mut failed_at = None;
    let mut unanswered: Vec<Report> = Vec::new();
    while !shared.done.load(Ordering::Relaxed) {
        let (at, url) = servers.least_loaded(&shared.streams, slot);
        let mut client = channel(&url);
        if !report_again(&client, &mut unanswered, &shared).await {
            failed_at = Some(at);
            slot = at + 1;
            tokio::time::sleep(BACKOFF).await;
            continue;
        }
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
            if let Ok(Err(status)) = opened {
                if status.code() == Code::Unavailable {
                    count(&shared.counts.unavailable);
                }
            }
            failed_at = Some(at);
            slot = at + 1;
            tokio::time::sleep(BACKOFF).await;
            continue;
        };
        if let Some(from) = failed_at.take() {
            shared.moved(from, at);
        }
        shared.streams[at].fetch_add(1, Ordering::Relaxed);
        let (end, left) = serve_stream(&mut rng, &shared, at, tx, response.into_inner()).await;
        shared.streams[at].fetch_sub(1, Ordering::Relaxed);
        let orphaned = end == StreamEnd::Broke && at == shared.killed.load(Ordering::Relaxed);
        for mut report in left {
            if orphaned {
                count(&shared.counts.orphaned_by_kill);
                report.orphaned = true;
            }
            unanswered.push(report);
        }
        match end {
            StreamEnd::Broke => {
                count(&shared.counts.streams_broken);
                failed_at = Some(at);
                slot = at + 1;
            }
            StreamEnd::Cut => {
                count(&shared.counts.streams_cut);
                slot = at + 1;
            }
            StreamEnd::Over => return,
        }
    }
}

/// Sends `unanswered` reports again with PutResult, under their leases,
/// all at once. Returns false (keeping those not answered) when the server
/// does not answer some or answers UNAVAILABLE.
async fn report_again(client: &Client, unanswered: &mut Vec<Report>, shared: &Shared) -> bool {
    let mut calls = JoinSet::new();
    for report in unanswered.drain(..) {
        let mut client = client.clone();
        calls.spawn(async move {
            let request = with_deadline(report.request.clone(), CALL);
            let answer = client.put_result(request).await.map(|_| ());
            (report, answer)
        });
    }
    let mut all = true;
    while let Some(call) = calls.join_next().await {
        let (report, answer) = call.expect("a report did not panic");
        count(&shared.counts.reports_again);
        match answer {
            Ok(()) => {
                count(&shared.counts.reports_again_accepted);
                if report.orphaned {
                    count(&shared.counts.orphans_accepted);
                }
                accepted(shared, &report);
            }
            // Finished under another lease (its lease ran out or its stream
            // gave it back, and someone else finished it), or a retried
            // failure whose lease is no longer current: nothing to do.
            Err(status)
                if matches!(
                    status.code(),
                    Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition
                ) =>
            {
                count(&shared.counts.reports_again_refused);
            }
            Err(status) => {
                if status.code() == Code::Unavailable {
                    count(&shared.counts.unavailable);
                }
                unanswered.push(report);
                all = false;
            }
        }
    }
    all
}

/// Runs one worker stream: reports each batch at once (a few after some
/// work), retries a few as failures, extends a few leases, sends again
/// what was answered UNAVAILABLE. After some batches it moves on: its
/// window goes to 0 and it leaves once all it held is answered (now and
/// then it leaves at once, holding a batch). Returns how it ended and what
/// it left unanswered: reports sent and tasks held.
async fn serve_stream(
    rng: &mut Rng,
    shared: &Shared,
    at: usize,
    tx: mpsc::Sender<pb::WorkerMessage>,
    mut inbound: tonic::Streaming<pb::ServerMessage>,
) -> (StreamEnd, Vec<Report>) {
    // Lease id -> the report sent under it, until its ack.
    let mut sent: HashMap<String, Report> = HashMap::new();
    // Lease id -> when its extension was sent.
    let mut extending: HashMap<String, Instant> = HashMap::new();
    // Answered UNAVAILABLE: to send again once the backoff is over.
    let mut again: Vec<Report> = Vec::new();
    let mut again_at = Instant::now();
    // Tasks being worked on, with when their work is done.
    let mut working: Vec<(pb::Task, Instant)> = Vec::new();
    let batches_here = 5 + rng.below(30);
    let mut batches = 0;
    // Set when it moves on: its window is 0 since then.
    let mut leaving: Option<Instant> = None;
    let end = loop {
        if shared.done.load(Ordering::Relaxed) {
            break StreamEnd::Over;
        }
        let now = Instant::now();
        if let Some(since) = leaving {
            let answered = sent.is_empty() && working.is_empty() && again.is_empty();
            if answered || now - since > Duration::from_secs(2) {
                break StreamEnd::Cut;
            }
        }
        let (done, still): (Vec<_>, Vec<_>) = working.into_iter().partition(|(_, at)| *at <= now);
        working = still;
        let mut reports: Vec<Report> = done.into_iter().map(|(task, _)| success(&task)).collect();
        if !again.is_empty() && now >= again_at {
            reports.append(&mut again);
        }
        if !reports.is_empty() && !send_reports(&tx, &mut sent, reports).await {
            break StreamEnd::Broke;
        }
        let message = match tokio::time::timeout(Duration::from_millis(50), inbound.message()).await
        {
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None) | Err(_)) => break StreamEnd::Broke,
            Err(_) => continue,
        };
        match message.msg {
            Some(Out::Tasks(batch)) => {
                let received = Instant::now();
                shared
                    .history
                    .lock()
                    .unwrap()
                    .delivered(&batch.tasks, received);
                let n = batch.tasks.len();
                shared.counts.delivered[at].fetch_add(n as u64, Ordering::Relaxed);
                if rng.below(200) == 0 {
                    // Cut holding this batch: it goes back at once.
                    count(&shared.counts.abrupt_cuts);
                    break StreamEnd::Cut;
                }
                shared.in_flight[at].fetch_add(n as i64, Ordering::Relaxed);
                if rng.below(10) == 0 {
                    // Some work before the report: these tasks are held.
                    let done_at = received + SLOW_WORK;
                    working.extend(batch.tasks.into_iter().map(|task| (task, done_at)));
                } else {
                    let mut reports = Vec::new();
                    for task in batch.tasks {
                        match rng.below(100) {
                            0..=2 => reports.push(Report {
                                request: pb::PutResultRequest {
                                    task_id: task.id.clone(),
                                    lease_id: task.lease_id.clone(),
                                    outcome: Some(pb::put_result_request::Outcome::Failure(
                                        pb::Failure {
                                            message: "flaky".into(),
                                            retry: true,
                                            retry_after: Some(prost_types::Duration::default()),
                                        },
                                    )),
                                },
                                sent: Instant::now(),
                                retry: true,
                                orphaned: false,
                            }),
                            3..=7 => {
                                extending.insert(task.lease_id.clone(), Instant::now());
                                count(&shared.counts.extensions);
                                let extend = pb::ExtendLeaseRequest {
                                    task_id: task.id.clone(),
                                    lease_id: task.lease_id.clone(),
                                    extend_by: Some(LEASE.try_into().unwrap()),
                                };
                                let message = pb::WorkerMessage {
                                    msg: Some(In::Extend(extend)),
                                };
                                if tx.send(message).await.is_err() {
                                    break;
                                }
                                reports.push(success(&task));
                            }
                            _ => reports.push(success(&task)),
                        }
                    }
                    if !send_reports(&tx, &mut sent, reports).await {
                        break StreamEnd::Broke;
                    }
                }
                batches += 1;
                if batches >= batches_here && leaving.is_none() {
                    // Moving on: no new tasks here; what it holds is
                    // reported before it leaves.
                    let pause = pb::WorkerMessage {
                        msg: Some(In::Window(pb::SetMaxInFlight { max_in_flight: 0 })),
                    };
                    if tx.send(pause).await.is_err() {
                        break StreamEnd::Broke;
                    }
                    leaving = Some(Instant::now());
                }
            }
            Some(Out::ResultAcks(acks)) => {
                for ack in acks.acks {
                    let Some(report) = sent.remove(&ack.lease_id) else {
                        continue;
                    };
                    match ack.error {
                        None => {
                            shared.in_flight[at].fetch_sub(1, Ordering::Relaxed);
                            accepted(shared, &report);
                        }
                        Some(e) if e.code == Code::Unavailable as i32 => {
                            count(&shared.counts.unavailable);
                            if again.is_empty() {
                                again_at = Instant::now() + BACKOFF;
                            }
                            again.push(report);
                        }
                        // Finished under another lease, or no longer the
                        // current lease: the task is someone else's.
                        Some(_) => {
                            shared.in_flight[at].fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Some(Out::ExtendAck(ack)) => {
                if let Some(sent) = extending.remove(&ack.lease_id) {
                    if ack.error.is_none() {
                        let seq = lease_seq(&ack.lease_id);
                        let mut history = shared.history.lock().unwrap();
                        history.current_ops.push((ack.task_id, seq, sent));
                    }
                }
            }
            _ => {}
        }
    };
    let mut left: Vec<Report> = sent.into_values().collect();
    left.append(&mut again);
    left.extend(working.iter().map(|(task, _)| success(task)));
    shared.in_flight[at].fetch_sub(left.len() as i64, Ordering::Relaxed);
    (end, left)
}

/// The success of `task`: the handler's output for its payload.
fn success(task: &pb::Task) -> Report {
    Report {
        request: pb::PutResultRequest {
            task_id: task.id.clone(),
            lease_id: task.lease_id.clone(),
            outcome: Some(pb::put_result_request::Outcome::Output(output_for(
                &task.payload,
            ))),
        },
        sent: Instant::now(),
        retry: false,
        orphaned: false,
    }
}

/// Sends `reports` in one `results` message; false if the stream is gone.
async fn send_reports(
    tx: &mpsc::Sender<pb::WorkerMessage>,
    sent: &mut HashMap<String, Report>,
    reports: Vec<Report>,
) -> bool {
    if reports.is_empty() {
        return true;
    }
    let results = reports.iter().map(|r| r.request.clone()).collect();
    for report in reports {
        sent.insert(report.request.lease_id.clone(), report);
    }
    tx.send(pb::WorkerMessage {
        msg: Some(In::Results(pb::PutResultBatch { results })),
    })
    .await
    .is_ok()
}

/// The queue's counts through the server at `url`, if it answers.
async fn queue_stats(url: &str) -> Option<pb::QueueStats> {
    let request = pb::GetStatsRequest {
        queue: QUEUE.into(),
    };
    let stats = channel(url)
        .get_stats(with_deadline(request, CALL))
        .await
        .ok()?;
    stats.into_inner().queues.into_iter().next()
}

/// The load of the first two tests, running.
struct Load {
    tasks: usize,
    servers: Arc<Servers>,
    shared: Arc<Shared>,
    producers: JoinSet<()>,
    clients: JoinSet<()>,
    /// The bound on the whole test.
    stop: Instant,
}

impl Load {
    fn start(servers: Arc<Servers>, tasks: usize, stop: Instant) -> Load {
        let shared = Arc::new(Shared {
            history: Mutex::new(History::default()),
            counts: Counts::default(),
            in_flight: Default::default(),
            streams: Default::default(),
            killed: AtomicUsize::new(usize::MAX),
            done: AtomicBool::new(false),
        });
        let mut clients = JoinSet::new();
        for w in 0..WORKERS {
            clients.spawn(stream_worker(servers.clone(), w, shared.clone()));
        }
        for r in 0..READERS {
            clients.spawn(reader(servers.clone(), r, shared.clone()));
        }
        let mut producers = JoinSet::new();
        for p in 0..PRODUCERS {
            producers.spawn(producer(servers.clone(), p, tasks, shared.clone(), stop));
        }
        Load {
            tasks,
            servers,
            shared,
            producers,
            clients,
            stop,
        }
    }

    /// Puts acknowledged so far.
    fn puts(&self) -> usize {
        self.shared.history.lock().unwrap().put.len()
    }

    /// Polls `condition` every 10 ms until it holds (true) or the test's
    /// bound passes (false).
    async fn until(&self, mut condition: impl FnMut(&Load) -> bool) -> bool {
        while Instant::now() < self.stop {
            if condition(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Waits until every task is finished and every result handed out by
    /// queue (or progress stalls for 10 s, or the bound passes), stops the
    /// clients, and runs the history check on every result read by id.
    async fn finish(mut self) -> (Verdict, Arc<Shared>) {
        while let Some(done) = self.producers.join_next().await {
            done.expect("a producer did not panic");
        }
        // (finished, unclaimed), and when they last changed.
        let mut progress = ((0, 0), Instant::now());
        loop {
            if Instant::now() >= self.stop || progress.1.elapsed() > Duration::from_secs(10) {
                let ((finished, unclaimed), _) = progress;
                eprintln!(
                    "the load did not finish: {finished} of {} tasks finished, {unclaimed} \
                     results unclaimed by queue",
                    self.tasks
                );
                break;
            }
            let (_, url) = self.servers.pick(0);
            if let Some(q) = queue_stats(&url).await {
                let now = (q.succeeded + q.failed, q.results_unclaimed);
                if now.0 >= self.tasks as u64 && now.1 == 0 {
                    break;
                }
                if now != progress.0 {
                    progress = (now, Instant::now());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.shared.done.store(true, Ordering::Relaxed);
        while let Some(done) = self.clients.join_next().await {
            done.expect("a client did not panic");
        }
        let ids: Vec<String> = self
            .shared
            .history
            .lock()
            .unwrap()
            .put
            .keys()
            .cloned()
            .collect();
        let (_, url) = self.servers.pick(0);
        let results = results_by_id(channel(&url), &ids, self.stop).await;
        let verdict = self
            .shared
            .history
            .lock()
            .unwrap()
            .check(&results, self.tasks);
        (verdict, self.shared)
    }
}

/// The rows of the queue in the database: one per task put, however many
/// times a batch was put again.
async fn rows(database: &TestDatabase) -> usize {
    let sql = format!("SELECT count(*) FROM taskq.tasks WHERE queue = '{QUEUE}'");
    database.psql(&sql).await.parse().unwrap()
}

/// Prints what the clients counted.
fn print_counts(what: &str, tasks: usize, shared: &Shared, verdict: &Verdict) {
    let c = &shared.counts;
    let by_slot = |counts: &[AtomicU64; SLOTS]| {
        counts
            .iter()
            .map(|n| got(n).to_string())
            .collect::<Vec<_>>()
            .join("/")
    };
    println!(
        "{what}: {tasks} tasks; {} unavailable answers, {} batches put again ({} duplicates), \
         {} reports sent again ({} accepted, {} refused), {} orphaned by the kill ({} accepted \
         elsewhere), {} clients moved off the killed server, {} streams broken, {} left ({} \
         cut holding tasks), {} extensions, {} retryable failures; puts by server {}, \
         deliveries by server {}; {verdict}",
        got(&c.unavailable),
        got(&c.puts_again),
        got(&c.duplicates),
        got(&c.reports_again),
        got(&c.reports_again_accepted),
        got(&c.reports_again_refused),
        got(&c.orphaned_by_kill),
        got(&c.orphans_accepted),
        got(&c.moved_off_killed),
        got(&c.streams_broken),
        got(&c.streams_cut),
        got(&c.abrupt_cuts),
        got(&c.extensions),
        got(&c.retryable_failures),
        by_slot(&c.puts),
        by_slot(&c.delivered),
    );
}

/// Tasks of the load tests: TASKQ_CHAOS_TASKS, or `default`.
fn tasks_or(default: usize) -> usize {
    std::env::var("TASKQ_CHAOS_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Three servers on one database under the stream-path load; one is
/// killed with SIGKILL while its workers hold tasks, and started again
/// (as a new server) later. Nothing is lost or doubled, and the clients of
/// the killed server carried on through the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_load_loses_and_doubles_nothing() {
    let tasks = tasks_or(15_000);
    let started = Instant::now();
    let stop = started + Duration::from_secs(40 + tasks as u64 / 500);
    let database = TestDatabase::start().await;
    let mut processes = Vec::new();
    for _ in 0..SERVERS {
        processes.push(ServeProcess::start(&database).await);
    }
    let servers = Arc::new(Servers::new(
        processes.iter().map(|p| p.url.clone()).collect(),
    ));
    let load = Load::start(servers.clone(), tasks, stop);

    // The kill: once a third of the puts are in, while the workers on the
    // victim hold tasks.
    let victim = 0;
    let ready = load
        .until(|load| {
            load.puts() >= tasks / 3 && load.shared.in_flight[victim].load(Ordering::Relaxed) >= 4
        })
        .await;
    assert!(ready, "the victim's workers never held tasks");
    servers.take_down(victim);
    load.shared.killed.store(victim, Ordering::Relaxed);
    let held_at_kill = load.shared.in_flight[victim].load(Ordering::Relaxed);
    processes[victim].kill().await;
    let killed_at = started.elapsed();

    // Started again (a new server on the same database) once the others
    // took more puts.
    load.until(|load| load.puts() >= tasks / 2).await;
    let restarted = ServeProcess::start(&database).await;
    let restarted_slot = servers.add(restarted.url.clone());
    processes.push(restarted);

    let (verdict, shared) = load.finish().await;
    let stored = rows(&database).await;
    print_counts("killed server", tasks, &shared, &verdict);
    println!(
        "killed server: killed at {killed_at:?} holding {held_at_kill} tasks in its workers' \
         streams; {stored} rows; {:?} in all",
        started.elapsed()
    );
    for (n, process) in processes.iter().enumerate() {
        println!("  server {n}: {}", process.warning_summary());
    }
    verdict.assert_nothing_broken();
    assert_eq!(stored, tasks, "one row per task put: no put doubled");
    let c = &shared.counts;
    assert!(
        got(&c.orphaned_by_kill) > 0,
        "the kill left no report or held task unanswered: it hit no work in flight"
    );
    assert!(
        got(&c.orphans_accepted) > 0,
        "no report (or finished task) left by the kill was accepted through another server"
    );
    assert!(
        got(&c.moved_off_killed) > 0,
        "no client of the killed server carried on through another"
    );
    assert!(
        got(&c.delivered[restarted_slot]) > 0,
        "the server started again handed out no task"
    );
    for (n, process) in processes.iter_mut().enumerate() {
        if n != victim {
            assert!(process.running(), "server {n} exited during the load");
        }
    }
}

/// Three servers on one database under the stream-path load while
/// PostgreSQL restarts: calls in the gap answer UNAVAILABLE and the
/// clients retry; nothing is lost or doubled, and the servers stay up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_mid_load_loses_and_doubles_nothing() {
    let tasks = tasks_or(15_000);
    let started = Instant::now();
    let stop = started + Duration::from_secs(40 + tasks as u64 / 500);
    let database = TestDatabase::start_own_cluster().await;
    let mut processes = Vec::new();
    for _ in 0..SERVERS {
        processes.push(ServeProcess::start(&database).await);
    }
    let servers = Arc::new(Servers::new(
        processes.iter().map(|p| p.url.clone()).collect(),
    ));
    let load = Load::start(servers.clone(), tasks, stop);

    let accepted = |load: &Load| load.shared.history.lock().unwrap().accepted.len();
    let ready = load
        .until(|load| load.puts() >= tasks / 3 && accepted(load) >= tasks / 10)
        .await;
    assert!(ready, "the load never got going");
    let unavailable = || got(&load.shared.counts.unavailable);
    let before_restart = unavailable();
    let restart_began = started.elapsed();
    database.restart().await;
    let restart_took = started.elapsed() - restart_began;
    // Then a crash: PostgreSQL quits at once, without a checkpoint, and
    // runs crash recovery when it starts again. Every commit acknowledged
    // before it must still be there.
    let ready = load.until(|load| accepted(load) >= tasks / 2).await;
    assert!(ready, "the load did not get past the restart");
    let before_crash = unavailable();
    let crash_began = started.elapsed();
    database.stop_cluster(StopMode::Immediate).await;
    database.start_cluster().await;
    let crash_took = started.elapsed() - crash_began;

    let (verdict, shared) = load.finish().await;
    let stored = rows(&database).await;
    print_counts("database restart", tasks, &shared, &verdict);
    println!(
        "database restart: restarted at {restart_began:?} (took {restart_took:?}), crashed at \
         {crash_began:?} (back after {crash_took:?}); {stored} rows; {:?} in all",
        started.elapsed()
    );
    for (n, process) in processes.iter().enumerate() {
        println!("  server {n}: {}", process.warning_summary());
    }
    verdict.assert_nothing_broken();
    assert_eq!(stored, tasks, "one row per task put: no put doubled");
    assert!(
        before_crash > before_restart,
        "no client saw the database away during the restart: it hit nothing"
    );
    assert!(
        got(&shared.counts.unavailable) > before_crash,
        "no client saw the database away after the crash: it hit nothing"
    );
    for (n, process) in processes.iter_mut().enumerate() {
        assert!(process.running(), "server {n} exited over the restart");
    }
}

/// A worker stream on `client`: the sender of its messages and its
/// inbound stream, subscribed to `queue`.
async fn open_stream(
    client: &mut Client,
    queue: &str,
    worker_id: &str,
    window: u32,
    lease: Duration,
) -> (
    mpsc::Sender<pb::WorkerMessage>,
    tonic::Streaming<pb::ServerMessage>,
) {
    let (tx, rx) = mpsc::channel(64);
    let subscribe = pb::Subscribe {
        queue: queue.into(),
        worker_id: worker_id.into(),
        max_in_flight: window,
        max_batch: 50,
        lease: Some(lease.try_into().unwrap()),
    };
    tx.send(pb::WorkerMessage {
        msg: Some(In::Subscribe(subscribe)),
    })
    .await
    .unwrap();
    let inbound = client
        .stream_tasks(ReceiverStream::new(rx))
        .await
        .expect("the stream opens")
        .into_inner();
    (tx, inbound)
}

/// The next message of a worker stream, within 10 s.
async fn next_message(inbound: &mut tonic::Streaming<pb::ServerMessage>) -> Option<Out> {
    tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("a message within 10s")
        .expect("the stream carries on")
        .expect("the stream is open")
        .msg
}

/// `n` tasks from a worker stream.
async fn take_tasks(inbound: &mut tonic::Streaming<pb::ServerMessage>, n: usize) -> Vec<pb::Task> {
    let mut tasks = Vec::new();
    while tasks.len() < n {
        match next_message(inbound).await {
            Some(Out::Tasks(batch)) => tasks.extend(batch.tasks),
            Some(Out::Task(task)) => tasks.push(task),
            other => panic!("expected tasks: {other:?}"),
        }
    }
    assert_eq!(tasks.len(), n, "no more than the window");
    tasks
}

/// `task`'s success with `output`, as a stream's `results` message.
fn results_message(tasks: &[pb::Task], output: impl Fn(&pb::Task) -> Bytes) -> pb::WorkerMessage {
    pb::WorkerMessage {
        msg: Some(In::Results(pb::PutResultBatch {
            results: tasks
                .iter()
                .map(|task| pb::PutResultRequest {
                    task_id: task.id.clone(),
                    lease_id: task.lease_id.clone(),
                    outcome: Some(pb::put_result_request::Outcome::Output(output(task))),
                })
                .collect(),
        })),
    }
}

async fn all_stats(client: &mut Client, queue: &str) -> pb::QueueStats {
    let request = pb::GetStatsRequest {
        queue: queue.into(),
    };
    client
        .get_stats(with_deadline(request, CALL))
        .await
        .expect("GetStats answers")
        .into_inner()
        .queues
        .remove(0)
}

/// (pending, leased, succeeded, failed, results unclaimed).
fn counts_of(q: &pb::QueueStats) -> (u64, u64, u64, u64, u64) {
    (
        q.pending,
        q.leased,
        q.succeeded,
        q.failed,
        q.results_unclaimed,
    )
}

/// Acknowledges every report of `tasks` on a worker stream (as each
/// succeeded with the handler's output), after pausing its window so that
/// no new task takes their places.
async fn report_all(
    tx: &mpsc::Sender<pb::WorkerMessage>,
    inbound: &mut tonic::Streaming<pb::ServerMessage>,
    tasks: &[pb::Task],
) {
    let pause = pb::WorkerMessage {
        msg: Some(In::Window(pb::SetMaxInFlight { max_in_flight: 0 })),
    };
    tx.send(pause).await.unwrap();
    tx.send(results_message(tasks, |t| output_for(&t.payload)))
        .await
        .unwrap();
    let mut acks = 0;
    while acks < tasks.len() {
        match next_message(inbound).await {
            Some(Out::ResultAcks(batch)) => {
                for ack in batch.acks {
                    assert!(ack.error.is_none(), "{ack:?}");
                    acks += 1;
                }
            }
            other => panic!("expected acks: {other:?}"),
        }
    }
}

/// GetResult by queue, not waiting: the next unread result, if any.
async fn next_result(client: &mut Client, queue: &str) -> Option<pb::Result> {
    let request = pb::GetResultRequest {
        target: Some(pb::get_result_request::Target::Queue(queue.into())),
        max_wait: Some(Duration::ZERO.try_into().unwrap()),
    };
    client
        .get_result(with_deadline(request, CALL))
        .await
        .expect("GetResult by queue answers")
        .into_inner()
        .result
}

/// Puts `n` tasks on `queue` through `client`: id -> payload.
async fn put_tasks(
    client: &mut Client,
    queue: &str,
    n: usize,
    tag: &str,
) -> HashMap<String, Bytes> {
    let tasks = (0..n)
        .map(|i| pb::PutTaskRequest {
            queue: queue.into(),
            payload: Bytes::from(format!("{tag}-{i}")),
            ..Default::default()
        })
        .collect::<Vec<_>>();
    let request = pb::PutTasksRequest {
        tasks: tasks.clone(),
    };
    let answer = client
        .put_tasks(with_deadline(request, CALL))
        .await
        .expect("PutTasks answers")
        .into_inner();
    let mut put = HashMap::new();
    for (task, outcome) in tasks.into_iter().zip(answer.outcomes) {
        match outcome.outcome {
            Some(pb::put_task_outcome::Outcome::Ok(ok)) => {
                put.insert(ok.task_id, task.payload);
            }
            other => panic!("put refused: {other:?}"),
        }
    }
    put
}

/// Every server stopped while a worker stream holds tasks and results wait
/// unread: one with SIGTERM (a drain, with a worker stream open that has
/// reported all it took), two with SIGKILL. Three new servers on the
/// database find every pending task, every lease (still valid: its
/// holder's report is accepted) and every unread result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_stopped_at_once_loses_nothing() {
    const Q: &str = "kept";
    let database = TestDatabase::start().await;
    let mut old = Vec::new();
    for _ in 0..SERVERS {
        old.push(ServeProcess::start(&database).await);
    }
    let mut clients: Vec<Client> = old.iter().map(|p| channel(&p.url)).collect();
    let mut payloads: HashMap<String, Bytes> = HashMap::new();
    for (n, client) in clients.iter_mut().enumerate() {
        payloads.extend(put_tasks(client, Q, 100, &format!("kept-{n}")).await);
    }
    let lease = Duration::from_secs(60);
    // Server 1: a stream takes 100 tasks, reports 60 and holds 40.
    let (held_tx, mut held_inbound) = open_stream(&mut clients[1], Q, "holder", 100, lease).await;
    let mut held = take_tasks(&mut held_inbound, 100).await;
    let mut reported: Vec<pb::Task> = held.drain(..60).collect();
    report_all(&held_tx, &mut held_inbound, &reported).await;
    // Server 0: a stream takes 20 tasks and reports them, and stays open.
    let (drained_tx, mut drained_inbound) =
        open_stream(&mut clients[0], Q, "drained", 20, lease).await;
    let done = take_tasks(&mut drained_inbound, 20).await;
    report_all(&drained_tx, &mut drained_inbound, &done).await;
    reported.extend(done);
    // Server 2: 20 results read by queue; 60 stay unread.
    let mut read = HashSet::new();
    for _ in 0..20 {
        let result = next_result(&mut clients[2], Q).await.expect("a result");
        assert!(read.insert(result.task_id), "a result read twice");
    }
    let before = all_stats(&mut clients[2], Q).await;
    assert_eq!(counts_of(&before), (180, 40, 80, 0, 60), "before the stop");

    // All stop: server 0 drains (SIGTERM; its stream ends UNAVAILABLE),
    // 1 and 2 die.
    let status = old[0].terminate().await;
    assert!(status.success(), "a drained server exits 0: {status:?}");
    let end = tokio::time::timeout(Duration::from_secs(10), drained_inbound.message()).await;
    match end.expect("the drained stream ends") {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        other => panic!("the drained stream ends UNAVAILABLE: {other:?}"),
    }
    old[1].kill().await;
    old[2].kill().await;
    drop((held_tx, held_inbound, drained_tx));

    let mut new = Vec::new();
    for _ in 0..SERVERS {
        new.push(ServeProcess::start(&database).await);
    }
    let mut clients: Vec<Client> = new.iter().map(|p| channel(&p.url)).collect();
    for (n, client) in clients.iter_mut().enumerate() {
        let after = all_stats(client, Q).await;
        assert_eq!(
            counts_of(&after),
            (180, 40, 80, 0, 60),
            "(pending, leased, succeeded, failed, unclaimed) through new server {n}"
        );
    }
    // Every result by id, as reported.
    for task in &reported {
        let request = pb::GetResultRequest {
            target: Some(pb::get_result_request::Target::TaskId(task.id.clone())),
            max_wait: Some(Duration::ZERO.try_into().unwrap()),
        };
        let result = clients[0]
            .get_result(with_deadline(request, CALL))
            .await
            .expect("GetResult by id answers")
            .into_inner()
            .result
            .unwrap_or_else(|| panic!("the result of {} is gone", task.id));
        assert_eq!(result.state(), pb::TaskState::Succeeded);
        assert_eq!(result.output, output_for(&task.payload));
    }
    // The unread results by queue, each once.
    let mut unread = HashSet::new();
    while let Some(result) = next_result(&mut clients[1], Q).await {
        assert!(unread.insert(result.task_id), "a result read twice");
    }
    let expected_unread: HashSet<String> = reported
        .iter()
        .map(|t| t.id.clone())
        .filter(|id| !read.contains(id))
        .collect();
    assert_eq!(unread.len(), 60);
    assert_eq!(unread, expected_unread, "the unread results, each once");
    // Every pending task, with its payload.
    let mut pending = HashSet::new();
    loop {
        let request = pb::GetTaskRequest {
            queue: Q.into(),
            worker_id: "after".into(),
            lease: Some(lease.try_into().unwrap()),
            max_wait: Some(Duration::ZERO.try_into().unwrap()),
        };
        let answer = clients[2]
            .get_task(with_deadline(request, CALL))
            .await
            .expect("GetTask answers")
            .into_inner();
        let Some(task) = answer.task else { break };
        assert_eq!(Some(&task.payload), payloads.get(&task.id), "{}", task.id);
        assert!(pending.insert(task.id), "a task handed out twice");
    }
    let taken: HashSet<&String> = reported.iter().chain(&held).map(|t| &t.id).collect();
    let expected_pending: HashSet<String> = payloads
        .keys()
        .filter(|id| !taken.contains(id))
        .cloned()
        .collect();
    assert_eq!(pending.len(), 180);
    assert_eq!(pending, expected_pending, "every pending task");
    // The killed server's leases are still valid: their holder's reports
    // go in through a new server.
    for task in &held {
        let request = pb::PutResultRequest {
            task_id: task.id.clone(),
            lease_id: task.lease_id.clone(),
            outcome: Some(pb::put_result_request::Outcome::Output(output_for(
                &task.payload,
            ))),
        };
        let state = clients[0]
            .put_result(with_deadline(request, CALL))
            .await
            .unwrap_or_else(|status| panic!("the lease of {} was lost: {status:?}", task.id))
            .into_inner()
            .state();
        assert_eq!(state, pb::TaskState::Succeeded);
    }
    let end = all_stats(&mut clients[1], Q).await;
    assert_eq!(counts_of(&end), (0, 180, 120, 0, 40), "at the end");
    println!(
        "every server stopped: 300 tasks; after the restart 180 pending, 40 leased, 80 \
         succeeded, 60 unread, all found, the 40 leases honoured; old servers: {}; {}; {}",
        old[0].warning_summary(),
        old[1].warning_summary(),
        old[2].warning_summary()
    );
}

/// A server drained (SIGTERM) while a worker stream on it holds tasks past
/// the grace: the stream ends with the server, and what it held goes back
/// to the queue at once (StreamTasks, point 5: "when the stream ends or
/// breaks, every task still leased through it goes back ... at once"), as
/// it does for a stream that breaks while the server runs; not when the
/// leases run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_servers_stream_gives_its_tasks_back_at_once() {
    const Q: &str = "drained";
    let database = TestDatabase::start().await;
    let mut draining = ServeProcess::start(&database).await;
    let other = ServeProcess::start(&database).await;
    let mut client = channel(&other.url);
    put_tasks(&mut client, Q, 20, "drained").await;
    let mut drained_client = channel(&draining.url);
    let lease = Duration::from_secs(60);
    let (tx, mut inbound) = open_stream(&mut drained_client, Q, "slow", 20, lease).await;
    take_tasks(&mut inbound, 20).await;
    let before = all_stats(&mut client, Q).await;
    assert_eq!((before.pending, before.leased), (0, 20), "before the drain");
    let status = draining.terminate().await;
    assert!(status.success(), "a drained server exits 0: {status:?}");
    drop((tx, inbound));
    let after = all_stats(&mut client, Q).await;
    println!(
        "drained server: after its exit {} pending, {} leased; {}",
        after.pending,
        after.leased,
        draining.warning_summary()
    );
    assert_eq!(
        (after.pending, after.leased),
        (20, 0),
        "(pending, leased) once the drained server exited: its stream's tasks are back"
    );
}

/// A producer for the crash rounds: PutTasks of 8 and PutTask by turns
/// through `url` until a call fails; what was acknowledged.
async fn crash_producer(
    url: String,
    round: usize,
    acked: Arc<AtomicUsize>,
) -> Vec<(String, Bytes)> {
    let mut client = channel(&url);
    let mut puts = Vec::new();
    let task = |payload: String| pb::PutTaskRequest {
        queue: QUEUE.into(),
        payload: Bytes::from(payload),
        max_attempts: 100,
        ..Default::default()
    };
    // Bounded: a round lasts less than a second.
    for i in 0..100_000 {
        if i % 2 == 0 {
            let tasks: Vec<_> = (0..8)
                .map(|j| task(format!("crash-{round}-{i}-{j}")))
                .collect();
            let request = pb::PutTasksRequest {
                tasks: tasks.clone(),
            };
            let Ok(answer) = client.put_tasks(with_deadline(request, CALL)).await else {
                break;
            };
            for (task, outcome) in tasks.into_iter().zip(answer.into_inner().outcomes) {
                match outcome.outcome {
                    Some(pb::put_task_outcome::Outcome::Ok(ok)) => {
                        puts.push((ok.task_id, task.payload));
                    }
                    other => panic!("put refused: {other:?}"),
                }
            }
        } else {
            let request = task(format!("crash-{round}-{i}"));
            let payload = request.payload.clone();
            let Ok(answer) = client.put_task(with_deadline(request, CALL)).await else {
                break;
            };
            puts.push((answer.into_inner().task_id, payload));
        }
        acked.store(puts.len(), Ordering::Release);
    }
    puts
}

/// A worker for the crash rounds, through `url` until a call or its
/// stream fails: a worker stream (even rounds) or GetTask and PutResult
/// (odd ones), reporting `r{round}:PAYLOAD`. What was acknowledged: (task
/// id, output).
async fn crash_worker(url: String, round: usize) -> Vec<(String, Bytes)> {
    let mut client = channel(&url);
    let worker_id = format!("crash-{round}");
    let output = |task: &pb::Task| {
        let mut output = format!("r{round}:").into_bytes();
        output.extend_from_slice(&task.payload);
        Bytes::from(output)
    };
    let lease = Duration::from_secs(2);
    let mut acked = Vec::new();
    if round % 2 == 0 {
        let (tx, rx) = mpsc::channel(64);
        let subscribe = pb::Subscribe {
            queue: QUEUE.into(),
            worker_id,
            max_in_flight: 16,
            max_batch: 8,
            lease: Some(lease.try_into().unwrap()),
        };
        let _ = tx.try_send(pb::WorkerMessage {
            msg: Some(In::Subscribe(subscribe)),
        });
        let Ok(response) = client.stream_tasks(ReceiverStream::new(rx)).await else {
            return acked;
        };
        let mut inbound = response.into_inner();
        let mut sent: HashMap<String, Bytes> = HashMap::new();
        while let Ok(Some(message)) = inbound.message().await {
            match message.msg {
                Some(Out::Tasks(batch)) => {
                    for task in &batch.tasks {
                        sent.insert(task.lease_id.clone(), output(task));
                    }
                    if tx
                        .send(results_message(&batch.tasks, output))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Some(Out::ResultAcks(batch)) => {
                    for ack in batch.acks {
                        assert!(ack.error.is_none(), "a report refused: {ack:?}");
                        let output = sent.remove(&ack.lease_id).expect("a report sent");
                        acked.push((ack.task_id, output));
                    }
                }
                _ => {}
            }
        }
    } else {
        loop {
            let request = pb::GetTaskRequest {
                queue: QUEUE.into(),
                worker_id: worker_id.clone(),
                lease: Some(lease.try_into().unwrap()),
                max_wait: Some(Duration::from_millis(100).try_into().unwrap()),
            };
            let Ok(answer) = client.get_task(with_deadline(request, CALL)).await else {
                break;
            };
            let Some(task) = answer.into_inner().task else {
                continue;
            };
            let done = output(&task);
            let request = pb::PutResultRequest {
                task_id: task.id.clone(),
                lease_id: task.lease_id.clone(),
                outcome: Some(pb::put_result_request::Outcome::Output(done.clone())),
            };
            if client
                .put_result(with_deadline(request, CALL))
                .await
                .is_err()
            {
                break;
            }
            acked.push((task.id, done));
        }
    }
    acked
}

/// One server SIGKILLed again and again, each time after a seeded random
/// delay once puts flow, while a producer puts (PutTasks and PutTask) and
/// a worker reports (a stream and GetTask/PutResult by turns) through it.
/// A second server, up throughout, then finishes what is left and reads
/// back every acknowledged put (the payload, through its result) and
/// every acknowledged result (the very output acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_kills_lose_no_acknowledged_put_or_result() {
    const KILLS: usize = 30;
    let budget = Duration::from_secs(30);
    let started = Instant::now();
    let database = TestDatabase::start().await;
    let mut witness = ServeProcess::start(&database).await;
    let mut rng = Rng::new(0x0C4A_54ED);
    let mut acked_puts: Vec<(String, Bytes)> = Vec::new();
    let mut acked_results: Vec<(String, Bytes)> = Vec::new();
    let mut delays = Vec::new();
    while delays.len() < KILLS && started.elapsed() < budget {
        let round = delays.len();
        let mut victim = ServeProcess::start(&database).await;
        let flowing = Arc::new(AtomicUsize::new(0));
        let producer = tokio::spawn(crash_producer(victim.url.clone(), round, flowing.clone()));
        let worker = tokio::spawn(crash_worker(victim.url.clone(), round));
        common::eventually("a put acknowledged", || {
            let n = flowing.load(Ordering::Acquire);
            async move { n > 0 }
        })
        .await;
        // The kill point: a random delay, up to 300 ms.
        let delay = Duration::from_millis(rng.below(300));
        tokio::time::sleep(delay).await;
        victim.kill().await;
        delays.push(delay);
        let bound = Duration::from_secs(10);
        let puts = tokio::time::timeout(bound, producer).await;
        acked_puts.extend(puts.expect("the producer stops").expect("no panic"));
        let results = tokio::time::timeout(bound, worker).await;
        acked_results.extend(results.expect("the worker stops").expect("no panic"));
    }
    let killed_in = started.elapsed();

    // The witness finishes what is left (the killed streams' leases run
    // out in 2 s), reporting `drain:PAYLOAD`.
    let mut client = channel(&witness.url);
    let (tx, mut inbound) = open_stream(&mut client, QUEUE, "drain", 1000, CALL).await;
    let drain_stop = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < drain_stop,
            "the drain did not finish in 30s"
        );
        let message = tokio::time::timeout(Duration::from_millis(100), inbound.message()).await;
        match message {
            Ok(Ok(Some(message))) => match message.msg {
                Some(Out::Tasks(batch)) => {
                    let output = |t: &pb::Task| {
                        let mut output = b"drain:".to_vec();
                        output.extend_from_slice(&t.payload);
                        Bytes::from(output)
                    };
                    tx.send(results_message(&batch.tasks, output))
                        .await
                        .unwrap();
                }
                Some(Out::ResultAcks(batch)) => {
                    for ack in batch.acks {
                        assert!(ack.error.is_none(), "a drain report refused: {ack:?}");
                    }
                }
                _ => {}
            },
            Ok(other) => panic!("the drain stream ended: {other:?}"),
            Err(_) => {
                let q = all_stats(&mut client, QUEUE).await;
                if q.pending + q.leased + q.delayed == 0 {
                    break;
                }
            }
        }
    }
    drop((tx, inbound));

    let ids: Vec<String> = acked_puts
        .iter()
        .chain(&acked_results)
        .map(|(id, _)| id.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let results = results_by_id(
        client.clone(),
        &ids,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    let (mut lost_puts, mut wrong_payloads, mut lost_results) = (0, 0, 0);
    for (id, payload) in &acked_puts {
        match results.get(id) {
            None => {
                lost_puts += 1;
                eprintln!("acknowledged put {id} is gone");
            }
            Some(result) => {
                let output = &result.output;
                let done_on = output.iter().position(|b| *b == b':');
                let ok = result.state() == pb::TaskState::Succeeded
                    && done_on.is_some_and(|at| output[at + 1..] == payload[..]);
                if !ok {
                    wrong_payloads += 1;
                    eprintln!("acknowledged put {id} of {payload:?} finished as {result:?}");
                }
            }
        }
    }
    for (id, output) in &acked_results {
        let kept = results.get(id);
        if kept.is_none_or(|r| r.state() != pb::TaskState::Succeeded || r.output != *output) {
            lost_results += 1;
            eprintln!("acknowledged result {output:?} of {id} is now {kept:?}");
        }
    }
    let rows = rows(&database).await;
    let (shortest, longest) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
    println!(
        "many kills: {} kills in {killed_in:?} (delays {shortest:?} to {longest:?} after the \
         first put's ack), {} acknowledged puts and {} acknowledged results checked through \
         the witness ({} acks), {rows} rows; lost puts {lost_puts}, wrong payloads \
         {wrong_payloads}, lost or changed results {lost_results}; witness: {}",
        delays.len(),
        acked_puts.len(),
        acked_results.len(),
        acked_puts.len() + acked_results.len(),
        witness.warning_summary()
    );
    assert_eq!(
        (lost_puts, wrong_payloads, lost_results),
        (0, 0, 0),
        "acknowledged puts lost, puts with another payload, acknowledged results lost or changed"
    );
    assert!(
        delays.len() >= 15,
        "only {} kills fit in {budget:?}: too few crash points tested",
        delays.len()
    );
    assert!(
        !acked_results.is_empty() && acked_puts.len() > acked_results.len(),
        "puts and results were acknowledged before the kills"
    );
    assert!(
        rows >= acked_puts.len(),
        "no fewer rows than puts acknowledged"
    );
    assert!(witness.running(), "the witness server exited");
}

/// A worker stream whose leases ran out has room again (StreamTasks,
/// point 2: a task stops being outstanding "when its lease ends
/// otherwise (it expired, ...)"): the tasks come back to it. Guards a bug
/// of the PostgreSQL store: a stream's window counted a lease until a
/// report of it reached that same server, so a lease that ran out (or was
/// reported through another server, below) kept its place for the life
/// of the stream, which starved once its window was full of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_leases_ran_out_gets_tasks_again() {
    const Q: &str = "expiring";
    let database = TestDatabase::start().await;
    let server = ServeProcess::start(&database).await;
    let mut client = channel(&server.url);
    let first = put_tasks(&mut client, Q, 2, "first").await;
    let (tx, mut inbound) =
        open_stream(&mut client, Q, "forgetful", 2, Duration::from_millis(500)).await;
    let taken = take_tasks(&mut inbound, 2).await;
    assert!(taken.iter().all(|t| first.contains_key(&t.id)));
    // Not reported: both leases run out (and are swept within 250 ms);
    // the stream's window is free again, and the tasks come back to it.
    let again = tokio::time::timeout(Duration::from_secs(5), take_tasks(&mut inbound, 2)).await;
    let q = all_stats(&mut client, Q).await;
    let again = again.unwrap_or_else(|_| {
        panic!(
            "no task reached the stream in 5 s after its 500 ms leases ran out, with {} pending \
             and {} leased: its window still counts the leases that ran out",
            q.pending, q.leased
        )
    });
    for task in &again {
        assert!(first.contains_key(&task.id));
        assert_eq!(task.attempt, 2, "{task:?}");
    }
    drop(tx);
}

/// A worker stream's task reported through another server (PutResult
/// there, as a worker does when its stream's connection fails it) frees
/// its place in the stream's window: StreamTasks, point 2, "a task stops
/// being outstanding when a result for it is accepted (any outcome)".
/// Guards the same bug as the test above, reached through a report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_tasks_were_reported_elsewhere_gets_tasks_again() {
    const Q: &str = "elsewhere";
    let database = TestDatabase::start().await;
    let (a, b) = (
        ServeProcess::start(&database).await,
        ServeProcess::start(&database).await,
    );
    let (mut on_a, mut on_b) = (channel(&a.url), channel(&b.url));
    let put = put_tasks(&mut on_b, Q, 4, "elsewhere").await;
    let lease = Duration::from_secs(60);
    let (tx, mut inbound) = open_stream(&mut on_a, Q, "w", 2, lease).await;
    let taken = take_tasks(&mut inbound, 2).await;
    for task in &taken {
        let request = pb::PutResultRequest {
            task_id: task.id.clone(),
            lease_id: task.lease_id.clone(),
            outcome: Some(pb::put_result_request::Outcome::Output(output_for(
                &task.payload,
            ))),
        };
        on_b.put_result(with_deadline(request, CALL))
            .await
            .expect("the report goes in through the other server");
    }
    let next = tokio::time::timeout(Duration::from_secs(5), take_tasks(&mut inbound, 2)).await;
    let q = all_stats(&mut on_a, Q).await;
    let next = next.unwrap_or_else(|_| {
        panic!(
            "no task reached the stream within 5 s of its tasks' reports through the other \
             server, with {} pending and {} succeeded: its window still counts them",
            q.pending, q.succeeded
        )
    });
    for task in &next {
        assert!(put.contains_key(&task.id));
        assert!(taken.iter().all(|t| t.id != task.id), "{task:?} again");
    }
    drop(tx);
}
