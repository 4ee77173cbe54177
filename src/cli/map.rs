//! `taskq map`: a distributed `xargs`. Every input (a line of stdin or of
//! files, a NUL-separated item, or a whole file) becomes a task on a
//! queue, for whatever workers take from it; each output is printed in
//! input order as soon as it and all before it are done.
//!
//! The run keeps at most `--window` inputs between reading and printing:
//! it reads ahead only while there is room, puts what it has read in
//! PutTasks batches of at most `--batch`, one call at a time
//! (`puts.rs`), and reads each batch's results with one
//! WatchResultBatches stream by task ids (`results.rs`). In input order
//! an input keeps its place in the window until it is printed, so what
//! waits for an earlier input is bounded too (`order.rs`). Its parts:
//! `input.rs` (reading and splitting, positions), `report.rs` (stdout,
//! `--json`, the failure lines), `progress.rs` (the progress line on a
//! terminal) and `cancel.rs` (the tasks a run stops waiting for). This
//! file holds the flags and the loop that ties them together.

mod cancel;
mod input;
mod order;
mod progress;
mod puts;
mod report;
mod results;

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufWriter, Stdout};
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};

use crate::cli::connect::ClientArgs;
use crate::cli::exit::{EXIT_FAILURE, EXIT_INTERRUPTED};
use crate::cli::put::TaskOptions;
use crate::client::{Client, ClientError};
use crate::pb;
use input::{Input, Origin, Position, Split};
use order::Reorder;
use progress::{Counts, Progress};
use puts::Placed;
use report::{Outcome, Printer};
use results::Event;

/// Default of `--window`.
pub const DEFAULT_WINDOW: u32 = 1000;

/// Default of `--batch`.
pub const DEFAULT_BATCH: u32 = 256;

/// Payload bytes a PutTasks batch stops growing at (a single bigger input
/// goes alone): well inside the server's message limit, its largest
/// payload plus 1 MiB.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// How often the progress line is drawn: at most 10 times a second.
const REDRAW: Duration = Duration::from_millis(100);

/// `taskq map` flags.
#[derive(Debug, Args)]
#[command(after_help = "\
EXAMPLE:
  taskq worker --queue squares -- sh -c 'read n; echo $((n*n))'   # as many as you like, anywhere
  seq 100 | taskq map --queue squares                               # prints 1 4 9 ... 10000, in order

Each input becomes one task, its payload the input's bytes (a line
without its newline; nothing else is trimmed). An empty line between
others is an empty input; a final newline makes none. Any worker on the
queue runs them, in any language (taskq worker runs a program per task).

Each output is written to stdout exactly as the worker returned it,
nothing added: a program that ends its output with a newline gives one
line per input, as `xargs` would. With --json, one object per input and
line: line, file, input (or input_base64), task_id, state, output (or
output_base64), error, attempts, worker.

A failed input is reported on stderr (`taskq map: input line 17 failed
after 3 attempts: ...`, or FILE:LINE for files) and makes the exit code 1.
Ctrl-C stops putting, cancels (CancelTask) the tasks it put that are not
finished, says how many, and exits 130; --halt-on-error does the same and
exits 1. On a terminal, stderr shows a progress line.

How long a task may run is the worker's business (taskq worker --lease,
--task-timeout); results are read by task id, so other readers of the
queue's results do not take them away.")]
pub struct MapArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The queue to put the tasks on ("" = default).
    #[arg(long, env = "TASKQ_QUEUE", default_value = "")]
    pub queue: String,
    /// Files to read inputs from, one after the other (`-` is stdin).
    /// Without any, stdin.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Inputs are separated by NUL bytes, not newlines (as from `find
    /// -print0`).
    #[arg(short = '0', long = "null", conflicts_with = "file_per_task")]
    pub null: bool,
    /// Each FILE whole is one input.
    #[arg(long, requires = "files")]
    pub file_per_task: bool,
    /// Print each output as soon as it is done, in completion order.
    #[arg(long)]
    pub unordered: bool,
    /// Print one JSON object per input (its line, input, output, state,
    /// error, attempts and worker) instead of the bare outputs.
    #[arg(long)]
    pub json: bool,
    /// At the first failed input, stop: put nothing more, wait for
    /// nothing more, exit 1.
    #[arg(long)]
    pub halt_on_error: bool,
    /// Inputs between reading and printing at most: this many tasks are
    /// on the queue at once, and in input order this many outputs are
    /// held at most.
    #[arg(long, default_value_t = DEFAULT_WINDOW,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub window: u32,
    /// Tasks per PutTasks call at most (the server takes up to its
    /// --max-batch, 1000 by default).
    #[arg(long, default_value_t = DEFAULT_BATCH,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
    /// What each task carries besides its payload.
    #[command(flatten)]
    pub task: TaskOptions,
}

