//! The worker runtime: takes tasks from a queue, runs a handler on each,
//! keeps each lease alive while the handler runs, and reports results.
//!
//! - Up to `concurrency` tasks run at once; a task is asked for only when a
//!   slot is free, so nothing waits in the worker while others could run it.
//! - Each lease is extended at a third of its length while its handler runs.
//!   If the lease is lost anyway (the server handed the task to someone
//!   else), the handler is dropped and nothing is reported.
//! - When the server is unreachable the worker retries with exponential
//!   backoff and jitter, logging once when the outage starts and once when
//!   it ends.
//! - On shutdown it stops taking tasks, lets running ones finish within the
//!   grace period, reports them, and returns. Tasks still running after the
//!   grace period are reported as retryable failures, so they go back to
//!   the queue at once rather than when their lease runs out.
//! - A handler that panics fails its attempt as retryable (logged); the
//!   worker goes on.
//! - On the stream path a handler is polled once where its task arrives;
//!   one that is done at once (most quick handlers) is reported without a
//!   task of its own, which saves two wake-ups per task (bench/README.md).
//!   So do CPU-heavy work in `tokio::task::spawn_blocking`, as anywhere on
//!   tokio: a handler that computes for long without awaiting holds up its
//!   stream.
//!
//! This module depends on [`crate::client`] only, never on the engine.
//! Its parts: the builder and the choice of mode here; `stream.rs` and
//! `unary.rs`, the two loops; what both share in their own files:
//! `handler.rs` (what a handler returns, panics caught), `lease.rs` (the
//! one lease keeper), `report.rs` (the one tally), `backoff.rs`
//! (reconnecting), `settings.rs` (the builder's choices). The loops never
//! import this file. Handlers that run programs: [`exec`] (a program per
//! task) and [`pipe`] (long-lived programs, one per slot, over a line
//! protocol), with what they share: [`command`] (a program and its
//! arguments) and `deadline.rs` (a program's time on a task).

pub mod builtin;
pub mod command;
pub mod exec;
pub mod pipe;

mod backoff;
mod deadline;
mod handler;
mod lease;
mod report;
mod settings;
mod stream;
mod unary;

use std::future::Future;
use std::time::Duration;

pub use self::backoff::Backoff;
pub use self::handler::{HandlerResult, TaskFailure};
pub use self::report::WorkerReport;
use self::settings::Settings;
use crate::client::{Client, ClientError};
use crate::pb;

/// Default of [`WorkerBuilder::concurrency`].
pub const DEFAULT_CONCURRENCY: usize = 1;

/// Default of [`WorkerBuilder::lease`].
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Default of [`WorkerBuilder::shutdown_grace`].
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Default of [`WorkerBuilder::poll_wait`].
pub const DEFAULT_POLL_WAIT: Duration = Duration::from_secs(20);

/// Default, and most, of [`WorkerBuilder::max_batch`]: as many as the
/// window allows, up to the size of a PutTasks batch.
pub const DEFAULT_MAX_BATCH: usize = 1000;

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The server refused the worker for a reason retrying will not fix.
    #[error("the server refused the worker: {0}")]
    Refused(#[source] ClientError),
}

/// Entry point of the worker runtime.
///
/// # Examples
///
/// A worker that squares integers, until told to stop (here with a server
/// and a producer in the same program, on a free port):
///
/// ```
/// use bytes::Bytes;
/// use taskq::client::{Client, ClientOptions};
/// use taskq::worker::{TaskFailure, Worker};
/// # use std::time::Duration;
/// # use taskq::server::{self, ServerConfig};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let address = format!("http://{}", listener.local_addr()?);
/// # let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
/// # let server = tokio::spawn(server::run(ServerConfig::default(), listener, async {
/// #     let _ = stopped.await;
/// # }));
/// let client = Client::connect_lazy(&address, ClientOptions::default())?;
/// let (stop, stop_signal) = tokio::sync::oneshot::channel::<()>();
/// let worker = Worker::builder(client)
///     .queue("squares")
///     .concurrency(4)
///     .run_until(
///         |task| async move {
///             let n: i64 = std::str::from_utf8(&task.payload)
///                 .ok()
///                 .and_then(|s| s.trim().parse().ok())
///                 .ok_or_else(|| TaskFailure::fatal("payload is not an integer"))?;
///             Ok(Bytes::from((n * n).to_string()))
///         },
///         async {
///             let _ = stop_signal.await;
///         },
///     );
/// let worker = tokio::spawn(worker);
/// # let producer = Client::connect(&address, ClientOptions::default()).await?;
/// # let put = producer.put("squares", b"7".to_vec()).await?;
/// # let result = producer.result(&put.task_id, Duration::from_secs(10)).await?;
/// # assert_eq!(result.expect("done within 10s").output, "49".as_bytes());
/// // ... later, on shutdown: the worker finishes what it runs, then reports.
/// let _ = stop.send(());
/// let report = worker.await??;
/// assert_eq!(report.succeeded, 1);
/// # let _ = stop_server.send(());
/// # server.await??;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Worker;

