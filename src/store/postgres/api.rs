//! The seam: the PostgreSQL store as a [`Store`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, oneshot};

use super::error::PgError;
use super::handle::PgStore;
use super::jobs::{Job, Prepared};
use super::rows::{self, state_of};
use super::streams::{PgResultStream, PgWatch, PgWorkerStream};
use crate::broker::{
    BrokerError, Holdings, LeaseId, LeaseRequest, LeasedTask, NewTask, Outcome, PutOutcome,
    QueueName, QueueStats, RECENT_FAILURES, Snapshot, Stats, TaskId, TaskResult, TaskState,
    TaskView, WorkerInfo,
};
use crate::store::Store;

impl Store for PgStore {
    type WorkerStream = PgWorkerStream;
    type ResultStream = PgResultStream;
    type Watch = PgWatch;

    async fn put(&self, task: NewTask, wait: Duration) -> Result<PutOutcome, BrokerError> {
        let task = self.prepare(task)?;
        self.admit_queue(&task.queue).await?;
        let until = tokio::time::Instant::now() + wait.min(Duration::from_secs(24 * 3600));
        // Room comes when tasks of the queue finish: their results'
        // notification.
        let room = self.inner.wakeups.results(task.queue.as_str());
        loop {
            if self.is_closed() {
                return Err(BrokerError::ShuttingDown);
            }
            let notified = room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let attempt = Prepared {
                id: task.id,
                queue: task.queue.clone(),
                task: task.task.clone(),
                max_attempts: task.max_attempts,
            };
            let answer = self
                .put_prepared(vec![attempt])
                .await?
                .pop()
                .unwrap_or(Err(BrokerError::ShuttingDown));
            match answer {
                // Still full when the wait ends: answered at once, so that
                // the answer arrives before the caller's deadline.
                Err(full @ BrokerError::QueueFull { .. }) => {
                    if !self.wait_for(notified, until).await {
                        return Err(full);
                    }
                }
                answer => return answer,
            }
        }
    }

    async fn put_many(&self, tasks: Vec<NewTask>) -> Vec<Result<PutOutcome, BrokerError>> {
        let mut slots = Vec::with_capacity(tasks.len());
        let mut valid = Vec::with_capacity(tasks.len());
        for task in tasks {
            match self.prepare(task) {
                Ok(task) => {
                    slots.push(None);
                    valid.push(task);
                }
                Err(error) => slots.push(Some(error)),
            }
        }
        let queues: Vec<&QueueName> = valid.iter().map(|task| &task.queue).collect();
        match self.admit_queues(&queues).await {
            Ok(refused) if refused.is_empty() => {}
            Ok(refused) => {
                // Tasks of queues past --max-queues are refused one by one.
                let mut kept = Vec::with_capacity(valid.len());
                let mut valid_tasks = valid.into_iter();
                for slot in &mut slots {
                    if slot.is_none() {
                        let task = valid_tasks.next().expect("a task per empty slot");
                        if refused.contains(task.queue.as_str()) {
                            *slot = Some(BrokerError::queues_full(self.inner.broker.max_queues));
                        } else {
                            kept.push(task);
                        }
                    }
                }
                valid = kept;
            }
            Err(error) => return vec![Err(error); slots.len()],
        }
        let n = slots.len();
        let stored = if valid.is_empty() {
            Ok(Vec::new())
        } else {
            self.put_prepared(valid).await
        };
        match stored {
            Ok(stored) => {
                let mut stored = stored.into_iter();
                slots
                    .into_iter()
                    .map(|slot| match slot {
                        Some(error) => Err(error),
                        None => stored.next().unwrap_or(Err(BrokerError::ShuttingDown)),
                    })
                    .collect()
            }
            Err(error) => vec![Err(error); n],
        }
    }

