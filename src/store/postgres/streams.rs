//! Streams on the PostgreSQL store.
//!
//! Worker streams and result streams of one queue on one server share one
//! claimer (a dispatch task): when tasks (or results) become ready, it
//! claims for all of them at once, sized to their room (window less what
//! each holds), in one statement, and hands each stream its share. One
//! notification thus costs one claim per server and queue, not one per
//! stream.
//!
//! When a worker stream ends, the dispatch gives back at once what it
//! held: the dispatch, not the stream's drop, does that, so a claim still
//! in flight when the stream ends is given back too.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::handle::PgStore;
use super::limits::WaiterSlot;
use super::registry::{
    RESULT_WINDOW, ResultDispatch, ResultShared, StreamShared, TaskDispatch, lock,
};
use crate::broker::{
    BrokerError, LeaseId, LeaseRequest, LeasedTask, QueueName, TaskId, TaskResult, WorkerId,
};
use crate::store::{ResultDeliveries, ResultWatch, TaskDeliveries, WindowControl};

/// Most tasks (or results) one claim takes.
const MAX_CLAIM: usize = 500;
/// How long a dispatch waits before trying again after a database error.
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(500);
/// How long a queue found empty is believed empty: room opening in a
/// window claims nothing then (each task made ready notifies the queue's
/// claimers, and a wake-up that came while the claimer was busy counts).
/// When the belief expires, the queue is claimed from again even if
/// nothing happened: should a notification ever be missed, its tasks wait
/// a second at most, for one claim a second of a drained queue whose
/// workers wait.
const BELIEVED_EMPTY: Duration = Duration::from_secs(1);

/// A worker stream on the PostgreSQL store.
pub struct PgWorkerStream {
    deliveries: mpsc::UnboundedReceiver<LeasedTask>,
    cancels: mpsc::UnboundedReceiver<LeaseId>,
    front: VecDeque<LeasedTask>,
    shared: Arc<StreamShared>,
    store: PgStore,
    queue: QueueName,
    /// Its place among the waiters (`--max-waiters`).
    _slot: WaiterSlot,
}

impl PgWorkerStream {
    pub(crate) fn open(
        store: &PgStore,
        request: LeaseRequest,
        window: u32,
        slot: WaiterSlot,
    ) -> Self {
        let (tx, deliveries) = mpsc::unbounded_channel();
        let (cancels_tx, cancels) = mpsc::unbounded_channel();
        let mut dispatches = lock(&store.inner.task_dispatch);
        let (dispatch, start) = match dispatches.get(request.queue.as_str()) {
            Some(dispatch) => (dispatch.clone(), false),
            None => {
                let dispatch = Arc::new(TaskDispatch::default());
                dispatches.insert(request.queue.as_str().to_owned(), dispatch.clone());
                (dispatch, true)
            }
        };
        let shared = Arc::new(StreamShared {
            window: AtomicU32::new(window),
            outstanding: AtomicUsize::new(0),
            held: Mutex::default(),
            ended: AtomicBool::new(false),
            queue: request.queue.clone(),
            worker: request.worker,
            lease: request.lease_duration,
            tx,
            cancels: cancels_tx,
            dispatch: dispatch.clone(),
        });
        lock(&dispatch.streams).push(shared.clone());
        drop(dispatches);
        store.touch(&shared.worker, &request.queue);
        if start {
            tokio::spawn(dispatch_tasks(
                store.clone(),
                request.queue.clone(),
                dispatch.clone(),
            ));
        }
        dispatch.changed.notify_one();
        Self {
            deliveries,
            cancels,
            front: VecDeque::new(),
            shared,
            store: store.clone(),
            queue: request.queue,
            _slot: slot,
        }
    }
}

impl Drop for PgWorkerStream {
    fn drop(&mut self) {
        self.shared.ended.store(true, Ordering::Release);
        self.shared.dispatch.changed.notify_one();
    }
}

