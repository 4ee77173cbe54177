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
//!
//! # Examples
//!
//! ```no_run
//! use bytes::Bytes;
//! use taskq::client::{Client, ClientOptions};
//! use taskq::worker::{TaskFailure, Worker};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect_lazy("http://127.0.0.1:50051", ClientOptions::default())?;
//! Worker::builder(client)
//!     .queue("squares")
//!     .concurrency(4)
//!     .run(|task| async move {
//!         let n: i64 = std::str::from_utf8(&task.payload)
//!             .ok()
//!             .and_then(|s| s.trim().parse().ok())
//!             .ok_or_else(|| TaskFailure::fatal("payload is not an integer"))?;
//!         Ok(Bytes::from((n * n).to_string()))
//!     })
//!     .await?;
//! # Ok(())
//! # }
//! ```

pub mod builtin;
pub mod exec;
mod stream;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{Client, ClientError};
use crate::pb::{self, put_result_request::Outcome};

/// Why a handler did not produce an output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskFailure {
    /// What went wrong; becomes the result's error.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retry: bool,
}

impl TaskFailure {
    /// A failure worth another attempt (a timeout, a flaky dependency).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: true,
        }
    }

    /// A failure no retry will fix (bad input).
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: false,
        }
    }
}

/// What a handler returns.
pub type HandlerResult = Result<Bytes, TaskFailure>;

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The server refused the worker for a reason retrying will not fix.
    #[error("the server refused the worker: {0}")]
    Refused(#[source] ClientError),
}

/// What a worker did, for its exit log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Tasks reported as succeeded.
    pub succeeded: u64,
    /// Tasks reported as failed (retried or final).
    pub failed: u64,
    /// Tasks whose lease was lost, or whose report could not be delivered.
    pub abandoned: u64,
    /// Tasks still running when the shutdown grace ran out, handed back to
    /// the queue unfinished.
    pub interrupted: u64,
}

/// Entry point of the worker runtime.
#[derive(Debug)]
pub struct Worker;

impl Worker {
    /// Starts configuring a worker that uses `client`.
    pub fn builder(client: Client) -> WorkerBuilder {
        WorkerBuilder {
            client,
            queue: String::new(),
            concurrency: 1,
            lease: Duration::from_secs(30),
            worker_id: default_worker_id(),
            shutdown_grace: Duration::from_secs(30),
            poll_wait: Duration::from_secs(20),
            mode: Mode::Stream,
            max_batch: DEFAULT_MAX_BATCH,
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
    client: Client,
    queue: String,
    concurrency: usize,
    lease: Duration,
    worker_id: String,
    shutdown_grace: Duration,
    poll_wait: Duration,
    mode: Mode,
    max_batch: usize,
}

impl WorkerBuilder {
    /// The queue to take tasks from (`""`: `default`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Most tasks running at once (at least 1).
    pub fn concurrency(mut self, tasks: usize) -> Self {
        self.concurrency = tasks.max(1);
        self
    }

    /// Lease asked for each task; extended at a third of it while running.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(30));
        self
    }

    /// The id the worker reports; default host name and pid.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = id.into();
        self
    }

    /// Time running tasks get to finish after a shutdown signal.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Stream (default) or unary calls.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// On the stream path, most tasks per message from the server (at most
    /// `concurrency`; default 1000). The server never waits to fill a
    /// batch: it sends what is ready, so batches cost no latency and save
    /// per-message work. 1 asks for each task in its own message.
    pub fn max_batch(mut self, tasks: usize) -> Self {
        self.max_batch = tasks.clamp(1, DEFAULT_MAX_BATCH);
        self
    }

