//! The worker runtime over unary calls: GetTask when a slot is free, then
//! per task ExtendLease while its handler runs and PutResult when it is
//! done. For servers without StreamTasks, or proxies that do not pass
//! bidirectional streams.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::ClientError;
use crate::pb::{self, put_result_request::Outcome};
use crate::worker::backoff::{Backoff, Reconnect};
use crate::worker::handler::{Handler, TaskFailure, catch_panics, outcome_of};
use crate::worker::lease::{self, Extension};
use crate::worker::report::{Ran, WorkerReport};
use crate::worker::settings::Settings;

/// How long a worker keeps trying to deliver one report.
const REPORT_PATIENCE: Duration = Duration::from_secs(30);

/// Runs the unary loop until `shutdown` resolves; the error is the
/// server's refusal of the worker.
pub(crate) async fn run(
    settings: Settings,
    handler: impl Handler,
    shutdown: impl Future<Output = ()>,
) -> Result<WorkerReport, ClientError> {
    let handler = Arc::new(handler);
    let ctx = Arc::new(settings);
    let slots = Arc::new(Semaphore::new(ctx.concurrency));
    let (interrupt, interrupted) = watch::channel(false);
    let mut running: JoinSet<Ran> = JoinSet::new();
    let mut report = WorkerReport::default();
    let mut reconnect = Reconnect::default();
    let mut refused = None;
    tokio::pin!(shutdown);
    loop {
        while let Some(done) = running.try_join_next() {
            report.count(ended(done));
        }
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let request = pb::GetTaskRequest {
            queue: ctx.queue.clone(),
            worker_id: ctx.worker_id.clone(),
            lease: prost_types::Duration::try_from(ctx.lease).ok(),
            max_wait: None,
        };
        // Dropping a waiting GetTask is safe: the server gives back a
        // task it handed to a call that is gone.
        let got = tokio::select! {
            biased;
            () = &mut shutdown => break,
            got = ctx.client.get_task(request, ctx.poll_wait) => got,
        };
        match got {
            Ok(task) => {
                reconnect.reached();
                if let Some(task) = task {
                    report.received(1);
                    let run = run_task(ctx.clone(), handler.clone(), task, interrupted.clone());
                    running.spawn(async move {
                        let ran = run.await;
                        drop(slot);
                        ran
                    });
                }
            }
            Err(error) if error.is_transient() => {
                let delay = reconnect.failed(&error);
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
            grace = ?ctx.shutdown_grace,
            "stopping: letting running tasks finish"
        );
    }
    let drain = async {
        while let Some(done) = running.join_next().await {
            report.count(ended(done));
        }
    };
    if tokio::time::timeout(ctx.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!("grace period over; handing unfinished tasks back to the queue");
        let _ = interrupt.send(true);
        while let Some(done) = running.join_next().await {
            report.count(ended(done));
        }
    }
    match refused {
        Some(error) => Err(error),
        None => Ok(report),
    }
}

/// How a task's runner ended; one that panicked abandoned its task.
fn ended(done: Result<Ran, tokio::task::JoinError>) -> Ran {
    done.unwrap_or_else(|error| {
        tracing::error!(%error, "a task runner panicked; its task comes back when its lease expires");
        Ran::Abandoned
    })
}

/// Runs one task: the handler, the lease keeper and the interrupt race;
/// then the report.
async fn run_task<H: Handler>(
    ctx: Arc<Settings>,
    handler: Arc<H>,
    task: pb::Task,
    mut interrupted: watch::Receiver<bool>,
) -> Ran {
    tracing::debug!(task_id = %task.id, attempt = task.attempt, "task started");
    let work = catch_panics(&task.id, handler.call(task.clone()));
    let result = tokio::select! {
        result = work => Some(result),
        lost = keep_lease(&ctx, &task) => {
            tracing::warn!(task_id = %task.id, error = %lost, "lease lost; dropping the task, another worker has it");
            return Ran::Abandoned;
        }
        _ = interrupted.wait_for(|stop| *stop) => None,
    };
    let Some(result) = result else {
        let stopped = TaskFailure::interrupted("the worker stopped before the task finished");
        return match deliver(&ctx, &task, outcome_of(Err(stopped))).await {
            Ran::Failed => Ran::Interrupted,
            other => other,
        };
    };
    deliver(&ctx, &task, outcome_of(result)).await
}

/// Keeps the task's lease with ExtendLease calls; returns the error that
/// says the lease is lost.
async fn keep_lease(ctx: &Settings, task: &pb::Task) -> ClientError {
    let granted = lease::granted(task.lease_expires_at, ctx.lease);
    lease::keep(granted, move || async move {
        match ctx.client.extend_lease(task, ctx.lease).await {
            Ok(_) => Extension::Asked,
            Err(error) if error.is_transient() => {
                tracing::debug!(task_id = %task.id, %error, "lease extension failed; will retry");
                Extension::Retry
            }
            Err(error) => Extension::Lost(error),
        }
    })
    .await
}

/// Reports a task's outcome with PutResult, retrying while the server is
/// unreachable, for up to [`REPORT_PATIENCE`].
async fn deliver(ctx: &Settings, task: &pb::Task, mut outcome: Outcome) -> Ran {
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
                outcome = outcome_of(Err(TaskFailure::output_refused(&error)));
            }
            Err(error) => {
                tracing::warn!(task_id = %task.id, %error, "result not accepted");
                return Ran::Abandoned;
            }
        }
    }
}