/// The claimer of one queue's worker streams on this server. Ends when
/// the last stream has ended and been given back.
async fn dispatch_tasks(store: PgStore, queue: QueueName, dispatch: Arc<TaskDispatch>) {
    let ready = store.inner.wakeups.tasks(queue.as_str());
    let mut closed = store.inner.closed.subscribe();
    // When the last claim found the queue empty (fewer tasks than it
    // asked for), and the queue's wake-ups counted before that claim.
    let mut empty: Option<(Instant, u64)> = None;
    loop {
        let changed = dispatch.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Read after `notified` is enabled: a wake-up from now on completes
        // it, or shows in the count (should this turn end on another event).
        let woken = ready.woken();
        // Ended streams leave, giving back what they held.
        let ended: Vec<Arc<StreamShared>> = {
            let mut streams = lock(&dispatch.streams);
            let (ended, open) = streams
                .drain(..)
                .partition(|s| s.ended.load(Ordering::Acquire));
            *streams = open;
            ended
        };
        for stream in ended {
            give_back(&store, &queue, &stream).await;
        }
        {
            let mut dispatches = lock(&store.inner.task_dispatch);
            if lock(&dispatch.streams).is_empty() {
                dispatches.remove(queue.as_str());
                return;
            }
        }
        let draining = *closed.borrow();
        // Slots in turns, one per stream with room each round, so that a
        // stream with a large window does not starve the others.
        let mut slots: Vec<Arc<StreamShared>> = Vec::new();
        if !draining {
            let mut streams = lock(&dispatch.streams).clone();
            let first = dispatch.turn.load(Ordering::Relaxed) % streams.len().max(1);
            streams.rotate_left(first);
            let mut rooms: Vec<usize> = streams.iter().map(|s| s.room()).collect();
            while slots.len() < MAX_CLAIM && rooms.iter().any(|r| *r > 0) {
                for (stream, room) in streams.iter().zip(rooms.iter_mut()) {
                    if *room > 0 && slots.len() < MAX_CLAIM {
                        *room -= 1;
                        slots.push(stream.clone());
                    }
                }
            }
        }
        // Drained at the last claim, nothing woken since, and not for long.
        let believed_empty =
            empty.is_some_and(|(at, seen)| seen == woken && at.elapsed() < BELIEVED_EMPTY);
        if slots.is_empty() || believed_empty {
            // Believed drained, the queue is looked at again when that
            // belief expires, whatever else happens.
            let expires = empty.map_or_else(Instant::now, |(at, _)| at + BELIEVED_EMPTY);
            tokio::select! {
                () = &mut notified => empty = drained(&dispatch, None),
                () = &mut changed => {}
                _ = closed.changed(), if !draining => {}
                () = tokio::time::sleep_until(expires), if believed_empty => {
                    empty = drained(&dispatch, None);
                }
            }
            continue;
        }
        let wanted: Vec<(WorkerId, Option<Duration>)> =
            slots.iter().map(|s| (s.worker.clone(), s.lease)).collect();
        match store.claim(&queue, &wanted).await {
            Ok(tasks) => {
                let full = tasks.len() == slots.len();
                dispatch.turn.fetch_add(tasks.len(), Ordering::Relaxed);
                deliver(&store, &slots, tasks);
                // Found drained: the next turn waits (above), unless a
                // wake-up came since this claim began.
                let since = (!full).then(|| (Instant::now(), woken));
                empty = drained(&dispatch, since);
            }
            Err(error) => {
                tracing::warn!(%error, queue = %queue, "postgres store: a claim for worker streams failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(RETRY_AFTER_ERROR) => {}
                    () = &mut changed => {}
                }
            }
        }
    }
}

/// Since when the dispatch's queue is known drained, and its wake-ups
/// counted before the claim that found it so (`None`: it may hold ready
/// tasks), kept with the dispatch for the writers' hand-overs.
fn drained(dispatch: &TaskDispatch, since: Option<(Instant, u64)>) -> Option<(Instant, u64)> {
    dispatch.drained.store(since.is_some(), Ordering::Release);
    since
}

