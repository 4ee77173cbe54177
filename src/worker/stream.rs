//! The worker runtime over one StreamTasks stream: the server pushes tasks
//! while fewer than `concurrency` are out, results and lease extensions go
//! back on the same stream. A broken stream is reopened with backoff; the
//! server has already given back the tasks it held.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tonic::Code;

use crate::client::{ClientError, StatusClass, WorkerSender};
use crate::pb::{self, server_message::Msg as Out, worker_message::Msg as In};
use crate::worker::backoff::Reconnect;
use crate::worker::handler::{
    Handler, HandlerResult, TaskFailure, catch_panics, outcome_of, poll_catching,
};
use crate::worker::lease::{self, Extension};
use crate::worker::report::{Ran, WorkerReport};
use crate::worker::settings::Settings;

/// How one stream ended.
enum StreamEnd {
    /// Shutdown asked for and the drain is done.
    Shutdown,
    /// The stream broke or the server ended it; open another.
    Broken(String),
    /// The server refused the worker for good.
    Refused(ClientError),
}

/// Runs the stream loop until `shutdown` resolves; the error is the
/// server's refusal of the worker.
pub(crate) async fn run(
    ctx: Settings,
    handler: impl Handler,
    shutdown: impl Future<Output = ()>,
) -> Result<WorkerReport, ClientError> {
    tokio::pin!(shutdown);
    let mut report = WorkerReport::default();
    let mut reconnect = Reconnect::default();
    loop {
        let subscribe = pb::Subscribe {
            queue: ctx.queue.clone(),
            worker_id: ctx.worker_id.clone(),
            lease: prost_types::Duration::try_from(ctx.lease).ok(),
            max_in_flight: u32::try_from(ctx.concurrency).unwrap_or(u32::MAX),
            max_batch: u32::try_from(ctx.max_batch.min(ctx.concurrency)).unwrap_or(1),
        };
        let opened = tokio::select! {
            biased;
            () = &mut shutdown => return Ok(report),
            opened = ctx.client.stream_tasks(subscribe) => opened,
        };
        let end = match opened {
            Ok((tx, inbound)) => {
                reconnect.reached();
                serve(&ctx, &handler, tx, inbound, shutdown.as_mut(), &mut report).await
            }
            Err(error) if error.is_transient() => StreamEnd::Broken(error.to_string()),
            Err(error) => StreamEnd::Refused(error),
        };
        match end {
            StreamEnd::Shutdown => return Ok(report),
            StreamEnd::Refused(error) => {
                tracing::error!(%error, "the server refused the worker; stopping");
                return Err(error);
            }
            StreamEnd::Broken(error) => {
                let delay = reconnect.failed(&error);
                tokio::select! {
                    () = &mut shutdown => return Ok(report),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Largest `results` message the worker sends, unless it holds one result
/// (the contract: StreamTasks, point 6).
const RESULT_BATCH_BYTES: usize = 1 << 20;

/// Serves one open stream until it breaks or the shutdown drain is done.
async fn serve(
    ctx: &Settings,
    handler: &impl Handler,
    tx: WorkerSender,
    mut inbound: tonic::Streaming<pb::ServerMessage>,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    report: &mut WorkerReport,
) -> StreamEnd {
    let mut running = Running::default();
    let mut outbox = Outbox::default();
    let mut grace_ends: Option<Instant> = None;
    loop {
        if grace_ends.is_some() && running.set.is_empty() {
            break;
        }
        tokio::select! {
            () = &mut shutdown, if grace_ends.is_none() => {
                tracing::info!(running = running.set.len(), grace = ?ctx.shutdown_grace, "stopping: letting running tasks finish");
                grace_ends = Some(Instant::now() + ctx.shutdown_grace);
                // No new tasks; results still go in.
                tx.send(In::Window(pb::SetMaxInFlight { max_in_flight: 0 }));
            }
            message = inbound.message() => match message {
                Ok(Some(pb::ServerMessage { msg: Some(msg) })) => match msg {
                    Out::Task(task) => {
                        report.received(1);
                        start(handler, task, ctx.lease, &tx, &mut running, &mut outbox).await;
                    }
                    Out::Tasks(batch) => {
                        // A server that sends batches takes them.
                        outbox.batches = true;
                        report.received(batch.tasks.len());
                        for task in batch.tasks {
                            start(handler, task, ctx.lease, &tx, &mut running, &mut outbox).await;
                        }
                    }
                    Out::ResultAck(ack) => outbox.acknowledged(ack, report),
                    Out::ResultAcks(batch) => {
                        for ack in batch.acks {
                            outbox.acknowledged(ack, report);
                        }
                    }
                    Out::Cancel(cancel) => {
                        // Someone took the task back: its result would be
                        // refused, so its handler (and an exec'd program)
                        // stops now.
                        if let Some(handle) = running.handles.remove(&cancel.lease_id) {
                            handle.abort();
                            report.count(Ran::Abandoned);
                            tracing::info!(task_id = %cancel.task_id, "task cancelled; its handler is stopped");
                        }
                    }
                    Out::ExtendAck(ack) => {
                        if let Some(error) = ack.error {
                            // The lease is gone: another worker has the task.
                            if let Some(handle) = running.handles.remove(&ack.lease_id) {
                                handle.abort();
                                report.count(Ran::Abandoned);
                                tracing::warn!(task_id = %ack.task_id, error = %error.message, "lease lost; dropping the task");
                            }
                        }
                    }
                },
                Ok(Some(_)) => {}
                Ok(None) => return end(grace_ends.is_some(), "the server closed the stream".into()),
                Err(status) if StatusClass::of(status.code()) == StatusClass::Refused => {
                    return StreamEnd::Refused(status.into());
                }
                Err(status) => return end(grace_ends.is_some(), ClientError::from(status).to_string()),
            },
            Some(done) = running.set.join_next_with_id(), if !running.set.is_empty() => {
                running.finished(done, &mut outbox);
                // Others done by now go back in the same message.
                while let Some(done) = running.set.try_join_next_with_id() {
                    running.finished(done, &mut outbox);
                }
            }
            () = sleep_until(grace_ends), if grace_ends.is_some() => {
                tracing::warn!(running = running.set.len(), "grace period over; the server takes back unfinished tasks");
                report.interrupted += running.set.len() as u64;
                running.set.abort_all();
                break;
            }
        }
        if !outbox.flush(&tx) {
            return end(grace_ends.is_some(), "the stream closed".into());
        }
    }
    // Closing our side ends the stream: the server acknowledges what it
    // has, gives back anything unfinished, and closes its side. (The
    // running handlers hold clones of the sender; they are gone by now.)
    drop(running);
    drop(tx);
    let acks = async {
        while let Ok(Some(message)) = inbound.message().await {
            match message.msg {
                Some(Out::ResultAck(ack)) => report.count(Ran::acknowledged(&ack)),
                Some(Out::ResultAcks(batch)) => {
                    for ack in &batch.acks {
                        report.count(Ran::acknowledged(ack));
                    }
                }
                _ => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), acks).await;
    StreamEnd::Shutdown
}

/// Starts a task's handler. A quick handler is done at its first poll: its
/// result goes in the outbox at once, without a task (and two wake-ups) of
/// its own, nor a lease keeper. Only a handler still running after its
/// first poll is moved, as it is, to a task of its own with its lease
/// keeper. (A handler that computes for long without awaiting holds the
/// stream up here; such work belongs in spawn_blocking, as anywhere on
/// tokio.)
async fn start(
    handler: &impl Handler,
    task: pb::Task,
    lease: Duration,
    tx: &WorkerSender,
    running: &mut Running,
    outbox: &mut Outbox,
) {
    let ids = Ids {
        task_id: task.id.clone(),
        lease_id: task.lease_id.clone(),
    };
    let expires = task.lease_expires_at;
    let mut work = Box::pin(handler.call(task));
    let first =
        std::future::poll_fn(|cx| Poll::Ready(poll_catching(&ids.task_id, work.as_mut(), cx)))
            .await;
    match first {
        Poll::Ready(result) => outbox.push(ids, result),
        Poll::Pending => {
            let run = keep_leased(work, ids.clone(), expires, tx.clone(), lease);
            let lease = ids.lease_id.clone();
            let handle = running.set.spawn(run);
            running.tasks_by_runner.insert(handle.id(), ids);
            running.handles.insert(lease, handle);
        }
    }
}

/// The handlers running on their own tasks.
#[derive(Default)]
struct Running {
    set: JoinSet<HandlerResult>,
    /// Each running task by lease id (one task may come twice, under two
    /// leases), to stop it when that lease is lost.
    handles: HashMap<String, AbortHandle>,
    tasks_by_runner: HashMap<tokio::task::Id, Ids>,
}

impl Running {
    /// A handler's task ended: its result goes in the outbox.
    fn finished(
        &mut self,
        done: Result<(tokio::task::Id, HandlerResult), tokio::task::JoinError>,
        outbox: &mut Outbox,
    ) {
        let (ids, result) = match done {
            Ok((runner, result)) => {
                let Some(ids) = self.tasks_by_runner.remove(&runner) else {
                    return;
                };
                (ids, result)
            }
            Err(error) if error.is_cancelled() => {
                self.tasks_by_runner.remove(&error.id());
                return;
            }
            Err(error) => {
                tracing::error!(%error, "a task handler panicked");
                let Some(ids) = self.tasks_by_runner.remove(&error.id()) else {
                    return;
                };
                (ids, Err(TaskFailure::panicked()))
            }
        };
        self.handles.remove(&ids.lease_id);
        outbox.push(ids, result);
    }
}

/// What the loop keeps of a task while its handler runs: enough to report.
#[derive(Clone)]
struct Ids {
    task_id: String,
    lease_id: String,
}

/// Results gathered while one event is handled, sent together after it:
/// the results of a batch of tasks go back in one message.
#[derive(Default)]
struct Outbox {
    results: Vec<pb::PutResultRequest>,
    /// Whether each result sent and not yet acknowledged was a success, in
    /// the order sent (the server acknowledges in that order): an output
    /// the server refuses is turned into the task's failure.
    unacked: VecDeque<bool>,
    /// The server sent a batch, so it takes `results` messages.
    batches: bool,
}

impl Outbox {
    fn push(&mut self, ids: Ids, result: HandlerResult) {
        self.unacked.push_back(result.is_ok());
        self.results.push(pb::PutResultRequest {
            task_id: ids.task_id,
            lease_id: ids.lease_id,
            outcome: Some(outcome_of(result)),
        });
    }

    /// A result's ack: counted, or, when the server refused a success's
    /// output itself (too large), the task's failure goes in instead of
    /// leaving it to run again.
    fn acknowledged(&mut self, ack: pb::ResultAck, report: &mut WorkerReport) {
        let success = self.unacked.pop_front().unwrap_or(false);
        let refused_output = ack
            .error
            .as_ref()
            .is_some_and(|e| e.code == Code::InvalidArgument as i32);
        if success && refused_output {
            let why = ack.error.as_ref().map_or("", |e| e.message.as_str());
            let failure = TaskFailure::output_refused(why);
            self.push(
                Ids {
                    task_id: ack.task_id,
                    lease_id: ack.lease_id,
                },
                Err(failure),
            );
        } else {
            report.count(Ran::acknowledged(&ack));
        }
    }

    /// Sends what it holds: one `results` message per [`RESULT_BATCH_BYTES`]
    /// when the server takes batches, else one `result` each. False when
    /// the stream is gone.
    fn flush(&mut self, tx: &WorkerSender) -> bool {
        if self.results.is_empty() {
            return true;
        }
        if !self.batches {
            return self
                .results
                .drain(..)
                .all(|result| tx.send(In::Result(result)));
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        for result in self.results.drain(..) {
            // With its field key and length: the batch's size is the sum.
            let size = prost::encoding::message::encoded_len(1, &result);
            if !batch.is_empty() && bytes + size > RESULT_BATCH_BYTES {
                if !send_batch(tx, std::mem::take(&mut batch)) {
                    return false;
                }
                bytes = 0;
            }
            bytes += size;
            batch.push(result);
        }
        send_batch(tx, batch)
    }
}

/// One result as `result`, more as `results`.
fn send_batch(tx: &WorkerSender, mut results: Vec<pb::PutResultRequest>) -> bool {
    if results.len() == 1 {
        return results
            .pop()
            .is_some_and(|result| tx.send(In::Result(result)));
    }
    tx.send(In::Results(pb::PutResultBatch { results }))
}

fn end(draining: bool, why: String) -> StreamEnd {
    if draining {
        StreamEnd::Shutdown
    } else {
        StreamEnd::Broken(why)
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Goes on with a handler that did not finish at its first poll, while
/// extending its task's lease on the stream at a third of its length.
async fn keep_leased<Fut>(
    work: std::pin::Pin<Box<Fut>>,
    ids: Ids,
    expires: Option<prost_types::Timestamp>,
    tx: WorkerSender,
    lease: Duration,
) -> HandlerResult
where
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let granted = lease::granted(expires, lease);
    let Ids { task_id, lease_id } = &ids;
    // A lost lease comes back as an ExtendAck, which the stream loop
    // handles: on the stream, the keeper itself never sees it.
    let keep_alive = lease::keep(granted, || {
        let extend = pb::ExtendLeaseRequest {
            task_id: task_id.clone(),
            lease_id: lease_id.clone(),
            extend_by: prost_types::Duration::try_from(lease).ok(),
        };
        let sent = tx.send(In::Extend(extend));
        async move {
            if !sent {
                // The stream is gone; the server already took the task back.
                std::future::pending::<()>().await;
            }
            Extension::<Infallible>::Asked
        }
    });
    let work = catch_panics(task_id, work);
    tokio::select! {
        biased;
        result = work => result,
        never = keep_alive => match never {},
    }
}
