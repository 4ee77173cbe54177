//! The subcommands of the `taskq` binary, one file each. Each is thin:
//! it turns flags into library calls and results into output.

pub mod bench;
pub mod connect;
pub mod demo;
pub mod health;
pub mod put;
pub mod result;
pub mod serve;
pub mod stats;
pub mod worker;

use std::process::ExitCode;

/// Exit code for bad configuration or usage (as clap uses).
pub const EXIT_CONFIG: u8 = 2;

/// Exit code for a failure at run time.
pub const EXIT_FAILURE: u8 = 1;

/// Prints a configuration error and returns its exit code.
pub fn config_error(error: impl std::fmt::Display) -> ExitCode {
    eprintln!("taskq: {error}");
    ExitCode::from(EXIT_CONFIG)
}
