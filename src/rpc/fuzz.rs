//! The `requests` fuzz target's harness: raw bytes decoded as a sequence of
//! operations run through the real handlers of one [`TaskQueueService`]:
//! the unary calls, and the streams (StreamTasks, WatchResults and
//! WatchResultBatches, by queue and by task ids) opened, fed, polled and
//! dropped where the input says. The promises: no input panics; every
//! refusal, of a call, of a stream or of one item of a batch, is a status a
//! client can act on (never INTERNAL, UNKNOWN or OK); the broker's
//! bookkeeping holds after every operation; and once every stream is
//! dropped, no waiter is left registered. Compiled only for tests and the
//! `fuzzing` feature.
//!
//! Input format, repeated: one byte naming the operation (modulo 16), one
//! byte of length `n`, then `n` bytes of body:
//! - 0 to 6: PutTask, GetTask, ExtendLease, PutResult, GetResult,
//!   GetStats, PutTasks; the body is the request.
//! - 7, 8: WatchResults, WatchResultBatches, kept open; the request.
//! - 9: StreamTasks, kept open; the body is its first `WorkerMessage`.
//! - 10: a worker's message on an open StreamTasks: a byte picking the
//!   stream, then the message.
//! - 11: polls of an open stream: a byte picking it, a byte for how many.
//! - 12: an open stream dropped (the client left): a byte picking it.
//! - 13: a worker closes its side of a StreamTasks: a byte picking it.
//! - 14: StreamTasks without a first message: an even byte (or none), the
//!   worker closes its side at once; odd, it stays silent.
//! - 15: nothing; only time passes.
//!
//! After each operation the paused clock moves on `n` × 10 ms. Task and
//! lease ids in requests may name ones the harness was handed: `"@3"` as a
//! task id is the fourth task id seen (modulo those remembered); as a lease
//! id, the fourth lease seen, which also fills an empty task id.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codec::{Codec, EncodeBody};
use tonic::{Code, Request, Status, Streaming};

use super::TaskQueueService;
use super::results::{ResultBatches, Results};
use super::worker_stream::ServerMessages;
use crate::auth::Access;
use crate::broker::{Broker, BrokerConfig, ResultStream, WorkerStream};
use crate::codec::WireCodec;
use crate::pb::{
    self, server_message::Msg as Out, task_queue_server::TaskQueue, worker_message::Msg as In,
};

/// Streams held open at once at most; opening another drops the oldest.
const MAX_OPEN: usize = 8;
/// Task ids and leases remembered for references, the latest.
const MAX_KNOWN: usize = 64;
/// Polls of one stream in one operation at most.
const MAX_POLLS: usize = 16;
/// Yields allowed, once every stream is dropped, for the tasks that serve
/// them to notice and end.
const SETTLE_YIELDS: usize = 100;

/// Runs the operations `data` encodes; panics on a broken promise.
pub fn run(data: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        let broker = Broker::new(BrokerConfig {
            max_payload: 64,
            max_result: 64,
            queue_capacity: 8,
            max_queues: 4,
            ..BrokerConfig::default()
        });
        let mut harness = Harness {
            service: TaskQueueService::new(broker.clone(), Duration::ZERO).with_max_batch(4),
            broker,
            known: Known::default(),
            open: VecDeque::new(),
        };
        let mut rest = data;
        while let [op, len, tail @ ..] = rest {
            let (body, tail) = tail.split_at(usize::from(*len).min(tail.len()));
            rest = tail;
            harness.step(*op, body).await;
            harness.broker.check();
            // Let timers and the tasks serving streams run.
            tokio::time::sleep(Duration::from_millis(u64::from(*len) * 10)).await;
        }
        harness.finish().await;
    });
}

/// A refusal must say something a client can act on.
fn check_status(status: &Status, what: &str) {
    assert!(
        !matches!(status.code(), Code::Internal | Code::Unknown | Code::Ok),
        "{what} refused with {status:?}"
    );
}

/// The refusal of one item of a batch, as [`check_status`].
fn check_item(error: Option<&pb::ItemError>, what: &str) {
    if let Some(error) = error {
        check_status(
            &Status::new(Code::from_i32(error.code), &error.message),
            what,
        );
    }
}

fn request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Access::full());
    request
}

