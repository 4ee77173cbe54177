//! `taskq cancel TASK_ID`: take back a task that has not finished.

use std::process::ExitCode;

use clap::Args;

use crate::cli::connect::ClientArgs;
use crate::cli::exit::EXIT_FAILURE;
use crate::pb;

/// `taskq cancel` flags.
#[derive(Debug, Args)]
#[command(after_help = "\
A pending task ends at once with state CANCELLED; a leased one too, and its
worker's lease is revoked (a streaming worker stops the task's handler; its
result would be refused). Whoever waits for the result gets CANCELLED.
A finished task cannot be cancelled (exit 1, nothing changes).")]
pub struct CancelArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The task id that `taskq put` printed.
    pub task_id: String,
}

/// Cancels one task; prints the state it had. Exit 0 when it was
/// cancelled, 1 when it could not be (finished, unknown, refused).
pub async fn run(args: CancelArgs) -> ExitCode {
    let client = match args.client.connect().await {
        Ok(client) => client,
        Err(code) => return code,
    };
    match client.cancel_task(&args.task_id).await {
        Ok(previous) => {
            let was = match previous {
                pb::TaskState::Leased => "leased: its worker's lease is revoked",
                _ => "pending",
            };
            println!("cancelled {} (it was {was})", args.task_id);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("taskq: cannot cancel {}: {error}", args.task_id);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