    /// Longest single wait for a task (the GetTask deadline).
    pub fn poll_wait(mut self, wait: Duration) -> Self {
        self.poll_wait = wait.max(Duration::from_millis(10));
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
        tracing::info!(
            worker_id = %self.worker_id,
            queue = %self.queue,
            concurrency = self.concurrency,
            mode = ?self.mode,
            "worker started"
        );
        let outcome = match self.mode {
            Mode::Stream => stream::run(self, Arc::new(handler), shutdown).await,
            Mode::Unary => self.run_unary(handler, shutdown).await,
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
        outcome
    }

    /// The unary loop: GetTask when a slot is free, ExtendLease and
    /// PutResult per task.
    async fn run_unary<F, Fut>(
        self,
        handler: F,
        shutdown: impl Future<Output = ()>,
    ) -> Result<WorkerReport, WorkerError>
    where
        F: Fn(pb::Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let ctx = Arc::new(self.clone());
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let (interrupt, interrupted) = watch::channel(false);
        let mut running: JoinSet<Ran> = JoinSet::new();
        let mut report = WorkerReport::default();
        let mut backoff = Backoff::default();
        let mut outage: Option<Instant> = None;
        let mut refused = None;
        tokio::pin!(shutdown);
        loop {
            while let Some(done) = running.try_join_next() {
                tally(&mut report, done);
            }
            let slot = tokio::select! {
                biased;
                () = &mut shutdown => break,
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            };
            let request = pb::GetTaskRequest {
                queue: self.queue.clone(),
                worker_id: self.worker_id.clone(),
                lease: prost_types::Duration::try_from(self.lease).ok(),
                max_wait: None,
            };
            // Dropping a waiting GetTask is safe: the server gives back a
            // task it handed to a call that is gone.
            let got = tokio::select! {
                biased;
                () = &mut shutdown => break,
                got = self.client.get_task(request, self.poll_wait) => got,
            };
            match got {
                Ok(task) => {
                    if let Some(since) = outage.take() {
                        tracing::info!(after = ?since.elapsed(), "server reachable again");
                    }
                    backoff.reset();
                    if let Some(task) = task {
                        let run = run_task(ctx.clone(), handler.clone(), task, interrupted.clone());
                        running.spawn(async move {
                            let ran = run.await;
                            drop(slot);
                            ran
                        });
                    }
                }
                Err(error) if error.is_transient() => {
                    if outage.is_none() {
                        tracing::warn!(%error, "server unavailable; retrying with backoff");
                        outage = Some(Instant::now());
                    }
                    let delay = backoff.next_delay();
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "the server refused the worker; stopping");
                    refused = Some(error);
                    break;
                }
            }
        }

        if !running.is_empty() {
            tracing::info!(
                running = running.len(),
                grace = ?self.shutdown_grace,
                "stopping: letting running tasks finish"
            );
        }
        let drain = async {
            while let Some(done) = running.join_next().await {
                tally(&mut report, done);
            }
        };
        if tokio::time::timeout(self.shutdown_grace, drain)
            .await
            .is_err()
        {
            tracing::warn!("grace period over; handing unfinished tasks back to the queue");
            let _ = interrupt.send(true);
            while let Some(done) = running.join_next().await {
                tally(&mut report, done);
            }
        }
        match refused {
            Some(error) => Err(WorkerError::Refused(error)),
            None => Ok(report),
        }
    }
}

/// How one task ended, from the worker's side.
enum Ran {
    Succeeded,
    Failed,
    Abandoned,
    Interrupted,
}

fn tally(report: &mut WorkerReport, done: Result<Ran, tokio::task::JoinError>) {
    match done {
        Ok(Ran::Succeeded) => report.succeeded += 1,
        Ok(Ran::Failed) => report.failed += 1,
        Ok(Ran::Abandoned) => report.abandoned += 1,
        Ok(Ran::Interrupted) => report.interrupted += 1,
        Err(error) => {
            tracing::error!(%error, "a task runner panicked; its task comes back when its lease expires");
            report.abandoned += 1;
        }
    }
}

/// Runs one task: the handler, the lease keeper and the interrupt race;
/// then the report.
async fn run_task<F, Fut>(
    ctx: Arc<WorkerBuilder>,
    handler: Arc<F>,
    task: pb::Task,
    mut interrupted: watch::Receiver<bool>,
) -> Ran
where
    F: Fn(pb::Task) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    tracing::debug!(task_id = %task.id, attempt = task.attempt, "task started");
    let work = catch_panics(&task.id, handler(task.clone()));
    let outcome = tokio::select! {
        result = work => Some(match result {
            Ok(output) => Outcome::Output(output),
            Err(failure) => Outcome::Failure(pb::Failure { message: failure.message, retry: failure.retry }),
        }),
        lost = keep_lease(&ctx, &task) => {
            tracing::warn!(task_id = %task.id, error = %lost, "lease lost; dropping the task, another worker has it");
            return Ran::Abandoned;
        }
        _ = interrupted.wait_for(|stop| *stop) => None,
    };
    let Some(outcome) = outcome else {
        let outcome = Outcome::Failure(pb::Failure {
            message: "the worker stopped before the task finished".into(),
            retry: true,
        });
        return match report(&ctx, &task, outcome).await {
            Ran::Failed => Ran::Interrupted,
            other => other,
        };
    };
    report(&ctx, &task, outcome).await
}

