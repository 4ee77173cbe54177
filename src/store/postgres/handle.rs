//! The store's handle: connecting, and the statements behind its calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{Mutex as AsyncMutex, mpsc, oneshot, watch};
use uuid::Uuid;

use super::config::PostgresConfig;
use super::counters::{Counters, Tally};
use super::error::PgError;
use super::inner::Inner;
use super::jobs::{Job, Prepared};
use super::limits::{KnownQueues, Waiters};
use super::registry::lock;
use super::rows::{leased_task, result_row, state_of, unix_ms};
use super::sql::Sql;
use super::wake::{self, Wakeups};
use super::{schema, sweep, writer};
use crate::broker::{
    BrokerConfig, BrokerError, IdMaker, LeaseId, LeasedTask, NewTask, PutOutcome, QueueName,
    TaskId, TaskResult, TaskState, WorkerId, WorkerInfo,
};

/// How the store's connections plan their statements, set when each
/// connects.
///
/// - Generic plans (`plan_cache_mode`): each prepared statement is planned
///   once per connection. Otherwise the planner plans those that take
///   arrays again at every call (a plan for an array of unknown length
///   looks dearer than one for the array at hand), which cost more than
///   running them (about 110 µs per put, bench/README.md).
/// - Rows reached by index (`enable_seqscan`): every statement of the
///   store finds its rows through an index. A generic plan made while the
///   table was small (a new schema, before autovacuum's first ANALYZE)
///   chose to scan the whole `tasks` table, and went on scanning it at
///   every report long after it grew: a report cost more the more tasks
///   the table held. A statement that has no index to use (GetStats of
///   every queue) still scans.
/// - No JIT compilation (`jit`): the planner prices a scan it was told to
///   avoid so high that PostgreSQL compiled such a statement (GetStats)
///   at every call, tens of milliseconds of CPU. Short statements never
///   gain from it.
const PLANS: &str = "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c jit=off";

/// The PostgreSQL store; a cheap handle.
#[derive(Clone, Debug)]
pub struct PgStore {
    pub(crate) inner: Arc<Inner>,
}

/// Applies the schema's migrations to the database at `config.url`: what
/// `taskq migrate` runs, and what a server runs at start.
///
/// # Errors
/// [`PgError`] when the database cannot be reached or refuses.
pub async fn migrate(config: &PostgresConfig) -> Result<Vec<i32>, PgError> {
    config.validate().map_err(PgError::Config)?;
    let (pg, tls) = config.connection().map_err(PgError::Config)?;
    let (mut client, connection) = pg.connect(tls).await?;
    let driver = tokio::spawn(connection);
    let applied = schema::migrate(&mut client, &config.schema).await;
    drop(client);
    let _ = driver.await;
    applied
}

