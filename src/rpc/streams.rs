//! The streaming and batch calls: PutTasks, StreamTasks, WatchResults.
//! Like the unary handlers, they convert, call the broker, and convert
//! back; each open stream is served by one task that ends with it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{convert, service};
use crate::auth::Access;
use crate::broker::{
    Broker, LeaseRequest, ResultStream, Subscription, SubscriptionControl, WorkerId,
};
use crate::limits::{CatchUnwind, panicked};
use crate::pb::{self, server_message::Msg as Out, worker_message::Msg as In};

/// Largest window a stream may ask for.
pub const MAX_IN_FLIGHT: u32 = 10_000;
/// Messages buffered toward a client before the server stops reading from
/// it: enough to keep a busy stream moving, small enough to bound memory.
const OUTBOUND_BUFFER: usize = 256;
/// How long a new stream may take to send its subscribe message.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(30);
/// How often a draining stream checks whether it still holds tasks.
const DRAIN_CHECK: Duration = Duration::from_millis(50);
/// Largest encoded batch of tasks, unless it holds one task (the contract:
/// StreamTasks, point 6). Well under any client's message limit.
pub const BATCH_BYTES: usize = 1 << 20;
/// Most results a batch reserves room for at once (it can grow past).
const MAX_RESERVED: usize = 1024;
/// Results of one `results` message completed per hold of the broker's
/// lock.
const COMPLETE_CHUNK: usize = 256;
/// WatchResults' outbound side. By queue, results go straight from the
/// broker to the transport, like a worker stream's tasks (bench/README.md);
/// by task ids, from the task that waits for them.
pub enum Results {
    Queue {
        results: ResultStream,
        /// The final UNAVAILABLE has been sent after the broker closed.
        ended: bool,
    },
    Tasks(ReceiverStream<Result<pb::Result, Status>>),
}

impl Stream for Results {
    type Item = Result<pb::Result, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Self::Queue { results, ended } => {
                if *ended {
                    return Poll::Ready(None);
                }
                match std::task::ready!(results.poll_next_result(cx)) {
                    Some(result) => Poll::Ready(Some(Ok(convert::result(result)))),
                    // The broker closed and this stream sent what it held.
                    None => {
                        *ended = true;
                        Poll::Ready(Some(Err(shutting_down())))
                    }
                }
            }
            Self::Tasks(results) => Pin::new(results).poll_next(cx),
        }
    }
}

/// WatchResultBatches' outbound side: [`Results`], with the results ready
/// at once sent together, up to [`BATCH_BYTES`].
pub struct ResultBatches {
    results: Results,
    /// By task ids: what did not fit the last batch, the next one's first
    /// (a result), or the status sent after it. (By queue, a result that
    /// does not fit goes back to the broker's stream instead, so that it
    /// is given back if the client leaves first.)
    held: Option<Result<pb::Result, Status>>,
}

impl ResultBatches {
    pub fn new(results: Results) -> Self {
        Self {
            results,
            held: None,
        }
    }
}

impl Stream for ResultBatches {
    type Item = Result<pb::ResultBatch, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match &mut this.results {
            Results::Queue { results, ended } => queue_batch(results, ended, cx),
            Results::Tasks(results) => task_ids_batch(results, &mut this.held, cx),
        }
    }
}

