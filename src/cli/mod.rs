//! The `taskq` binary's command line: the top-level parser ([`Cli`]), the
//! subcommands ([`Command`]), and one file per subcommand. Each is thin:
//! it turns flags into library calls and results into output.
//!
//! The server's own flags and their validation live in [`crate::config`];
//! the value parsers (durations, sizes) in [`crate::units`]. The
//! subcommand files import from their siblings (`connect`, `exit`), never
//! from this one.

pub mod bench;
pub mod connect;
pub mod demo;
pub mod exit;
pub mod health;
pub mod put;
pub mod result;
pub mod serve;
pub mod stats;
pub mod worker;

use clap::{Parser, Subcommand};

use crate::config::{LogArgs, ServeArgs};

/// taskq: a task queue over gRPC.
///
/// Producers put tasks on named queues, workers anywhere lease them, run
/// them and report results, and producers read the results back. Leases
/// make sure a crashed worker never loses a task.
#[derive(Debug, Parser)]
#[command(name = "taskq", version, propagate_version = true)]
pub struct Cli {
    /// Logging options, for every subcommand.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the taskq server.
    Serve(ServeArgs),
    /// Run a program (or a built-in handler) on the tasks of a queue.
    Worker(worker::WorkerArgs),
    /// Put a task on a queue; print its id, or wait for its result.
    Put(put::PutArgs),
    /// Print a task's result (the output; exit 1 if it failed).
    Result(result::ResultArgs),
    /// Read the results of a queue in completion order, each once.
    Results(result::ResultsArgs),
    /// Show queues and workers.
    Stats(stats::StatsArgs),
    /// Exit 0 when the server is SERVING (for health checks).
    Health(health::HealthArgs),
    /// Show the whole system on this machine: a server, two workers and a
    /// master that puts 10 numbers and prints their squares.
    Demo(demo::DemoArgs),
    /// Measure throughput and latency of the full task round trip.
    Bench(bench::BenchArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
