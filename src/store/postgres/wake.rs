//! Wake-ups from the database: one connection per server LISTENs on the
//! schema's two channels, and each notification wakes the local waiters it
//! concerns. Every transaction that makes tasks ready (put, retry, lease
//! expiry, a stream's give-back) or finishes tasks sends a NOTIFY, which the
//! database delivers at commit: a woken waiter always finds the row.
//!
//! - `<schema>_tasks`, payload the queue name: tasks became ready there.
//! - `<schema>_results`, payload `queue` then a newline and task ids
//!   separated by commas: those tasks finished.
//!
//! A notification lost while the listening connection is down is made up
//! for by waking every waiter when it comes back: each looks again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio_postgres::AsyncMessage;

use super::tls::MakeRustlsConnect;

use super::registry::lock;
use crate::broker::{LeaseId, TaskId};

/// Who waits for what on this server.
#[derive(Debug, Default)]
pub(crate) struct Wakeups {
    /// Per queue: tasks became ready.
    tasks: Mutex<HashMap<String, Arc<Ready>>>,
    /// Per queue: results finished.
    results: Mutex<HashMap<String, Arc<Notify>>>,
    /// Per task: its result exists. Each waiter (a GetResult, a watch)
    /// registers its own `Notify`.
    task_results: Mutex<HashMap<TaskId, Vec<Arc<Notify>>>>,
    /// Per queue: GetTask calls waiting on this server.
    waiting: Mutex<HashMap<String, u64>>,
    /// Where the leases cancelled on any server go, for this server's
    /// worker streams that hold them (`PgStore::deliver_cancels`).
    cancels: Mutex<Option<tokio::sync::mpsc::UnboundedSender<LeaseId>>>,
}

/// The wake-up of one queue's ready tasks: its waiters, and how many
/// times it was woken.
#[derive(Debug, Default)]
pub(crate) struct Ready {
    notify: Notify,
    /// Wake-ups so far. A claimer that skips a claim because it believes
    /// the queue drained checks that none came since its last claim began:
    /// a wake-up that came while it was busy elsewhere is not lost.
    woken: AtomicU64,
}

impl Ready {
    /// The next wake-up (enable it before looking at the database).
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }

    /// Wake-ups so far.
    pub(crate) fn woken(&self) -> u64 {
        self.woken.load(Ordering::Acquire)
    }

    fn wake(&self) {
        self.woken.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }
}

/// Uncounts a waiting GetTask call when dropped.
pub(crate) struct WaitingGuard {
    wakeups: Arc<Wakeups>,
    queue: String,
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.wakeups.waiting).get_mut(&self.queue) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Wakeups {
    /// Sends every cancelled lease heard of to `to`.
    pub(crate) fn forward_cancels(&self, to: tokio::sync::mpsc::UnboundedSender<LeaseId>) {
        *lock(&self.cancels) = Some(to);
    }

    /// A cancel notification's payload (after its `~`): `task:seq`.
    fn cancelled(&self, payload: &str) {
        let lease = payload.split_once(':').and_then(|(task, seq)| {
            Some(LeaseId {
                task: TaskId::parse(task)?,
                seq: seq.parse().ok()?,
            })
        });
        match (lease, lock(&self.cancels).as_ref()) {
            (Some(lease), Some(to)) => {
                let _ = to.send(lease);
            }
            (None, _) => tracing::warn!(
                payload,
                "postgres store: a cancel notification not understood"
            ),
            (Some(_), None) => {}
        }
    }

    /// The wake-up of `queue`'s ready tasks. Queues are few; their entries
    /// stay.
    pub(crate) fn tasks(&self, queue: &str) -> Arc<Ready> {
        lock(&self.tasks).entry(queue.into()).or_default().clone()
    }

    /// The `Notify` woken when results of `queue` finish.
    pub(crate) fn results(&self, queue: &str) -> Arc<Notify> {
        lock(&self.results).entry(queue.into()).or_default().clone()
    }

    /// Registers `notify` to be woken when any of `ids` finishes; the
    /// returned guard unregisters it.
    pub(crate) fn watch_tasks(
        self: &Arc<Self>,
        ids: &[TaskId],
        notify: &Arc<Notify>,
    ) -> TaskWatchGuard {
        let mut map = lock(&self.task_results);
        for id in ids {
            map.entry(*id).or_default().push(notify.clone());
        }
        TaskWatchGuard {
            wakeups: self.clone(),
            ids: ids.to_vec(),
            notify: notify.clone(),
        }
    }

    /// Wakes everyone: after the listening connection was lost, any
    /// notification may have been missed.
    pub(crate) fn wake_all(&self) {
        for ready in lock(&self.tasks).values() {
            ready.wake();
        }
        for notify in lock(&self.results).values() {
            notify.notify_waiters();
        }
        for waiters in lock(&self.task_results).values() {
            for notify in waiters {
                notify.notify_waiters();
            }
        }
    }

    /// Tasks became ready on `queue`: wake its waiters. Every waiter
    /// enables its wait before it looks at the database, so a wake-up
    /// between its look and its wait is not lost, and none is stored for
    /// later (which would wake the next waiter for nothing).
    pub(crate) fn tasks_ready(&self, queue: &str) {
        if let Some(ready) = lock(&self.tasks).get(queue) {
            ready.wake();
        }
    }

    /// Counts a GetTask call waiting on `queue` until the guard drops.
    pub(crate) fn waiting(self: &Arc<Self>, queue: &str) -> WaitingGuard {
        *lock(&self.waiting).entry(queue.into()).or_default() += 1;
        WaitingGuard {
            wakeups: self.clone(),
            queue: queue.into(),
        }
    }

    /// GetTask calls waiting on `queue` on this server.
    pub(crate) fn waiting_on(&self, queue: &str) -> u64 {
        lock(&self.waiting).get(queue).copied().unwrap_or(0)
    }

    fn finished(&self, payload: &str) {
        let (queue, ids) = payload.split_once('\n').unwrap_or((payload, ""));
        // `!queue`: already handed out by queue; only waiters by id care.
        if !queue.starts_with('!') {
            if let Some(notify) = lock(&self.results).get(queue) {
                notify.notify_waiters();
            }
        }
        let map = lock(&self.task_results);
        if map.is_empty() {
            return;
        }
        for id in ids.split(',').filter_map(TaskId::parse) {
            for notify in map.get(&id).into_iter().flatten() {
                notify.notify_waiters();
            }
        }
    }
}

