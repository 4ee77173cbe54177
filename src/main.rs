//! The `taskq` binary: parse the command line, set up logging, run the
//! subcommand. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use taskq::cli;
use taskq::config::{Cli, Command};

fn main() -> ExitCode {
    let args = Cli::parse();
    if let Err(error) = taskq::telemetry::init(&args.log) {
        return cli::config_error(error);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("taskq: cannot start the async runtime: {error}");
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    runtime.block_on(async {
        match args.command {
            Command::Serve(serve) => cli::serve::run(serve).await,
        }
    })
}