/// By queue: the results ready now, up to [`BATCH_BYTES`]. One that would
/// not fit is put back in the broker's stream before it is converted.
fn queue_batch(
    results: &mut ResultStream,
    ended: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<pb::ResultBatch, Status>>> {
    if *ended {
        return Poll::Ready(None);
    }
    let mut batch = Vec::with_capacity(results.ready().clamp(1, MAX_RESERVED));
    let mut bytes = 0;
    loop {
        let result = match results.poll_next_result(cx) {
            Poll::Ready(Some(result)) => result,
            // The broker closed and this stream sent what it held.
            Poll::Ready(None) if batch.is_empty() => {
                *ended = true;
                return Poll::Ready(Some(Err(shutting_down())));
            }
            Poll::Pending if batch.is_empty() => return Poll::Pending,
            Poll::Ready(None) | Poll::Pending => break,
        };
        // Bounds added up, as for tasks (ServerMessages::poll_batch).
        let size = convert::result_len_bound(&result);
        if !batch.is_empty() && bytes + size > BATCH_BYTES {
            results.put_back(result);
            break;
        }
        bytes += size;
        batch.push(convert::result(result));
    }
    Poll::Ready(Some(Ok(pb::ResultBatch { results: batch })))
}

/// By task ids: the results ready now, up to [`BATCH_BYTES`]. These are
/// not consumed, so one that did not fit waits in `held`.
fn task_ids_batch(
    results: &mut ReceiverStream<Result<pb::Result, Status>>,
    held: &mut Option<Result<pb::Result, Status>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<pb::ResultBatch, Status>>> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    match held.take() {
        Some(Ok(result)) => {
            bytes += in_batch_len(&result);
            batch.push(result);
        }
        Some(Err(status)) => return Poll::Ready(Some(Err(status))),
        None => {}
    }
    loop {
        let result = match Pin::new(&mut *results).poll_next(cx) {
            Poll::Ready(Some(Ok(result))) => result,
            Poll::Ready(Some(Err(status))) if batch.is_empty() => {
                return Poll::Ready(Some(Err(status)));
            }
            Poll::Ready(Some(Err(status))) => {
                *held = Some(Err(status));
                break;
            }
            Poll::Ready(None) if batch.is_empty() => return Poll::Ready(None),
            Poll::Pending if batch.is_empty() => return Poll::Pending,
            Poll::Ready(None) | Poll::Pending => break,
        };
        let size = in_batch_len(&result);
        if !batch.is_empty() && bytes + size > BATCH_BYTES {
            *held = Some(Ok(result));
            break;
        }
        bytes += size;
        batch.push(result);
    }
    Poll::Ready(Some(Ok(pb::ResultBatch { results: batch })))
}

/// An item's size inside a batch message (each batch's items are its
/// field 1): its encoding plus the field's key and length, so that the
/// batch's own size is the sum.
fn in_batch_len(item: &impl prost::Message) -> usize {
    prost::encoding::message::encoded_len(1, item)
}

pub fn item_error(status: &Status) -> pb::ItemError {
    pb::ItemError {
        code: status.code() as i32,
        message: status.message().to_string(),
    }
}

fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down: reconnect and go on")
}

/// Runs the task that serves one open stream. A panic in it ends the
/// stream with INTERNAL (through `report`, a second sender of the stream)
/// instead of a silent end that a client would read as OK; what the stream
/// held goes back as its values are dropped.
fn spawn_stream<T: Send + 'static>(
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

/// PutTasks: every task validated and stored on its own, under one lock.
pub fn put_tasks(
    broker: &Broker,
    access: &Access,
    request: pb::PutTasksRequest,
    max_batch: usize,
) -> Result<pb::PutTasksResponse, Status> {
    if request.tasks.len() > max_batch {
        return Err(Status::invalid_argument(format!(
            "{} tasks in one PutTasks; the limit is {max_batch} (server flag --max-batch): split the batch",
            request.tasks.len()
        )));
    }
    // Tasks that fail conversion keep their place with their error.
    let mut slots = Vec::with_capacity(request.tasks.len());
    let mut valid = Vec::with_capacity(request.tasks.len());
    let mut last_queue = None;
    for task in request.tasks {
        let task = convert::new_task_in_batch(task, &mut last_queue)
            .and_then(|task| service::permit_new_task(access, &task).map(|()| task));
        match task {
            Ok(task) => {
                slots.push(None);
                valid.push(task);
            }
            Err(status) => slots.push(Some(status)),
        }
    }
    let mut stored = broker.put_many(valid).into_iter();
    let outcomes = slots
        .into_iter()
        .map(|slot| {
            let result = match slot {
                Some(status) => Err(status),
                None => stored
                    .next()
                    .expect("one outcome per valid task")
                    .map_err(Status::from),
            };
            pb::PutTaskOutcome {
                outcome: Some(match result {
                    Ok(put) => pb::put_task_outcome::Outcome::Ok(pb::PutTaskResponse {
                        task_id: put.task_id.to_text(),
                        duplicate: put.duplicate,
                    }),
                    Err(status) => pb::put_task_outcome::Outcome::Error(item_error(&status)),
                }),
            }
        })
        .collect();
    Ok(pb::PutTasksResponse { outcomes })
}

