//! The PostgreSQL store: tasks and results in a database that several
//! servers share, durable once acknowledged.
//!
//! - Puts and results go through group commit (`writer`): an OK means the
//!   transaction committed (`synchronous_commit` as the database sets it).
//! - Claims take ready tasks with `FOR UPDATE SKIP LOCKED`, so servers
//!   never block on each other's rows and a task is leased once per
//!   attempt. Every lease change is fenced by the lease's sequence number in
//!   its `WHERE`, and every time is the database's `now()`: clock skew
//!   between servers changes nothing.
//! - Waits are woken by LISTEN/NOTIFY (`wake`), never by polling per call.
//! - Lease expiry, ttl and retention are swept by every server (`sweep`);
//!   `SKIP LOCKED` and the state in each `WHERE` make each change happen
//!   once.
//! - Worker streams, result streams and watches (`streams`) claim on
//!   demand and give back what they held when they end.

mod config;
mod schema;
mod streams;
mod sweep;
mod wake;
mod writer;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{Mutex as AsyncMutex, Notify, mpsc, oneshot, watch};
use tokio_postgres::NoTls;
use uuid::Uuid;

pub use config::{
    DEFAULT_MAX_PENDING, DEFAULT_POOL_SIZE, DEFAULT_SCHEMA, DEFAULT_STATEMENT_TIMEOUT,
    PostgresConfig,
};
pub(crate) use streams::{PgResultStream, PgWatch, PgWorkerStream};

use super::Store;
use crate::broker::{
    BrokerConfig, BrokerError, Holdings, IdMaker, LeaseId, LeaseRequest, LeasedTask, NewTask,
    Outcome, PutOutcome, QueueName, QueueStats, Snapshot, Stats, TaskId, TaskResult, TaskState,
    WorkerId, WorkerInfo,
};
use wake::Wakeups;
use writer::{Job, Prepared};

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// A statement or the connection failed.
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection could be had from the pool.
    #[error("{0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The pool could not be made.
    #[error("{0}")]
    Build(#[from] deadpool_postgres::BuildError),
    /// The schema is not one this binary can use.
    #[error("{0}")]
    Schema(String),
    /// A value could not be encoded for the database.
    #[error("{0}")]
    Encode(String),
    /// The configuration is wrong.
    #[error("{0}")]
    Config(String),
}

impl PgError {
    /// The error a client sees: UNAVAILABLE, naming the store.
    pub(crate) fn into_broker(self) -> BrokerError {
        BrokerError::StoreUnavailable {
            store: "postgres",
            reason: self.to_string(),
        }
    }
}

impl From<PgError> for BrokerError {
    fn from(error: PgError) -> Self {
        error.into_broker()
    }
}

/// The task state a row's `state` column holds.
pub(crate) fn state_of(state: i16) -> TaskState {
    match state {
        0 => TaskState::Pending,
        1 => TaskState::Leased,
        2 => TaskState::Succeeded,
        _ => TaskState::Failed,
    }
}

/// The PostgreSQL store; a cheap handle.
#[derive(Clone, Debug)]
pub struct PgStore {
    inner: Arc<Inner>,
}

