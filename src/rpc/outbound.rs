//! Serving a response stream: the task that feeds one open stream, the
//! buffer toward its client, and the status a stream ends with when the
//! server drains.

use std::future::Future;

use tokio::sync::mpsc;
use tonic::Status;

use crate::limits::{CatchUnwind, panicked};

/// Messages buffered toward a client before the server stops reading from
/// it: enough to keep a busy stream moving, small enough to bound memory.
pub(super) const OUTBOUND_BUFFER: usize = 256;

/// The status a stream ends with when the server drains.
pub(super) fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down: reconnect and go on")
}

/// Runs the task that serves one open stream. A panic in it ends the
/// stream with INTERNAL (through `report`, a second sender of the stream)
/// instead of a silent end that a client would read as OK; what the stream
/// held goes back as its values are dropped.
pub(super) fn spawn_stream<T: Send + 'static>(
    call: &'static str,
    report: mpsc::Sender<Result<T, Status>>,
    serve: impl Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(panic) = CatchUnwind::new(serve).await {
            tracing::error!(%call, %panic, "stream task panicked; stream ended with INTERNAL");
            let _ = report.send(Err(panicked())).await;
        }
    });
}