/// StreamTasks: reads the subscribe message, opens the broker stream, and
/// serves it from a task of its own until either side ends it.
pub async fn stream_tasks(
    broker: &Broker,
    access: Access,
    mut inbound: Streaming<pb::WorkerMessage>,
    default_worker: impl FnOnce() -> String,
) -> Result<ServerMessages, Status> {
    let first = tokio::time::timeout(SUBSCRIBE_WAIT, inbound.message())
        .await
        .map_err(|_| {
            Status::invalid_argument("no subscribe message within 30s of opening the stream")
        })??
        .ok_or_else(|| Status::invalid_argument("the stream ended before its subscribe message"))?;
    let Some(In::Subscribe(subscribe)) = first.msg else {
        return Err(Status::invalid_argument(
            "the first message of StreamTasks must be subscribe",
        ));
    };
    if subscribe.max_in_flight > MAX_IN_FLIGHT {
        return Err(Status::invalid_argument(format!(
            "max_in_flight is {}; the limit is {MAX_IN_FLIGHT}",
            subscribe.max_in_flight
        )));
    }
    if subscribe.max_batch > MAX_IN_FLIGHT {
        return Err(Status::invalid_argument(format!(
            "max_batch is {}; the limit is {MAX_IN_FLIGHT}",
            subscribe.max_batch
        )));
    }
    let worker = if subscribe.worker_id.is_empty() {
        default_worker()
    } else {
        subscribe.worker_id
    };
    let request = LeaseRequest {
        queue: convert::queue(&subscribe.queue)?,
        worker: WorkerId::new(&worker)?,
        lease: convert::duration("lease", subscribe.lease)?,
    };
    access.permit_queue(&request.queue)?;
    let subscription = broker.subscribe(request, subscribe.max_in_flight)?;
    let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
    let report = tx.clone();
    spawn_stream(
        "StreamTasks",
        report,
        serve_inbound(broker.clone(), access, subscription.control(), inbound, tx),
    );
    Ok(ServerMessages {
        subscription,
        replies: rx,
        max_batch: subscribe.max_batch as usize,
    })
}

/// A worker stream's outbound side: the acks and the final status from the
/// task that reads the worker's messages, and the tasks leased to the
/// stream, handed straight from the broker to the transport (no task or
/// channel in between: bench/README.md). It owns the [`Subscription`], so
/// when the transport drops it (the worker left) or it ends, what the
/// stream holds goes back to its queue at once.
pub struct ServerMessages {
    subscription: Subscription,
    replies: mpsc::Receiver<Result<pb::ServerMessage, Status>>,
    /// Tasks per message at most; 0 or 1 sends each in a `task` message.
    max_batch: usize,
}