/// Puts every input as a task and prints the outputs; exit 0 when all
/// succeeded, 1 when any failed, 130 on Ctrl-C.
pub async fn run(args: MapArgs) -> ExitCode {
    let client = match args.client.connect().await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let origins: Vec<Origin> = if args.files.is_empty() {
        vec![Origin::Stdin]
    } else {
        args.files.iter().map(|path| Origin::of(path)).collect()
    };
    let split = match (args.file_per_task, args.null) {
        (true, _) => Split::WholeFiles,
        (false, true) => Split::Nul,
        (false, false) => Split::Lines,
    };
    Run::new(&args, client, split).go(origins, split).await
}

/// The PutTasks call in progress.
type PutCall = Pin<Box<dyn Future<Output = Result<Vec<Placed>, ClientError>> + Send>>;

/// Why a run stopped before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Ctrl-C.
    Interrupted,
    /// An input failed, with `--halt-on-error`.
    Halted,
    /// The server refused the puts, or stdout closed.
    Fatal,
}

/// What woke the loop.
enum Step {
    Interrupted,
    Event(Event),
    WatchEnded(Result<(), JoinError>),
    Placed(Result<Vec<Placed>, ClientError>),
    Input(Option<Input>),
    Total(Option<u64>),
    Redraw,
}

/// An input read and not finished.
#[derive(Debug)]
struct Slot {
    position: Position,
    /// The input, kept for `--json`.
    input: Option<Bytes>,
}

/// A run's books: what it read, put and printed. The loop in
/// [`Run::go`] owns the channels and calls in progress; this holds the
/// state they change.
struct Run {
    client: Client,
    queue: String,
    /// Every task's fields but its payload and key.
    template: pb::PutTaskRequest,
    /// The run's part of each idempotency key; the input's number follows.
    key_prefix: String,
    window: usize,
    batch: usize,
    halt_on_error: bool,
    /// Whether inputs are kept until printed (`--json`, not whole files).
    keep_inputs: bool,
    /// Inputs read so far: the next input's number.
    read: u64,
    /// Inputs read and not finished, by number.
    unfinished: HashMap<u64, Slot>,
    /// The input number of each task put and not finished.
    numbers: HashMap<String, u64>,
    /// Finished outcomes on their way to stdout.
    order: Reorder<Outcome>,
    /// The next batch to put, with its payload bytes.
    next_batch: Vec<(u64, pb::PutTaskRequest)>,
    next_batch_bytes: usize,
    counts: Counts,
    printer: Printer<BufWriter<Stdout>>,
    stdout_closed: bool,
    progress: Option<Progress>,
    stopping: Option<Stop>,
    /// Inputs whose put was not answered before the run stopped.
    maybe_stored: u64,
}

impl Run {
    fn new(args: &MapArgs, client: Client, split: Split) -> Self {
        let template = args.task.request(&args.queue);
        Self {
            client,
            queue: args.queue.clone(),
            template,
            key_prefix: format!("taskq-map-{}-", uuid::Uuid::now_v7().simple()),
            window: args.window as usize,
            batch: args.batch as usize,
            halt_on_error: args.halt_on_error,
            keep_inputs: args.json && split != Split::WholeFiles,
            read: 0,
            unfinished: HashMap::new(),
            numbers: HashMap::new(),
            order: Reorder::new(!args.unordered),
            next_batch: Vec::new(),
            next_batch_bytes: 0,
            counts: Counts::default(),
            printer: Printer::new(BufWriter::new(std::io::stdout()), args.json),
            stdout_closed: false,
            progress: Progress::on_terminal(),
            stopping: None,
            maybe_stored: 0,
        }
    }

