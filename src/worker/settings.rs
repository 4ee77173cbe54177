//! What a worker runs with: the choices made on its builder, read by both
//! the stream and the unary loop.

use std::time::Duration;

use crate::client::Client;

/// A worker's settings, as its builder filled them in.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// The connection, shared by every call and stream of the worker.
    pub(crate) client: Client,
    /// The queue tasks come from (`""`: `default`).
    pub(crate) queue: String,
    /// Most tasks running at once (at least 1).
    pub(crate) concurrency: usize,
    /// Lease asked for each task.
    pub(crate) lease: Duration,
    /// The id reported with each call.
    pub(crate) worker_id: String,
    /// Time running tasks get to finish after a shutdown signal.
    pub(crate) shutdown_grace: Duration,
    /// Longest single wait for a task (unary GetTask).
    pub(crate) poll_wait: Duration,
    /// Most tasks per message from the server (stream).
    pub(crate) max_batch: usize,
}