/// Everything the store's handles share.
pub(crate) struct Inner {
    pool: Pool,
    sql: Sql,
    broker: BrokerConfig,
    schema: String,
    /// (tasks channel, results channel).
    channels: (String, String),
    wakeups: Arc<Wakeups>,
    jobs: mpsc::Sender<Job>,
    closed: watch::Sender<bool>,
    /// Leases held by this server's worker streams: task → (lease
    /// sequence, the stream's shared record). A report of one frees its
    /// stream's window.
    stream_leases: Mutex<std::collections::HashMap<TaskId, (u32, Arc<streams::StreamShared>)>>,
    /// Per queue: the one claimer of this server's worker streams.
    task_dispatch: Mutex<std::collections::HashMap<String, Arc<streams::TaskDispatch>>>,
    /// Per queue: the one claimer of this server's result streams.
    result_dispatch: Mutex<std::collections::HashMap<String, Arc<streams::ResultDispatch>>>,
    /// Task ids: UUIDv7, unique across servers by their random start.
    ids: Mutex<IdMaker>,
    /// Workers that called this server: id → (queue, last seen).
    workers: Mutex<std::collections::HashMap<String, (String, SystemTime)>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// Applies the schema's migrations to the database at `config.url`: what
/// `taskq migrate` runs, and what a server runs at start.
///
/// # Errors
/// [`PgError`] when the database cannot be reached or refuses.
pub async fn migrate(config: &PostgresConfig) -> Result<Vec<i32>, PgError> {
    config.validate().map_err(PgError::Config)?;
    let pg: tokio_postgres::Config = config
        .url
        .parse()
        .map_err(|e: tokio_postgres::Error| PgError::Config(e.to_string()))?;
    let (mut client, connection) = pg.connect(NoTls).await?;
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
        let mut pg: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| PgError::Config(e.to_string()))?;
        pg.application_name("taskq");
        pg.options(format!(
            "-c statement_timeout={}",
            config.statement_timeout.as_millis()
        ));
        pg.connect_timeout(Duration::from_secs(5));
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.statement_timeout))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()?;
        let (jobs_tx, jobs_rx) = mpsc::channel(config.max_pending.max(1));
        let wakeups = Arc::new(Wakeups::default());
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
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(wake::listen(
            pg,
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
        tokio::spawn(sweep::run(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    fn lease_secs(&self, requested: Option<Duration>) -> f64 {
        requested
            .unwrap_or(self.inner.broker.default_lease)
            .min(self.inner.broker.max_lease)
            .as_secs_f64()
    }

    fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    async fn send(&self, job: Job) -> Result<(), BrokerError> {
        self.inner
            .jobs
            .send(job)
            .await
            .map_err(|_| BrokerError::ShuttingDown)
    }

    /// Validates and names new tasks; an invalid one keeps its error.
    fn prepare(&self, task: NewTask) -> Result<Prepared, BrokerError> {
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
            id: self
                .inner
                .ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .next(unix_ms()),
            queue,
            task,
            max_attempts,
        })
    }

    async fn put_prepared(
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
            .map(|(_, lease)| self.lease_secs(*lease))
            .collect();
        let workers: Vec<&str> = slots.iter().map(|(worker, _)| worker.as_str()).collect();
        let rows = client
            .query(&statement, &[&queue.as_str(), &limit, &leases, &workers])
            .await
            .map_err(PgError::from)?;
        let now = tokio::time::Instant::now();
        let mut tasks: Vec<(usize, LeasedTask)> = rows
            .iter()
            .map(|row| {
                let slot = usize::try_from(row.get::<_, i64>(10) - 1).unwrap_or(0);
                (slot, leased_task(row, queue, now))
            })
            .collect();
        tasks.sort_unstable_by_key(|(slot, _)| *slot);
        Ok(tasks)
    }

    /// Gives leases back to pending at once (a worker stream ended), and
    /// wakes claimers of their queue.
    pub(crate) async fn release(&self, queue: &QueueName, leases: Vec<(TaskId, u32)>) {
        if leases.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = leases.iter().map(|(id, _)| id.as_uuid()).collect();
        let seqs: Vec<i32> = leases
            .iter()
            .map(|(_, seq)| i32::try_from(*seq).unwrap_or(i32::MAX))
            .collect();
        let released = async {
            let client = self.inner.pool.get().await?;
            client
                .execute(
                    &self.inner.sql.release,
                    &[&ids, &seqs, &self.inner.channels.0, &queue.as_str()],
                )
                .await?;
            Ok::<_, PgError>(())
        }
        .await;
        if let Err(error) = released {
            tracing::warn!(%error, queue = %queue, tasks = ids.len(),
                "postgres store: could not give a closed stream's tasks back; their leases will expire");
        }
    }

    /// A task's result if it is finished; `Ok(None)` while it is not.
    async fn result_now(&self, task: TaskId) -> Result<Option<TaskResult>, BrokerError> {
        let client = self.inner.pool.get().await.map_err(PgError::from)?;
        let rows = client
            .query(&self.inner.sql.result_of, &[&task.as_uuid()])
            .await
            .map_err(PgError::from)?;
        let Some(row) = rows.first() else {
            return Err(BrokerError::TaskNotFound(task.to_string()));
        };
        Ok(result_row(row))
    }

    /// Finished results among `ids` (unknown ids are left out).
    pub(crate) async fn results_of(&self, ids: &[TaskId]) -> Result<Vec<TaskResult>, BrokerError> {
        let ids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
        let client = self.inner.pool.get().await.map_err(PgError::from)?;
        let rows = client
            .query(&self.inner.sql.results_of, &[&ids])
            .await
            .map_err(PgError::from)?;
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
            .query(&self.inner.sql.claim_results, &[&queue.as_str(), &limit])
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
                    &self.inner.sql.unclaim_results,
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
        let mut workers = self
            .inner
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = SystemTime::now();
        match workers.get_mut(worker.as_str()) {
            Some(seen) => {
                if seen.0 != queue.as_str() {
                    seen.0 = queue.as_str().to_owned();
                }
                seen.1 = now;
            }
            None => {
                workers.insert(worker.as_str().to_owned(), (queue.as_str().to_owned(), now));
            }
        }
    }

    /// The workers this server has seen, with their leases across all
    /// servers.
    async fn workers(&self, only: Option<&[QueueName]>) -> Result<Vec<WorkerInfo>, BrokerError> {
        let seen: Vec<(String, String, SystemTime)> = self
            .inner
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
        let client = self.inner.pool.get().await.map_err(PgError::from)?;
        let in_flight: std::collections::HashMap<String, i64> = client
            .query(&self.inner.sql.in_flight, &[&names])
            .await
            .map_err(PgError::from)?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let now = SystemTime::now();
        let mut workers: Vec<WorkerInfo> = seen
            .into_iter()
            .filter_map(|(worker, queue, at)| {
                Some(WorkerInfo {
                    in_flight: u32::try_from(in_flight.get(&worker).copied().unwrap_or(0))
                        .unwrap_or(u32::MAX),
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

    /// A worker stream's lease was reported: free its place in the window.
    fn reported(&self, leases: impl IntoIterator<Item = LeaseId>) {
        let mut map = self
            .inner
            .stream_leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
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
    async fn wait_for(
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

/// Milliseconds since the Unix epoch, for a new task id.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A claimed row as a leased task.
fn leased_task(
    row: &tokio_postgres::Row,
    queue: &QueueName,
    now: tokio::time::Instant,
) -> LeasedTask {
    let id = TaskId::from_uuid(row.get(0));
    let payload: Vec<u8> = row.get(1);
    let headers: Option<String> = row.get(2);
    let seq: i32 = row.get(5);
    let left: f64 = row.get(9);
    LeasedTask {
        id,
        queue: queue.clone(),
        payload: payload.into(),
        headers: headers
            .and_then(|h| serde_json::from_str(&h).ok())
            .unwrap_or_default(),
        attempt: u32::try_from(row.get::<_, i32>(3)).unwrap_or(0),
        max_attempts: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
        lease_id: LeaseId {
            task: id,
            seq: u32::try_from(seq).unwrap_or(0),
        },
        lease_expires_at: row.get(6),
        lease_deadline: now + Duration::from_secs_f64(left.max(0.0)),
        created_at: row.get(7),
        expires_at: row.get(8),
    }
}

/// A row as a result, when it is finished.
fn result_row(row: &tokio_postgres::Row) -> Option<TaskResult> {
    let state = state_of(row.get::<_, i16>(2));
    if !matches!(state, TaskState::Succeeded | TaskState::Failed) {
        return None;
    }
    let queue: String = row.get(1);
    let output: Option<Vec<u8>> = row.get(3);
    let error: Option<String> = row.get(4);
    let worker: Option<String> = row.get(6);
    Some(TaskResult {
        task_id: TaskId::from_uuid(row.get(0)),
        queue: QueueName::parse(&queue).ok()?,
        state,
        output: output.unwrap_or_default().into(),
        error: if state == TaskState::Failed {
            error.unwrap_or_default()
        } else {
            String::new()
        },
        attempts: u32::try_from(row.get::<_, i32>(5)).unwrap_or(0),
        worker: worker.and_then(|w| WorkerId::new(&w).ok()),
        created_at: row.get(7),
        finished_at: row
            .get::<_, Option<SystemTime>>(8)
            .unwrap_or(SystemTime::UNIX_EPOCH),
    })
}

/// The store's statements, with the schema filled in once.
pub(crate) struct Sql {
    ensure_queues: String,
    lock_queues: String,
    insert_tasks: String,
    find_keys: String,
    add_unfinished: String,
    notify_tasks: String,
    notify: String,
    claim: String,
    release: String,
    extend: String,
    complete_ok: String,
    complete_failed: String,
    report_view: String,
    result_of: String,
    results_of: String,
    claim_results: String,
    unclaim_results: String,
    task_queue: String,
    stats: String,
    in_flight: String,
    sweep_leases: String,
    sweep_ttl: String,
    drop_old: String,
    drop_over: String,
}

/// The columns a result is read from, in `result_row`'s order.
const RESULT_COLUMNS: &str =
    "id, queue, state, output, error, attempt, worker, created_at, finished_at";

impl Sql {
    fn new(schema: &str) -> Self {
        let s = |text: &str| text.replace("{s}", schema).replace("{r}", RESULT_COLUMNS);
        Self {
            ensure_queues: s("INSERT INTO {s}.queues (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING"),
            lock_queues: s("SELECT name, unfinished FROM {s}.queues WHERE name = ANY($1) ORDER BY name FOR UPDATE"),
            insert_tasks: s("INSERT INTO {s}.tasks (id, queue, payload, headers, idempotency_key, max_attempts, expires_at)
                SELECT id, queue, payload, headers, key, max_attempts,
                       CASE WHEN ttl IS NULL THEN NULL ELSE now() + make_interval(secs => ttl) END
                FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::int4[], $7::float8[])
                     AS t(id, queue, payload, headers, key, max_attempts, ttl)
                ORDER BY id
                ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                RETURNING id"),
            find_keys: s("SELECT t.queue, t.idempotency_key, t.id FROM {s}.tasks t
                JOIN unnest($1::text[], $2::text[]) AS k(queue, key)
                  ON t.queue = k.queue AND t.idempotency_key = k.key"),
            add_unfinished: s("UPDATE {s}.queues q SET unfinished = q.unfinished + d.n
                FROM unnest($1::text[], $2::int8[]) AS d(name, n) WHERE q.name = d.name"),
            notify_tasks: s("SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q"),
            notify: s("SELECT pg_notify($1, $2)"),
            // Row n (in id order) goes to slot n: its worker and lease.
            claim: s("WITH locked AS (
                    SELECT id FROM {s}.tasks
                    WHERE queue = $1 AND state = 0 AND (expires_at IS NULL OR expires_at > now())
                    ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED),
                numbered AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM locked)
                UPDATE {s}.tasks t
                SET state = 1, attempt = t.attempt + 1, lease_seq = t.lease_seq + 1,
                    lease_until = now() + make_interval(secs => ($3::float8[])[c.n]),
                    worker = ($4::text[])[c.n]
                FROM numbered c
                WHERE t.id = c.id
                RETURNING t.id, t.payload, t.headers, t.attempt, t.max_attempts, t.lease_seq,
                          t.lease_until, t.created_at, t.expires_at,
                          extract(epoch FROM t.lease_until - now())::float8, c.n"),
            release: s("WITH back AS (
                    UPDATE {s}.tasks t SET state = 0, lease_until = NULL
                    FROM unnest($1::uuid[], $2::int4[]) AS r(id, seq)
                    WHERE t.id = r.id AND t.state = 1 AND t.lease_seq = r.seq
                    RETURNING t.id)
                SELECT pg_notify($3, $4) WHERE EXISTS (SELECT 1 FROM back)"),
            extend: s("UPDATE {s}.tasks SET lease_until = now() + make_interval(secs => $3)
                WHERE id = $1 AND state = 1 AND lease_seq = $2 AND lease_until > now()
                RETURNING lease_until"),
            complete_ok: s("UPDATE {s}.tasks t
                SET state = 2, output = r.output, error = NULL, finished_at = now(),
                    by_lease = r.seq, lease_until = NULL
                FROM unnest($1::uuid[], $2::int4[], $3::bytea[]) AS r(id, seq, output)
                WHERE t.id = r.id AND t.state < 2 AND r.seq >= 1 AND r.seq <= t.lease_seq
                RETURNING t.id, t.queue, t.state"),
            complete_failed: s("UPDATE {s}.tasks t
                SET state = CASE WHEN r.retry AND t.attempt < t.max_attempts
                                      AND (t.expires_at IS NULL OR t.expires_at > now())
                                 THEN 0 ELSE 3 END,
                    finished_at = CASE WHEN r.retry AND t.attempt < t.max_attempts
                                      AND (t.expires_at IS NULL OR t.expires_at > now())
                                 THEN NULL ELSE now() END,
                    error = r.error, by_lease = r.seq, lease_until = NULL
                FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::bool[]) AS r(id, seq, error, retry)
                WHERE t.id = r.id AND t.state = 1 AND t.lease_seq = r.seq AND t.lease_until > now()
                RETURNING t.id, t.queue, t.state"),
            report_view: s("SELECT id, state, lease_seq, by_lease, output, error FROM {s}.tasks WHERE id = ANY($1)"),
            result_of: s("SELECT {r} FROM {s}.tasks WHERE id = $1"),
            results_of: s("SELECT {r} FROM {s}.tasks WHERE id = ANY($1) AND state >= 2"),
            claim_results: s("UPDATE {s}.tasks t SET claimed = true
                FROM (SELECT id FROM {s}.tasks WHERE queue = $1 AND state >= 2 AND NOT claimed
                      ORDER BY finished_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) c
                WHERE t.id = c.id
                RETURNING t.id, t.queue, t.state, t.output, t.error, t.attempt, t.worker,
                          t.created_at, t.finished_at"),
            unclaim_results: s("WITH back AS (
                    UPDATE {s}.tasks SET claimed = false WHERE id = ANY($1) RETURNING id)
                SELECT pg_notify($2, $3) WHERE EXISTS (SELECT 1 FROM back)"),
            task_queue: s("SELECT queue FROM {s}.tasks WHERE id = $1"),
            in_flight: s("SELECT worker, count(*) FROM {s}.tasks
                WHERE state = 1 AND worker = ANY($1) GROUP BY worker"),
            stats: s("SELECT queue,
                    count(*) FILTER (WHERE state = 0),
                    count(*) FILTER (WHERE state = 1),
                    count(*) FILTER (WHERE state = 2),
                    count(*) FILTER (WHERE state = 3),
                    coalesce(sum(greatest(attempt - 1, 0)), 0)::int8,
                    coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 0)), 0)::float8,
                    count(*) FILTER (WHERE state >= 2 AND NOT claimed),
                    count(*) FILTER (WHERE state = 3 AND error LIKE 'task expired:%')
                FROM {s}.tasks WHERE $1::text[] IS NULL OR queue = ANY($1) GROUP BY queue"),
            sweep_leases: s("UPDATE {s}.tasks t
                SET state = CASE WHEN t.attempt >= t.max_attempts THEN 3 ELSE 0 END,
                    finished_at = CASE WHEN t.attempt >= t.max_attempts THEN now() END,
                    error = CASE WHEN t.attempt >= t.max_attempts
                                 THEN 'lease expired on attempt ' || t.attempt || ' of ' || t.max_attempts
                                      || ': worker ' || coalesce(t.worker, '?') || ' reported no result in time'
                                 ELSE t.error END,
                    by_lease = CASE WHEN t.attempt >= t.max_attempts THEN t.lease_seq ELSE t.by_lease END,
                    lease_until = NULL
                FROM (SELECT id FROM {s}.tasks WHERE state = 1 AND lease_until <= now()
                      ORDER BY lease_until LIMIT 500 FOR UPDATE SKIP LOCKED) c
                WHERE t.id = c.id
                RETURNING t.id, t.queue, t.state"),
            sweep_ttl: s("UPDATE {s}.tasks t
                SET state = 3, finished_at = now(), lease_until = NULL,
                    error = 'task expired: its ttl ran out before it finished'
                FROM (SELECT id FROM {s}.tasks WHERE state < 2 AND expires_at <= now()
                      ORDER BY expires_at LIMIT 500 FOR UPDATE SKIP LOCKED) c
                WHERE t.id = c.id
                RETURNING t.id, t.queue, t.state"),
            drop_old: s("DELETE FROM {s}.tasks WHERE id IN (
                SELECT id FROM {s}.tasks WHERE state >= 2 AND finished_at < now() - make_interval(secs => $1)
                ORDER BY finished_at LIMIT 1000 FOR UPDATE SKIP LOCKED)"),
            drop_over: s("DELETE FROM {s}.tasks WHERE id IN (
                SELECT id FROM {s}.tasks WHERE state >= 2
                ORDER BY finished_at DESC OFFSET $1 LIMIT 1000 FOR UPDATE SKIP LOCKED)"),
        }
    }
}

impl Store for PgStore {
    type WorkerStream = PgWorkerStream;
    type ResultStream = PgResultStream;
    type Watch = PgWatch;

    async fn put(&self, task: NewTask, wait: Duration) -> Result<PutOutcome, BrokerError> {
        let task = self.prepare(task)?;
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
            waiting.get_or_insert_with(|| self.inner.wakeups.waiting(request.queue.as_str()));
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
                &self.inner.sql.extend,
                &[&lease.task.as_uuid(), &seq, &self.lease_secs(extend_by)],
            )
            .await
            .map_err(PgError::from)?;
        if let Some(row) = rows.first() {
            return Ok(row.get(0));
        }
        let rows = client
            .query(&self.inner.sql.report_view, &[&vec![lease.task.as_uuid()]])
            .await
            .map_err(PgError::from)?;
        match rows.first().map(|row| state_of(row.get::<_, i16>(1))) {
            None => Err(BrokerError::TaskNotFound(lease.task.to_string())),
            Some(TaskState::Succeeded | TaskState::Failed) => {
                Err(BrokerError::TaskFinished(lease.task))
            }
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
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(result) = self.result_now(task).await? {
                return Ok(Some(result));
            }
            if self.is_closed() || wait.is_zero() || !self.wait_for(notified, until).await {
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
        let ready = self.inner.wakeups.results(queue.as_str());
        loop {
            let notified = ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(result) = self.claim_results(&queue, 1).await?.pop() {
                return Ok(Some(result));
            }
            if self.is_closed() || wait.is_zero() || !self.wait_for(notified, until).await {
                return Ok(None);
            }
        }
    }

    async fn stats(&self, only: Option<&[QueueName]>) -> Result<Stats, BrokerError> {
        let names: Option<Vec<String>> =
            only.map(|queues| queues.iter().map(|q| q.as_str().to_owned()).collect());
        let client = self.inner.pool.get().await.map_err(PgError::from)?;
        let rows = client
            .query(&self.inner.sql.stats, &[&names])
            .await
            .map_err(PgError::from)?;
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
        for queue in &mut queues {
            queue.waiting_workers = self.inner.wakeups.waiting_on(&queue.queue);
        }
        queues.sort_by(|a, b| a.queue.cmp(&b.queue));
        let workers = self.workers(only).await?;
        Ok(Stats { queues, workers })
    }

    async fn task_queue(&self, task: TaskId) -> Result<QueueName, BrokerError> {
        let client = self.inner.pool.get().await.map_err(PgError::from)?;
        let rows = client
            .query(&self.inner.sql.task_queue, &[&task.as_uuid()])
            .await
            .map_err(PgError::from)?;
        let Some(row) = rows.first() else {
            return Err(BrokerError::TaskNotFound(task.to_string()));
        };
        QueueName::parse(row.get(0))
    }

    async fn open_worker_stream(
        &self,
        request: LeaseRequest,
        window: u32,
    ) -> Result<PgWorkerStream, BrokerError> {
        if self.is_closed() {
            return Err(BrokerError::ShuttingDown);
        }
        Ok(PgWorkerStream::open(self, request, window))
    }

    async fn open_result_stream(&self, queue: &QueueName) -> Result<PgResultStream, BrokerError> {
        Ok(PgResultStream::open(self, queue.clone()))
    }

    async fn watch(&self, ids: &[TaskId]) -> Result<PgWatch, BrokerError> {
        PgWatch::open(self.clone(), ids).await
    }

    async fn snapshot(&self) -> Result<Snapshot, BrokerError> {
        let stats = self.stats(None).await?;
        Ok(Snapshot {
            queues: stats.queues,
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

    fn holdings(&self) -> Holdings {
        Holdings::default()
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}
