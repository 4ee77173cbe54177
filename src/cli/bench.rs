//! `taskq bench`: a bounded load generator that measures the full round
//! trip of a task (put → get → result → result read by the producer), next
//! to a baseline of plain unary calls on the same server in the same run.

mod ledger;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::time::Instant;

use crate::broker::BrokerConfig;
use crate::cli::connect::ClientArgs;
use crate::cli::exit::{EXIT_FAILURE, config_error};
use crate::client::{Client, DEFAULT_CONNECT_TIMEOUT};
use crate::server::{self, DEFAULT_MAX_BATCH, ServerConfig};
use crate::units::parse_duration;
use crate::worker::{Mode, Worker, builtin};

use ledger::{FaultKind, Faults, Ledger, PerMessage, histogram};

/// `taskq bench` flags.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A running server to load; without it an embedded server is started
    /// on a free loopback port (sharing this machine's cores).
    #[arg(long, env = "TASKQ_SERVER")]
    pub server: Option<String>,
    /// File holding the bearer token, for a server that needs one.
    #[arg(long, env = "TASKQ_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) of a running server that speaks TLS.
    #[arg(long, env = "TASKQ_TLS_CA", value_name = "PATH", requires = "server")]
    pub tls_ca: Option<PathBuf>,
    /// Name to check the server's certificate against.
    #[arg(long, env = "TASKQ_TLS_DOMAIN", requires = "tls_ca")]
    pub tls_domain: Option<String>,
    /// Tasks in all.
    #[arg(long, default_value = "20000", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub tasks: u64,
    /// Producers, each putting its share of tasks one after another and
    /// reading each result back.
    #[arg(long, default_value = "16", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub producers: u64,
    /// Workers the bench starts, each with its own connection, running
    /// the `echo` builtin. 0 starts none and uses the workers already on
    /// the --queue of the --server (both needed then): start them with
    /// `taskq worker --queue QUEUE --builtin echo`, since every result is
    /// checked against the echo of its payload.
    #[arg(long, default_value = "4", value_parser = clap::value_parser!(u64).range(0..=1024))]
    pub workers: u64,
    /// The queue the round trip uses; default `bench-<pid>`, one nobody
    /// else uses. Every result on it must belong to a task this run put:
    /// give the bench a queue of its own.
    #[arg(long)]
    pub queue: Option<String>,
    /// Tasks each worker runs at once.
    #[arg(long, default_value = "16", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub concurrency: u64,
    /// Payload size of each task. In the round trip at least 8: a payload
    /// starts with the time of its put, which its result must echo.
    #[arg(long, default_value = "64")]
    pub payload_bytes: usize,
    /// Give up after this long: the round trip stops, and tasks put whose
    /// result was not read count as lost (closing down may take up to 10s
    /// more).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// `stream`: producers use PutTasks and WatchResults, workers
    /// StreamTasks; `unary`: PutTask, GetResult, and unary workers.
    #[arg(long, value_enum, default_value_t = BenchMode::Stream)]
    pub mode: BenchMode,
    /// Tasks per PutTasks call of each producer (stream mode).
    #[arg(long, default_value = "64",
          value_parser = clap::value_parser!(u64).range(1..=DEFAULT_MAX_BATCH as u64))]
    pub batch: u64,
    /// How stream-mode producers read results. `queue`: each producer
    /// keeps one WatchResults(queue) stream open, the seed's shared result
    /// queue, and puts while fewer than producers x batch tasks are
    /// unfinished; `ids`: each batch's results are read with a
    /// WatchResults of its task ids before the next batch is put.
    #[arg(long, value_enum, default_value_t = ResultsBy::Queue)]
    pub results: ResultsBy,
    /// Stream mode: `true` sends the tasks, results and acks ready at once
    /// in one message (StreamTasks batches, WatchResultBatches); `false`
    /// one per message, as clients written before batches do.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub batches: bool,
    /// Unary GetStats calls made first, a baseline of plain unary calls on
    /// the same server (default: the task count, at most 20,000; 0
    /// skips). On the PostgreSQL store a GetStats reads the database, so
    /// its benches skip it.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub baseline_calls: Option<u64>,
    /// After the round trip, put this many tasks nobody takes and report
    /// the memory per pending task (embedded server only; 0 skips).
    #[arg(long, default_value = "100000", value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub fill: u64,
}