/// A worker's side of StreamTasks as the server reads it: the messages
/// sent on `rx`, framed and decoded as the transport would.
fn inbound(
    rx: mpsc::UnboundedReceiver<Result<pb::WorkerMessage, Status>>,
) -> Streaming<pb::WorkerMessage> {
    let mut codec = WireCodec::<pb::WorkerMessage, pb::WorkerMessage>::default();
    let body = EncodeBody::new_client(
        codec.encoder(),
        UnboundedReceiverStream::new(rx),
        None,
        None,
    );
    Streaming::new_request(codec.decoder(), body, None, None)
}

/// A stream the harness holds open, as a client would.
enum Open {
    /// StreamTasks: the worker's side (`None` once the worker closed it)
    /// and the server's messages.
    Worker {
        to_server: Option<mpsc::UnboundedSender<Result<pb::WorkerMessage, Status>>>,
        from_server: ServerMessages<WorkerStream>,
    },
    Results(Results<ResultStream>),
    Batches(ResultBatches<ResultStream>),
}

impl Open {
    fn name(&self) -> &'static str {
        match self {
            Self::Worker { .. } => "StreamTasks",
            Self::Results(_) => "WatchResults",
            Self::Batches(_) => "WatchResultBatches",
        }
    }

    /// One poll of the server's side; what arrives is read (ids
    /// remembered, item errors checked) and dropped.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        known: &mut Known,
    ) -> Poll<Option<Result<(), Status>>> {
        match self {
            Self::Worker { from_server, .. } => Pin::new(from_server)
                .poll_next(cx)
                .map(|m| m.map(|m| m.map(|m| known.server_message(&m)))),
            Self::Results(results) => Pin::new(results)
                .poll_next(cx)
                .map(|r| r.map(|r| r.map(|r| known.task(&r.task_id)))),
            Self::Batches(batches) => Pin::new(batches).poll_next(cx).map(|b| {
                b.map(|b| {
                    b.map(|b| {
                        assert!(!b.results.is_empty(), "an empty WatchResultBatches message");
                        for r in &b.results {
                            known.task(&r.task_id);
                        }
                    })
                })
            }),
        }
    }
}

/// Ids the harness was handed, for requests that refer to them.
#[derive(Default)]
struct Known {
    tasks: VecDeque<String>,
    /// (task id, lease id)
    leases: VecDeque<(String, String)>,
}

fn remember<T>(list: &mut VecDeque<T>, item: T) {
    if list.len() == MAX_KNOWN {
        list.pop_front();
    }
    list.push_back(item);
}

/// `"@n"`: a reference to the `n`-th id remembered.
fn reference(text: &str) -> Option<usize> {
    text.strip_prefix('@')?.parse().ok()
}

fn pick<T>(list: &VecDeque<T>, n: usize) -> Option<&T> {
    (!list.is_empty()).then(|| &list[n % list.len()])
}

impl Known {
    fn task(&mut self, id: &str) {
        remember(&mut self.tasks, id.to_owned());
    }

    fn leased(&mut self, task: &pb::Task) {
        self.task(&task.id);
        remember(&mut self.leases, (task.id.clone(), task.lease_id.clone()));
    }

    /// A message from a worker stream's server side: tasks remembered,
    /// acks' errors checked.
    fn server_message(&mut self, message: &pb::ServerMessage) {
        match &message.msg {
            Some(Out::Task(task)) => self.leased(task),
            Some(Out::Tasks(batch)) => {
                assert!(!batch.tasks.is_empty(), "an empty `tasks` message");
                for task in &batch.tasks {
                    self.leased(task);
                }
            }
            Some(Out::ResultAck(ack)) => check_item(ack.error.as_ref(), "a result on a stream"),
            Some(Out::ResultAcks(batch)) => {
                for ack in &batch.acks {
                    check_item(ack.error.as_ref(), "a result in a `results` batch");
                }
            }
            Some(Out::ExtendAck(ack)) => check_item(ack.error.as_ref(), "an extension on a stream"),
            Some(Out::Cancel(cancel)) => assert!(
                self.leases
                    .iter()
                    .any(|(task, lease)| *task == cancel.task_id && *lease == cancel.lease_id),
                "a cancel of a lease this stream was never given: {cancel:?}"
            ),
            None => panic!("a ServerMessage with nothing set"),
        }
    }

    fn task_ref(&self, text: &mut String) {
        if let Some(id) = reference(text).and_then(|n| pick(&self.tasks, n)) {
            text.clone_from(id);
        }
    }

    fn lease_ref(&self, task: &mut String, lease: &mut String) {
        if let Some((t, l)) = reference(lease).and_then(|n| pick(&self.leases, n)) {
            lease.clone_from(l);
            if task.is_empty() {
                task.clone_from(t);
            }
        }
        self.task_ref(task);
    }