    async fn lease(
        &self,
        request: LeaseRequest,
        wait: Duration,
    ) -> Result<Option<LeasedTask>, BrokerError> {
        let until = tokio::time::Instant::now() + wait.min(Duration::from_secs(24 * 3600));
        self.admit_queue(&request.queue).await?;
        let ready = self.inner.wakeups.tasks(request.queue.as_str());
        self.touch(&request.worker, &request.queue);
        let mut waiting = None;
        loop {
            let notified = ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let slot = [(request.worker.clone(), request.lease_duration)];
            if let Some((_, task)) = self.claim(&request.queue, &slot).await?.pop() {
                return Ok(Some(task));
            }
            if self.is_closed() || wait.is_zero() {
                return Ok(None);
            }
            if waiting.is_none() {
                let slot = self.inner.waiters.admit()?;
                waiting = Some((slot, self.inner.wakeups.waiting(request.queue.as_str())));
            }
            if !self.wait_for(notified, until).await {
                return Ok(None);
            }
        }
    }

    async fn extend(
        &self,
        lease: LeaseId,
        extend_by: Option<Duration>,
    ) -> Result<SystemTime, BrokerError> {
        let client = self.inner.pool.get().await.map_err(PgError::from)?;
        let seq = i32::try_from(lease.seq).unwrap_or(i32::MAX);
        let rows = client
            .query(
                &client
                    .prepare_cached(&self.inner.sql.extend)
                    .await
                    .map_err(PgError::from)?,
                &[
                    &lease.task.as_uuid(),
                    &seq,
                    &self.inner.lease_secs(extend_by),
                ],
            )
            .await
            .map_err(PgError::from)?;
        if let Some(row) = rows.first() {
            return Ok(row.get(0));
        }
        let rows = client
            .query(
                &client
                    .prepare_cached(&self.inner.sql.report_view)
                    .await
                    .map_err(PgError::from)?,
                &[&vec![lease.task.as_uuid()]],
            )
            .await
            .map_err(PgError::from)?;
        match rows.first().map(|row| state_of(row.get::<_, i16>(1))) {
            None => Err(BrokerError::TaskNotFound(lease.task.to_string())),
            Some(TaskState::Succeeded | TaskState::Failed) => {
                Err(BrokerError::TaskFinished(lease.task))
            }
            Some(TaskState::Cancelled) => Err(BrokerError::Cancelled(lease.task)),
            Some(_) => Err(BrokerError::stale(lease)),
        }
    }

    async fn complete(&self, lease: LeaseId, outcome: Outcome) -> Result<TaskState, BrokerError> {
        self.complete_many(vec![(lease, outcome)])
            .await
            .pop()
            .unwrap_or(Err(BrokerError::ShuttingDown))
    }

    async fn complete_many(
        &self,
        results: Vec<(LeaseId, Outcome)>,
    ) -> Vec<Result<TaskState, BrokerError>> {
        let n = results.len();
        let leases: Vec<LeaseId> = results.iter().map(|(lease, _)| *lease).collect();
        let (answer, answered) = oneshot::channel();
        if let Err(error) = self.send(Job::Complete { results, answer }).await {
            return vec![Err(error); n];
        }
        let answers = answered
            .await
            .unwrap_or_else(|_| vec![Err(BrokerError::ShuttingDown); n]);
        // Reported, whatever the answer (except a store that could not
        // say): the stream's window has room again.
        self.reported(
            leases
                .into_iter()
                .zip(&answers)
                .filter(|(_, a)| !matches!(a, Err(BrokerError::StoreUnavailable { .. })))
                .map(|(lease, _)| lease),
        );
        answers
    }

