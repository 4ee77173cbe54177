//! `taskq serve`: validate the flags, bind (gRPC, then HTTP), serve until
//! SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio::net::TcpListener;

use crate::auth::Tokens;
use crate::cli::exit::{EXIT_FAILURE, config_error};
use crate::config::ServeArgs;
use crate::server;

/// Runs the server with `args`.
pub async fn run(args: ServeArgs) -> ExitCode {
    let listen = args.listen;
    let token_file = args.token_file.clone();
    let config = match args.into_config() {
        Ok(config) => config,
        Err(error) => return config_error(error),
    };
    let Some(listener) = bind(listen, "--listen").await else {
        return ExitCode::from(EXIT_FAILURE);
    };
    let http = match config.http.listen {
        Some(addr) => match bind(addr, "--http-listen (or `off`)").await {
            Some(http) => Some(http),
            None => return ExitCode::from(EXIT_FAILURE),
        },
        None => None,
    };
    let reload =
        token_file.map(|path| tokio::spawn(reload_tokens_on_hangup(path, config.tokens.clone())));
    let served = server::run_with_http(config, listener, http, crate::shutdown::signal()).await;
    if let Some(reload) = reload {
        reload.abort();
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Binds `addr`, or says why not and which flag to change.
async fn bind(addr: std::net::SocketAddr, flag: &str) -> Option<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Some(listener),
        Err(error) => {
            eprintln!(
                "taskq: cannot listen on {addr}: {error}; is another server using it? \
                 choose another {flag}"
            );
            None
        }
    }
}

/// Re-reads the token file on each SIGHUP, so tokens rotate without a
/// restart. A file that no longer parses is reported and the tokens in
/// force stay: a typo never locks everyone out or lets everyone in.
async fn reload_tokens_on_hangup(path: PathBuf, tokens: Tokens) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGHUP; token changes need a restart");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            match Tokens::from_file(&path) {
                Ok(fresh) => {
                    tokens.replace(&fresh);
                    tracing::info!(
                        path = %path.display(),
                        tokens = fresh.len(),
                        "SIGHUP: token file reloaded"
                    );
                }
                Err(error) => tracing::error!(
                    %error,
                    "SIGHUP: token file not reloaded; the previous tokens stay in force: fix \
                     the file and send SIGHUP again"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, tokens);
}
