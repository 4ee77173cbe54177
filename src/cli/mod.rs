//! The `taskq` binary's command line: the top-level parser ([`Cli`]), the
//! subcommands ([`Command`]), and one file per subcommand. Each is thin:
//! it turns flags into library calls and results into output.
//!
//! The server's own flags and their validation live in `config`;
//! the value parsers (durations, sizes) in `units`. The
//! subcommand files import from their siblings (`connect`, `exit`), never
//! from this one.

pub mod bench;
pub mod cancel;
pub mod connect;
pub mod control;
pub mod demo;
pub mod exit;
pub mod health;
pub mod map;
pub mod migrate;
pub mod put;
pub mod result;
pub mod serve;
pub mod stats;
pub mod top;
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
    /// Run every input line (or file) as a task, like a distributed
    /// `xargs`, and print the outputs in input order.
    Map(map::MapArgs),
    /// Take back a task that has not finished (it ends CANCELLED).
    Cancel(cancel::CancelArgs),
    /// Stop handing out a queue's tasks (puts still go in).
    Pause(control::PauseArgs),
    /// Hand out a paused queue's tasks again.
    Resume(control::ResumeArgs),
    /// Drop every pending task of a queue (each ends CANCELLED).
    Purge(control::PurgeArgs),
    /// Show queues and workers.
    Stats(stats::StatsArgs),
    /// A live dashboard of queues, rates and workers in the terminal; `q`
    /// quits.
    Top(top::TopArgs),
    /// Exit 0 when the server is SERVING (for health checks).
    Health(health::HealthArgs),
    /// Show the whole system on this machine: a server, two workers and a
    /// master that puts 10 numbers and prints their squares.
    Demo(demo::DemoArgs),
    /// Measure throughput and latency of the full task round trip.
    Bench(bench::BenchArgs),
    /// Apply the PostgreSQL store's schema migrations (servers also apply
    /// them at start).
    Migrate(migrate::MigrateArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientOptions, DEFAULT_SERVER};
    use crate::worker::{DEFAULT_CONCURRENCY, DEFAULT_LEASE, DEFAULT_SHUTDOWN_GRACE, Mode};
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// `taskq top` without flags refreshes every [`top::DEFAULT_INTERVAL`]
    /// and finds the server where the other commands do.
    #[test]
    fn top_flags_default_to_the_named_defaults() {
        let Command::Top(args) = Cli::try_parse_from(["taskq", "top"]).unwrap().command else {
            panic!("not parsed as top");
        };
        assert_eq!(args.interval, top::DEFAULT_INTERVAL);
        assert_eq!(args.server, DEFAULT_SERVER);
        assert_eq!(args.http, None);
    }

    /// `taskq map` without flags reads stdin onto the default queue with
    /// the named window and batch; `--file-per-task` needs files, and
    /// cannot be `-0` too.
    #[test]
    fn map_flags_default_to_the_named_defaults() {
        let Command::Map(args) = Cli::try_parse_from(["taskq", "map"]).unwrap().command else {
            panic!("not parsed as map");
        };
        assert_eq!(
            (args.window, args.batch),
            (map::DEFAULT_WINDOW, map::DEFAULT_BATCH)
        );
        assert_eq!((args.queue.as_str(), args.files.len()), ("", 0));
        assert!(!args.unordered && !args.json && !args.halt_on_error && !args.null);
        for wrong in [
            &["taskq", "map", "--file-per-task"][..],
            &["taskq", "map", "-0", "--file-per-task", "a"],
            &["taskq", "map", "--window", "0"],
        ] {
            assert!(Cli::try_parse_from(wrong).is_err(), "{wrong:?}");
        }
    }

    /// The defaults `taskq worker --help` shows (and a run without those
    /// flags gets) are the library's: the worker builder's named defaults
    /// and [`ClientOptions::default`]. (`taskq serve`'s are checked next to
    /// its flags, in `config`.)
    #[test]
    fn worker_and_client_flags_default_to_the_library_defaults() {
        let argv = ["taskq", "worker", "--builtin", "echo"];
        let Command::Worker(worker) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not parsed as a worker");
        };
        assert_eq!(worker.concurrency as usize, DEFAULT_CONCURRENCY);
        assert_eq!(worker.lease, DEFAULT_LEASE);
        assert_eq!(worker.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(Mode::from(worker.mode), Mode::default());

        assert_eq!(worker.client.server, DEFAULT_SERVER);
        let ClientOptions {
            token,
            connect_timeout,
            call_timeout,
            tls,
        } = worker.client.options().unwrap();
        let defaults = ClientOptions::default();
        assert_eq!(token, defaults.token);
        assert_eq!(connect_timeout, defaults.connect_timeout);
        assert_eq!(call_timeout, defaults.call_timeout);
        assert_eq!(tls.is_none(), defaults.tls.is_none());
    }
}