/// What `taskq bench` drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    /// PutTasks + WatchResults producers, StreamTasks workers.
    Stream,
    /// PutTask + GetResult producers, unary workers.
    Unary,
}

/// How stream-mode producers read results back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ResultsBy {
    /// One WatchResults(queue) stream per producer, open all along.
    Queue,
    /// One WatchResults(task_ids) per batch.
    Ids,
}

/// Figures of one measured phase.
#[derive(Debug)]
struct Phase {
    count: u64,
    errors: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn to_json(&self, unit: &str) -> serde_json::Value {
        json!({
            "count": self.count,
            "errors": self.errors,
            "seconds": self.elapsed.as_secs_f64(),
            format!("{unit}_per_second"): self.rate(),
            "latency_ms": {
                "p50": self.ms(0.50), "p90": self.ms(0.90), "p99": self.ms(0.99),
                "max": self.latency.max() as f64 / 1000.0,
            },
        })
    }

    fn line(&self, label: &str, unit: &str) -> String {
        format!(
            "{label:<44} {:>10.0} {unit}/s   p50 {:>7.2} ms   p90 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms{}",
            self.rate(),
            self.ms(0.50),
            self.ms(0.90),
            self.ms(0.99),
            self.latency.max() as f64 / 1000.0,
            if self.errors > 0 {
                format!("   ({} errors)", self.errors)
            } else {
                String::new()
            }
        )
    }
}

/// The round trip's figures, counting only results that checked out, and
/// what the checks found in the others.
#[derive(Debug)]
struct RoundTrip {
    /// `count` and the latencies are of results that checked out; `errors`
    /// are tasks that could not be put.
    figures: Phase,
    faults: Faults,
    /// Whether `--timeout` ended the round trip.
    timed_out: bool,
    /// The tasks the bench's workers received and the messages they came
    /// in; `None` with `--workers 0` (the workers are not the bench's).
    tasks_received: Option<PerMessage>,
    /// The results the producers read and the messages they came in.
    results_read: PerMessage,
}

impl RoundTrip {
    /// The round trip that started at `started`, from its books.
    fn from_books(ledger: &Ledger, started: Instant, timed_out: bool) -> Self {
        let tally = ledger.tally();
        Self {
            figures: Phase {
                count: tally.latency.len(),
                errors: tally.refused,
                elapsed: started.elapsed(),
                latency: tally.latency,
            },
            faults: tally.faults,
            timed_out,
            tasks_received: None,
            results_read: tally.results_read,
        }
    }

    /// Items per message on the stream path's two legs to clients, tasks
    /// to workers and results to producers, together (results alone when
    /// the workers are not the bench's): the batch the echo ceiling of
    /// bench/compare.sh is run with.
    fn items_per_message(&self) -> Option<f64> {
        (self.results_read + self.tasks_received.unwrap_or_default()).mean()
    }

    fn passed(&self) -> bool {
        self.figures.errors == 0 && self.faults.total() == 0 && !self.timed_out
    }

    fn to_json(&self) -> serde_json::Value {
        let mut figures = self.figures.to_json("tasks");
        let mut first = serde_json::Map::new();
        for (kind, fault) in self.faults.kinds() {
            figures[kind.name()] = json!(fault.count);
            first.insert(kind.name().into(), json!(fault.first));
        }
        figures["first_faults"] = first.into();
        figures["timed_out"] = json!(self.timed_out);
        let tasks = self.tasks_received;
        figures["tasks_per_message"] = json!(tasks.and_then(PerMessage::mean));
        figures["results_per_message"] = json!(self.results_read.mean());
        figures["items_per_message"] = json!(self.items_per_message());
        figures["messages"] = json!({
            "task_messages": tasks.map(|t| t.messages),
            "tasks_received": tasks.map(|t| t.items),
            "result_messages": self.results_read.messages,
            "results_read": self.results_read.items,
        });
        figures
    }

    /// The human output's line about items per message.
    fn per_message_line(&self) -> String {
        let mean = |m: Option<f64>| m.map_or_else(|| "-".to_string(), |m| format!("{m:.1}"));
        format!(
            "per message: {} tasks to a worker, {} results to a producer, {} both (means)",
            mean(self.tasks_received.and_then(PerMessage::mean)),
            mean(self.results_read.mean()),
            mean(self.items_per_message())
        )
    }

