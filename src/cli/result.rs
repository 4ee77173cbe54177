//! `taskq result ID` and `taskq results --queue Q`: read results back.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use serde_json::json;

use crate::cli::connect::ClientArgs;
use crate::cli::exit::EXIT_FAILURE;
use crate::pb;
use crate::units::parse_duration;

/// `taskq result` flags.
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The task id that `taskq put` printed.
    pub task_id: String,
    /// Wait this long for the task to finish (default: do not wait).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub wait: Duration,
    /// Print the whole result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `taskq results` flags.
#[derive(Debug, Args)]
pub struct ResultsArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The queue whose results to read, in completion order. Each result is
    /// handed out once, to one reader.
    #[arg(long, env = "TASKQ_QUEUE", default_value = "")]
    pub queue: String,
    /// How many results to read.
    #[arg(long, default_value = "1")]
    pub count: u64,
    /// How long to wait for each result.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub wait: Duration,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// Prints one task's result: the output on stdout when it succeeded (exit
/// 0), the error on stderr when it failed (exit 1).
pub async fn run_one(args: ResultArgs) -> ExitCode {
    let client = match args.client.connect().await {
        Ok(client) => client,
        Err(code) => return code,
    };
    match client.result(&args.task_id, args.wait).await {
        Ok(Some(result)) => print_result(&result, args.json),
        Ok(None) => {
            eprintln!(
                "taskq: task {} is not finished{}; ask again with --wait",
                args.task_id,
                waited(args.wait)
            );
            ExitCode::from(EXIT_FAILURE)
        }
        Err(error) => {
            eprintln!("taskq: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn waited(wait: Duration) -> String {
    if wait.is_zero() {
        String::new()
    } else {
        format!(" after {}", humantime::format_duration(wait))
    }
}

/// Prints a result as `taskq result` does and returns the exit code.
pub fn print_result(result: &pb::Result, json: bool) -> ExitCode {
    let succeeded = result.state() == pb::TaskState::Succeeded;
    if json {
        println!("{}", to_json(result));
    } else if succeeded {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&result.output);
        if !result.output.ends_with(b"\n") {
            let _ = stdout.write_all(b"\n");
        }
    } else if result.state() == pb::TaskState::Cancelled {
        eprintln!(
            "taskq: task {} was cancelled: {}",
            result.task_id, result.error
        );
    } else {
        eprintln!(
            "taskq: task {} failed after {} attempt(s): {}",
            result.task_id, result.attempts, result.error
        );
    }
    if succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}

/// A result as one JSON object; the output as UTF-8 text when it is, and
/// as an array of bytes otherwise.
pub fn to_json(result: &pb::Result) -> serde_json::Value {
    let time = |t: Option<prost_types::Timestamp>| {
        t.and_then(|t| SystemTime::try_from(t).ok())
            .map(|t| humantime::format_rfc3339_millis(t).to_string())
    };
    let output = match std::str::from_utf8(&result.output) {
        Ok(text) => json!(text),
        Err(_) => json!(result.output.to_vec()),
    };
    json!({
        "task_id": result.task_id,
        "queue": result.queue,
        "state": result.state().as_str_name().trim_start_matches("TASK_STATE_"),
        "output": output,
        "error": result.error,
        "attempts": result.attempts,
        "worker_id": result.worker_id,
        "created_at": time(result.created_at),
        "finished_at": time(result.finished_at),
    })
}

/// Reads `--count` results of a queue, one line each: task id, state, and
/// the output or the error. Exit 1 if fewer came within their waits.
pub async fn run_queue(args: ResultsArgs) -> ExitCode {
    let client = match args.client.connect().await {
        Ok(client) => client,
        Err(code) => return code,
    };
    for got in 0..args.count {
        match client.next_result(&args.queue, args.wait).await {
            Ok(Some(result)) if args.json => println!("{}", to_json(&result)),
            Ok(Some(result)) => {
                let detail = if result.state() == pb::TaskState::Succeeded {
                    String::from_utf8_lossy(&result.output)
                        .trim_end()
                        .to_string()
                } else {
                    result.error.clone()
                };
                let state = result
                    .state()
                    .as_str_name()
                    .trim_start_matches("TASK_STATE_");
                println!("{}\t{state}\t{detail}", result.task_id);
            }
            Ok(None) => {
                eprintln!(
                    "taskq: {got} of {} results; no more came within {}",
                    args.count,
                    humantime::format_duration(args.wait)
                );
                return ExitCode::from(EXIT_FAILURE);
            }
            Err(error) => {
                eprintln!("taskq: {error}");
                return ExitCode::from(EXIT_FAILURE);
            }
        }
    }
    ExitCode::SUCCESS
}