/// Runs a handler's future, turning a panic in it into a retryable failure
/// of its task (and an error in the log), so that one bad task neither
/// takes the worker down nor waits out its lease.
async fn catch_panics<Fut>(task_id: &str, work: Fut) -> HandlerResult
where
    Fut: Future<Output = HandlerResult>,
{
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| poll_catching(task_id, work.as_mut(), cx)).await
}

/// One poll of a handler's future, a panic in it turned into a retryable
/// failure of its task, as [`catch_panics`] does.
fn poll_catching<Fut>(
    task_id: &str,
    work: std::pin::Pin<&mut Fut>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<HandlerResult>
where
    Fut: Future<Output = HandlerResult>,
{
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.poll(cx))) {
        Ok(poll) => poll,
        Err(_) => {
            tracing::error!(%task_id, "the task handler panicked; the task will be retried");
            std::task::Poll::Ready(Err(TaskFailure::retryable("the task handler panicked")))
        }
    }
}

/// Extends the task's lease at a third of its length, for as long as it is
/// polled. Returns only when the lease is lost.
async fn keep_lease(ctx: &WorkerBuilder, task: &pb::Task) -> ClientError {
    let granted = granted_lease(task.lease_expires_at, ctx.lease);
    let mut every = (granted / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        match ctx.client.extend_lease(task, ctx.lease).await {
            // The server grants the same (possibly clamped) length as at
            // delivery: keep extending at a third of what was granted.
            Ok(_) => every = (granted / 3).max(Duration::from_millis(10)),
            Err(error) if error.is_transient() => {
                tracing::debug!(task_id = %task.id, %error, "lease extension failed; will retry");
                every = (every / 2).max(Duration::from_millis(10));
            }
            Err(error) => return error,
        }
    }
}

/// The lease the server granted at delivery (it may have clamped the one
/// asked for; extensions are clamped the same way).
fn granted_lease(expires: Option<prost_types::Timestamp>, asked: Duration) -> Duration {
    expires
        .and_then(|at| SystemTime::try_from(at).ok())
        .and_then(|at| at.duration_since(SystemTime::now()).ok())
        .unwrap_or(asked)
        .min(asked)
}

/// Default of [`WorkerBuilder::max_batch`]: as many as the window allows,
/// up to the size of a PutTasks batch.
const DEFAULT_MAX_BATCH: usize = 1000;

/// How long a worker keeps trying to deliver one report.
const REPORT_PATIENCE: Duration = Duration::from_secs(30);

async fn report(ctx: &WorkerBuilder, task: &pb::Task, mut outcome: Outcome) -> Ran {
    let started = Instant::now();
    let mut backoff = Backoff::default();
    loop {
        let success = matches!(outcome, Outcome::Output(_));
        match ctx.client.put_result(task, outcome.clone()).await {
            Ok(_) if success => return Ran::Succeeded,
            Ok(_) => return Ran::Failed,
            Err(error) if error.is_transient() && started.elapsed() < REPORT_PATIENCE => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(error) if success && error.code() == Some(tonic::Code::InvalidArgument) => {
                // The output itself was refused (too large): say so as the
                // task's failure rather than leave it to run again.
                outcome = Outcome::Failure(pb::Failure {
                    message: format!("the server refused the output: {error}"),
                    retry: false,
                });
            }
            Err(error) => {
                tracing::warn!(task_id = %task.id, %error, "result not accepted");
                return Ran::Abandoned;
            }
        }
    }
}

/// Exponential backoff with jitter: 100 ms doubling to 5 s, each delay
/// drawn from the upper half of its step so that many workers spread out.
#[derive(Debug)]
pub struct Backoff {
    step: u32,
    rng: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        Self {
            step: 0,
            rng: seed | 1,
        }
    }
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = Self::BASE
            .saturating_mul(1 << self.step.min(16))
            .min(Self::MAX);
        self.step += 1;
        // xorshift64: jitter needs spread, not cryptographic strength.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = ceiling / 2;
        half + half.mul_f64((self.rng % 1000) as f64 / 1000.0)
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.step = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_ceiling_with_jitter() {
        let mut backoff = Backoff::default();
        let delays: Vec<_> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400));
        assert!(delays.iter().all(|d| *d <= Backoff::MAX));
        assert!(delays[11] >= Backoff::MAX / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn worker_ids_name_host_and_pid() {
        let id = default_worker_id();
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
    }
}
