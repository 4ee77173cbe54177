//! `taskq worker`: run a program (one per task, or long-lived programs
//! over a line protocol) or a built-in handler on a queue's tasks.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::cli::connect::ClientArgs;
use crate::cli::exit::{EXIT_FAILURE, config_error};
use crate::config::ConfigError;
use crate::units::parse_duration;
use crate::worker::command::CommandLine;
use crate::worker::exec::ExecHandler;
use crate::worker::pipe::{DEFAULT_EXIT_WAIT, PipeHandler};
use crate::worker::{DEFAULT_CONCURRENCY, Mode, Worker, builtin, default_worker_id};

/// `taskq worker` flags.
#[derive(Debug, Args)]
#[command(after_help = "\
EXAMPLES:
  taskq worker --queue squares --builtin square
  taskq worker --queue thumbs --exec 'convert - -resize 64x64 png:-'
  taskq worker --queue py -- python3 -c 'import sys; print(int(sys.stdin.read())**2)'
  taskq worker --queue py --concurrency 4 --pipe -- python3 examples/pipe_square.py

A program gets the payload on stdin; exit 0 means success with stdout as
the output; any other exit is a failure (retried while attempts remain)
with the tail of stderr as its message. It runs directly, never through a
shell. Its environment has TASKQ_TASK_ID, TASKQ_ATTEMPT, TASKQ_MAX_ATTEMPTS,
TASKQ_QUEUE, TASKQ_EXPIRES_AT (if the task has a ttl) and
TASKQ_HEADER_<NAME> for each header.

With --pipe the program starts once per slot and reads one task per line
on stdin, answering each with one line on stdout (see --pipe).")]
pub struct WorkerArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The queue to work on ("" = default).
    #[arg(long, env = "TASKQ_QUEUE", default_value = "")]
    pub queue: String,
    /// Tasks run at once.
    #[arg(long, env = "TASKQ_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY as u32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Lease asked for each task; kept alive while the task runs.
    #[arg(long, env = "TASKQ_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub lease: Duration,
    /// The id shown in stats and results (default: host name and pid).
    #[arg(long, env = "TASKQ_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Command line of a program to run per task, split into words as a
    /// shell would (but never run by one).
    #[arg(long, conflicts_with_all = ["builtin", "command"])]
    pub exec: Option<String>,
    /// A built-in handler instead of a program.
    #[arg(long, value_enum, conflicts_with = "command")]
    pub builtin: Option<Builtin>,
    /// Start the program (after `--`, or given with --exec) once per
    /// concurrency slot and give it one task at a time, one JSON object per
    /// line, instead of starting it per task.
    ///
    /// In, on its stdin: {"id": "...", "queue": "...", "attempt": 1,
    /// "max_attempts": 3, "payload": "..."}, the payload as text when it is
    /// UTF-8, else "payload_base64" instead; "headers" (an object) and
    /// "expires_at" (RFC 3339) when the task has them; ignore other fields.
    ///
    /// Out, one line on its stdout per task, flushed: {"id": "...",
    /// "output": "..."} or {"id": "...", "output_base64": "..."} for a
    /// success; {"id": "...", "error": "...", "retry": true|false} for a
    /// failure (retry defaults to true).
    ///
    /// Its stderr goes to the worker's log, line by line, with the slot.
    /// A program that exits, answers another id or writes anything else
    /// fails its task as retryable and is restarted with backoff. On
    /// shutdown its stdin closes: it should exit then.
    #[arg(long, conflicts_with = "builtin")]
    pub pipe: bool,
    /// Kill a program that runs longer than this on a task and fail the
    /// task (with --pipe, counted from when the task is written to it).
    #[arg(long, env = "TASKQ_TASK_TIMEOUT", value_parser = parse_duration)]
    pub task_timeout: Option<Duration>,
    /// On SIGTERM or Ctrl-C, how long running tasks may take to finish.
    #[arg(long, env = "TASKQ_WORKER_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// `stream`: one StreamTasks stream (tasks pushed with flow control;
    /// with `--concurrency` above 1, the tasks ready at once come in one
    /// message and their results go back in one); `unary`: GetTask/PutResult
    /// calls, for proxies without bidirectional streams.
    #[arg(long, env = "TASKQ_WORKER_MODE", value_enum, default_value_t = Mode::default().into())]
    pub mode: WorkerMode,
    /// The program and its arguments, after `--`.
    #[arg(last = true, value_name = "PROGRAM ARGS")]
    pub command: Vec<String>,
}

