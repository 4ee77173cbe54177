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
    match server::run(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the server")
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
