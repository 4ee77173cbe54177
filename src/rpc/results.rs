//! The result calls: GetResult (by task id, or the queue's next), and
//! WatchResults / WatchResultBatches (a queue's results as they finish, or
//! the listed tasks' results as each exists).
//!
//! By queue, the response stream polls the broker's [`ResultStream`]
//! directly, like a worker stream's deliveries (bench/README.md); by task
//! ids, a task waits on the broker's [`Watch`] and sends what arrives.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::access::permit_task;
use super::batch::{BatchSource, in_batch_len, poll_batch};
use super::convert;
use super::outbound::{OUTBOUND_BUFFER, shutting_down, spawn_stream};
use crate::auth::Access;
use crate::broker::TaskResult;
use crate::pb;
use crate::store::{ResultDeliveries, ResultWatch, Store};

/// GetResult: a task's result, or the queue's next, waiting up to `wait`.
pub(super) async fn get_result<S: Store>(
    broker: &S,
    access: &Access,
    request: pb::GetResultRequest,
    wait: Duration,
) -> Result<pb::GetResultResponse, Status> {
    use pb::get_result_request::Target;
    let result = match request.target {
        Some(Target::TaskId(id)) => {
            let task = convert::task_id(&id)?;
            permit_task(broker, access, task).await?;
            broker.result(task, wait).await?
        }
        Some(Target::Queue(queue)) => {
            let queue = convert::queue(&queue)?;
            access.permit_queue(&queue)?;
            broker.next_result(queue, wait).await?
        }
        None => {
            return Err(Status::invalid_argument(
                "set a target: task_id (that task's result) or queue (the next result)",
            ));
        }
    };
    Ok(pb::GetResultResponse {
        result: result.map(convert::result),
    })
}

/// WatchResults' outbound side, one result per message.
pub enum Results<R> {
    /// By queue: results straight from the broker's result stream.
    Queue(QueueResults<R>),
    /// By task ids: results from the task that waits for them.
    Tasks(TaskResults),
}

/// A queue's results, from its result stream in the broker. When the
/// broker closes, the stream ends with UNAVAILABLE once it has sent what it
/// held.
pub struct QueueResults<R> {
    results: R,
    /// The final UNAVAILABLE has been taken.
    ended: bool,
    /// A status that followed results in a batch: the next message.
    held: Option<Status>,
}

impl<R: ResultDeliveries> BatchSource for QueueResults<R> {
    type Item = TaskResult;
    type Wire = pb::Result;

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<TaskResult, Status>>> {
        if let Some(status) = self.held.take() {
            return Poll::Ready(Some(Err(status)));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(
            match std::task::ready!(self.results.poll_next_result(cx)) {
                Some(result) => Ok(result),
                // The broker closed and this stream sent what it held.
                None => {
                    self.ended = true;
                    Err(shutting_down())
                }
            },
        ))
    }

    /// A result that would not fit goes back to the broker's stream, so
    /// that it is given back if the client leaves first.
    fn put_back(&mut self, result: TaskResult) {
        self.results.put_back(result);
    }

    fn hold(&mut self, status: Status) {
        self.held = Some(status);
    }

    fn ready(&self) -> usize {
        self.results.ready()
    }

    fn bound(result: &TaskResult) -> usize {
        convert::result_len_bound(result)
    }

    fn convert(result: TaskResult) -> pb::Result {
        convert::result(result)
    }
}

/// The listed tasks' results, converted by the task that waits for them.
/// These are not consumed, so one that did not fit a batch waits in `held`.
pub struct TaskResults {
    results: ReceiverStream<Result<pb::Result, Status>>,
    held: Option<Result<pb::Result, Status>>,
}

impl BatchSource for TaskResults {
    type Item = pb::Result;
    type Wire = pb::Result;

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<pb::Result, Status>>> {
        if let Some(held) = self.held.take() {
            return Poll::Ready(Some(held));
        }
        Pin::new(&mut self.results).poll_next(cx)
    }