    /// The human output's line about the checks.
    fn checks_line(&self) -> String {
        let faults: Vec<String> = self
            .faults
            .kinds()
            .map(|(kind, fault)| format!("{} {}", kind.name(), fault.count))
            .collect();
        format!(
            "results checked: {} as expected (a task of this run, read once, SUCCEEDED, output = payload); {}",
            self.figures.count,
            faults.join(", ")
        )
    }

    /// What went wrong and what to do about it, for a run that did not
    /// pass: a line per kind of fault, with the first of its kind.
    fn failure(&self, args: &BenchArgs, queue: &str) -> String {
        let workers = if args.workers == 0 {
            format!("the workers on queue {queue} (yours to start, with --workers 0)")
        } else {
            "the bench's workers".to_string()
        };
        let mut lines = vec![format!(
            "taskq bench: the round trip failed its checks: {} of {} tasks as expected",
            self.figures.count, args.tasks
        )];
        if self.timed_out {
            lines.push(format!(
                "  not finished within --timeout {}: give fewer tasks or a longer --timeout, or check that {workers} are running",
                humantime::format_duration(args.timeout)
            ));
        }
        if self.figures.errors > 0 {
            lines.push(format!(
                "  not put {}: PutTask(s) failed or were refused: see the server's log and its limits (taskq serve --help)",
                self.figures.errors
            ));
        }
        for (kind, fault) in self.faults.kinds() {
            if fault.count == 0 {
                continue;
            }
            let meaning = match kind {
                FaultKind::Lost => format!(
                    "put, but no result read by the end of the run: check that {workers} are running, and the server's log"
                ),
                FaultKind::Duplicated => "a result read twice for one task (or one id given to two tasks): the server handed it out more than once; report it with this command line".to_string(),
                FaultKind::Wrong => format!(
                    "an output that is not the echo of its task's payload, or a result of a task this run did not put: {workers} must run the echo builtin (taskq worker --builtin echo), and nothing else may use queue {queue}"
                ),
                FaultKind::Failed => format!(
                    "results not SUCCEEDED (the first one's error is below): see the log of {workers}"
                ),
            };
            lines.push(format!("  {} {}: {meaning}", kind.name(), fault.count));
            if let Some(first) = &fault.first {
                lines.push(format!("    first: {first}"));
            }
        }
        lines.join("\n")
    }
}

fn micros(since: Instant) -> u64 {
    (since.elapsed().as_micros() as u64).max(1)
}

/// Closing down after the round trip (stopping the workers, the memory
/// phase) may take this long beyond `--timeout`.
const WIND_DOWN: Duration = Duration::from_secs(10);

/// How long a unary producer waits for each result (GetResult by id).
const RESULT_WAIT: Duration = Duration::from_secs(30);

