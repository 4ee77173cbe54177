//! `taskq put`: store a task; print its id, or wait for and print its result.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;

use crate::cli::connect::ClientArgs;
use crate::cli::exit::{EXIT_FAILURE, config_error};
use crate::cli::result::print_result;
use crate::config::ConfigError;
use crate::pb;
use crate::units::parse_duration;

/// The options of a new task that `taskq put` and `taskq map` share.
#[derive(Debug, Args)]
pub struct TaskOptions {
    /// Deliveries allowed per task (0: the server's default).
    #[arg(long, default_value = "0")]
    pub max_attempts: u32,
    /// A header for the workers, as name=value. Repeatable.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Time to live of each task: it fails if not finished by then.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Hand-out order: higher first; within one priority, oldest first.
    /// Negative values go after the default.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Not handed out before this long after the put, e.g. `10s`, `2h`.
    /// Must be shorter than --ttl.
    #[arg(long, value_parser = parse_duration)]
    pub delay: Option<Duration>,
}

impl TaskOptions {
    /// A PutTask request on `queue` with these options and no payload.
    pub(crate) fn request(&self, queue: &str) -> pb::PutTaskRequest {
        pb::PutTaskRequest {
            queue: queue.to_owned(),
            max_attempts: self.max_attempts,
            headers: self.headers.iter().cloned().collect::<HashMap<_, _>>(),
            ttl: self
                .ttl
                .and_then(|t| prost_types::Duration::try_from(t).ok()),
            priority: self.priority,
            delay: self
                .delay
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
            ..Default::default()
        }
    }
}

/// `taskq put` flags.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The queue ("" = default).
    #[arg(long, env = "TASKQ_QUEUE", default_value = "")]
    pub queue: String,
    /// The payload, as text. Without --data or --file, stdin is read.
    #[arg(long, conflicts_with = "file")]
    pub data: Option<String>,
    /// Read the payload from this file.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Idempotency key: while the first task with it is held, putting again
    /// returns the first task's id.
    #[arg(long)]
    pub key: Option<String>,
    /// What each task carries besides its payload.
    #[command(flatten)]
    pub task: TaskOptions,
    /// Wait this long for the result and print it instead of the id (the id
    /// goes to stderr).
    #[arg(long, value_parser = parse_duration, conflicts_with = "lines")]
    pub wait: Option<Duration>,
    /// One task per line of the input (stdin or --file), put in batches
    /// with PutTasks; prints one id per line, in order.
    #[arg(long, conflicts_with = "data")]
    pub lines: bool,
}

/// Tasks per PutTasks call of `--lines`: the server's default --max-batch.
const LINES_BATCH: usize = crate::server::DEFAULT_MAX_BATCH;

/// Parses a `--header` value, `NAME=VALUE`.
pub(crate) fn parse_header(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))
}

impl PutArgs {
    fn payload(&self) -> Result<Bytes, ConfigError> {
        if let Some(data) = &self.data {
            return Ok(Bytes::from(data.clone()));
        }
        if let Some(path) = &self.file {
            return std::fs::read(path)
                .map(Bytes::from)
                .map_err(|e| ConfigError {
                    flag: "--file",
                    message: format!("cannot read {}: {e}", path.display()),
                });
        }
        let mut buffer = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buffer)
            .map_err(|e| ConfigError {
                flag: "--data",
                message: format!("no --data or --file, and stdin cannot be read: {e}"),
            })?;
        Ok(Bytes::from(buffer))
    }
}

/// Puts the task and prints its id (or its result, with `--wait`).
pub async fn run(args: PutArgs) -> ExitCode {
    let payload = match args.payload() {
        Ok(payload) => payload,
        Err(error) => return config_error(error),
    };
    let client = match args.client.connect().await {
        Ok(client) => client,
        Err(code) => return code,
    };
    if args.lines {
        return put_lines(&client, &args, &payload).await;
    }
    let request = pb::PutTaskRequest {
        payload,
        idempotency_key: args.key.clone().unwrap_or_default(),
        ..args.task.request(&args.queue)
    };
    let put = match client.put_task(request).await {
        Ok(put) => put,
        Err(error) => {
            eprintln!("taskq: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let Some(wait) = args.wait else {
        println!("{}", put.task_id);
        if put.duplicate {
            eprintln!("taskq: duplicate key; this is the first task's id");
        }
        return ExitCode::SUCCESS;
    };
    eprintln!("task {}", put.task_id);
    match client.result(&put.task_id, wait).await {
        Ok(Some(result)) => print_result(&result, false),
        Ok(None) => {
            eprintln!(
                "taskq: no result within {}; the task goes on: taskq result {} --wait 1m",
                humantime::format_duration(wait),
                put.task_id
            );
            ExitCode::from(EXIT_FAILURE)
        }
        Err(error) => {
            eprintln!("taskq: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `--lines`: every non-empty line a task, in batches; exit 1 if any was
/// refused (its error goes to stderr, its line number with it).
async fn put_lines(client: &crate::client::Client, args: &PutArgs, input: &[u8]) -> ExitCode {
    let template = args.task.request(&args.queue);
    let lines: Vec<(usize, &[u8])> = input
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line.strip_suffix(b"\r").unwrap_or(line)))
        .filter(|(_, line)| !line.is_empty())
        .collect();
    let mut refused = 0;
    for batch in lines.chunks(LINES_BATCH) {
        let tasks = batch
            .iter()
            .map(|(_, line)| pb::PutTaskRequest {
                payload: Bytes::copy_from_slice(line),
                ..template.clone()
            })
            .collect();
        let outcomes = match client.put_tasks(tasks).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                eprintln!("taskq: {error}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        for ((number, _), outcome) in batch.iter().zip(outcomes) {
            match outcome.outcome {
                Some(pb::put_task_outcome::Outcome::Ok(ok)) => println!("{}", ok.task_id),
                Some(pb::put_task_outcome::Outcome::Error(error)) => {
                    refused += 1;
                    println!();
                    eprintln!("taskq: line {number}: {}", error.message);
                }
                None => refused += 1,
            }
        }
    }
    if refused > 0 {
        eprintln!("taskq: {refused} of {} tasks refused", lines.len());
        ExitCode::from(EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}
