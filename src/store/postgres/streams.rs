//! Streams on the PostgreSQL store. Each open stream has a claimer task
//! that claims what the stream has room for (its window less what it
//! holds), waits for a notification when nothing is ready, and, when the
//! stream ends, gives back at once whatever it still held: the claimer,
//! not the stream's drop, does that, so a claim still in flight when the
//! stream ends is given back too.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::PgStore;
use crate::broker::{BrokerError, LeaseRequest, LeasedTask, QueueName, TaskId, TaskResult};
use crate::store::{ResultDeliveries, ResultWatch, TaskDeliveries, WindowControl};

/// Most tasks (or results) one claim takes.
const MAX_CLAIM: usize = 500;
/// How long a claimer waits before trying again after a database error.
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(500);
/// Results a result stream holds ahead of its reader.
const RESULT_WINDOW: usize = 64;

/// What a worker stream and its claimer share.
#[derive(Debug)]
pub(crate) struct StreamShared {
    window: AtomicU32,
    /// Tasks leased through the stream and not reported.
    outstanding: AtomicUsize,
    /// Leases held (task → sequence), to give back when the stream ends.
    held: Mutex<HashMap<TaskId, u32>>,
    /// The window changed, or a task was reported, or the stream ended.
    changed: Notify,
    ended: AtomicBool,
}

impl StreamShared {
    /// A task of this stream was reported.
    pub(crate) fn reported(&self, task: TaskId) {
        if self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&task)
            .is_some()
        {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_one();
        }
    }
}

/// A worker stream on the PostgreSQL store.
pub struct PgWorkerStream {
    deliveries: mpsc::UnboundedReceiver<LeasedTask>,
    front: VecDeque<LeasedTask>,
    shared: Arc<StreamShared>,
}

impl PgWorkerStream {
    pub(crate) fn open(store: PgStore, request: LeaseRequest, window: u32) -> Self {
        let shared = Arc::new(StreamShared {
            window: AtomicU32::new(window),
            outstanding: AtomicUsize::new(0),
            held: Mutex::default(),
            changed: Notify::new(),
            ended: AtomicBool::new(false),
        });
        let (tx, deliveries) = mpsc::unbounded_channel();
        tokio::spawn(claim_tasks(store, request, shared.clone(), tx));
        Self {
            deliveries,
            front: VecDeque::new(),
            shared,
        }
    }
}

impl Drop for PgWorkerStream {
    fn drop(&mut self) {
        self.shared.ended.store(true, Ordering::Release);
        self.shared.changed.notify_one();
    }
}

/// The claimer of one worker stream.
async fn claim_tasks(
    store: PgStore,
    request: LeaseRequest,
    shared: Arc<StreamShared>,
    tx: mpsc::UnboundedSender<LeasedTask>,
) {
    let ready = store.inner.wakeups.tasks(request.queue.as_str());
    let mut closed = store.inner.closed.subscribe();
    loop {
        if shared.ended.load(Ordering::Acquire) {
            break;
        }
        let room = (shared.window.load(Ordering::Acquire) as usize)
            .saturating_sub(shared.outstanding.load(Ordering::Acquire));
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let draining = *closed.borrow();
        if room == 0 || draining {
            tokio::select! {
                () = &mut changed => {}
                _ = closed.changed(), if !draining => {}
            }
            continue;
        }
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match store
            .claim(
                &request.queue,
                room.min(MAX_CLAIM),
                request.lease_duration,
                &request.worker,
            )
            .await
        {
            Ok(tasks) if !tasks.is_empty() => {
                {
                    let mut held = shared.held.lock().unwrap_or_else(PoisonError::into_inner);
                    let mut leases = store
                        .inner
                        .stream_leases
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    for task in &tasks {
                        held.insert(task.id, task.lease_id.seq);
                        leases.insert(task.id, (task.lease_id.seq, shared.clone()));
                    }
                    shared.outstanding.fetch_add(tasks.len(), Ordering::AcqRel);
                }
                for task in tasks {
                    // A failed send: the stream is gone; the give-back below
                    // takes what it held.
                    let _ = tx.send(task);
                }
            }
            Ok(_) => {
                tokio::select! {
                    () = &mut notified => {}
                    () = &mut changed => {}
                    _ = closed.changed() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, queue = %request.queue, "postgres store: a worker stream's claim failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(RETRY_AFTER_ERROR) => {}
                    () = &mut changed => {}
                }
            }
        }
    }
    // The stream ended: everything it still holds goes back at once.
    let held: Vec<(TaskId, u32)> = shared
        .held
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain()
        .collect();
    {
        let mut leases = store
            .inner
            .stream_leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (task, _) in &held {
            leases.remove(task);
        }
    }
    store.release(&request.queue, held).await;
}

impl TaskDeliveries for PgWorkerStream {
    type Control = PgStreamControl;

    fn poll_next_task(&mut self, cx: &mut Context<'_>) -> Poll<Option<LeasedTask>> {
        if let Some(task) = self.front.pop_front() {
            return Poll::Ready(Some(task));
        }
        self.deliveries.poll_recv(cx)
    }

    fn poll_next_task_at(
        &mut self,
        cx: &mut Context<'_>,
        _now: &mut Option<Instant>,
    ) -> Poll<Option<LeasedTask>> {
        self.poll_next_task(cx)
    }

    fn ready(&self) -> usize {
        self.front.len() + self.deliveries.len()
    }

    fn put_back(&mut self, task: LeasedTask) {
        self.front.push_front(task);
    }

    fn control(&self) -> PgStreamControl {
        PgStreamControl {
            shared: self.shared.clone(),
        }
    }
}

/// A worker stream's window and count, on the PostgreSQL store.
#[derive(Debug)]
pub struct PgStreamControl {
    shared: Arc<StreamShared>,
}