    /// Reads, puts and prints until every input is printed or the run
    /// stops; returns the exit code.
    async fn go(mut self, origins: Vec<Origin>, split: Split) -> ExitCode {
        let mut inputs = input::read(origins.clone(), split, self.batch);
        let mut reading = true;
        let mut total = None;
        if split == Split::WholeFiles {
            self.counts.total = Some(origins.len() as u64);
        } else if self.progress.is_some() {
            total = Some(input::count(origins, split));
        }
        // Each task's result is sent once (a reader takes it off its list
        // first), so at most a window of events is ever waiting.
        let (events_tx, mut events) = mpsc::channel(self.window);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut watches = JoinSet::new();
        let mut put: Option<(PutCall, usize)> = None;
        let mut interrupt = pin!(tokio::signal::ctrl_c());
        let mut redraw = tokio::time::interval(REDRAW);
        redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

        loop {
            let idle = !reading && put.is_none() && self.next_batch.is_empty();
            if self.stopping.is_some() || (idle && self.in_window() == 0) {
                break;
            }
            let step = tokio::select! {
                biased;
                _ = &mut interrupt => Step::Interrupted,
                Some(event) = events.recv() => Step::Event(event),
                Some(ended) = watches.join_next(), if !watches.is_empty() => Step::WatchEnded(ended),
                placed = async { put.as_mut().expect("checked").0.as_mut().await }, if put.is_some() => {
                    Step::Placed(placed)
                }
                input = inputs.recv(), if reading && self.may_read() => Step::Input(input),
                n = async { total.as_mut().expect("checked").await }, if total.is_some() => {
                    Step::Total(n.ok())
                }
                _ = redraw.tick(), if self.progress.is_some() => Step::Redraw,
            };
            match step {
                Step::Interrupted => self.stopping = Some(Stop::Interrupted),
                Step::Event(Event::Finished(result)) => self.finished(result),
                Step::Event(Event::Unreadable { task_ids, error }) => {
                    for task_id in task_ids {
                        self.unreadable(task_id, &error);
                    }
                }
                Step::WatchEnded(Err(error)) if error.is_panic() => {
                    self.say(&format!("taskq map: a result stream failed: {error}"));
                    self.stopping = Some(Stop::Fatal);
                }
                Step::WatchEnded(_) => {}
                Step::Placed(placed) => {
                    put = None;
                    match placed {
                        Ok(placed) => {
                            let ids = self.placed(placed);
                            if !ids.is_empty() {
                                let watch =
                                    results::watch(self.client.clone(), ids, events_tx.clone());
                                watches.spawn(watch);
                            }
                        }
                        Err(error) => {
                            self.say(&format!("taskq map: the server refuses the tasks: {error}"));
                            self.stopping = Some(Stop::Fatal);
                        }
                    }
                }
                Step::Input(Some(input)) => {
                    self.accept(input);
                    reading = self.accept_ready(&mut inputs);
                }
                Step::Input(None) => {
                    reading = false;
                    self.counts.total = Some(self.read);
                }
                Step::Total(n) => {
                    total = None;
                    self.counts.total = self.counts.total.or(n);
                }
                Step::Redraw => {
                    let counts = self.counts;
                    if let Some(progress) = &mut self.progress {
                        progress.draw(counts);
                    }
                }
            }
            if put.is_none() && !self.next_batch.is_empty() && self.stopping.is_none() {
                let batch = std::mem::take(&mut self.next_batch);
                self.next_batch_bytes = 0;
                let size = batch.len();
                let call = puts::put_batch(self.client.clone(), batch, stop_rx.clone());
                put = Some((Box::pin(call), size));
            }
            self.flush();
        }

        let _ = stop_tx.send(true);
        if let Some(progress) = &mut self.progress {
            progress.clear();
        }
        drop(watches);
        match self.stopping {
            None => self.end(),
            Some(stop) => self.stop(stop, put).await,
        }
    }

    /// Ends a run stopped early: books the answer of the batch being put
    /// (which tries no more once told to stop), then the tasks put and not
    /// finished go to [`cancel::cancel_unfinished`]. A second Ctrl-C does
    /// not wait for the batch.
    async fn stop(mut self, stop: Stop, put: Option<(PutCall, usize)>) -> ExitCode {
        if let Some((call, size)) = put {
            let placed = if stop == Stop::Interrupted {
                tokio::select! {
                    placed = call => Some(placed),
                    _ = tokio::signal::ctrl_c() => None,
                }
            } else {
                Some(call.await)
            };
            match placed {
                Some(Ok(placed)) => {
                    self.placed(placed);
                }
                // Refused: nothing stored.
                Some(Err(_)) => {}
                None => self.maybe_stored += size as u64,
            }
        }
        self.flush();
        let ids: Vec<String> = self.numbers.keys().cloned().collect();
        cancel::cancel_unfinished(&self.client, &self.queue, &ids).await;
        if self.maybe_stored > 0 {
            eprintln!(
                "taskq map: {} more may be on the queue: their put was not answered before the stop",
                self.maybe_stored
            );
        }
        ExitCode::from(match stop {
            Stop::Interrupted => EXIT_INTERRUPTED,
            Stop::Halted | Stop::Fatal => EXIT_FAILURE,
        })
    }

    /// The exit code of a run that read and printed everything.
    fn end(mut self) -> ExitCode {
        self.flush();
        if self.counts.failed == 0 {
            return ExitCode::SUCCESS;
        }
        eprintln!(
            "taskq map: {} of {} inputs failed",
            self.counts.failed, self.read
        );
        ExitCode::from(EXIT_FAILURE)
    }

    /// Inputs read and not printed.
    fn in_window(&self) -> usize {
        self.unfinished.len() + self.order.waiting()
    }