impl ServerMessages {
    /// The tasks ready now, up to `max_batch` and [`BATCH_BYTES`]; waits
    /// only while there is none. A task that would not fit is put back in
    /// the subscription before it is converted: it leads the next batch,
    /// its lease checked again, or goes back undelivered if the stream
    /// ends first.
    fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Option<pb::TaskBatch>> {
        let mut tasks = Vec::with_capacity(self.subscription.ready().clamp(1, self.max_batch));
        let mut bytes = 0;
        let mut now = None;
        while tasks.len() < self.max_batch {
            let task = match self.subscription.poll_next_task_at(cx, &mut now) {
                Poll::Ready(Some(task)) => task,
                // Nothing to send: wait (the poll registered the wake-up),
                // or end.
                Poll::Ready(None) if tasks.is_empty() => return Poll::Ready(None),
                Poll::Pending if tasks.is_empty() => return Poll::Pending,
                Poll::Ready(None) | Poll::Pending => break,
            };
            // Bounds, not encoded sizes, are added up: the batch stays under
            // its limit without encoding each task once more to measure it.
            let size = convert::task_len_bound(&task);
            if !tasks.is_empty() && bytes + size > BATCH_BYTES {
                self.subscription.put_back(task);
                break;
            }
            bytes += size;
            tasks.push(convert::task(task));
        }
        Poll::Ready(Some(pb::TaskBatch { tasks }))
    }
}

impl Stream for ServerMessages {
    type Item = Result<pb::ServerMessage, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.replies.poll_recv(cx) {
            Poll::Ready(Some(reply)) => return Poll::Ready(Some(reply)),
            // The reading task ended (the worker closed its side, or the
            // stream broke or was refused): so does this side.
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        if this.max_batch > 1 {
            return this.poll_batch(cx).map(|batch| {
                batch.map(|batch| {
                    Ok(pb::ServerMessage {
                        msg: Some(Out::Tasks(batch)),
                    })
                })
            });
        }
        this.subscription.poll_next_task(cx).map(|task| {
            task.map(|task| {
                Ok(pb::ServerMessage {
                    msg: Some(Out::Task(convert::task(task))),
                })
            })
        })
    }
}

/// Reads a worker's messages: results and extensions answered with acks,
/// window changes, and the drain.
async fn serve_inbound(
    broker: Broker,
    access: Access,
    control: SubscriptionControl,
    mut inbound: Streaming<pb::WorkerMessage>,
    tx: mpsc::Sender<Result<pb::ServerMessage, Status>>,
) {
    let closed = broker.closed();
    tokio::pin!(closed);
    let mut draining = false;
    loop {
        if draining && control.outstanding() == 0 {
            // Everything this stream held is reported: let the worker go and
            // reconnect elsewhere.
            let _ = tx.send(Err(shutting_down())).await;
            break;
        }
        tokio::select! {
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(message)) => message,
                    // The worker closed its side, or the stream broke.
                    Ok(None) | Err(_) => break,
                };
                match handle(&broker, &access, &control, message, draining) {
                    Ok(Some(reply)) => {
                        if tx.send(Ok(reply)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
            }
            () = &mut closed, if !draining => {
                // Draining: no new tasks; results still go in.
                draining = true;
                control.set_window(0);
            }
            // The outbound side is gone: the worker left.
            () = tx.closed() => break,
            // Tasks can leave a draining stream without a message on it (a
            // lease expiring, a result by PutResult): look again now and then.
            () = tokio::time::sleep(DRAIN_CHECK), if draining => {}
        }
    }
    // Dropping `tx` ends the outbound side, which drops the subscription:
    // what the stream still holds goes back to its queue at once.
}