/// Unregisters a task watch when dropped.
pub(crate) struct TaskWatchGuard {
    wakeups: Arc<Wakeups>,
    ids: Vec<TaskId>,
    notify: Arc<Notify>,
}

impl Drop for TaskWatchGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.wakeups.task_results);
        for id in &self.ids {
            if let Some(waiters) = map.get_mut(id) {
                waiters.retain(|n| !Arc::ptr_eq(n, &self.notify));
                if waiters.is_empty() {
                    map.remove(id);
                }
            }
        }
    }
}

/// The channel names of `schema`.
pub(crate) fn channels(schema: &str) -> (String, String) {
    (format!("{schema}_tasks"), format!("{schema}_results"))
}

/// Listens until `wakeups` has no other owner, reconnecting with a backoff
/// while the database is unreachable.
pub(crate) async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    schema: String,
    wakeups: std::sync::Weak<Wakeups>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let (tasks_channel, results_channel) = channels(&schema);
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        if wakeups.strong_count() == 0 {
            return;
        }
        match config.clone_for_listen().connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let drive = tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(message)) => {
                                if tx.send(message).is_err() {
                                    return;
                                }
                            }
                            Some(Err(error)) => {
                                tracing::warn!(%error, "postgres store: listening connection lost");
                                return;
                            }
                            None => return,
                        }
                    }
                });
                let listened = client
                    .batch_execute(&format!(
                        "LISTEN \"{tasks_channel}\"; LISTEN \"{results_channel}\";"
                    ))
                    .await;
                if let Err(error) = listened {
                    tracing::warn!(%error, "postgres store: LISTEN failed");
                    drive.abort();
                } else {
                    backoff = Duration::from_millis(100);
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                    // Anything missed while not listening: look again.
                    if let Some(wakeups) = wakeups.upgrade() {
                        wakeups.wake_all();
                    }
                    while let Some(message) = rx.recv().await {
                        let Some(wakeups) = wakeups.upgrade() else {
                            drive.abort();
                            return;
                        };
                        if let AsyncMessage::Notification(note) = message {
                            if note.channel() == tasks_channel {
                                // Queue names never start with `~`.
                                match note.payload().strip_prefix('~') {
                                    Some(lease) => wakeups.cancelled(lease),
                                    None => wakeups.tasks_ready(note.payload()),
                                }
                            } else if note.channel() == results_channel {
                                wakeups.finished(note.payload());
                            }
                        }
                    }
                    drop(client);
                }
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "postgres store: cannot connect to listen");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A listening connection runs no statements that could time out.
trait ForListen {
    fn clone_for_listen(&self) -> tokio_postgres::Config;
}

impl ForListen for tokio_postgres::Config {
    fn clone_for_listen(&self) -> tokio_postgres::Config {
        let mut config = self.clone();
        config.application_name("taskq-listen");
        config
    }
}
