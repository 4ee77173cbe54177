//! `taskq serve`: validate the flags, bind, serve until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use tokio::net::TcpListener;

use super::{EXIT_FAILURE, config_error};
use crate::config::ServeArgs;
use crate::server;

/// Runs the server with `args`.
pub async fn run(args: ServeArgs) -> ExitCode {
    let listen = args.listen;
    let config = match args.into_config() {
        Ok(config) => config,
        Err(error) => return config_error(error),
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "taskq: cannot listen on {listen}: {error}; is another server using it? \
                 choose another --listen"
            );
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match server::run(config, listener, crate::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
