//! The `taskq` binary: parse the command line, set up logging, run the
//! subcommand. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use taskq::cli::exit::{EXIT_FAILURE, config_error};
use taskq::cli::{self, Cli, Command};

/// mimalloc rather than the system allocator: a task's trip allocates and
/// frees dozens of small buffers across threads, where glibc's malloc spent
/// a sixth of the stream bench (bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut args = Cli::parse();
    if matches!(args.command, Command::Demo(_) | Command::Bench(_)) && args.log.filter.is_none() {
        // Their output is the point; keep routine logs out of it.
        args.log.filter = Some("warn".into());
    }
    if matches!(args.command, Command::Top(_)) && args.log.filter.is_none() {
        // A log line on stderr would tear the dashboard; its problems are
        // shown on it instead.
        args.log.filter = Some("off".into());
    }
    if let Err(error) = taskq::telemetry::init(&args.log) {
        return config_error(error);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("taskq: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async {
        match args.command {
            Command::Serve(serve) => cli::serve::run(serve).await,
            Command::Worker(worker) => cli::worker::run(worker).await,
            Command::Put(put) => cli::put::run(put).await,
            Command::Result(result) => cli::result::run_one(result).await,
            Command::Results(results) => cli::result::run_queue(results).await,
            Command::Map(map) => cli::map::run(map).await,
            Command::Stats(stats) => cli::stats::run(stats).await,
            Command::Cancel(cancel) => cli::cancel::run(cancel).await,
            Command::Pause(pause) => cli::control::pause(pause).await,
            Command::Resume(resume) => cli::control::resume(resume).await,
            Command::Purge(purge) => cli::control::purge(purge).await,
            Command::Top(top) => cli::top::run(top).await,
            Command::Health(health) => cli::health::run(health).await,
            Command::Demo(demo) => cli::demo::run(demo).await,
            Command::Bench(bench) => cli::bench::run(bench).await,
            Command::Migrate(migrate) => cli::migrate::run(migrate).await,
        }
    })
}
