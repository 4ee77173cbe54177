//! `taskq pause`, `taskq resume` and `taskq purge`: an operator's hold on
//! a queue (admin tokens only).

use std::process::ExitCode;

use clap::Args;

use crate::cli::connect::ClientArgs;
use crate::cli::exit::{EXIT_CONFIG, EXIT_FAILURE};

/// `taskq pause` flags.
#[derive(Debug, Args)]
#[command(after_help = "\
Workers get nothing from the queue until `taskq resume`: GetTask waits and
worker streams stay idle. Puts are still accepted and tasks already leased
run on. Needs an admin token. On the PostgreSQL store the pause holds for
every server and across restarts; on the memory store, until the server
stops.")]
pub struct PauseArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The queue to pause.
    pub queue: String,
}

/// `taskq resume` flags.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The queue to hand out again.
    pub queue: String,
}

/// `taskq purge` flags.
#[derive(Debug, Args)]
#[command(after_help = "\
Every pending task of the queue ends CANCELLED (a producer waiting for one
learns it); tasks already leased run on. This cannot be undone, so it needs
--yes. Needs an admin token.")]
pub struct PurgeArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The queue to purge.
    pub queue: String,
    /// Yes, drop them: without it nothing happens.
    #[arg(long)]
    pub yes: bool,
}

/// Pauses a queue; exit 0 also when it was paused already.
pub async fn pause(args: PauseArgs) -> ExitCode {
    set_paused(&args.client, &args.queue, true).await
}

/// Resumes a queue; exit 0 also when it was not paused.
pub async fn resume(args: ResumeArgs) -> ExitCode {
    set_paused(&args.client, &args.queue, false).await
}

async fn set_paused(client: &ClientArgs, queue: &str, paused: bool) -> ExitCode {
    let client = match client.connect().await {
        Ok(client) => client,
        Err(code) => return code,
    };
    match client.set_paused(queue, paused).await {
        Ok(was) => {
            let now = if paused { "paused" } else { "handing out" };
            let before = match (was, paused) {
                (true, true) => " (it was paused already)",
                (false, false) => " (it was not paused)",
                _ => "",
            };
            println!("queue {queue:?}: {now}{before}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("taskq: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Purges a queue with `--yes`; prints how many tasks it dropped.
pub async fn purge(args: PurgeArgs) -> ExitCode {
    if !args.yes {
        eprintln!(
            "taskq: purge drops every pending task of {:?} for good; add --yes to do it",
            args.queue
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let client = match args.client.connect().await {
        Ok(client) => client,
        Err(code) => return code,
    };
    match client.purge_queue(&args.queue).await {
        Ok(purged) => {
            println!("queue {:?}: {purged} pending task(s) dropped", args.queue);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("taskq: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