impl Worker {
    /// Starts configuring a worker that uses `client`.
    pub fn builder(client: Client) -> WorkerBuilder {
        WorkerBuilder {
            settings: Settings {
                client,
                queue: String::new(),
                concurrency: DEFAULT_CONCURRENCY,
                lease: DEFAULT_LEASE,
                worker_id: default_worker_id(),
                shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
                poll_wait: DEFAULT_POLL_WAIT,
                max_batch: DEFAULT_MAX_BATCH,
            },
            mode: Mode::default(),
        }
    }
}

/// How a worker talks to the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// One StreamTasks stream: tasks pushed with flow control, results and
    /// extensions on the same stream. The default: far fewer round trips.
    #[default]
    Stream,
    /// GetTask, ExtendLease and PutResult calls: for servers without
    /// StreamTasks, or proxies that do not pass bidirectional streams.
    Unary,
}

/// A worker id from the host name and the process id.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", std::process::id())
}

/// How a worker runs; see [`Worker::builder`].
#[derive(Clone, Debug)]
pub struct WorkerBuilder {
    settings: Settings,
    mode: Mode,
}

impl WorkerBuilder {
    /// The queue to take tasks from (`""`: `default`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.settings.queue = queue.into();
        self
    }

    /// Most tasks running at once (at least 1; default
    /// [`DEFAULT_CONCURRENCY`]).
    pub fn concurrency(mut self, tasks: usize) -> Self {
        self.settings.concurrency = tasks.max(1);
        self
    }

    /// Lease asked for each task (default [`DEFAULT_LEASE`]); extended at
    /// a third of it while running.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease.max(Duration::from_millis(30));
        self
    }

    /// The id the worker reports; default host name and pid.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.settings.worker_id = id.into();
        self
    }

    /// Time running tasks get to finish after a shutdown signal (default
    /// [`DEFAULT_SHUTDOWN_GRACE`]).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.settings.shutdown_grace = grace;
        self
    }

    /// Stream (default) or unary calls.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// On the stream path, most tasks per message from the server (at most
    /// `concurrency`; default and most [`DEFAULT_MAX_BATCH`]). The server
    /// never waits to fill a batch: it sends what is ready, so batches cost
    /// no latency and save per-message work. 1 asks for each task in its
    /// own message.
    pub fn max_batch(mut self, tasks: usize) -> Self {
        self.settings.max_batch = tasks.clamp(1, DEFAULT_MAX_BATCH);
        self
    }

    /// Longest single wait for a task (the GetTask deadline; default
    /// [`DEFAULT_POLL_WAIT`]).
    pub fn poll_wait(mut self, wait: Duration) -> Self {
        self.settings.poll_wait = wait.max(Duration::from_millis(10));
        self
    }

    /// Runs `handler` on tasks until SIGTERM or Ctrl-C.
    ///
    /// # Errors
    /// [`WorkerError::Refused`] when the server refuses the worker for a
    /// reason retrying will not fix (a wrong token, an invalid queue name).
    pub async fn run<F, Fut>(self, handler: F) -> Result<WorkerReport, WorkerError>
    where
        F: Fn(pb::Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.run_until(handler, crate::shutdown::signal()).await
    }

    /// Runs `handler` on tasks until `shutdown` resolves.
    ///
    /// # Errors
    /// As [`WorkerBuilder::run`].
    pub async fn run_until<F, Fut>(
        self,
        handler: F,
        shutdown: impl Future<Output = ()>,
    ) -> Result<WorkerReport, WorkerError>
    where
        F: Fn(pb::Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let Self { settings, mode } = self;
        tracing::info!(
            worker_id = %settings.worker_id,
            queue = %settings.queue,
            concurrency = settings.concurrency,
            mode = ?mode,
            "worker started"
        );
        let outcome = match mode {
            Mode::Stream => stream::run(settings, handler, shutdown).await,
            Mode::Unary => unary::run(settings, handler, shutdown).await,
        };
        if let Ok(report) = &outcome {
            tracing::info!(
                succeeded = report.succeeded,
                failed = report.failed,
                abandoned = report.abandoned,
                interrupted = report.interrupted,
                "worker stopped"
            );
        }
        outcome.map_err(WorkerError::Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_name_host_and_pid() {
        let id = default_worker_id();
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
    }
}