    async fn result(
        &self,
        task: TaskId,
        wait: Duration,
    ) -> Result<Option<TaskResult>, BrokerError> {
        let until = tokio::time::Instant::now() + wait.min(Duration::from_secs(24 * 3600));
        let notify = Arc::new(Notify::new());
        let _guard = self.inner.wakeups.watch_tasks(&[task], &notify);
        let mut slot = None;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(result) = self.result_now(task).await? {
                return Ok(Some(result));
            }
            if self.is_closed() || wait.is_zero() {
                return Ok(None);
            }
            if slot.is_none() {
                slot = Some(self.inner.waiters.admit()?);
            }
            if !self.wait_for(notified, until).await {
                return Ok(None);
            }
        }
    }

    async fn next_result(
        &self,
        queue: QueueName,
        wait: Duration,
    ) -> Result<Option<TaskResult>, BrokerError> {
        let until = tokio::time::Instant::now() + wait.min(Duration::from_secs(24 * 3600));
        self.admit_queue(&queue).await?;
        let ready = self.inner.wakeups.results(queue.as_str());
        let mut slot = None;
        loop {
            let notified = ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(result) = self.claim_results(&queue, 1).await?.pop() {
                return Ok(Some(result));
            }
            if self.is_closed() || wait.is_zero() {
                return Ok(None);
            }
            if slot.is_none() {
                slot = Some(self.inner.waiters.admit()?);
            }
            if !self.wait_for(notified, until).await {
                return Ok(None);
            }
        }
    }

    async fn stats(&self, only: Option<&[QueueName]>) -> Result<Stats, BrokerError> {
        let names: Option<Vec<String>> =
            only.map(|queues| queues.iter().map(|q| q.as_str().to_owned()).collect());
        let rows = self.rows(&self.inner.sql.stats, &[&names]).await?;
        let count =
            |row: &tokio_postgres::Row, i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        let mut queues: Vec<QueueStats> = rows
            .iter()
            .map(|row| {
                let succeeded = count(row, 3);
                let failed = count(row, 4);
                QueueStats {
                    queue: row.get(0),
                    pending: count(row, 1),
                    leased: count(row, 2),
                    succeeded,
                    failed,
                    redelivered: count(row, 5),
                    oldest_pending_age: Duration::from_secs_f64(row.get::<_, f64>(6).max(0.0)),
                    results_unclaimed: count(row, 7),
                    expired: count(row, 8),
                    delayed: count(row, 9),
                    cancelled: count(row, 10),
                    ..QueueStats::default()
                }
            })
            .collect();
        if let Some(only) = only {
            for queue in only {
                if !queues.iter().any(|q| q.queue == queue.as_str()) {
                    queues.push(QueueStats {
                        queue: queue.as_str().to_owned(),
                        ..QueueStats::default()
                    });
                }
            }
        }
        let paused = self.paused_queues().await?;
        for queue in &mut queues {
            queue.waiting_workers = self.inner.wakeups.waiting_on(&queue.queue);
            queue.paused = paused.contains(&queue.queue);
        }
        queues.sort_by(|a, b| a.queue.cmp(&b.queue));
        let workers = self.workers(only).await?;
        Ok(Stats { queues, workers })
    }

    async fn task_queue(&self, task: TaskId) -> Result<QueueName, BrokerError> {
        let rows = self
            .rows(&self.inner.sql.task_queue, &[&task.as_uuid()])
            .await?;
        let Some(row) = rows.first() else {
            return Err(BrokerError::TaskNotFound(task.to_string()));
        };
        QueueName::parse(row.get(0))
    }

    async fn cancel(&self, task: TaskId) -> Result<TaskState, BrokerError> {
        let cancelled = PgStore::cancel(self, task).await?;
        match cancelled {
            Some(previous) => Ok(previous),
            None => match self.result_now(task).await? {
                Some(_) => Err(BrokerError::TaskFinished(task)),
                None => Err(BrokerError::TaskNotFound(task.to_string())),
            },
        }
    }

    async fn set_paused(&self, queue: &QueueName, paused: bool) -> Result<bool, BrokerError> {
        PgStore::set_paused(self, queue, paused).await
    }

    async fn purge(&self, queue: &QueueName) -> Result<u64, BrokerError> {
        PgStore::purge(self, queue).await
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, BrokerError> {
        PgStore::workers(self, None).await
    }

    async fn describe(&self, task: TaskId) -> Result<TaskView, BrokerError> {
        let rows = self
            .rows(&self.inner.sql.describe, &[&task.as_uuid()])
            .await?;
        rows.first()
            .and_then(rows::task_view)
            .ok_or_else(|| BrokerError::TaskNotFound(task.to_string()))
    }

    async fn open_worker_stream(
        &self,
        request: LeaseRequest,
        window: u32,
    ) -> Result<PgWorkerStream, BrokerError> {
        if self.is_closed() {
            return Err(BrokerError::ShuttingDown);
        }
        self.admit_queue(&request.queue).await?;
        let slot = self.inner.waiters.admit()?;
        Ok(PgWorkerStream::open(self, request, window, slot))
    }

    async fn open_result_stream(&self, queue: &QueueName) -> Result<PgResultStream, BrokerError> {
        self.admit_queue(queue).await?;
        let slot = self.inner.waiters.admit()?;
        Ok(PgResultStream::open(self, queue.clone(), slot))
    }

    async fn watch(&self, ids: &[TaskId]) -> Result<PgWatch, BrokerError> {
        let slot = self.inner.waiters.admit()?;
        PgWatch::open(self.clone(), ids, slot).await
    }

    async fn snapshot(&self) -> Result<Snapshot, BrokerError> {
        let sql = &self.inner.sql;
        let limit = RECENT_FAILURES as i64;
        let failures_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&limit];
        let (unfinished, leased, failures) = tokio::try_join!(
            self.rows(&sql.snapshot_unfinished, &[]),
            self.rows(&sql.snapshot_leased_delayed, &[]),
            self.rows(&sql.recent_failures, &failures_params),
        )?;
        let names: Vec<String> = unfinished.iter().map(|row| row.get(0)).collect();
        let oldest = self.rows(&sql.snapshot_oldest, &[&names]).await?;
        let leased: HashMap<String, (i64, i64)> = leased
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2))))
            .collect();
        let oldest: HashMap<String, f64> =
            oldest.iter().map(|row| (row.get(0), row.get(1))).collect();
        let counters = self.inner.counters.read();
        let streams = self.worker_streams();
        let paused = self.paused_queues().await?;
        let queues = unfinished
            .iter()
            .map(|row| {
                let queue: String = row.get(0);
                let unfinished = u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
                let (leased, delayed) = leased.get(&queue).map_or((0, 0), |(l, d)| {
                    (
                        u64::try_from(*l).unwrap_or(0),
                        u64::try_from(*d).unwrap_or(0),
                    )
                });
                let mut stats = QueueStats {
                    pending: unfinished.saturating_sub(leased + delayed),
                    delayed,
                    leased,
                    oldest_pending_age: Duration::try_from_secs_f64(
                        oldest.get(&queue).copied().unwrap_or(0.0),
                    )
                    .unwrap_or_default(),
                    worker_streams: streams.get(&queue).copied().unwrap_or(0),
                    paused: paused.contains(&queue),
                    ..QueueStats::default()
                };
                if let Some(counts) = counters.get(&queue) {
                    counts.fill(&mut stats);
                }
                stats.queue = queue;
                stats
            })
            .collect();
        Ok(Snapshot {
            queues,
            workers_alive: self.workers_alive(),
            recent_failures: failures
                .iter()
                .filter_map(rows::result_row)
                .map(|failure| failure.as_failure_note())
                .collect(),
            ..Snapshot::default()
        })
    }

    fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closed = self.inner.closed.subscribe();
        async move {
            let _ = closed.wait_for(|closed| *closed).await;
        }
    }

    async fn release_streams(&self) {
        let held: Vec<(TaskId, u32)> = {
            let mut leases = super::registry::lock(&self.inner.stream_leases);
            leases
                .drain()
                .map(|(task, (seq, stream))| {
                    // Ended: its dispatch hands it nothing more.
                    stream
                        .ended
                        .store(true, std::sync::atomic::Ordering::Release);
                    super::registry::lock(&stream.held).remove(&task);
                    (task, seq)
                })
                .collect()
        };
        if let Err(error) = self.lose_leases(&held).await {
            tracing::warn!(%error, tasks = held.len(),
                "postgres store: could not give the worker streams' tasks back at the stop; their leases will expire");
        }
    }

    fn holdings(&self) -> Holdings {
        Holdings::default()
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}