/// One message from a worker: a result or an extension answered with its
/// ack, or a new window.
fn handle(
    broker: &Broker,
    access: &Access,
    subscription: &SubscriptionControl,
    message: pb::WorkerMessage,
    draining: bool,
) -> Result<Option<pb::ServerMessage>, Status> {
    match message.msg {
        Some(In::Result(request)) => Ok(Some(pb::ServerMessage {
            msg: Some(Out::ResultAck(put_result(broker, access, request))),
        })),
        Some(In::Results(batch)) => Ok(Some(pb::ServerMessage {
            msg: Some(Out::ResultAcks(put_results(broker, access, batch.results))),
        })),
        Some(In::Extend(request)) => {
            let task_id = request.task_id.clone();
            let lease_id = request.lease_id.clone();
            let answer = service::extend_lease(broker, access, request);
            let ack = match answer {
                Ok(at) => pb::ExtendAck {
                    task_id,
                    lease_expires_at: Some(convert::timestamp(at)),
                    error: None,
                    lease_id,
                },
                Err(status) => pb::ExtendAck {
                    task_id,
                    lease_expires_at: None,
                    error: Some(item_error(&status)),
                    lease_id,
                },
            };
            Ok(Some(pb::ServerMessage {
                msg: Some(Out::ExtendAck(ack)),
            }))
        }
        Some(In::Window(window)) => {
            if window.max_in_flight > MAX_IN_FLIGHT {
                return Err(Status::invalid_argument(format!(
                    "max_in_flight is {}; the limit is {MAX_IN_FLIGHT}",
                    window.max_in_flight
                )));
            }
            // While draining the window stays shut, whatever the worker asks.
            if !draining {
                subscription.set_window(window.max_in_flight);
            }
            Ok(None)
        }
        Some(In::Subscribe(_)) => Err(Status::invalid_argument(
            "subscribe may only be the first message of a stream",
        )),
        None => Err(Status::invalid_argument(
            "a WorkerMessage must set one of subscribe, result, results, extend or window",
        )),
    }
}

/// One result from a stream, as PutResult, answered by its ack.
fn put_result(broker: &Broker, access: &Access, request: pb::PutResultRequest) -> pb::ResultAck {
    let pb::PutResultRequest {
        task_id,
        lease_id,
        outcome,
    } = request;
    let answer = service::result_request(broker, access, &task_id, &lease_id, outcome)
        .and_then(|(lease, outcome)| Ok(broker.complete(lease, outcome)?));
    result_ack(task_id, lease_id, answer)
}

/// A `results` batch: each result checked and converted on its own, the
/// valid ones completed [`COMPLETE_CHUNK`] per hold of the lock (a worker
/// may send as many as fit its message, and other calls should not wait
/// for all), one ack per result in order.
fn put_results(
    broker: &Broker,
    access: &Access,
    requests: Vec<pb::PutResultRequest>,
) -> pb::ResultAckBatch {
    let mut named = Vec::with_capacity(requests.len());
    let mut valid = Vec::with_capacity(requests.len());
    for request in requests {
        let pb::PutResultRequest {
            task_id,
            lease_id,
            outcome,
        } = request;
        let refused = match service::result_request(broker, access, &task_id, &lease_id, outcome) {
            Ok(result) => {
                valid.push(result);
                None
            }
            Err(status) => Some(status),
        };
        named.push((task_id, lease_id, refused));
    }
    let mut answers = Vec::with_capacity(valid.len());
    let mut valid = valid.into_iter();
    loop {
        let chunk: Vec<_> = valid.by_ref().take(COMPLETE_CHUNK).collect();
        if chunk.is_empty() {
            break;
        }
        answers.extend(broker.complete_many(chunk));
    }
    let mut answers = answers.into_iter();
    let acks = named
        .into_iter()
        .map(|(task_id, lease_id, refused)| {
            let answer = match refused {
                Some(status) => Err(status),
                None => answers
                    .next()
                    .expect("one answer per valid result")
                    .map_err(Status::from),
            };
            result_ack(task_id, lease_id, answer)
        })
        .collect();
    pb::ResultAckBatch { acks }
}

fn result_ack(
    task_id: String,
    lease_id: String,
    answer: Result<crate::broker::TaskState, Status>,
) -> pb::ResultAck {
    let (state, error) = match answer {
        Ok(state) => (convert::state(state), None),
        Err(status) => (pb::TaskState::Unspecified, Some(item_error(&status))),
    };
    pb::ResultAck {
        task_id,
        state: state.into(),
        error,
        lease_id,
    }
}