    fn worker_message(&self, message: &mut pb::WorkerMessage) {
        match &mut message.msg {
            Some(In::Result(r)) => self.lease_ref(&mut r.task_id, &mut r.lease_id),
            Some(In::Results(batch)) => {
                for r in &mut batch.results {
                    self.lease_ref(&mut r.task_id, &mut r.lease_id);
                }
            }
            Some(In::Extend(e)) => self.lease_ref(&mut e.task_id, &mut e.lease_id),
            _ => {}
        }
    }

    fn watch_request(&self, request: &mut pb::WatchResultsRequest) {
        if let Some(pb::watch_results_request::Target::TaskIds(list)) = &mut request.target {
            for id in &mut list.ids {
                self.task_ref(id);
            }
        }
    }
}

/// The service, its broker, and what a client holds between operations.
struct Harness {
    service: TaskQueueService<Broker>,
    broker: Broker,
    known: Known,
    open: VecDeque<Open>,
}

impl Harness {
    async fn step(&mut self, op: u8, body: &[u8]) {
        match op % 16 {
            call @ 0..=6 => self.unary(call, body).await,
            7 | 8 => self.watch(op % 16 == 8, body).await,
            9 => {
                if let Ok(first) = pb::WorkerMessage::decode(body) {
                    self.stream_tasks(Some(first), true).await;
                }
            }
            10 => self.send(body),
            11 => self.poll(body).await,
            12 => {
                if let Some(at) = self.pick_open(body, |_| true) {
                    self.open.remove(at);
                }
            }
            13 => {
                let worker = |o: &Open| {
                    matches!(
                        o,
                        Open::Worker {
                            to_server: Some(_),
                            ..
                        }
                    )
                };
                if let Some(at) = self.pick_open(body, worker)
                    && let Open::Worker { to_server, .. } = &mut self.open[at]
                {
                    *to_server = None;
                }
            }
            14 => {
                let silent = body.first().is_some_and(|b| b % 2 == 1);
                self.stream_tasks(None, silent).await;
            }
            _ => {}
        }
    }

    /// The open stream the body's first byte picks among those that
    /// `fits`.
    fn pick_open(&self, body: &[u8], fits: impl Fn(&Open) -> bool) -> Option<usize> {
        let fitting: Vec<usize> = (0..self.open.len())
            .filter(|i| fits(&self.open[*i]))
            .collect();
        let n = usize::from(body.first().copied().unwrap_or(0));
        pick(&fitting.into(), n).copied()
    }

    fn keep(&mut self, stream: Open) {
        if self.open.len() == MAX_OPEN {
            self.open.pop_front();
        }
        self.open.push_back(stream);
    }

    async fn unary(&mut self, call: u8, body: &[u8]) {
        let service = &self.service;
        let answer = match call {
            0 => {
                let Ok(m) = pb::PutTaskRequest::decode(body) else {
                    return;
                };
                service
                    .put_task(request(m))
                    .await
                    .map(|r| self.known.task(&r.get_ref().task_id))
            }
            1 => {
                let Ok(m) = pb::GetTaskRequest::decode(body) else {
                    return;
                };
                service.get_task(request(m)).await.map(|r| {
                    if let Some(task) = &r.get_ref().task {
                        self.known.leased(task);
                    }
                })
            }
            2 => {
                let Ok(mut m) = pb::ExtendLeaseRequest::decode(body) else {
                    return;
                };
                self.known.lease_ref(&mut m.task_id, &mut m.lease_id);
                service.extend_lease(request(m)).await.map(drop)
            }
            3 => {
                let Ok(mut m) = pb::PutResultRequest::decode(body) else {
                    return;
                };
                self.known.lease_ref(&mut m.task_id, &mut m.lease_id);
                service.put_result(request(m)).await.map(drop)
            }
            4 => {
                let Ok(mut m) = pb::GetResultRequest::decode(body) else {
                    return;
                };
                if let Some(pb::get_result_request::Target::TaskId(id)) = &mut m.target {
                    self.known.task_ref(id);
                }
                service.get_result(request(m)).await.map(drop)
            }
            5 => {
                let Ok(m) = pb::GetStatsRequest::decode(body) else {
                    return;
                };
                service.get_stats(request(m)).await.map(drop)
            }
            _ => {
                let Ok(m) = pb::PutTasksRequest::decode(body) else {
                    return;
                };
                service.put_tasks(request(m)).await.map(|r| {
                    use pb::put_task_outcome::Outcome;
                    for outcome in &r.get_ref().outcomes {
                        match &outcome.outcome {
                            Some(Outcome::Ok(put)) => self.known.task(&put.task_id),
                            Some(Outcome::Error(error)) => check_item(Some(error), "PutTasks item"),
                            None => panic!("a PutTasks outcome with nothing set"),
                        }
                    }
                })
            }
        };
        if let Err(status) = answer {
            check_status(&status, &format!("unary call {call}"));
        }
    }

