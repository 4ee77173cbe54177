//! The process's stop signal, shared by the server and the worker.

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn signal() {
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
                tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the process");
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