/// WatchResults: the queue's results as they finish, or the listed tasks'
/// results as each exists.
pub fn watch_results(
    broker: &Broker,
    access: &Access,
    request: pb::WatchResultsRequest,
    max_batch: usize,
) -> Result<Results, Status> {
    use pb::watch_results_request::Target;
    match request.target {
        Some(Target::Queue(queue)) => {
            let queue = convert::queue(&queue)?;
            access.permit_queue(&queue)?;
            let results = broker.read_results(&queue)?;
            Ok(Results::Queue {
                results,
                ended: false,
            })
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
                service::permit_task(broker, access, *id)?;
            }
            // Every id is checked before anything is sent.
            let watch = broker.watch(&ids)?;
            let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
            spawn_stream(
                "WatchResults",
                tx.clone(),
                watch_tasks(broker.clone(), watch, ids.len(), tx),
            );
            Ok(Results::Tasks(ReceiverStream::new(rx)))
        }
        None => Err(Status::invalid_argument(
            "set a target: queue (its results as they finish) or task_ids",
        )),
    }
}

async fn watch_tasks(
    broker: Broker,
    mut results: crate::broker::Watch,
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

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::{convert, in_batch_len, pb};
    use crate::broker::{LeaseId, LeasedTask, QueueName, TaskId, TaskResult, TaskState, WorkerId};

    /// The 1 MiB bound of a batch holds only if the items' sizes add up to
    /// the batch's size, field keys and lengths included.
    #[test]
    fn batch_sizes_add_up() {
        let tasks: Vec<_> = [0, 1, 127, 128, 70_000]
            .iter()
            .map(|&n| pb::Task {
                id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
                payload: vec![b'x'; n].into(),
                attempt: 1,
                ..Default::default()
            })
            .collect();
        let sum: usize = tasks.iter().map(in_batch_len).sum();
        assert_eq!(sum, pb::TaskBatch { tasks }.encoded_len());
        let results: Vec<_> = [0, 300, 20_000]
            .iter()
            .map(|&n| pb::Result {
                task_id: "t".into(),
                output: vec![b'y'; n].into(),
                ..Default::default()
            })
            .collect();
        let sum: usize = results.iter().map(in_batch_len).sum();
        assert_eq!(sum, pb::ResultBatch { results }.encoded_len());
    }

    /// A batch checks the bound before converting: it must never be below
    /// the size the conversion gives, whatever the fields hold.
    #[test]
    fn size_bounds_cover_the_converted_size() {
        let id = TaskId::parse("01890a5d-ac96-774b-bcce-b302099a8057").unwrap();
        // The largest varints: a far future, the most nanoseconds, the
        // most attempts and lease numbers.
        let late = std::time::UNIX_EPOCH + std::time::Duration::new(1 << 40, 999_999_999);
        let queue = QueueName::parse(&"q".repeat(128)).unwrap();
        for (payload, headers) in [(0, 0), (1, 1), (300, 3), (70_000, 20)] {
            let task = LeasedTask {
                id,
                queue: queue.clone(),
                payload: vec![0; payload].into(),
                headers: (0..headers)
                    .map(|i| (format!("header-{i}"), "v".repeat(200)))
                    .collect(),
                attempt: u32::MAX,
                max_attempts: u32::MAX,
                lease_id: LeaseId {
                    task: id,
                    seq: u32::MAX,
                },
                lease_expires_at: late,
                lease_deadline: tokio::time::Instant::now(),
                created_at: late,
                expires_at: Some(late),
            };
            let bound = convert::task_len_bound(&task);
            assert!(in_batch_len(&convert::task(task)) <= bound);
        }
        for (output, error) in [(0, 0), (1, 0), (0, 500), (70_000, 70_000)] {
            let result = TaskResult {
                task_id: id,
                queue: queue.clone(),
                state: TaskState::Failed,
                output: vec![0; output].into(),
                error: "e".repeat(error),
                attempts: u32::MAX,
                worker: Some(WorkerId::new(&"w".repeat(WorkerId::MAX_LEN)).unwrap()),
                created_at: late,
                finished_at: late,
            };
            let bound = convert::result_len_bound(&result);
            assert!(in_batch_len(&convert::result(result)) <= bound);
        }
    }
}