/// Runs the benchmark and prints its figures.
pub async fn run(args: BenchArgs) -> ExitCode {
    if args.workers == 0 && (args.server.is_none() || args.queue.is_none()) {
        return config_error(
            "--workers 0 uses the workers already on a running server's queue: give --server and --queue, and start echo workers on that queue (taskq worker --queue QUEUE --builtin echo)",
        );
    }
    let client_args = ClientArgs {
        server: args.server.clone().unwrap_or_default(),
        token_file: args.token_file.clone(),
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        timeout: Duration::from_secs(30),
        tls_ca: args.tls_ca.clone(),
        tls_domain: args.tls_domain.clone(),
        tls_client_cert: None,
        tls_client_key: None,
    };
    let options = match client_args.options() {
        Ok(options) => options,
        Err(error) => return config_error(error),
    };
    let mut embedded = None;
    let address = match &args.server {
        Some(address) => address.clone(),
        None => {
            let listener = match TcpListener::bind("127.0.0.1:0").await {
                Ok(listener) => listener,
                Err(error) => {
                    eprintln!("taskq bench: cannot bind a loopback port: {error}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            let address = format!("http://{}", listener.local_addr().expect("bound"));
            let (stop, stopped) = oneshot::channel::<()>();
            // Room for the --fill tasks, which nobody takes.
            let broker = BrokerConfig {
                queue_capacity: BrokerConfig::default()
                    .queue_capacity
                    .max(args.fill as usize),
                ..BrokerConfig::default()
            };
            let server = tokio::spawn(server::run(ServerConfig::new(broker), listener, async {
                let _ = stopped.await;
            }));
            embedded = Some((stop, server));
            address
        }
    };
    let queue = args
        .queue
        .clone()
        .unwrap_or_else(|| format!("bench-{}", std::process::id()));
    let deadline = Instant::now() + args.timeout;
    // Held to the end: the memory phase must not reuse its memory.
    let ledger = Arc::new(Ledger::new(args.tasks, args.payload_bytes));
    let outcome = tokio::time::timeout_at(deadline + WIND_DOWN, async {
        let (baseline, round_trip) =
            measure(&args, &address, options.clone(), &queue, &ledger, deadline).await?;
        // Memory is read from this process: only meaningful when the
        // server is embedded.
        let memory = match embedded {
            Some(_) if args.fill > 0 && !round_trip.timed_out => {
                Some(held_memory(&args, &address, options).await?)
            }
            _ => None,
        };
        Ok::<_, crate::client::ClientError>((baseline, round_trip, memory))
    })
    .await;
    if let Some((stop, server)) = embedded {
        let _ = stop.send(());
        let _ = server.await;
    }
    let (baseline, round_trip, memory) = match outcome {
        Ok(Ok(figures)) => figures,
        Ok(Err(error)) => {
            eprintln!("taskq bench: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
        Err(_) => {
            eprintln!(
                "taskq bench: not finished within --timeout {}; fewer tasks or a longer timeout",
                humantime::format_duration(args.timeout)
            );
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let target = if args.server.is_some() {
        "running server"
    } else {
        "embedded server"
    };
    if args.json {
        let report = json!({
            "tasks": args.tasks, "producers": args.producers, "workers": args.workers,
            "concurrency": args.concurrency, "payload_bytes": args.payload_bytes,
            "server": target,
            "queue": queue,
            "mode": format!("{:?}", args.mode).to_lowercase(),
            "batch": args.batch,
            "results": format!("{:?}", args.results).to_lowercase(),
            "batches": args.batches,
            "baseline_unary": baseline.to_json("calls"),
            "round_trip": round_trip.to_json(),
            "held_bytes_per_task": memory.map(|m| m.bytes_per_task()),
            "held_tasks_measured": memory.map(|m| m.tasks),
        });
        println!("{report}");
    } else {
        let batches = if args.mode == BenchMode::Stream {
            format!(
                " (batches of {}, results by {}, {} per message)",
                args.batch,
                format!("{:?}", args.results).to_lowercase(),
                if args.batches { "several" } else { "one" }
            )
        } else {
            String::new()
        };
        let workers = if args.workers == 0 {
            format!("the workers already on queue {queue}")
        } else {
            format!("{} workers x {} in flight", args.workers, args.concurrency)
        };
        println!(
            "taskq bench ({:?} mode): {} tasks, {} producers{batches}, {workers}, {}-byte payloads, {target}",
            args.mode, args.tasks, args.producers, args.payload_bytes
        );
        if baseline.count > 0 {
            println!(
                "{}",
                baseline.line(
                    &format!("baseline: unary GetStats, {} callers", args.producers),
                    "calls"
                )
            );
        }
        println!(
            "{}",
            round_trip
                .figures
                .line("round trip: put → get → result → read", "tasks")
        );
        println!("{}", round_trip.checks_line());
        println!("{}", round_trip.per_message_line());
        if args.mode == BenchMode::Unary {
            println!(
                "a task costs 4 unary calls: the baseline allows at most {:.0} tasks/s",
                baseline.rate() / 4.0
            );
        }
        if let Some(memory) = memory {
            println!(
                "memory: {:.0} bytes per pending task ({}-byte payload; resident set grew {} KiB for {} pending tasks)",
                memory.bytes_per_task(),
                args.payload_bytes,
                memory.grown / 1024,
                memory.tasks
            );
        }
    }
    if round_trip.passed() {
        ExitCode::SUCCESS
    } else {
        eprintln!("{}", round_trip.failure(&args, &queue));
        ExitCode::from(EXIT_FAILURE)
    }
}

async fn measure(
    args: &BenchArgs,
    address: &str,
    options: crate::client::ClientOptions,
    queue: &str,
    ledger: &Arc<Ledger>,
    deadline: Instant,
) -> Result<(Phase, RoundTrip), crate::client::ClientError> {
    let mut producers = Vec::new();
    for _ in 0..args.producers {
        producers.push(Client::connect(address, options.clone()).await?);
    }
    let calls = args.baseline_calls.unwrap_or(args.tasks.min(20_000));
    let baseline = baseline(&producers, calls).await;

    let mut workers = Vec::new();
    for i in 0..args.workers {
        let client = Client::connect(address, options.clone()).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let mut worker = Worker::builder(client)
            .mode(match args.mode {
                BenchMode::Stream => Mode::Stream,
                BenchMode::Unary => Mode::Unary,
            })
            .queue(queue)
            .concurrency(args.concurrency as usize)
            .worker_id(format!("bench-worker-{i}"))
            .poll_wait(Duration::from_secs(1));
        if !args.batches {
            // Batches are the worker's default.
            worker = worker.max_batch(1);
        }
        let run = worker.run_until(|task| async move { builtin::echo(&task) }, async {
            let _ = stopped.await;
        });
        workers.push((stop, tokio::spawn(run)));
    }

    let mut round_trip = if args.mode == BenchMode::Stream && args.results == ResultsBy::Queue {
        produce_by_queue(args, producers, queue, ledger, deadline).await
    } else {
        produce_each(args, producers, queue, ledger, deadline).await
    };
    let mut received = PerMessage::default();
    for (stop, worker) in workers {
        let _ = stop.send(());
        if let Ok(Ok(report)) = worker.await {
            received = received
                + PerMessage {
                    messages: report.task_messages,
                    items: report.tasks_received,
                };
        }
    }
    if args.workers > 0 {
        round_trip.tasks_received = Some(received);
    }
    Ok((baseline, round_trip))
}

/// The tasks producer `i` puts: an even split of `--tasks`.
fn share_of(args: &BenchArgs, i: usize) -> u64 {
    args.tasks / args.producers + u64::from((i as u64) < args.tasks % args.producers)
}

/// The ids of the tasks a PutTasks call stored.
fn ids_of(outcomes: &[crate::pb::PutTaskOutcome]) -> impl Iterator<Item = &str> {
    outcomes.iter().filter_map(|o| match &o.outcome {
        Some(crate::pb::put_task_outcome::Outcome::Ok(ok)) => Some(ok.task_id.as_str()),
        _ => None,
    })
}

/// How many of a PutTasks call's tasks were stored.
fn stored(outcomes: &[crate::pb::PutTaskOutcome]) -> u64 {
    ids_of(outcomes).count() as u64
}

/// Producers that each wait for their own results: unary (PutTask, then
/// GetResult by id), or stream mode with `--results ids`. Each stops at
/// `deadline`.
async fn produce_each(
    args: &BenchArgs,
    producers: Vec<Client>,
    queue: &str,
    ledger: &Arc<Ledger>,
    deadline: Instant,
) -> RoundTrip {
    let started = Instant::now();
    let mut running = Vec::new();
    for (i, client) in producers.into_iter().enumerate() {
        let share = share_of(args, i);
        let (queue, books) = (queue.to_string(), ledger.clone());
        running.push(if args.mode == BenchMode::Stream {
            let batches = produce_batches(client, queue, share, args.batch, args.batches, books);
            tokio::spawn(tokio::time::timeout_at(deadline, batches))
        } else {
            let one_by_one = produce_one_by_one(client, queue, share, books);
            tokio::spawn(tokio::time::timeout_at(deadline, one_by_one))
        });
    }
    let mut timed_out = false;
    for producer in running {
        timed_out |= producer.await.expect("a producer panicked").is_err();
    }
    RoundTrip::from_books(ledger, started, timed_out)
}

/// A unary producer: each task put with PutTask, then its result read
/// with GetResult by id.
async fn produce_one_by_one(client: Client, queue: String, share: u64, ledger: Arc<Ledger>) {
    for _ in 0..share {
        let stamp = ledger.stamp();
        match client.put(&queue, ledger.payload(stamp)).await {
            Ok(put) => {
                ledger.put([put.task_id.as_str()], stamp);
                // Without a result (an error, or none within the wait) the
                // task stays outstanding: lost, unless read later.
                if let Ok(Some(result)) = client.result(&put.task_id, RESULT_WAIT).await {
                    ledger.read([result]);
                }
            }
            Err(_) => ledger.refused(1),
        }
    }
}

/// A stream-mode producer: batches of `batch` tasks with PutTasks, each
/// batch's results read with one WatchResults; a task's latency runs from
/// its batch's put to its result.
async fn produce_batches(
    client: Client,
    queue: String,
    share: u64,
    batch: u64,
    batches: bool,
    ledger: Arc<Ledger>,
) {
    let mut left = share;
    while left > 0 {
        let n = left.min(batch);
        left -= n;
        let stamp = ledger.stamp();
        let put = client.put_tasks(batch_of(&queue, &ledger.payload(stamp), n));
        let ids: Vec<String> = match put.await {
            Ok(outcomes) => outcomes
                .into_iter()
                .filter_map(|o| match o.outcome {
                    Some(crate::pb::put_task_outcome::Outcome::Ok(ok)) => Some(ok.task_id),
                    _ => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        ledger.refused(n - ids.len() as u64);
        ledger.put(ids.iter().map(String::as_str), stamp);
        let target = crate::pb::watch_results_request::Target::TaskIds(crate::pb::TaskIds { ids });
        if let Ok(mut results) = ResultFeed::open(&client, target, batches).await {
            while let Ok(Some(read)) = results.next_batch().await {
                ledger.read(read);
            }
        }
    }
}

/// Results as they come, from WatchResults (one per message) or from
/// WatchResultBatches (several).
enum ResultFeed {
    One(tonic::Streaming<crate::pb::Result>),
    Batched(tonic::Streaming<crate::pb::ResultBatch>),
}

impl ResultFeed {
    async fn open(
        client: &Client,
        target: crate::pb::watch_results_request::Target,
        batches: bool,
    ) -> Result<Self, crate::client::ClientError> {
        Ok(if batches {
            Self::Batched(client.watch_result_batches(target).await?)
        } else {
            Self::One(client.watch_results(target).await?)
        })
    }

    /// The results of the next message; `None` when the stream ended.
    async fn next_batch(&mut self) -> Result<Option<Vec<crate::pb::Result>>, tonic::Status> {
        Ok(match self {
            Self::One(results) => results.message().await?.map(|result| vec![result]),
            Self::Batched(batches) => batches.message().await?.map(|batch| batch.results),
        })
    }
}

/// Stream mode with `--results queue`: every producer puts batches with
/// PutTasks and reads results from its own WatchResults(queue) stream, the
/// seed's result queue shared by all. A result may reach any producer, so
/// the books are shared: each task's put time is kept with its id. At most
/// `producers x batch` tasks are unfinished at once, the same as with
/// `--results ids`. Producers and readers stop at `deadline`.
async fn produce_by_queue(
    args: &BenchArgs,
    clients: Vec<Client>,
    queue: &str,
    ledger: &Arc<Ledger>,
    deadline: Instant,
) -> RoundTrip {
    let total = args.tasks;
    let window = Arc::new(Semaphore::new((args.producers * args.batch) as usize));
    // Tasks read for the first time plus tasks that could not be put: the
    // run ends at `total`.
    let settled = Arc::new(AtomicU64::new(0));
    let (finished, _) = watch::channel(false);
    let settle = {
        let (settled, finished, window) = (settled.clone(), finished.clone(), window.clone());
        move |n: u64| {
            if n == 0 {
                return;
            }
            window.add_permits(n as usize);
            if settled.fetch_add(n, Ordering::AcqRel) + n >= total {
                finished.send_replace(true);
            }
        }
    };
    let started = Instant::now();
    let mut running = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let share = share_of(args, i);
        let target = crate::pb::watch_results_request::Target::Queue(queue.into());
        let results = ResultFeed::open(&client, target, args.batches).await;
        let mut done = finished.subscribe();
        let (books, settle_read) = (ledger.clone(), settle.clone());
        let read = async move {
            let Ok(mut results) = results else {
                return;
            };
            // The books are kept once per message, so the reader's own
            // cost stays per result read.
            loop {
                let read = tokio::select! {
                    read = results.next_batch() => read,
                    _ = done.wait_for(|finished| *finished) => break,
                };
                let Ok(Some(read)) = read else { break };
                settle_read(books.read(read));
            }
        };
        running.push(tokio::spawn(tokio::time::timeout_at(deadline, read)));
        let (queue, window, settle) = (queue.to_string(), window.clone(), settle.clone());
        let (books, batch) = (ledger.clone(), args.batch);
        let put = async move {
            let mut left = share;
            while left > 0 {
                let n = left.min(batch);
                left -= n;
                let Ok(permits) = window.acquire_many(n as u32).await else {
                    break;
                };
                permits.forget();
                let stamp = books.stamp();
                let put = client.put_tasks(batch_of(&queue, &books.payload(stamp), n));
                let (stored, settled) = match put.await {
                    Ok(outcomes) => (stored(&outcomes), books.put(ids_of(&outcomes), stamp)),
                    Err(_) => (0, 0),
                };
                books.refused(n - stored);
                // Tasks not put, and tasks whose result was read first.
                settle(n - stored + settled);
            }
        };
        running.push(tokio::spawn(tokio::time::timeout_at(deadline, put)));
    }
    let mut timed_out = false;
    for task in running {
        timed_out |= task.await.expect("a load loop panicked").is_err();
    }
    RoundTrip::from_books(ledger, started, timed_out)
}

/// `n` tasks with the same queue and payload, for PutTasks.
fn batch_of(queue: &str, payload: &Bytes, n: u64) -> Vec<crate::pb::PutTaskRequest> {
    (0..n)
        .map(|_| crate::pb::PutTaskRequest {
            queue: queue.to_string(),
            payload: payload.clone(),
            ..Default::default()
        })
        .collect()
}

/// Spawns a load loop: `op` `times` in a row, each time on `state`, which
/// it hands back with whether it succeeded (so the loop needs no clone per
/// call); the latency of each success recorded, failures counted.
fn load_loop<S, F, Fut>(
    times: u64,
    mut state: S,
    op: F,
) -> tokio::task::JoinHandle<(Histogram<u64>, u64)>
where
    S: Send + 'static,
    F: Fn(S) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = (S, bool)> + Send,
{
    tokio::spawn(async move {
        let mut latency = histogram();
        let mut errors = 0;
        for _ in 0..times {
            let t0 = Instant::now();
            let (back, ok) = op(state).await;
            state = back;
            if ok {
                let _ = latency.record(micros(t0));
            } else {
                errors += 1;
            }
        }
        (latency, errors)
    })
}

/// The figures of the load loops of a phase that started at `started`.
async fn measured(
    started: Instant,
    loops: Vec<tokio::task::JoinHandle<(Histogram<u64>, u64)>>,
) -> Phase {
    let (latency, errors) = merge(loops).await;
    Phase {
        count: latency.len(),
        errors,
        elapsed: started.elapsed(),
        latency,
    }
}

/// Joins the load loops and merges their latencies and error counts.
async fn merge(
    loops: Vec<tokio::task::JoinHandle<(Histogram<u64>, u64)>>,
) -> (Histogram<u64>, u64) {
    let mut latency = histogram();
    let mut errors = 0;
    for handle in loops {
        let (h, e) = handle.await.expect("a load loop panicked");
        latency.add(&h).expect("same bounds");
        errors += e;
    }
    (latency, errors)
}

/// How much the resident set grew while tasks were held.
#[derive(Clone, Copy, Debug)]
struct Memory {
    tasks: u64,
    grown: u64,
}

impl Memory {
    fn bytes_per_task(&self) -> f64 {
        self.grown as f64 / self.tasks.max(1) as f64
    }
}

/// This process's resident set size, from `/proc/self/status` (Linux).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Puts up to 100,000 tasks that nobody takes and measures how much the
/// process grew per task; they are dropped with the embedded server. The
/// figure includes allocator slack, so it is an upper bound.
async fn held_memory(
    args: &BenchArgs,
    address: &str,
    options: crate::client::ClientOptions,
) -> Result<Memory, crate::client::ClientError> {
    let tasks = args.fill;
    let client = Client::connect(address, options).await?;
    let payload = Bytes::from(vec![b'x'; args.payload_bytes]);
    let queue = format!("bench-held-{}", std::process::id());
    let before = resident_bytes().unwrap_or(0);
    let mut left = tasks;
    let mut held = 0;
    while left > 0 {
        let n = left.min(DEFAULT_MAX_BATCH as u64);
        left -= n;
        held += stored(&client.put_tasks(batch_of(&queue, &payload, n)).await?);
    }
    let after = resident_bytes().unwrap_or(0);
    Ok(Memory {
        tasks: held,
        grown: after.saturating_sub(before),
    })
}

/// Plain unary calls (GetStats of one queue) from every producer
/// connection at once: the transport's ceiling on this machine.
async fn baseline(clients: &[Client], calls: u64) -> Phase {
    let per_client = (calls / clients.len() as u64).max(1);
    let started = Instant::now();
    let mut running = Vec::new();
    for client in clients.iter().filter(|_| calls > 0) {
        running.push(load_loop(per_client, client.clone(), |client| async move {
            let ok = client.stats("bench-baseline").await.is_ok();
            (client, ok)
        }));
    }
    measured(started, running).await
}
