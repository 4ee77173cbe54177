//! StreamTasks: a worker's stream. The subscribe message opens a worker
//! stream in the broker; a task per open stream reads the worker's
//! messages (results, extensions, window changes), while the response
//! stream itself polls the broker for deliveries and owns the
//! [`WorkerStream`], so that whatever ends the stream gives back what it
//! held.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use super::access::worker_id;
use super::batch::{BatchSource, in_place, poll_batch};
use super::outbound::{OUTBOUND_BUFFER, shutting_down, spawn_stream};
use super::{convert, tasks};
use crate::auth::Access;
use crate::broker::{LeaseRequest, LeasedTask, TaskState};
use crate::pb::{self, server_message::Msg as Out, worker_message::Msg as In};
use crate::store::{Store, TaskDeliveries, WindowControl};

/// Largest window (and batch) a worker stream may ask for.
pub const MAX_IN_FLIGHT: u32 = 10_000;
/// How long a new stream may take to send its subscribe message.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(30);
/// How often a draining stream checks whether it still holds tasks.
const DRAIN_CHECK: Duration = Duration::from_millis(50);
/// Results of one `results` message completed per hold of the broker's
/// lock.
const COMPLETE_CHUNK: usize = 256;

/// StreamTasks: reads the subscribe message, opens the worker stream, and
/// serves the worker's messages from a task of its own until either side
/// ends it.
pub(super) async fn stream_tasks<S: Store>(
    broker: &S,
    access: Access,
    mut inbound: Streaming<pb::WorkerMessage>,
    peer: Option<std::net::SocketAddr>,
) -> Result<ServerMessages<S::WorkerStream>, Status> {
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
    check_window("max_in_flight", subscribe.max_in_flight)?;
    check_window("max_batch", subscribe.max_batch)?;
    let request = LeaseRequest {
        queue: convert::queue(&subscribe.queue)?,
        worker: worker_id(subscribe.worker_id, peer)?,
        lease_duration: convert::duration("lease", subscribe.lease)?,
    };
    access.permit_queue(&request.queue)?;
    let stream = broker
        .open_worker_stream(request, subscribe.max_in_flight)
        .await?;
    let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
    let report = tx.clone();
    spawn_stream(
        "StreamTasks",
        report,
        serve_inbound(broker.clone(), access, stream.control(), inbound, tx),
    );
    Ok(ServerMessages {
        stream,
        replies: rx,
        max_batch: subscribe.max_batch as usize,
    })
}

/// A window (or batch size) within [`MAX_IN_FLIGHT`].
fn check_window(field: &str, value: u32) -> Result<(), Status> {
    if value > MAX_IN_FLIGHT {
        return Err(Status::invalid_argument(format!(
            "{field} is {value}; the limit is {MAX_IN_FLIGHT}"
        )));
    }
    Ok(())
}

/// A worker stream's outbound side: the acks and the final status from the
/// task that reads the worker's messages, and the tasks leased to the
/// stream, handed straight from the broker to the transport (no task or
/// channel in between: bench/README.md). It owns the [`WorkerStream`], so
/// when the transport drops it (the worker left) or it ends, what the
/// stream holds goes back to its queue at once.
pub struct ServerMessages<W> {
    stream: W,
    replies: mpsc::Receiver<Result<pb::ServerMessage, Status>>,
    /// Tasks per message at most; 0 or 1 sends each in a `task` message.
    max_batch: usize,
}

/// The tasks delivered to a worker stream, as a batch's source. One clock
/// reading serves the whole batch.
struct Deliveries<'a, W> {
    stream: &'a mut W,
    now: Option<Instant>,
}

impl<W: TaskDeliveries> BatchSource for Deliveries<'_, W> {
    type Item = LeasedTask;
    type Wire = pb::Task;

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<LeasedTask, Status>>> {
        self.stream
            .poll_next_task_at(cx, &mut self.now)
            .map(|task| task.map(Ok))
    }

    fn put_back(&mut self, task: LeasedTask) {
        self.stream.put_back(task);
    }

    fn hold(&mut self, _: Status) {
        // Deliveries carry no errors: the stream's statuses come on
        // `replies`.
    }

    fn ready(&self) -> usize {
        self.stream.ready()
    }

    fn bound(task: &LeasedTask) -> usize {
        convert::task_len_bound(task)
    }

    fn convert(task: LeasedTask) -> pb::Task {
        convert::task(task)
    }
}

impl<W: TaskDeliveries> Stream for ServerMessages<W> {
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
        let tasks = if this.max_batch > 1 {
            let mut deliveries = Deliveries {
                stream: &mut this.stream,
                now: None,
            };
            poll_batch(&mut deliveries, this.max_batch, cx).map(|batch| {
                batch.map(|tasks| {
                    tasks.map(|tasks| pb::ServerMessage {
                        msg: Some(Out::Tasks(pb::TaskBatch { tasks })),
                    })
                })
            })
        } else {
            this.stream.poll_next_task(cx).map(|task| {
                task.map(|task| {
                    Ok(pb::ServerMessage {
                        msg: Some(Out::Task(convert::task(task))),
                    })
                })
            })
        };
        if tasks.is_ready() {
            return tasks;
        }
        // Cancels after tasks: a task cancelled while it waited to be sent
        // reaches the worker before its cancel.
        match this.stream.poll_cancelled(cx) {
            Poll::Ready(Some(lease)) => Poll::Ready(Some(Ok(pb::ServerMessage {
                msg: Some(Out::Cancel(pb::TaskCancelled {
                    task_id: lease.task.to_string(),
                    lease_id: lease.to_string(),
                })),
            }))),
            _ => Poll::Pending,
        }
    }
}