    /// Whether another input may be read: there is room in the window and
    /// in the next batch.
    fn may_read(&self) -> bool {
        self.stopping.is_none()
            && self.in_window() < self.window
            && self.next_batch.len() < self.batch
            && self.next_batch_bytes < MAX_BATCH_BYTES
    }

    /// Takes the inputs already read, while there is room, for a fuller
    /// batch; returns whether more are to come.
    fn accept_ready(&mut self, inputs: &mut mpsc::Receiver<Input>) -> bool {
        while self.may_read() {
            match inputs.try_recv() {
                Ok(input) => self.accept(input),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.counts.total = Some(self.read);
                    return false;
                }
            }
        }
        true
    }

    /// Numbers an input read and adds it to the next batch (or, when it
    /// could not be read, finishes it as failed).
    fn accept(&mut self, input: Input) {
        let number = self.read;
        self.read += 1;
        let payload = match input.payload {
            Ok(payload) => payload,
            Err(error) => {
                let error = format!("cannot read: {error}");
                return self.finish(number, Outcome::failed(input.position, None, None, error));
            }
        };
        self.next_batch_bytes += payload.len();
        let slot = Slot {
            position: input.position,
            input: self.keep_inputs.then(|| payload.clone()),
        };
        self.unfinished.insert(number, slot);
        let task = pb::PutTaskRequest {
            payload,
            idempotency_key: format!("{}{number}", self.key_prefix),
            ..self.template.clone()
        };
        self.next_batch.push((number, task));
    }

    /// Books a batch's answer; returns the tasks it stored, whose results
    /// are to be read.
    fn placed(&mut self, placed: Vec<Placed>) -> Vec<String> {
        let mut stored = Vec::new();
        for placed in placed {
            match placed {
                Placed::Stored { number, task_id } => {
                    self.numbers.insert(task_id.clone(), number);
                    stored.push(task_id);
                }
                Placed::Refused { number, error } => {
                    if let Some(slot) = self.unfinished.remove(&number) {
                        let error = format!("not put: {error}");
                        let outcome = Outcome::failed(slot.position, slot.input, None, error);
                        self.finish(number, outcome);
                    }
                }
                Placed::Unsent {
                    number,
                    maybe_stored,
                } => {
                    self.unfinished.remove(&number);
                    self.maybe_stored += u64::from(maybe_stored);
                }
            }
        }
        stored
    }

    /// A task's result came.
    fn finished(&mut self, result: pb::Result) {
        let Some(number) = self.numbers.remove(&result.task_id) else {
            return;
        };
        if let Some(slot) = self.unfinished.remove(&number) {
            let outcome = Outcome::of_result(slot.position, slot.input, result);
            self.finish(number, outcome);
        }
    }

    /// A task's result cannot be read.
    fn unreadable(&mut self, task_id: String, error: &str) {
        let Some(number) = self.numbers.remove(&task_id) else {
            return;
        };
        if let Some(slot) = self.unfinished.remove(&number) {
            let error = format!("its result cannot be read: {error}");
            let outcome = Outcome::failed(slot.position, slot.input, Some(task_id), error);
            self.finish(number, outcome);
        }
    }

    /// Counts an input's outcome, reports a failure, and prints what is
    /// now due.
    fn finish(&mut self, number: u64, outcome: Outcome) {
        if outcome.succeeded() {
            self.counts.done += 1;
        } else {
            self.counts.failed += 1;
            if let Some(line) = outcome.failure() {
                self.say(&line);
            }
            if self.halt_on_error {
                self.stopping.get_or_insert(Stop::Halted);
            }
        }
        for ready in self.order.finish(number, outcome) {
            if self.stdout_closed {
                break;
            }
            if let Err(error) = self.printer.print(&ready) {
                self.stdout_failed(&error);
            }
        }
    }

    /// A line on stderr, after what stdout holds so far and without the
    /// progress line in the way.
    fn say(&mut self, line: &str) {
        self.flush();
        if let Some(progress) = &mut self.progress {
            progress.clear();
        }
        eprintln!("{line}");
    }

    /// Sends what stdout holds on its way.
    fn flush(&mut self) {
        if self.stdout_closed {
            return;
        }
        if let Err(error) = self.printer.flush() {
            self.stdout_failed(&error);
        }
    }

    /// Stdout cannot be written to: nothing more can be printed, so the
    /// run stops. A closed pipe (`| head`) goes without saying.
    fn stdout_failed(&mut self, error: &std::io::Error) {
        self.stdout_closed = true;
        self.stopping.get_or_insert(Stop::Fatal);
        if error.kind() != std::io::ErrorKind::BrokenPipe {
            self.say(&format!("taskq map: cannot write to stdout: {error}"));
        }
    }
}