    async fn watch(&mut self, batches: bool, body: &[u8]) {
        let Ok(mut m) = pb::WatchResultsRequest::decode(body) else {
            return;
        };
        self.known.watch_request(&mut m);
        let opened = if batches {
            self.service
                .watch_result_batches(request(m))
                .await
                .map(|r| Open::Batches(r.into_inner()))
        } else {
            self.service
                .watch_results(request(m))
                .await
                .map(|r| Open::Results(r.into_inner()))
        };
        match opened {
            Ok(stream) => self.keep(stream),
            Err(status) => check_status(&status, "opening WatchResults"),
        }
    }

    /// Opens StreamTasks with `first` already sent; with `keep_open`
    /// false the worker has closed its side too.
    async fn stream_tasks(&mut self, first: Option<pb::WorkerMessage>, keep_open: bool) {
        let (to_server, rx) = mpsc::unbounded_channel();
        if let Some(first) = first {
            to_server.send(Ok(first)).expect("the receiver is here");
        }
        let to_server = keep_open.then_some(to_server);
        match self.service.stream_tasks(request(inbound(rx))).await {
            Ok(response) => self.keep(Open::Worker {
                to_server,
                from_server: response.into_inner(),
            }),
            Err(status) => check_status(&status, "opening StreamTasks"),
        }
    }

    /// A worker's message on an open StreamTasks; its ids may refer to
    /// ones seen.
    fn send(&mut self, body: &[u8]) {
        let Some((pick_byte, message)) = body.split_first() else {
            return;
        };
        let Ok(mut message) = pb::WorkerMessage::decode(message) else {
            return;
        };
        self.known.worker_message(&mut message);
        let worker = |o: &Open| {
            matches!(
                o,
                Open::Worker {
                    to_server: Some(_),
                    ..
                }
            )
        };
        if let Some(at) = self.pick_open(&[*pick_byte], worker)
            && let Open::Worker {
                to_server: Some(tx),
                ..
            } = &self.open[at]
        {
            // The server may have ended the stream: then nobody reads it.
            let _ = tx.send(Ok(message));
        }
    }

    /// Polls one open stream as its transport would, letting the tasks
    /// behind it run between polls; a stream that ended is dropped.
    async fn poll(&mut self, body: &[u8]) {
        let Some(at) = self.pick_open(body, |_| true) else {
            return;
        };
        let polls = 1 + usize::from(body.get(1).copied().unwrap_or(0)) % MAX_POLLS;
        for _ in 0..polls {
            tokio::task::yield_now().await;
            let (open, known) = (&mut self.open[at], &mut self.known);
            let name = open.name();
            match std::future::poll_fn(|cx| Poll::Ready(open.poll(cx, known))).await {
                Poll::Ready(Some(Ok(()))) | Poll::Pending => {}
                Poll::Ready(Some(Err(status))) => check_status(&status, name),
                Poll::Ready(None) => {
                    self.open.remove(at);
                    return;
                }
            }
        }
    }

    /// Every stream dropped: once the tasks serving them have ended, no
    /// waiter is left.
    async fn finish(mut self) {
        self.open.clear();
        for _ in 0..SETTLE_YIELDS {
            if self.broker.waiters() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        self.broker.check();
        assert_eq!(
            self.broker.waiters(),
            0,
            "waiters left once every call and stream is gone"
        );
    }
}

#[cfg(test)]
mod tests {
    /// Replays every input the fuzzer kept (`fuzz/corpus/requests`),
    /// regressions included.
    #[test]
    fn the_fuzz_corpus_replays_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/requests");
        let mut replayed = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/requests exists") {
            let path = entry.unwrap().path();
            // The committed inputs; the fuzzer's local corpus is not replayed.
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("seed-") || name.starts_with("regression-") {
                super::run(&std::fs::read(&path).unwrap());
                replayed += 1;
            }
        }
        assert!(replayed > 0, "no inputs in {}", dir.display());
    }
}