/// Reads a worker's messages: results and extensions answered with acks,
/// window changes, and the drain.
async fn serve_inbound<S: Store>(
    broker: S,
    access: Access,
    control: <S::WorkerStream as TaskDeliveries>::Control,
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
                match handle(&broker, &access, &control, message, draining).await {
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
    // What the stream still holds goes back to its queue before the worker
    // sees its end (the memory store does it when the stream is dropped).
    control.give_back().await;
    // Dropping `tx` ends the outbound side, which drops the worker stream:
    // what it still holds goes back to its queue at once.
}

/// One message from a worker: a result or an extension answered with its
/// ack, or a new window.
async fn handle<S: Store>(
    broker: &S,
    access: &Access,
    control: &impl WindowControl,
    message: pb::WorkerMessage,
    draining: bool,
) -> Result<Option<pb::ServerMessage>, Status> {
    let reply = match message.msg {
        Some(In::Result(request)) => Out::ResultAck(put_result(broker, access, request).await),
        Some(In::Results(batch)) => {
            Out::ResultAcks(put_results(broker, access, batch.results).await)
        }
        Some(In::Extend(request)) => {
            let task_id = request.task_id.clone();
            let lease_id = request.lease_id.clone();
            let (lease_expires_at, error) = match tasks::extend_lease(broker, access, request).await
            {
                Ok(at) => (Some(convert::timestamp(at)), None),
                Err(status) => (None, Some(convert::item_error(&status))),
            };
            Out::ExtendAck(pb::ExtendAck {
                task_id,
                lease_expires_at,
                error,
                lease_id,
            })
        }
        Some(In::Window(window)) => {
            check_window("max_in_flight", window.max_in_flight)?;
            // While draining the window stays shut, whatever the worker asks.
            if !draining {
                control.set_window(window.max_in_flight);
            }
            return Ok(None);
        }
        Some(In::Subscribe(_)) => {
            return Err(Status::invalid_argument(
                "subscribe may only be the first message of a stream",
            ));
        }
        None => {
            return Err(Status::invalid_argument(
                "a WorkerMessage must set one of subscribe, result, results, extend or window",
            ));
        }
    };
    Ok(Some(pb::ServerMessage { msg: Some(reply) }))
}

/// One result from a stream, as PutResult, answered by its ack.
async fn put_result<S: Store>(
    broker: &S,
    access: &Access,
    request: pb::PutResultRequest,
) -> pb::ResultAck {
    let pb::PutResultRequest {
        task_id,
        lease_id,
        outcome,
    } = request;
    let answer = match tasks::result_request(broker, access, &task_id, &lease_id, outcome).await {
        Ok((lease_id, outcome)) => broker.complete(lease_id, outcome).await.map_err(Into::into),
        Err(status) => Err(status),
    };
    result_ack(task_id, lease_id, answer)
}

/// A `results` batch: each result checked and converted on its own, the
/// valid ones completed [`COMPLETE_CHUNK`] per hold of the lock (a worker
/// may send as many as fit its message, and other calls should not wait
/// for all), one ack per result in order.
async fn put_results<S: Store>(
    broker: &S,
    access: &Access,
    requests: Vec<pb::PutResultRequest>,
) -> pb::ResultAckBatch {
    let mut names = Vec::with_capacity(requests.len());
    let mut refused = Vec::with_capacity(requests.len());
    let mut valid = Vec::with_capacity(requests.len());
    for request in requests {
        let pb::PutResultRequest {
            task_id,
            lease_id,
            outcome,
        } = request;
        let checked = if access.limits_queues() {
            tasks::result_request(broker, access, &task_id, &lease_id, outcome).await
        } else {
            tasks::result_request_unlimited(&task_id, &lease_id, outcome)
        };
        refused.push(match checked {
            Ok(result) => {
                valid.push(result);
                None
            }
            Err(status) => Some(status),
        });
        names.push((task_id, lease_id));
    }
    let mut answers = Vec::with_capacity(valid.len());
    let mut valid = valid.into_iter();
    loop {
        let chunk: Vec<_> = valid.by_ref().take(COMPLETE_CHUNK).collect();
        if chunk.is_empty() {
            break;
        }
        answers.extend(broker.complete_many(chunk).await);
    }
    let acks = names
        .into_iter()
        .zip(in_place(refused, answers))
        .map(|((task_id, lease_id), answer)| result_ack(task_id, lease_id, answer))
        .collect();
    pb::ResultAckBatch { acks }
}

fn result_ack(
    task_id: String,
    lease_id: String,
    answer: Result<TaskState, Status>,
) -> pb::ResultAck {
    let (state, error) = match answer {
        Ok(state) => (convert::state(state), None),
        Err(status) => (
            pb::TaskState::Unspecified,
            Some(convert::item_error(&status)),
        ),
    };
    pb::ResultAck {
        task_id,
        state: state.into(),
        error,
        lease_id,
    }
}