impl PgStore {
    /// Connects, applies migrations, starts listening and sweeping.
    ///
    /// # Errors
    /// [`PgError`] when the database cannot be reached at start, or the
    /// configuration is wrong.
    pub async fn connect(config: &PostgresConfig, broker: BrokerConfig) -> Result<Self, PgError> {
        config.validate().map_err(PgError::Config)?;
        let applied = migrate(config).await?;
        if !applied.is_empty() {
            tracing::info!(schema = %config.schema, versions = ?applied, "postgres store: migrations applied");
        }
        let (mut pg, tls) = config.connection().map_err(PgError::Config)?;
        pg.application_name("taskq");
        pg.options(format!(
            "-c statement_timeout={} {PLANS}",
            config.statement_timeout.as_millis()
        ));
        pg.connect_timeout(Duration::from_secs(5));
        let manager = Manager::from_config(
            pg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            // The connection used last goes out first: the few a quiet
            // server needs stay warm (their PostgreSQL processes in the
            // CPU caches, not woken in turns), and the rest idle.
            .queue_mode(deadpool_postgres::QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.statement_timeout))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()?;
        let (jobs_tx, jobs_rx) = mpsc::channel(config.max_pending.max(1));
        let wakeups = Arc::new(Wakeups::default());
        let max_waiters = broker.max_waiters;
        let inner = Arc::new(Inner {
            pool,
            sql: Sql::new(&config.schema),
            broker,
            schema: config.schema.clone(),
            channels: wake::channels(&config.schema),
            wakeups: wakeups.clone(),
            jobs: jobs_tx,
            closed: watch::Sender::new(false),
            stream_leases: Mutex::default(),
            task_dispatch: Mutex::default(),
            result_dispatch: Mutex::default(),
            ids: Mutex::new(IdMaker::new()),
            workers: Mutex::default(),
            counters: Counters::default(),
            known_queues: KnownQueues::default(),
            waiters: Waiters::new(max_waiters),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(wake::listen(
            pg,
            tls,
            config.schema.clone(),
            Arc::downgrade(&wakeups),
            ready_tx,
        ));
        // Wait until listening, so no notification of the first calls is
        // missed.
        let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        let jobs = Arc::new(AsyncMutex::new(jobs_rx));
        // Writers: enough that commits overlap, leaving connections for
        // claims and reads.
        let writers = (config.pool_size / 2).clamp(1, 4);
        for _ in 0..writers {
            tokio::spawn(writer::run(Arc::downgrade(&inner), jobs.clone()));
        }
        // Connections opened now, not by the first calls: a call with a
        // short deadline should not pay for a connection's start-up.
        let mut warm = Vec::new();
        for _ in 0..writers + 1 {
            warm.push(inner.pool.get().await?);
        }
        drop(warm);
        tokio::spawn(sweep::run(Arc::downgrade(&inner)));
        let (cancels_tx, cancels) = mpsc::unbounded_channel();
        wakeups.forward_cancels(cancels_tx);
        tokio::spawn(Self::deliver_cancels(Arc::downgrade(&inner), cancels));
        Ok(Self { inner })
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    pub(crate) async fn send(&self, job: Job) -> Result<(), BrokerError> {
        self.inner
            .jobs
            .send(job)
            .await
            .map_err(|_| BrokerError::ShuttingDown)
    }

    /// Validates and names new tasks; an invalid one keeps its error.
    pub(crate) fn prepare(&self, task: NewTask) -> Result<Prepared, BrokerError> {
        task.validate(self.inner.broker.max_payload)?;
        let queue = match &task.queue {
            Some(queue) => queue.clone(),
            None => QueueName::parse("")?,
        };
        let max_attempts = if task.max_attempts == 0 {
            self.inner.broker.default_max_attempts
        } else {
            task.max_attempts
        };
        Ok(Prepared {
            id: lock(&self.inner.ids).next(unix_ms()),
            queue,
            task,
            max_attempts,
        })
    }

    pub(crate) async fn put_prepared(
        &self,
        tasks: Vec<Prepared>,
    ) -> Result<Vec<Result<PutOutcome, BrokerError>>, BrokerError> {
        let (answer, answered) = oneshot::channel();
        self.send(Job::Put { tasks, answer }).await?;
        answered.await.map_err(|_| BrokerError::ShuttingDown)
    }

    /// Claims ready tasks of `queue` for `slots` (each a worker and its
    /// lease duration), oldest first: at most one task per slot, task `i`
    /// for slot `i`. One statement, one commit, however many slots.
    pub(crate) async fn claim(
        &self,
        queue: &QueueName,
        slots: &[(WorkerId, Option<Duration>)],
    ) -> Result<Vec<(usize, LeasedTask)>, BrokerError> {
        let client = self.inner.pool.get().await.map_err(PgError::from)?;
        let statement = client
            .prepare_cached(&self.inner.sql.claim)
            .await
            .map_err(PgError::from)?;
        let limit = i64::try_from(slots.len()).unwrap_or(i64::MAX);
        let leases: Vec<f64> = slots
            .iter()
            .map(|(_, lease)| self.inner.lease_secs(*lease))
            .collect();
        let workers: Vec<&str> = slots.iter().map(|(worker, _)| worker.as_str()).collect();
        let rows = client
            .query(&statement, &[&queue.as_str(), &limit, &leases, &workers])
            .await
            .map_err(PgError::from)?;
        let now = tokio::time::Instant::now();
        let mut tally = Tally::default();
        let counts = tally.queue(queue.as_str());
        let mut tasks: Vec<(usize, LeasedTask)> = rows
            .iter()
            .map(|row| {
                counts.delivered(row.get(11));
                let slot = usize::try_from(row.get::<_, i64>(10) - 1).unwrap_or(0);
                (slot, leased_task(row, queue, now))
            })
            .collect();
        // One statement: committed once it answered.
        self.inner.counters.add(tally);
        tasks.sort_unstable_by_key(|(slot, _)| *slot);
        Ok(tasks)
    }

    /// Ends a worker stream's leases at once, as if they had run out now:
    /// each task back to pending (its queue's claimers woken), or FAILED
    /// on its last attempt, as on the memory store.
    pub(crate) async fn release(&self, queue: &QueueName, leases: Vec<(TaskId, u32)>) {
        if let Err(error) = self.lose_leases(&leases).await {
            tracing::warn!(%error, queue = %queue, tasks = leases.len(),
                "postgres store: could not give a closed stream's tasks back; their leases will expire");
        }
    }

    /// Ends `leases` at once, in one transaction (see [`PgStore::release`]).
    pub(crate) async fn lose_leases(&self, leases: &[(TaskId, u32)]) -> Result<(), PgError> {
        if leases.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = leases.iter().map(|(id, _)| id.as_uuid()).collect();
        let seqs: Vec<i32> = leases
            .iter()
            .map(|(_, seq)| i32::try_from(*seq).unwrap_or(i32::MAX))
            .collect();
        let mut client = self.inner.pool.get().await?;
        let transaction = client.transaction().await?;
        let statement = transaction
            .prepare_cached(&self.inner.sql.lose_leases)
            .await?;
        let rows = transaction.query(&statement, &[&ids, &seqs]).await?;
        let tally = sweep::leases_ended(&self.inner, &transaction, &rows, false).await?;
        transaction.commit().await?;
        self.inner.counters.add(tally);
        Ok(())
    }

    /// The rows of `statement` (prepared once per connection) run on a
    /// connection from the pool.
    pub(crate) async fn rows(
        &self,
        statement: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, PgError> {
        let client = self.inner.pool.get().await?;
        let prepared = client.prepare_cached(statement).await?;
        Ok(client.query(&prepared, params).await?)
    }

    /// A task's result if it is finished; `Ok(None)` while it is not.
    pub(crate) async fn result_now(&self, task: TaskId) -> Result<Option<TaskResult>, BrokerError> {
        let rows = self
            .rows(&self.inner.sql.result_of, &[&task.as_uuid()])
            .await?;
        let Some(row) = rows.first() else {
            return Err(BrokerError::TaskNotFound(task.to_string()));
        };
        Ok(result_row(row))
    }

    /// Finished results among `ids` (unknown ids are left out).
    pub(crate) async fn results_of(&self, ids: &[TaskId]) -> Result<Vec<TaskResult>, BrokerError> {
        let ids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
        let rows = self.rows(&self.inner.sql.results_of, &[&ids]).await?;
        Ok(rows.iter().filter_map(result_row).collect())
    }

    /// Claims up to `limit` unclaimed results of `queue`, oldest first.
    pub(crate) async fn claim_results(
        &self,
        queue: &QueueName,
        limit: usize,
    ) -> Result<Vec<TaskResult>, BrokerError> {
        let client = self.inner.pool.get().await.map_err(PgError::from)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                &client
                    .prepare_cached(&self.inner.sql.claim_results)
                    .await
                    .map_err(PgError::from)?,
                &[&queue.as_str(), &limit],
            )
            .await
            .map_err(PgError::from)?;
        let mut results: Vec<TaskResult> = rows.iter().filter_map(result_row).collect();
        results.sort_by_key(|r| (r.finished_at, r.task_id));
        Ok(results)
    }

    /// Gives claimed results back (a result stream ended before sending
    /// them).
    pub(crate) async fn unclaim_results(&self, queue: &QueueName, ids: Vec<TaskId>) {
        if ids.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
        let done = async {
            let client = self.inner.pool.get().await?;
            client
                .execute(
                    &client
                        .prepare_cached(&self.inner.sql.unclaim_results)
                        .await
                        .map_err(PgError::from)?,
                    &[&ids, &self.inner.channels.1, &format!("{queue}\n")],
                )
                .await?;
            Ok::<_, PgError>(())
        }
        .await;
        if let Err(error) = done {
            tracing::warn!(%error, queue = %queue,
                "postgres store: could not give a closed result stream's results back");
        }
    }

    /// Records that `worker` asked for work on `queue` now.
    pub(crate) fn touch(&self, worker: &WorkerId, queue: &QueueName) {
        let mut workers = lock(&self.inner.workers);
        let now = SystemTime::now();
        match workers.get_mut(worker.as_str()) {
            Some(seen) => {
                if seen.0 != queue.as_str() {
                    seen.0 = queue.as_str().to_owned();
                }
                seen.1 = now;
            }
            None => {
                let timeout = self.inner.broker.worker_timeout;
                if workers.len() >= self.inner.broker.max_workers {
                    // Silent workers first; if that frees nothing, this
                    // one is not tracked, and its calls go on as usual.
                    workers
                        .retain(|_, (_, at)| now.duration_since(*at).unwrap_or_default() < timeout);
                    if workers.len() >= self.inner.broker.max_workers {
                        return;
                    }
                }
                workers.insert(worker.as_str().to_owned(), (queue.as_str().to_owned(), now));
            }
        }
    }

    /// The workers this server has seen, with their leases across all
    /// servers.
    pub(crate) async fn workers(
        &self,
        only: Option<&[QueueName]>,
    ) -> Result<Vec<WorkerInfo>, BrokerError> {
        let seen: Vec<(String, String, SystemTime)> = lock(&self.inner.workers)
            .iter()
            .filter(|(_, (queue, _))| {
                only.is_none_or(|only| only.iter().any(|q| q.as_str() == queue))
            })
            .map(|(worker, (queue, at))| (worker.clone(), queue.clone(), *at))
            .collect();
        if seen.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = seen.iter().map(|(w, _, _)| w.as_str()).collect();
        type Leases = (i64, Vec<(TaskId, SystemTime)>);
        let mut in_flight: std::collections::HashMap<String, Leases> = self
            .rows(&self.inner.sql.in_flight, &[&names])
            .await?
            .iter()
            .map(|row| {
                let ids: Vec<uuid::Uuid> = row.get(2);
                let until: Vec<SystemTime> = row.get(3);
                let leases = ids.into_iter().map(TaskId::from_uuid).zip(until).collect();
                (row.get(0), (row.get(1), leases))
            })
            .collect();
        let now = SystemTime::now();
        let mut workers: Vec<WorkerInfo> = seen
            .into_iter()
            .filter_map(|(worker, queue, at)| {
                let (count, leases) = in_flight.remove(&worker).unwrap_or_default();
                Some(WorkerInfo {
                    in_flight: u32::try_from(count).unwrap_or(u32::MAX),
                    leases,
                    worker: WorkerId::new(&worker).ok()?,
                    queue: QueueName::parse(&queue).ok(),
                    last_seen: at,
                    alive: now.duration_since(at).unwrap_or_default()
                        < self.inner.broker.worker_timeout,
                })
            })
            .collect();
        workers.sort_by(|a, b| a.worker.as_str().cmp(b.worker.as_str()));
        Ok(workers)
    }

    /// Workers that called this server within the worker timeout.
    pub(crate) fn workers_alive(&self) -> u64 {
        let now = SystemTime::now();
        let timeout = self.inner.broker.worker_timeout;
        lock(&self.inner.workers)
            .values()
            .filter(|(_, at)| now.duration_since(*at).unwrap_or_default() < timeout)
            .count() as u64
    }

    /// This server's worker streams per queue.
    pub(crate) fn worker_streams(&self) -> HashMap<String, u64> {
        lock(&self.inner.task_dispatch)
            .iter()
            .map(|(queue, dispatch)| (queue.clone(), lock(&dispatch.streams).len() as u64))
            .collect()
    }

    /// Cancels an unfinished task: it ends CANCELLED, whoever waits for its
    /// result is told, and a lease on it is revoked on every server (a
    /// notification). `None` when no unfinished task has that id.
    pub(crate) async fn cancel(&self, task: TaskId) -> Result<Option<TaskState>, BrokerError> {
        let inner = &self.inner;
        let mut client = inner.pool.get().await.map_err(PgError::from)?;
        let transaction = client.transaction().await.map_err(PgError::from)?;
        let cancel = async {
            let statement = transaction.prepare_cached(&inner.sql.cancel).await?;
            let rows = transaction.query(&statement, &[&task.as_uuid()]).await?;
            let Some(row) = rows.first() else {
                return Ok::<_, PgError>(None);
            };
            let queue: String = row.get(0);
            let previous = state_of(row.get::<_, i16>(1));
            let finished =
                std::collections::BTreeMap::from([(queue.clone(), vec![task.as_uuid()])]);
            writer::tasks_ended(inner, &transaction, &finished).await?;
            if previous == TaskState::Leased {
                let seq: i32 = row.get(2);
                transaction
                    .execute(
                        &transaction.prepare_cached(&inner.sql.notify).await?,
                        &[&inner.channels.0, &format!("~{task}:{seq}")],
                    )
                    .await?;
            }
            transaction.commit().await?;
            let mut tally = Tally::default();
            let counts = tally.queue(&queue);
            counts.cancelled += 1;
            counts.finished(row.get(3), row.get(4));
            inner.counters.add(tally);
            Ok(Some(previous))
        };
        Ok(cancel.await?)
    }

    /// Stops or restarts a queue's hand-outs on every server; returns
    /// whether it was paused before.
    pub(crate) async fn set_paused(
        &self,
        queue: &QueueName,
        paused: bool,
    ) -> Result<bool, BrokerError> {
        let inner = &self.inner;
        let client = inner.pool.get().await.map_err(PgError::from)?;
        let was = if paused {
            let statement = client
                .prepare_cached(&inner.sql.pause)
                .await
                .map_err(PgError::from)?;
            client
                .execute(&statement, &[&queue.as_str()])
                .await
                .map_err(PgError::from)?
                == 0
        } else {
            let statement = client
                .prepare_cached(&inner.sql.resume)
                .await
                .map_err(PgError::from)?;
            !client
                .query(&statement, &[&queue.as_str(), &inner.channels.0])
                .await
                .map_err(PgError::from)?
                .is_empty()
        };
        tracing::info!(queue = %queue, paused, was_paused = was, "queue hand-outs changed");
        Ok(was)
    }

    /// Drops every pending task of a queue: each ends CANCELLED and whoever
    /// waits for its result is told. Returns how many.
    pub(crate) async fn purge(&self, queue: &QueueName) -> Result<u64, BrokerError> {
        let inner = &self.inner;
        let mut client = inner.pool.get().await.map_err(PgError::from)?;
        let transaction = client.transaction().await.map_err(PgError::from)?;
        let purge = async {
            let statement = transaction.prepare_cached(&inner.sql.purge).await?;
            let rows = transaction.query(&statement, &[&queue.as_str()]).await?;
            let ids: Vec<Uuid> = rows.iter().map(|row| row.get(0)).collect();
            if !ids.is_empty() {
                let finished =
                    std::collections::BTreeMap::from([(queue.as_str().to_owned(), ids.clone())]);
                writer::tasks_ended(inner, &transaction, &finished).await?;
            }
            transaction.commit().await?;
            let mut tally = Tally::default();
            let counts = tally.queue(queue.as_str());
            for row in &rows {
                counts.cancelled += 1;
                counts.finished(row.get(1), row.get(2));
            }
            inner.counters.add(tally);
            Ok::<_, PgError>(ids.len() as u64)
        };
        let purged = purge.await?;
        tracing::info!(queue = %queue, purged, "queue purged");
        Ok(purged)
    }

    /// The queues paused now.
    pub(crate) async fn paused_queues(
        &self,
    ) -> Result<std::collections::HashSet<String>, BrokerError> {
        let rows = self.rows(&self.inner.sql.paused, &[]).await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Hands each cancelled lease that a worker stream of this server holds
    /// to that stream, and frees its place. Runs for the store's life.
    async fn deliver_cancels(
        inner: std::sync::Weak<Inner>,
        mut cancels: mpsc::UnboundedReceiver<LeaseId>,
    ) {
        while let Some(lease) = cancels.recv().await {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let mut leases = lock(&inner.stream_leases);
            if leases
                .get(&lease.task)
                .is_some_and(|(seq, _)| *seq == lease.seq)
            {
                if let Some((_, stream)) = leases.remove(&lease.task) {
                    stream.reported(lease.task);
                    let _ = stream.cancels.send(lease);
                }
            }
        }
    }

    /// A worker stream's lease was reported: free its place in the window.
    pub(crate) fn reported(&self, leases: impl IntoIterator<Item = LeaseId>) {
        let mut map = lock(&self.inner.stream_leases);
        if map.is_empty() {
            return;
        }
        for lease in leases {
            if map
                .get(&lease.task)
                .is_some_and(|(seq, _)| *seq == lease.seq)
            {
                if let Some((_, stream)) = map.remove(&lease.task) {
                    stream.reported(lease.task);
                }
            }
        }
    }

    /// Waits for `notified` (enabled before the caller looked), the wait's
    /// end, or the store's close. True when woken.
    pub(crate) async fn wait_for(
        &self,
        notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        until: tokio::time::Instant,
    ) -> bool {
        let mut closed = self.inner.closed.subscribe();
        tokio::select! {
            () = notified => true,
            () = tokio::time::sleep_until(until) => false,
            _ = closed.wait_for(|c| *c) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::TestDatabase;
    use super::*;
    use crate::store::Store;

    /// A report finds its task through the primary key even when its
    /// statement was first planned on a new schema, whose tables have no
    /// statistics yet. Before the connections were told to reach rows by
    /// index (`PLANS`), that generic plan scanned the whole `tasks` table,
    /// and went on doing so at every report as the table grew.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_finds_its_task_by_index_on_a_new_schema() {
        let database = TestDatabase::start().await;
        let mut config = PostgresConfig::new(database.url());
        config.schema = "new_schema_plans".into();
        let store = PgStore::connect(&config, BrokerConfig::default())
            .await
            .unwrap_or_else(|error| panic!("the store opens on {}: {error}", database.url()));
        let client = store.inner.pool.get().await.unwrap();
        // The writers' statement, prepared by name so that its generic
        // plan (`plan_cache_mode`) can be explained.
        client
            .batch_execute(&format!(
                "PREPARE finish AS {}",
                store.inner.sql.complete_ok
            ))
            .await
            .unwrap();
        let plan: Vec<String> = client
            .query(
                "EXPLAIN EXECUTE finish('{}', '{}', '{}', '{}', 1, 'results', 'tasks')",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan using tasks_pkey on tasks"),
            "the update finds its rows by the primary key:\n{plan}"
        );
        assert!(
            !plan.contains("Seq Scan on tasks"),
            "the update scans no table:\n{plan}"
        );
        drop(client);
        store.close();
    }
}
