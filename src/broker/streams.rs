//! The broker's ends of its streams: a worker stream's deliveries
//! ([`WorkerStream`], StreamTasks), a queue's results as they finish
//! ([`ResultStream`], WatchResults by queue), and a watch on tasks'
//! results ([`Watch`], WatchResults by task ids). Each is a drop guard:
//! dropped, it gives back what it held.

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::waiters::{ResultStreamFlow, ResultStreamId, StreamId};
use super::{Broker, LeasedTask, TaskId, TaskResult};

/// A worker stream's end in the broker: tasks leased to it arrive on
/// [`WorkerStream::next`]. Dropped, it closes the stream: tasks it received
/// but never handed on go back as undelivered; tasks it handed on go back
/// at once, their delivery counted.
#[derive(Debug)]
pub struct WorkerStream {
    broker: Broker,
    id: StreamId,
    deliveries: mpsc::UnboundedReceiver<LeasedTask>,
    /// A task taken and put back ([`WorkerStream::put_back`]): the next
    /// one out.
    front: Option<LeasedTask>,
}

impl WorkerStream {
    pub(super) fn new(
        broker: Broker,
        id: StreamId,
        deliveries: mpsc::UnboundedReceiver<LeasedTask>,
    ) -> Self {
        Self {
            broker,
            id,
            deliveries,
            front: None,
        }
    }

    /// The next task for this stream; waits while the window is full or the
    /// queue empty. Cancel-safe: a task is never lost by dropping this
    /// future. A task whose lease ended while it waited here (it expired,
    /// or a result came by another way) is skipped: it is no longer this
    /// stream's.
    pub async fn next(&mut self) -> Option<LeasedTask> {
        std::future::poll_fn(|cx| self.poll_next_task(cx)).await
    }

    /// [`WorkerStream::next`] as a poll, for a response stream that hands
    /// tasks straight to the transport.
    pub fn poll_next_task(&mut self, cx: &mut Context<'_>) -> Poll<Option<LeasedTask>> {
        self.poll_next_task_at(cx, &mut None)
    }

    /// [`WorkerStream::poll_next_task`] for a caller that takes several
    /// tasks at once: `now` is read from the clock by the first task that
    /// needs it and reused by the rest, so a batch reads the clock once.
    pub fn poll_next_task_at(
        &mut self,
        cx: &mut Context<'_>,
        now: &mut Option<Instant>,
    ) -> Poll<Option<LeasedTask>> {
        loop {
            let task = match self.front.take() {
                Some(task) => task,
                None => match std::task::ready!(self.deliveries.poll_recv(cx)) {
                    Some(task) => task,
                    None => return Poll::Ready(None),
                },
            };
            // Before its expiry a lease can only have ended by a result sent
            // some other way, which the worker's own report then meets as
            // ALREADY_EXISTS; only an expired one needs the lock to check.
            if task.lease_deadline > *now.get_or_insert_with(Instant::now)
                || self.broker.state().leased_through(task.lease_id, self.id)
            {
                return Poll::Ready(Some(task));
            }
        }
    }

    /// Tasks waiting to be taken now (some may be skipped when taken): room
    /// to reserve for a batch.
    pub fn ready(&self) -> usize {
        self.deliveries.len() + usize::from(self.front.is_some())
    }

    /// Puts back a task just taken and not sent (it did not fit a batch):
    /// it is the next one taken, its lease checked again then, and if the
    /// stream ends first it goes back to its queue as undelivered, like the
    /// tasks still in the channel.
    pub fn put_back(&mut self, task: LeasedTask) {
        debug_assert!(self.front.is_none(), "one task put back at a time");
        self.front = Some(task);
    }

    /// A handle on this stream's window for another task (the one reading
    /// the worker's messages), while this one is polled for deliveries.
    pub fn control(&self) -> WorkerStreamControl {
        WorkerStreamControl {
            broker: self.broker.clone(),
            id: self.id,
        }
    }
}

/// The window of a [`WorkerStream`], from another task. Outlives nothing:
/// once the stream is dropped, changes to it do nothing.
#[derive(Clone, Debug)]
pub struct WorkerStreamControl {
    broker: Broker,
    id: StreamId,
}

