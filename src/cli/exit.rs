//! How a subcommand ends: the exit codes, and a configuration error
//! printed on the way out.

use std::process::ExitCode;

/// Exit code for bad configuration or usage (as clap uses).
pub const EXIT_CONFIG: u8 = 2;

/// Exit code for a failure at run time.
pub const EXIT_FAILURE: u8 = 1;

/// Exit code after Ctrl-C (SIGINT), as shells report a process it
/// killed: 128 + 2.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Prints a configuration error and returns its exit code.
pub fn config_error(error: impl std::fmt::Display) -> ExitCode {
    eprintln!("taskq: {error}");
    ExitCode::from(EXIT_CONFIG)
}