/// Hands claimed tasks to their slots' streams. A stream that ended in
/// the meantime still records the task as held: the give-back of ended
/// streams returns it.
fn deliver(store: &PgStore, slots: &[Arc<StreamShared>], tasks: Vec<(usize, LeasedTask)>) {
    let mut leases = lock(&store.inner.stream_leases);
    for (slot, task) in tasks {
        let Some(stream) = slots.get(slot) else {
            continue;
        };
        stream.hold(&task, &mut leases);
        stream.outstanding.fetch_add(1, Ordering::AcqRel);
        let _ = stream.tx.send(task);
    }
    drop(leases);
    // A stream that ended while the claim was in flight: make sure the
    // dispatch looks again and gives back what it was just handed.
    if slots.iter().any(|s| s.ended.load(Ordering::Acquire)) {
        if let Some(stream) = slots.first() {
            stream.dispatch.changed.notify_one();
        }
    }
}

/// Gives back everything an ended stream held.
async fn give_back(store: &PgStore, queue: &QueueName, stream: &StreamShared) {
    let held: Vec<(TaskId, u32)> = lock(&stream.held).drain().collect();
    if held.is_empty() {
        return;
    }
    {
        let mut leases = lock(&store.inner.stream_leases);
        for (task, _) in &held {
            leases.remove(task);
        }
    }
    store.release(queue, held).await;
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

    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> Poll<Option<LeaseId>> {
        self.cancels.poll_recv(cx)
    }

    fn put_back(&mut self, task: LeasedTask) {
        self.front.push_front(task);
    }

    fn control(&self) -> PgStreamControl {
        PgStreamControl {
            shared: self.shared.clone(),
            store: self.store.clone(),
            queue: self.queue.clone(),
        }
    }
}

/// A worker stream's window and count, on the PostgreSQL store.
#[derive(Debug)]
pub struct PgStreamControl {
    shared: Arc<StreamShared>,
    store: PgStore,
    queue: QueueName,
}

impl WindowControl for PgStreamControl {
    fn set_window(&self, window: u32) {
        self.shared.window.store(window, Ordering::Release);
        self.shared.dispatch.changed.notify_one();
    }

    fn outstanding(&self) -> usize {
        self.shared.outstanding.load(Ordering::Acquire)
    }

    async fn give_back(&self) {
        self.shared.ended.store(true, Ordering::Release);
        self.shared.dispatch.changed.notify_one();
        give_back(&self.store, &self.queue, &self.shared).await;
    }
}

/// A queue's result stream on the PostgreSQL store: results claimed (handed
/// out once across all servers) ahead of the reader, up to a small window;
/// those not yet sent when it ends are given back.
pub struct PgResultStream {
    results: mpsc::UnboundedReceiver<TaskResult>,
    front: VecDeque<TaskResult>,
    shared: Arc<ResultShared>,
    store: PgStore,
    queue: QueueName,
    /// Its place among the waiters (`--max-waiters`).
    _slot: WaiterSlot,
}

impl PgResultStream {
    pub(crate) fn open(store: &PgStore, queue: QueueName, slot: WaiterSlot) -> Self {
        let (tx, results) = mpsc::unbounded_channel();
        let mut dispatches = lock(&store.inner.result_dispatch);
        let (dispatch, start) = match dispatches.get(queue.as_str()) {
            Some(dispatch) => (dispatch.clone(), false),
            None => {
                let dispatch = Arc::new(ResultDispatch::default());
                dispatches.insert(queue.as_str().to_owned(), dispatch.clone());
                (dispatch, true)
            }
        };
        let shared = Arc::new(ResultShared {
            buffered: AtomicUsize::new(0),
            ended: AtomicBool::new(false),
            tx: Mutex::new(Some(tx)),
            dispatch: dispatch.clone(),
        });
        lock(&dispatch.streams).push(shared.clone());
        drop(dispatches);
        if start {
            tokio::spawn(dispatch_results(
                store.clone(),
                queue.clone(),
                dispatch.clone(),
            ));
        }
        dispatch.changed.notify_one();
        Self {
            results,
            front: VecDeque::new(),
            shared,
            store: store.clone(),
            queue,
            _slot: slot,
        }
    }
}