impl WindowControl for PgStreamControl {
    fn set_window(&self, window: u32) {
        self.shared.window.store(window, Ordering::Release);
        self.shared.changed.notify_one();
    }

    fn outstanding(&self) -> usize {
        self.shared.outstanding.load(Ordering::Acquire)
    }
}

/// A queue's result stream on the PostgreSQL store: results claimed (handed
/// out once across all servers) ahead of the reader, up to a small window;
/// those not yet sent when it ends are given back.
pub struct PgResultStream {
    results: mpsc::UnboundedReceiver<TaskResult>,
    front: VecDeque<TaskResult>,
    /// Results claimed and not yet taken by the reader.
    buffered: Arc<AtomicUsize>,
    taken: Arc<Notify>,
    ended: Arc<AtomicBool>,
    /// Ids of results taken from the channel and put back: given back at
    /// the end with the rest.
    store: PgStore,
    queue: QueueName,
}

impl PgResultStream {
    pub(crate) fn open(store: PgStore, queue: QueueName) -> Self {
        let (tx, results) = mpsc::unbounded_channel();
        let buffered = Arc::new(AtomicUsize::new(0));
        let taken = Arc::new(Notify::new());
        let ended = Arc::new(AtomicBool::new(false));
        tokio::spawn(claim_results(
            store.clone(),
            queue.clone(),
            buffered.clone(),
            taken.clone(),
            ended.clone(),
            tx,
        ));
        Self {
            results,
            front: VecDeque::new(),
            buffered,
            taken,
            ended,
            store,
            queue,
        }
    }
}

impl Drop for PgResultStream {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::Release);
        self.taken.notify_one();
        // What is buffered here was claimed for this reader: give it back.
        let mut back: Vec<TaskId> = self.front.drain(..).map(|r| r.task_id).collect();
        while let Ok(result) = self.results.try_recv() {
            back.push(result.task_id);
        }
        if !back.is_empty() {
            let store = self.store.clone();
            let queue = self.queue.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { store.unclaim_results(&queue, back).await });
            }
        }
    }
}

async fn claim_results(
    store: PgStore,
    queue: QueueName,
    buffered: Arc<AtomicUsize>,
    taken: Arc<Notify>,
    ended: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<TaskResult>,
) {
    let ready = store.inner.wakeups.results(queue.as_str());
    let mut closed = store.inner.closed.subscribe();
    while !ended.load(Ordering::Acquire) && !*closed.borrow() {
        let room = RESULT_WINDOW.saturating_sub(buffered.load(Ordering::Acquire));
        let more = taken.notified();
        tokio::pin!(more);
        more.as_mut().enable();
        if room == 0 {
            tokio::select! {
                () = &mut more => {}
                _ = closed.changed() => {}
            }
            continue;
        }
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match store.claim_results(&queue, room).await {
            Ok(results) if !results.is_empty() => {
                buffered.fetch_add(results.len(), Ordering::AcqRel);
                let mut back = Vec::new();
                for result in results {
                    if let Err(unsent) = tx.send(result) {
                        back.push(unsent.0.task_id);
                    }
                }
                store.unclaim_results(&queue, back).await;
            }
            Ok(_) => {
                tokio::select! {
                    () = &mut notified => {}
                    () = &mut more => {}
                    _ = closed.changed() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, queue = %queue, "postgres store: a result stream's claim failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(RETRY_AFTER_ERROR) => {}
                    () = &mut more => {}
                }
            }
        }
    }
    // Dropping `tx` ends the stream once the reader has what was sent.
}

impl ResultDeliveries for PgResultStream {
    fn poll_next_result(&mut self, cx: &mut Context<'_>) -> Poll<Option<TaskResult>> {
        if let Some(result) = self.front.pop_front() {
            return Poll::Ready(Some(result));
        }
        let polled = self.results.poll_recv(cx);
        if let Poll::Ready(Some(_)) = &polled {
            self.buffered.fetch_sub(1, Ordering::AcqRel);
            self.taken.notify_one();
        }
        polled
    }

    fn ready(&self) -> usize {
        self.front.len() + self.results.len()
    }

    fn put_back(&mut self, result: TaskResult) {
        self.front.push_front(result);
    }
}

/// A watch of listed tasks on the PostgreSQL store.
pub struct PgWatch {
    results: mpsc::UnboundedReceiver<TaskResult>,
}

impl PgWatch {
    pub(crate) async fn open(store: PgStore, ids: &[TaskId]) -> Result<Self, BrokerError> {
        // Every id must be held before anything is watched.
        for id in ids {
            crate::store::Store::task_queue(&store, *id).await?;
        }
        let notify = Arc::new(Notify::new());
        let guard = store.inner.wakeups.watch_tasks(ids, &notify);
        let (tx, results) = mpsc::unbounded_channel();
        // An id listed twice gets its result twice, as on the memory store.
        let mut waiting: Vec<TaskId> = ids.to_vec();
        tokio::spawn(async move {
            let _guard = guard;
            while !waiting.is_empty() {
                let notified = notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match store.results_of(&waiting).await {
                    Ok(mut found) => {
                        found.sort_by_key(|r| (r.finished_at, r.task_id));
                        for result in found {
                            let before = waiting.len();
                            waiting.retain(|id| *id != result.task_id);
                            for _ in waiting.len()..before {
                                if tx.send(result.clone()).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "postgres store: a watch's read failed; retrying");
                        tokio::time::sleep(RETRY_AFTER_ERROR).await;
                        continue;
                    }
                }
                if waiting.is_empty() {
                    return;
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Self { results })
    }
}

impl ResultWatch for PgWatch {
    async fn recv(&mut self) -> Option<TaskResult> {
        self.results.recv().await
    }
}
