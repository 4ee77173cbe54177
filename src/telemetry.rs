//! Installs the tracing subscriber. Called once, from `main` only: the
//! library emits events and never decides where they go.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, LogArgs, LogFormat};

/// Sends logs to stderr with the filter and format asked for.
///
/// # Errors
/// A `ConfigError` naming `--log` when the filter does not parse.
pub fn init(args: &LogArgs) -> Result<(), ConfigError> {
    let (filter, flag) = match &args.filter {
        Some(filter) => (filter.clone(), "--log (TASKQ_LOG)"),
        None => match std::env::var("RUST_LOG") {
            Ok(filter) if !filter.is_empty() => (filter, "RUST_LOG"),
            _ => ("info".to_string(), "--log (TASKQ_LOG)"),
        },
    };
    let filter = EnvFilter::try_new(&filter).map_err(|e| ConfigError {
        flag,
        message: format!("{e}: write filters like info or taskq=debug,warn"),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}