impl Drop for PgResultStream {
    fn drop(&mut self) {
        self.shared.ended.store(true, Ordering::Release);
        self.shared.dispatch.changed.notify_one();
        // What is buffered here was claimed for this reader: give it back.
        self.results.close();
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

/// The claimer of one queue's result streams on this server.
async fn dispatch_results(store: PgStore, queue: QueueName, dispatch: Arc<ResultDispatch>) {
    let ready = store.inner.wakeups.results(queue.as_str());
    let mut closed = store.inner.closed.subscribe();
    loop {
        let changed = dispatch.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let notified = ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let streams = {
            let mut dispatches = lock(&store.inner.result_dispatch);
            let mut streams = lock(&dispatch.streams);
            streams.retain(|s| !s.ended.load(Ordering::Acquire));
            if streams.is_empty() {
                dispatches.remove(queue.as_str());
                return;
            }
            let mut streams = streams.clone();
            let first = dispatch.turn.load(Ordering::Relaxed) % streams.len();
            streams.rotate_left(first);
            streams
        };
        let draining = *closed.borrow();
        let mut slots: Vec<Arc<ResultShared>> = Vec::new();
        if !draining {
            let mut rooms: Vec<usize> = streams
                .iter()
                .map(|s| RESULT_WINDOW.saturating_sub(s.buffered.load(Ordering::Acquire)))
                .collect();
            while slots.len() < MAX_CLAIM && rooms.iter().any(|r| *r > 0) {
                for (stream, room) in streams.iter().zip(rooms.iter_mut()) {
                    if *room > 0 && slots.len() < MAX_CLAIM {
                        *room -= 1;
                        slots.push(stream.clone());
                    }
                }
            }
        }
        if draining {
            // Draining: no new claims; each stream ends once its reader has
            // what it was sent.
            for stream in &streams {
                stream.ended.store(true, Ordering::Release);
                lock(&stream.tx).take();
            }
            lock(&dispatch.streams).clear();
            lock(&store.inner.result_dispatch).remove(queue.as_str());
            return;
        }
        if slots.is_empty() {
            tokio::select! {
                () = &mut changed => {}
                _ = closed.changed() => {}
            }
            continue;
        }
        match store.claim_results(&queue, slots.len()).await {
            Ok(results) => {
                let full = results.len() == slots.len();
                dispatch.turn.fetch_add(results.len(), Ordering::Relaxed);
                let mut back = Vec::new();
                for (stream, result) in slots.iter().zip(results) {
                    stream.buffered.fetch_add(1, Ordering::AcqRel);
                    let sent = match lock(&stream.tx).as_ref() {
                        Some(tx) => tx.send(result).map_err(|unsent| unsent.0),
                        None => Err(result),
                    };
                    if let Err(unsent) = sent {
                        stream.buffered.fetch_sub(1, Ordering::AcqRel);
                        back.push(unsent.task_id);
                    }
                }
                store.unclaim_results(&queue, back).await;
                if full {
                    continue;
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = &mut changed => {}
                    _ = closed.changed() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, queue = %queue, "postgres store: a claim for result streams failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(RETRY_AFTER_ERROR) => {}
                    () = &mut changed => {}
                }
            }
        }
    }
}

impl ResultDeliveries for PgResultStream {
    fn poll_next_result(&mut self, cx: &mut Context<'_>) -> Poll<Option<TaskResult>> {
        if let Some(result) = self.front.pop_front() {
            return Poll::Ready(Some(result));
        }
        let polled = self.results.poll_recv(cx);
        if let Poll::Ready(Some(_)) = &polled {
            if self.shared.buffered.fetch_sub(1, Ordering::AcqRel) == RESULT_WINDOW / 2 {
                // Half the window is free: time for the next claim.
                self.shared.dispatch.changed.notify_one();
            }
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
    /// Its place among the waiters (`--max-waiters`).
    _slot: WaiterSlot,
}

impl PgWatch {
    pub(crate) async fn open(
        store: PgStore,
        ids: &[TaskId],
        slot: WaiterSlot,
    ) -> Result<Self, BrokerError> {
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
        Ok(Self {
            results,
            _slot: slot,
        })
    }
}

impl ResultWatch for PgWatch {
    async fn recv(&mut self) -> Option<TaskResult> {
        self.results.recv().await
    }
}