/// How the worker talks to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkerMode {
    /// StreamTasks.
    Stream,
    /// GetTask, ExtendLease, PutResult.
    Unary,
}

impl From<WorkerMode> for Mode {
    fn from(mode: WorkerMode) -> Self {
        match mode {
            WorkerMode::Stream => Mode::Stream,
            WorkerMode::Unary => Mode::Unary,
        }
    }
}

impl From<Mode> for WorkerMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Stream => WorkerMode::Stream,
            Mode::Unary => WorkerMode::Unary,
        }
    }
}

/// Built-in handlers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Builtin {
    /// The square of a decimal integer (the seed's computation).
    Square,
    /// The payload, unchanged.
    Echo,
    /// Sleep for the payload's duration (`250ms`, `2s`), then echo it.
    Sleep,
}

/// Whether `program` can be started: a path to a file, or a name found on
/// `PATH`.
fn find_program(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The flag that names the program, for messages.
fn program_flag(args: &WorkerArgs) -> &'static str {
    if args.pipe { "--pipe" } else { "--exec" }
}

/// The program to run, from --exec or after `--`, if any.
fn command_line(args: &WorkerArgs) -> Result<Option<CommandLine>, ConfigError> {
    let flag = program_flag(args);
    let command = match (&args.exec, args.command.is_empty()) {
        (Some(line), _) => CommandLine::parse(line),
        (None, false) => CommandLine::from_words(args.command.clone()),
        (None, true) => return Ok(None),
    }
    .map_err(|e| ConfigError {
        flag,
        message: e.to_string(),
    })?;
    if !find_program(command.program()) {
        return Err(ConfigError {
            flag,
            message: format!(
                "program {:?} not found (not a file, not on PATH)",
                command.program()
            ),
        });
    }
    Ok(Some(command))
}

/// Runs the worker until SIGTERM or Ctrl-C.
pub async fn run(args: WorkerArgs) -> ExitCode {
    let command = match command_line(&args) {
        Ok(command) => command,
        Err(error) => return config_error(error),
    };
    if command.is_none() && args.builtin.is_none() {
        return config_error(ConfigError {
            flag: program_flag(&args),
            message: "say what to run: --exec 'PROGRAM ARGS', --builtin NAME, -- PROGRAM ARGS, \
                      or --pipe -- PROGRAM ARGS"
                .into(),
        });
    }
    let client = match args.client.connect_lazy() {
        Ok(client) => client,
        Err(code) => return code,
    };
    let worker = Worker::builder(client)
        .mode(args.mode.into())
        .queue(args.queue.clone())
        .concurrency(args.concurrency as usize)
        .lease(args.lease)
        .worker_id(args.worker_id.clone().unwrap_or_else(default_worker_id))
        .shutdown_grace(args.shutdown_grace);
    let outcome = match (command, args.builtin) {
        (Some(command), _) if args.pipe => {
            let pipe = PipeHandler::new(command, args.concurrency as usize, args.task_timeout);
            let handler = pipe.clone();
            let outcome = worker
                .run(move |task| {
                    let pipe = handler.clone();
                    async move { pipe.run(task).await }
                })
                .await;
            pipe.close(DEFAULT_EXIT_WAIT).await;
            outcome
        }
        (Some(command), _) => {
            let exec = Arc::new(ExecHandler::new(command, args.task_timeout));
            worker
                .run(move |task| {
                    let exec = exec.clone();
                    async move { exec.run(task).await }
                })
                .await
        }
        (None, Some(Builtin::Square)) => {
            worker
                .run(|task| async move { builtin::square(&task.payload) })
                .await
        }
        (None, Some(Builtin::Echo)) => worker.run(|task| async move { builtin::echo(&task) }).await,
        (None, Some(Builtin::Sleep)) => worker.run(builtin::sleep).await,
        (None, None) => unreachable!("checked above"),
    };
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("taskq: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