    fn put_back(&mut self, result: pb::Result) {
        self.held = Some(Ok(result));
    }

    fn hold(&mut self, status: Status) {
        self.held = Some(Err(status));
    }

    fn bound(result: &pb::Result) -> usize {
        in_batch_len(result)
    }

    fn convert(result: pb::Result) -> pb::Result {
        result
    }
}

/// One item of a source, converted: a message of WatchResults.
fn poll_one<S: BatchSource>(
    source: &mut S,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<S::Wire, Status>>> {
    source
        .poll_item(cx)
        .map(|item| item.map(|item| item.map(S::convert)))
}

impl<R: ResultDeliveries> Stream for Results<R> {
    type Item = Result<pb::Result, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Self::Queue(results) => poll_one(results, cx),
            Self::Tasks(results) => poll_one(results, cx),
        }
    }
}

/// WatchResultBatches' outbound side: [`Results`], with the results ready
/// at once sent together, up to the batch bound.
pub struct ResultBatches<R>(Results<R>);

impl<R> ResultBatches<R> {
    pub(super) fn new(results: Results<R>) -> Self {
        Self(results)
    }
}

impl<R: ResultDeliveries> Stream for ResultBatches<R> {
    type Item = Result<pb::ResultBatch, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let batch = match &mut self.get_mut().0 {
            Results::Queue(results) => poll_batch(results, usize::MAX, cx),
            Results::Tasks(results) => poll_batch(results, usize::MAX, cx),
        };
        batch.map(|batch| batch.map(|results| results.map(|results| pb::ResultBatch { results })))
    }
}

/// WatchResults: the queue's results as they finish, or the listed tasks'
/// results as each exists.
pub(super) async fn watch_results<S: Store>(
    broker: &S,
    access: &Access,
    request: pb::WatchResultsRequest,
    max_batch: usize,
) -> Result<Results<S::ResultStream>, Status> {
    use pb::watch_results_request::Target;
    match request.target {
        Some(Target::Queue(queue)) => {
            let queue = convert::queue(&queue)?;
            access.permit_queue(&queue)?;
            let results = broker.open_result_stream(&queue).await?;
            Ok(Results::Queue(QueueResults {
                results,
                ended: false,
                held: None,
            }))
        }
        Some(Target::TaskIds(list)) => {
            if list.ids.len() > max_batch {
                return Err(Status::invalid_argument(format!(
                    "{} task ids; the limit is {max_batch} (server flag --max-batch)",
                    list.ids.len()
                )));
            }
            let ids = list
                .ids
                .iter()
                .map(|text| convert::task_id(text))
                .collect::<Result<Vec<_>, _>>()?;
            for id in &ids {
                permit_task(broker, access, *id).await?;
            }
            // Every id is checked before anything is sent.
            let watch = broker.watch(&ids).await?;
            let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
            spawn_stream(
                "WatchResults",
                tx.clone(),
                watch_tasks(broker.clone(), watch, ids.len(), tx),
            );
            Ok(Results::Tasks(TaskResults {
                results: ReceiverStream::new(rx),
                held: None,
            }))
        }
        None => Err(Status::invalid_argument(
            "set a target: queue (its results as they finish) or task_ids",
        )),
    }
}

/// Sends the watched tasks' results as they arrive, until each has come,
/// the client leaves, or the broker closes.
async fn watch_tasks<S: Store>(
    broker: S,
    mut results: S::Watch,
    mut remaining: usize,
    tx: mpsc::Sender<Result<pb::Result, Status>>,
) {
    let closed = broker.closed();
    tokio::pin!(closed);
    while remaining > 0 {
        tokio::select! {
            biased;
            result = results.recv() => {
                let Some(result) = result else { return };
                remaining -= 1;
                if tx.send(Ok(convert::result(result))).await.is_err() {
                    return;
                }
            }
            () = &mut closed => {
                let _ = tx.send(Err(shutting_down())).await;
                return;
            }
            () = tx.closed() => return,
        }
    }
}
