//! What a handler returns, and how a handler's panic is turned into its
//! task's failure: the contract between the runtime and the code it runs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::pb::{self, put_result_request::Outcome};

/// Why a handler did not produce an output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskFailure {
    /// What went wrong; becomes the result's error.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retry: bool,
    /// With `retry`: wait exactly this long before the next attempt,
    /// instead of the server's backoff.
    pub retry_after: Option<std::time::Duration>,
}

impl TaskFailure {
    /// A failure worth another attempt (a timeout, a flaky dependency).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: true,
            retry_after: None,
        }
    }

    /// A task that did not fail but was not run to its end (the worker is
    /// stopping): back to the queue at once, with no backoff.
    pub fn interrupted(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: true,
            retry_after: Some(std::time::Duration::ZERO),
        }
    }

    /// A failure no retry will fix (bad input).
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: false,
            retry_after: None,
        }
    }

    /// The failure of a task whose handler panicked: retried, since the
    /// bug may lie with this attempt only.
    pub(crate) fn panicked() -> Self {
        Self::retryable("the task handler panicked")
    }

    /// The failure of a task whose output the server refused (too large):
    /// no retry makes it smaller.
    pub(crate) fn output_refused(why: impl std::fmt::Display) -> Self {
        Self::fatal(format!("the server refused the output: {why}"))
    }
}

/// What a handler returns.
pub type HandlerResult = Result<Bytes, TaskFailure>;

/// A task handler as the loops see it: any `Fn(pb::Task) -> Fut` the
/// worker's builder accepts, under one name so the loops need not spell
/// out its bounds.
pub(crate) trait Handler: Send + Sync + 'static {
    /// The handler's work on one task.
    type Work: Future<Output = HandlerResult> + Send + 'static;

    /// Starts the work on `task`.
    fn call(&self, task: pb::Task) -> Self::Work;
}

impl<F, Fut> Handler for F
where
    F: Fn(pb::Task) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    type Work = Fut;

    fn call(&self, task: pb::Task) -> Fut {
        self(task)
    }
}

/// A handler's result as the outcome reported to the server.
pub(crate) fn outcome_of(result: HandlerResult) -> Outcome {
    match result {
        Ok(output) => Outcome::Output(output),
        Err(failure) => Outcome::Failure(pb::Failure {
            message: failure.message,
            retry: failure.retry,
            retry_after: failure
                .retry_after
                .map(|after| prost_types::Duration::try_from(after).unwrap_or_default()),
        }),
    }
}

/// Runs a handler's future, turning a panic in it into a retryable failure
/// of its task (and an error in the log), so that one bad task neither
/// takes the worker down nor waits out its lease.
pub(crate) async fn catch_panics<Fut>(task_id: &str, work: Fut) -> HandlerResult
where
    Fut: Future<Output = HandlerResult>,
{
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| poll_catching(task_id, work.as_mut(), cx)).await
}

/// One poll of a handler's future, a panic in it turned into a retryable
/// failure of its task, as [`catch_panics`] does.
pub(crate) fn poll_catching<Fut>(
    task_id: &str,
    work: Pin<&mut Fut>,
    cx: &mut Context<'_>,
) -> Poll<HandlerResult>
where
    Fut: Future<Output = HandlerResult>,
{
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.poll(cx))) {
        Ok(poll) => poll,
        Err(_) => {
            tracing::error!(%task_id, "the task handler panicked; the task will be retried");
            Poll::Ready(Err(TaskFailure::panicked()))
        }
    }
}