impl WorkerStreamControl {
    /// Changes how many tasks may be outstanding; 0 pauses delivery.
    pub fn set_window(&self, window: u32) {
        self.broker
            .state()
            .set_window(self.id, window, Instant::now());
    }

    /// How many tasks are leased through the stream now.
    pub fn outstanding(&self) -> usize {
        self.broker.state().stream_outstanding(self.id)
    }
}

impl Drop for WorkerStream {
    fn drop(&mut self) {
        self.deliveries.close();
        let mut state = self.broker.state();
        let now = Instant::now();
        if let Some(task) = self.front.take() {
            state.undo_lease(task.lease_id, now);
        }
        while let Ok(task) = self.deliveries.try_recv() {
            state.undo_lease(task.lease_id, now);
        }
        state.close_stream(self.id, now);
    }
}

/// A result stream (WatchResults by queue): a queue's results as they
/// finish, from [`Broker::open_result_stream`].
#[derive(Debug)]
pub struct ResultStream {
    broker: Broker,
    id: ResultStreamId,
    flow: Arc<ResultStreamFlow>,
    results: mpsc::UnboundedReceiver<TaskResult>,
    /// A result taken and put back ([`ResultStream::put_back`]): the next
    /// one out.
    front: Option<TaskResult>,
}

impl ResultStream {
    pub(super) fn new(
        broker: Broker,
        id: ResultStreamId,
        flow: Arc<ResultStreamFlow>,
        results: mpsc::UnboundedReceiver<TaskResult>,
    ) -> Self {
        Self {
            broker,
            id,
            flow,
            results,
            front: None,
        }
    }

    /// The next result, waiting for one; `None` once the broker closed and
    /// everything held was handed on. Taking a result needs no lock, except
    /// now and then to ask for more after the window filled.
    pub fn poll_next_result(&mut self, cx: &mut Context<'_>) -> Poll<Option<TaskResult>> {
        if let Some(result) = self.front.take() {
            // Counted when it was first taken.
            return Poll::Ready(Some(result));
        }
        let result = std::task::ready!(self.results.poll_recv(cx));
        if result.is_some() && self.flow.taken() {
            self.broker.state().refill_result_stream(self.id);
        }
        Poll::Ready(result)
    }

    /// Results waiting to be taken now: room to reserve for a batch.
    pub fn ready(&self) -> usize {
        self.results.len() + usize::from(self.front.is_some())
    }

    /// Puts back a result just taken and not sent (it did not fit a
    /// batch): it is the next one taken, and if the stream ends first it
    /// goes back to the queue's results first, ahead of those still in the
    /// channel.
    pub fn put_back(&mut self, result: TaskResult) {
        debug_assert!(self.front.is_none(), "one result put back at a time");
        self.front = Some(result);
    }

    /// [`ResultStream::poll_next_result`] as a future.
    pub async fn next(&mut self) -> Option<TaskResult> {
        std::future::poll_fn(|cx| self.poll_next_result(cx)).await
    }
}

impl Drop for ResultStream {
    fn drop(&mut self) {
        // Closed first, so that nothing arrives after the drain below.
        self.results.close();
        let mut unsent: Vec<_> = self.front.take().into_iter().collect();
        while let Ok(result) = self.results.try_recv() {
            unsent.push(result);
        }
        self.broker.state().close_result_stream(self.id, unsent);
    }
}

/// A watch on tasks' results: each arrives once, as soon as it exists.
/// Dropped, it unregisters from the tasks still unfinished.
#[derive(Debug)]
pub struct Watch {
    broker: Broker,
    ids: Vec<TaskId>,
    tx: mpsc::UnboundedSender<TaskResult>,
    rx: mpsc::UnboundedReceiver<TaskResult>,
}

impl Watch {
    pub(super) fn new(
        broker: Broker,
        ids: Vec<TaskId>,
        tx: mpsc::UnboundedSender<TaskResult>,
        rx: mpsc::UnboundedReceiver<TaskResult>,
    ) -> Self {
        Self {
            broker,
            ids,
            tx,
            rx,
        }
    }

    /// The next result, in completion order.
    pub async fn recv(&mut self) -> Option<TaskResult> {
        self.rx.recv().await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.broker.state().unwatch(&self.ids, &self.tx);
    }
}
