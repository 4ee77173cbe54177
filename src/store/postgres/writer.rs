//! Group commit: puts and results that arrive together share one
//! transaction. Calls hand their work to a bounded queue; each of a few
//! writer tasks takes everything queued when it is free, writes it with
//! multi-row statements (`unnest` of arrays), commits once, and answers
//! every caller. While one writer waits for its commit to reach the disk,
//! the next gathers the following batch, so the commits overlap and no
//! call pays one commit of its own under load.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use deadpool_postgres::Transaction;
use tokio::sync::{Mutex as AsyncMutex, mpsc};
use uuid::Uuid;

use super::counters::Tally;
use super::error::PgError;
use super::inner::Inner;
use super::jobs::{Job, Prepared};
use super::notify::notify_finished;
use super::registry::{ResultShared, StreamShared, lock, places};
use super::rows::{result_row, state_of};
use crate::broker::{
    BrokerError, LeaseId, LeaseId as Lease, LeasedTask, Outcome, PutOutcome, TaskId, TaskResult,
    TaskState,
};

/// Most tasks and results one transaction takes.
const MAX_BATCH_ITEMS: usize = 2_000;

/// The queue writers take their work from.
pub(crate) type Jobs = Arc<AsyncMutex<mpsc::Receiver<Job>>>;

/// One writer: takes what is queued, writes it in one transaction, answers.
pub(crate) async fn run(inner: std::sync::Weak<Inner>, jobs: Jobs) {
    loop {
        let batch = {
            let mut jobs = jobs.lock().await;
            let Some(first) = jobs.recv().await else {
                return;
            };
            let mut items = first.items();
            let mut batch = vec![first];
            while items < MAX_BATCH_ITEMS {
                match jobs.try_recv() {
                    Ok(job) => {
                        items += job.items();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        let Some(inner) = inner.upgrade() else { return };
        write(&inner, batch).await;
    }
}

/// Writes one batch and answers its callers; on a database error every
/// caller hears UNAVAILABLE and nothing of the batch is kept.
async fn write(inner: &Inner, batch: Vec<Job>) {
    let mut puts = Vec::new();
    let mut completes = Vec::new();
    let mut put_answers = Vec::new();
    let mut complete_answers = Vec::new();
    for job in batch {
        match job {
            Job::Put { tasks, answer } => {
                put_answers.push((tasks.len(), answer));
                puts.extend(tasks);
            }
            Job::Complete { results, answer } => {
                complete_answers.push((results.len(), answer));
                completes.extend(results);
            }
        }
    }
    let mut tries = 0;
    let written = loop {
        match write_once(inner, &puts, &completes).await {
            // PostgreSQL broke a deadlock by failing this side: nothing of
            // it was kept, so it can run again.
            Err(error) if error.is_retryable() && tries < 3 => tries += 1,
            written => break written,
        }
    };
    match written {
        Ok((put_results, complete_results, handoffs)) => {
            let back = handoffs.deliver(inner);
            unclaim(inner, back).await;
            let mut put_results = put_results.into_iter();
            for (n, answer) in put_answers {
                let _ = answer.send(put_results.by_ref().take(n).collect());
            }
            let mut complete_results = complete_results.into_iter();
            for (n, answer) in complete_answers {
                let _ = answer.send(complete_results.by_ref().take(n).collect());
            }
        }
        Err(error) => {
            tracing::warn!(%error, "postgres store: a write transaction failed");
            let error = BrokerError::from(error);
            for (n, answer) in put_answers {
                let _ = answer.send(vec![Err(error.clone()); n]);
            }
            for (n, answer) in complete_answers {
                let _ = answer.send(vec![Err(error.clone()); n]);
            }
        }
    }
}

/// One transaction of a batch: its puts, then its results. Counter rows are
/// taken in one order by every transaction (put shards in name order, then
/// one finish shard in name order), so transactions queue up rather than
/// deadlock.
type Written = (
    Vec<Result<PutOutcome, BrokerError>>,
    Vec<Result<TaskState, BrokerError>>,
    Handoffs,
);

async fn write_once(
    inner: &Inner,
    puts: &[Prepared],
    completes: &[(LeaseId, Outcome)],
) -> Result<Written, PgError> {
    let mut handoffs = Handoffs::default();
    match write_transaction(inner, puts, completes, &mut handoffs).await {
        Ok((put_results, complete_results)) => Ok((put_results, complete_results, handoffs)),
        Err(error) => {
            handoffs.undo();
            Err(error)
        }
    }
}

/// Tasks and results handed to this server's streams inside a write
/// transaction (the places reserved in their windows before it commits),
/// delivered once it has: a new task goes straight to a worker stream with
/// room, leased in the insert, and a new result straight to a result
/// stream, claimed in the update that finished it. No claim, and no commit
/// of its own, for either. Other servers' streams and the backlog go
/// through the claims of each queue's dispatch.
#[derive(Default)]
pub(crate) struct Handoffs {
    tasks: Vec<(Arc<StreamShared>, LeasedTask)>,
    results: Vec<(Arc<ResultShared>, TaskResult)>,
    /// Places reserved and not (yet) filled: given back on failure.
    task_places: Vec<Arc<StreamShared>>,
    result_places: Vec<Arc<ResultShared>>,
    /// What the transaction did, counted once it commits.
    tally: Tally,
}

impl Handoffs {
    /// The transaction failed: every reserved place is given back.
    fn undo(self) {
        for stream in self.task_places {
            stream.unreserve(1);
        }
        for (stream, _) in self.tasks {
            stream.unreserve(1);
        }
        for stream in self.result_places {
            stream.unreserve(1);
        }
        for (stream, _) in self.results {
            stream.unreserve(1);
        }
    }

    /// The transaction committed: each stream gets what was handed to it.
    /// A stream that ended meanwhile still holds its task, and its dispatch
    /// gives it back; a result for a reader that left is given back here.
    fn deliver(self, inner: &Inner) -> Vec<TaskResult> {
        inner.counters.add(self.tally);
        let mut back = Vec::new();
        for stream in self.task_places {
            stream.unreserve(1);
        }
        for stream in self.result_places {
            stream.unreserve(1);
        }
        if !self.tasks.is_empty() {
            let mut leases = lock(&inner.stream_leases);
            for (stream, task) in self.tasks {
                stream.hold(&task, &mut leases);
                if stream.tx.send(task).is_err() {
                    stream.dispatch.changed.notify_one();
                }
            }
        }
        for (stream, result) in self.results {
            let sent = match lock(&stream.tx).as_ref() {
                Some(tx) => tx.send(result).map_err(|unsent| unsent.0),
                None => Err(result),
            };
            if let Err(result) = sent {
                stream.unreserve(1);
                back.push(result);
            }
        }
        back
    }
}

/// Gives back results claimed for a reader that left before they were
/// sent, and tells the other readers of their queues.
async fn unclaim(inner: &Inner, results: Vec<TaskResult>) {
    let mut by_queue: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for result in results {
        by_queue
            .entry(result.queue.as_str().to_owned())
            .or_default()
            .push(result.task_id.as_uuid());
    }
    for (queue, ids) in by_queue {
        let done = async {
            let client = inner.pool.get().await?;
            client
                .execute(
                    &inner.sql.unclaim_results,
                    &[&ids, &inner.channels.1, &format!("{queue}\n")],
                )
                .await?;
            Ok::<_, PgError>(())
        }
        .await;
        if let Err(error) = done {
            tracing::warn!(%error, queue = %queue,
                "postgres store: could not give back results a reader left; they stay claimed");
        }
    }
}

async fn write_transaction(
    inner: &Inner,
    puts: &[Prepared],
    completes: &[(LeaseId, Outcome)],
    handoffs: &mut Handoffs,
) -> Result<
    (
        Vec<Result<PutOutcome, BrokerError>>,
        Vec<Result<TaskState, BrokerError>>,
    ),
    PgError,
> {
    let sql = &inner.sql;
    let mut client = inner.pool.get().await?;
    let transaction = client.transaction().await?;
    // Puts first: the put shard of each queue is locked (in name order),
    // then the count read, so no two puts pass the capacity check together.
    let mut names: Vec<String> = puts.iter().map(|t| t.queue.as_str().to_owned()).collect();
    names.sort_unstable();
    names.dedup();
    let mut unfinished: HashMap<String, i64> = HashMap::new();
    if !names.is_empty() {
        let ensure = transaction.prepare_cached(&sql.ensure_queues).await?;
        let lock = transaction.prepare_cached(&sql.lock_queues).await?;
        let count = transaction.prepare_cached(&sql.count_unfinished).await?;
        // Sent together (tokio-postgres pipelines what is polled at once);
        // the database runs them in order, and the count, a statement of
        // its own, sees every put committed before the lock was granted.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&names];
        let (_, _, counts) = tokio::try_join!(
            transaction.execute(&ensure, &params),
            transaction.execute(&lock, &params),
            transaction.query(&count, &params),
        )?;
        for row in counts {
            unfinished.insert(row.get(0), row.get(1));
        }
    }
    let put_results = if puts.is_empty() {
        Vec::new()
    } else {
        put_tasks(inner, &transaction, puts, &unfinished, handoffs).await?
    };
    let complete_results = if completes.is_empty() {
        Vec::new()
    } else {
        complete_in_rounds(inner, &transaction, completes, handoffs).await?
    };
    transaction.commit().await?;
    Ok((put_results, complete_results))
}

/// Inserts tasks: room checked per queue across all servers (the queue's
/// counter row, locked by the caller), duplicates by idempotency key
/// answered with the first task's id.
async fn put_tasks(
    inner: &Inner,
    transaction: &Transaction<'_>,
    tasks: &[Prepared],
    unfinished: &HashMap<String, i64>,
    handoffs: &mut Handoffs,
) -> Result<Vec<Result<PutOutcome, BrokerError>>, PgError> {
    let sql = &inner.sql;
    let capacity = i64::try_from(inner.broker.queue_capacity).unwrap_or(i64::MAX);
    let mut room: HashMap<String, i64> = unfinished
        .iter()
        .map(|(name, n)| (name.clone(), capacity - n))
        .collect();
    // Keys first, as the memory store checks them: a put whose key is
    // held (or taken by an earlier task of this batch) is a duplicate and
    // takes no room. Puts to a queue run one transaction at a time (its
    // counter row is locked), so no other server adds a key meanwhile.
    let mut keys_held = held_keys(inner, transaction, tasks.iter()).await?;
    // Tasks within room, in order; the others are refused at once.
    let mut answers: Vec<Option<Result<PutOutcome, BrokerError>>> = Vec::with_capacity(tasks.len());
    let mut accepted: BTreeMap<&str, usize> = BTreeMap::new();
    for task in tasks {
        let key = task
            .task
            .idempotency_key
            .as_ref()
            .map(|key| (task.queue.as_str().to_owned(), key.clone()));
        if let Some(first) = key.as_ref().and_then(|key| keys_held.get(key)) {
            answers.push(Some(Ok(PutOutcome {
                task_id: TaskId::from_uuid(*first),
                duplicate: true,
            })));
            continue;
        }
        let left = room.entry(task.queue.as_str().to_owned()).or_insert(0);
        if *left <= 0 {
            answers.push(Some(Err(BrokerError::QueueFull {
                queue: task.queue.clone(),
                capacity: inner.broker.queue_capacity,
            })));
            continue;
        }
        *left -= 1;
        answers.push(None);
        if let Some(key) = key {
            keys_held.insert(key, task.id.as_uuid());
        }
        if !task.is_delayed() {
            *accepted.entry(task.queue.as_str()).or_default() += 1;
        }
    }
    // Places in this server's worker streams with room, for the first
    // tasks of each queue; only when nothing older waits in that queue, so
    // that hand-over keeps the queue's order.
    let mut places_of: HashMap<&str, std::collections::VecDeque<Arc<StreamShared>>> =
        HashMap::new();
    if !*inner.closed.borrow() {
        for (queue, n) in &accepted {
            let Some(dispatch) = lock(&inner.task_dispatch).get(*queue).cloned() else {
                continue;
            };
            let streams = lock(&dispatch.streams).clone();
            if streams.iter().all(|s| s.room() == 0) {
                continue;
            }
            let waiting: bool = transaction
                .query_one(&transaction.prepare_cached(&sql.any_ready).await?, &[queue])
                .await?
                .get(0);
            if waiting {
                continue;
            }
            let got = places(&streams, &dispatch.turn, *n, StreamShared::reserve);
            handoffs.task_places.extend(got.iter().cloned());
            places_of.insert(*queue, got.into());
        }
    }
    let mut rows = Rows::default();
    let mut handed: HashMap<Uuid, Arc<StreamShared>> = HashMap::new();
    for (task, answer) in tasks.iter().zip(&answers) {
        if answer.is_some() {
            continue;
        }
        let place = places_of
            .get_mut(task.queue.as_str())
            .filter(|_| !task.is_delayed())
            .and_then(std::collections::VecDeque::pop_front);
        let lease = place.as_ref().map(|stream| {
            (
                stream.worker.as_str().to_owned(),
                inner.lease_secs(stream.lease),
            )
        });
        if let Some(stream) = place {
            handed.insert(task.id.as_uuid(), stream);
        }
        rows.push(task, lease)?;
    }
    let mut inserted: std::collections::HashSet<Uuid> = Default::default();
    let by_id: HashMap<Uuid, &Prepared> = if handed.is_empty() {
        HashMap::new()
    } else {
        tasks.iter().map(|t| (t.id.as_uuid(), t)).collect()
    };
    if !rows.ids.is_empty() {
        let now = tokio::time::Instant::now();
        for row in transaction
            .query(
                &transaction.prepare_cached(&sql.insert_tasks).await?,
                &[
                    &rows.ids,
                    &rows.queues,
                    &rows.payloads,
                    &rows.headers,
                    &rows.keys,
                    &rows.max_attempts,
                    &rows.ttls,
                    &rows.lease_secs,
                    &rows.workers,
                    &rows.priorities,
                    &rows.delays,
                ],
            )
            .await?
        {
            let id: Uuid = row.get(0);
            inserted.insert(id);
            if let Some(stream) = handed.remove(&id) {
                let task = by_id[&id];
                // Leased in its own insert: it waited for nothing.
                handoffs.tally.queue(task.queue.as_str()).delivered(0.0);
                let left: f64 = row.get(4);
                let task = LeasedTask {
                    id: task.id,
                    queue: task.queue.clone(),
                    payload: task.task.payload.clone(),
                    headers: task.task.headers.clone(),
                    attempt: 1,
                    max_attempts: task.max_attempts,
                    lease_id: Lease {
                        task: task.id,
                        seq: 1,
                    },
                    lease_expires_at: row.get(1),
                    lease_deadline: now + std::time::Duration::from_secs_f64(left.max(0.0)),
                    created_at: row.get(2),
                    expires_at: row.get(3),
                };
                // The place is filled: it moves from reserved to handed.
                if let Some(i) = handoffs
                    .task_places
                    .iter()
                    .position(|s| Arc::ptr_eq(s, &stream))
                {
                    handoffs.task_places.swap_remove(i);
                }
                handoffs.tasks.push((stream, task));
            }
        }
    }
    // A task sent to the insert and not inserted met an idempotency key
    // held (a safety net: keys were looked up under the queue's lock
    // before the insert, so this finds none and sends no statement).
    let duplicates = held_keys(
        inner,
        transaction,
        tasks
            .iter()
            .zip(&answers)
            .filter(|(t, answer)| answer.is_none() && !inserted.contains(&t.id.as_uuid()))
            .map(|(t, _)| t),
    )
    .await?;
    let handed_ids: std::collections::HashSet<TaskId> =
        handoffs.tasks.iter().map(|(_, t)| t.id).collect();
    let mut added: BTreeMap<String, i64> = BTreeMap::new();
    // Queues where some new task waits for a claim: their notification.
    let mut ready: std::collections::BTreeSet<String> = Default::default();
    let mut results = Vec::with_capacity(tasks.len());
    for (task, answer) in tasks.iter().zip(answers) {
        if let Some(answer) = answer {
            results.push(answer);
            continue;
        }
        if inserted.contains(&task.id.as_uuid()) {
            *added.entry(task.queue.as_str().to_owned()).or_default() += 1;
            handoffs.tally.queue(task.queue.as_str()).enqueued += 1;
            if !handed_ids.contains(&task.id) && !task.is_delayed() {
                ready.insert(task.queue.as_str().to_owned());
            }
            results.push(Ok(PutOutcome {
                task_id: task.id,
                duplicate: false,
            }));
            continue;
        }
        let first = task
            .task
            .idempotency_key
            .as_ref()
            .and_then(|key| duplicates.get(&(task.queue.as_str().to_owned(), key.clone())));
        results.push(match first {
            Some(first) => Ok(PutOutcome {
                task_id: TaskId::from_uuid(*first),
                duplicate: true,
            }),
            // Its twin was dropped between the insert and the look-up: only
            // retention deletes rows, and it never deletes unfinished ones.
            None => Err(BrokerError::StoreUnavailable {
                store: "postgres",
                reason: "a duplicate's first task vanished; put it again".into(),
            }),
        });
    }
    // The count and the notification go together (pipelined).
    let add = transaction.prepare_cached(&sql.add_unfinished).await?;
    let notify = transaction.prepare_cached(&sql.notify_tasks).await?;
    let (names, counts): (Vec<String>, Vec<i64>) = added.into_iter().unzip();
    let ready: Vec<String> = ready.into_iter().collect();
    let adding = async {
        if !names.is_empty() {
            transaction.execute(&add, &[&names, &counts]).await?;
        }
        Ok::<_, PgError>(())
    };
    let notifying = async {
        if !ready.is_empty() {
            transaction
                .execute(&notify, &[&inner.channels.0, &ready])
                .await?;
        }
        Ok::<_, PgError>(())
    };
    tokio::try_join!(adding, notifying)?;
    Ok(results)
}

/// The idempotency keys of `tasks` already held: (queue, key) → the
/// task holding it. No statement when no task has a key.
async fn held_keys<'a>(
    inner: &Inner,
    transaction: &Transaction<'_>,
    tasks: impl Iterator<Item = &'a Prepared>,
) -> Result<HashMap<(String, String), Uuid>, PgError> {
    let (queues, keys): (Vec<String>, Vec<String>) = tasks
        .filter_map(|t| {
            t.task
                .idempotency_key
                .clone()
                .map(|key| (t.queue.as_str().to_owned(), key))
        })
        .unzip();
    let mut held = HashMap::new();
    if queues.is_empty() {
        return Ok(held);
    }
    for row in transaction
        .query(
            &transaction.prepare_cached(&inner.sql.find_keys).await?,
            &[&queues, &keys],
        )
        .await?
    {
        held.insert((row.get(0), row.get(1)), row.get(2));
    }
    Ok(held)
}

/// The columns of an insert, one array each.
#[derive(Default)]
struct Rows {
    ids: Vec<Uuid>,
    queues: Vec<String>,
    payloads: Vec<Vec<u8>>,
    headers: Vec<Option<String>>,
    keys: Vec<Option<String>>,
    max_attempts: Vec<i32>,
    ttls: Vec<Option<f64>>,
    /// Set for a task handed to a worker stream in the insert.
    lease_secs: Vec<Option<f64>>,
    workers: Vec<Option<String>>,
    priorities: Vec<i32>,
    /// Set for a task that waits before it is pending.
    delays: Vec<Option<f64>>,
}

impl Rows {
    fn push(&mut self, task: &Prepared, lease: Option<(String, f64)>) -> Result<(), PgError> {
        self.ids.push(task.id.as_uuid());
        self.queues.push(task.queue.as_str().to_owned());
        self.payloads.push(task.task.payload.to_vec());
        self.headers.push(if task.task.headers.is_empty() {
            None
        } else {
            Some(
                serde_json::to_string(&task.task.headers)
                    .map_err(|e| PgError::Encode(e.to_string()))?,
            )
        });
        self.keys.push(task.task.idempotency_key.clone());
        self.max_attempts
            .push(i32::try_from(task.max_attempts).unwrap_or(i32::MAX));
        self.ttls.push(task.task.ttl.map(|ttl| ttl.as_secs_f64()));
        let (worker, secs) = lease.unzip();
        self.lease_secs.push(secs);
        self.workers.push(worker);
        self.priorities.push(task.task.priority);
        self.delays.push(
            task.is_delayed()
                .then(|| task.task.delay.unwrap_or_default().as_secs_f64()),
        );
        Ok(())
    }
}

/// Records results. Successes from any lease of an unfinished task are
/// taken (the first wins); failures need the current, unexpired lease, and
/// go back to pending while attempts and ttl allow a retry. Whatever no
/// statement changed is explained by a look at the row: a repeat of the
/// same report answers the state again, anything else is refused.
/// Applies reports in the order they came. A task reported more than once
/// in one batch (a worker's repeat, a stream's report racing its retry)
/// has its later reports applied after its earlier ones, as if they came
/// in later transactions: each round takes at most one report per task.
async fn complete_in_rounds(
    inner: &Inner,
    transaction: &Transaction<'_>,
    results: &[(LeaseId, Outcome)],
    handoffs: &mut Handoffs,
) -> Result<Vec<Result<TaskState, BrokerError>>, PgError> {
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    let round_of: Vec<usize> = results
        .iter()
        .map(|(lease, _)| {
            let n = seen.entry(lease.task.as_uuid()).or_default();
            *n += 1;
            *n - 1
        })
        .collect();
    let rounds = round_of.iter().max().map_or(0, |last| last + 1);
    if rounds <= 1 {
        return complete(inner, transaction, results, handoffs).await;
    }
    let mut answers: Vec<Option<Result<TaskState, BrokerError>>> = vec![None; results.len()];
    for round in 0..rounds {
        let (at, batch): (Vec<usize>, Vec<(LeaseId, Outcome)>) = results
            .iter()
            .enumerate()
            .filter(|(i, _)| round_of[*i] == round)
            .map(|(i, report)| (i, report.clone()))
            .unzip();
        let got = complete(inner, transaction, &batch, handoffs).await?;
        for (i, answer) in at.into_iter().zip(got) {
            answers[i] = Some(answer);
        }
    }
    Ok(answers
        .into_iter()
        .map(|answer| answer.unwrap_or(Err(BrokerError::ShuttingDown)))
        .collect())
}

async fn complete(
    inner: &Inner,
    transaction: &Transaction<'_>,
    results: &[(LeaseId, Outcome)],
    handoffs: &mut Handoffs,
) -> Result<Vec<Result<TaskState, BrokerError>>, PgError> {
    let sql = &inner.sql;
    let mut answers: Vec<Option<Result<TaskState, BrokerError>>> =
        Vec::with_capacity(results.len());
    let mut ok = (Vec::new(), Vec::new(), Vec::new());
    let mut failed = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut checked = Vec::with_capacity(results.len());
    for (lease, outcome) in results {
        let lease = *lease;
        match outcome.clone().within(inner.broker.max_result) {
            Err(error) => {
                answers.push(Some(Err(error)));
                checked.push(None);
            }
            Ok(outcome) => {
                answers.push(None);
                checked.push(Some((lease, outcome.clone())));
                let seq = i32::try_from(lease.seq).unwrap_or(i32::MAX);
                match &outcome {
                    Outcome::Success(output) => {
                        ok.0.push(lease.task.as_uuid());
                        ok.1.push(seq);
                        ok.2.push(output.to_vec());
                    }
                    Outcome::Failure {
                        message,
                        retry,
                        retry_after,
                    } => {
                        failed.0.push(lease.task.as_uuid());
                        failed.1.push(seq);
                        failed.2.push(message.clone());
                        failed.3.push(*retry);
                        failed.4.push(retry_after.map(|after| after.as_secs_f64()));
                    }
                }
            }
        }
    }
    // What each statement changed: task → (queue, state now).
    // What each statement changed: task → (queue, state now), and the
    // result of a task it finished.
    let mut changed: HashMap<Uuid, (String, i16)> = HashMap::new();
    let mut finished_results: HashMap<Uuid, TaskResult> = HashMap::new();
    if !ok.0.is_empty() {
        for row in transaction
            .query(
                &transaction.prepare_cached(&sql.complete_ok).await?,
                &[&ok.0, &ok.1, &ok.2],
            )
            .await?
        {
            changed.insert(row.get(0), (row.get(1), row.get(2)));
            count_report(&mut handoffs.tally, &row);
            if let Some(result) = result_row(&row) {
                finished_results.insert(row.get(0), result);
            }
        }
    }
    if !failed.0.is_empty() {
        let backoff = inner.broker.retry_backoff;
        for row in transaction
            .query(
                &transaction.prepare_cached(&sql.complete_failed).await?,
                &[
                    &failed.0,
                    &failed.1,
                    &failed.2,
                    &failed.3,
                    &failed.4,
                    &backoff.base.as_secs_f64(),
                    &backoff.max.as_secs_f64(),
                ],
            )
            .await?
        {
            changed.insert(row.get(0), (row.get(1), row.get(2)));
            count_report(&mut handoffs.tally, &row);
            if let Some(result) = result_row(&row) {
                finished_results.insert(row.get(0), result);
            }
        }
    }
    // The rest: look at the rows (as this transaction left them).
    let unexplained: Vec<Uuid> = checked
        .iter()
        .flatten()
        .filter(|(lease, _)| !changed.contains_key(&lease.task.as_uuid()))
        .map(|(lease, _)| lease.task.as_uuid())
        .collect();
    let mut rows: HashMap<Uuid, tokio_postgres::Row> = HashMap::new();
    if !unexplained.is_empty() {
        for row in transaction
            .query(
                &transaction.prepare_cached(&sql.report_view).await?,
                &[&unexplained],
            )
            .await?
        {
            rows.insert(row.get(0), row);
        }
    }
    let mut finished: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    let mut retried: Vec<String> = Vec::new();
    let mut out = Vec::with_capacity(answers.len());
    for (answer, checked) in answers.into_iter().zip(checked) {
        if let Some(answer) = answer {
            out.push(answer);
            continue;
        }
        let (lease, outcome) = checked.expect("checked when not answered");
        let id = lease.task.as_uuid();
        if let Some((queue, state)) = changed.get(&id) {
            match state_of(*state) {
                // Pending now (0): its queue's claimers are woken. A retry
                // waiting out its backoff (-1) is woken by the sweep when
                // it is due.
                TaskState::Pending if *state == 0 => retried.push(queue.clone()),
                TaskState::Pending => {}
                _ => finished.entry(queue.clone()).or_default().push(id),
            }
            out.push(Ok(state_of(*state)));
            continue;
        }
        out.push(match rows.get(&id) {
            None => Err(BrokerError::TaskNotFound(lease.task.to_string())),
            Some(row) => explain(row, lease, &outcome),
        });
    }
    if !finished.is_empty() {
        // Results for this server's result streams are claimed here; the
        // count, the claims and the notifications go to the database
        // together (pipelined).
        let mut claimed: Vec<Uuid> = Vec::new();
        let mut split: Vec<(&str, &[Uuid], &[Uuid])> = Vec::new();
        for (queue, ids) in &finished {
            let handed = hand_results(inner, queue, ids, &mut finished_results, handoffs);
            claimed.extend_from_slice(&ids[..handed]);
            split.push((queue, &ids[..handed], &ids[handed..]));
        }
        let claim = transaction.prepare_cached(&sql.claim_these).await?;
        let notifications = async {
            for (queue, handed, rest) in &split {
                tokio::try_join!(
                    notify_finished(inner, transaction, queue, handed, true),
                    notify_finished(inner, transaction, queue, rest, false),
                )?;
            }
            Ok::<_, PgError>(())
        };
        let claims = async {
            if !claimed.is_empty() {
                transaction.execute(&claim, &[&claimed]).await?;
            }
            Ok::<_, PgError>(())
        };
        tokio::try_join!(
            subtract_finished(inner, transaction, &finished),
            claims,
            notifications,
        )?;
    }
    if !retried.is_empty() {
        retried.sort_unstable();
        retried.dedup();
        transaction
            .execute(
                &transaction.prepare_cached(&sql.notify_tasks).await?,
                &[&inner.channels.0, &retried],
            )
            .await?;
    }
    Ok(out)
}

/// Counts a report that changed its task (a row of `complete_ok` or
/// `complete_failed`: the result's columns, then the durations).
fn count_report(tally: &mut Tally, row: &tokio_postgres::Row) {
    let queue: &str = row.get(1);
    let counts = tally.queue(queue);
    match state_of(row.get::<_, i16>(2)) {
        TaskState::Pending => counts.retried_after_error += 1,
        TaskState::Succeeded => {
            counts.succeeded += 1;
            counts.finished(row.get(9), row.get(10));
        }
        TaskState::Failed => {
            counts.failed += 1;
            counts.finished(row.get(9), row.get(10));
        }
        TaskState::Leased | TaskState::Cancelled => {}
    }
}

/// Tasks a server ended outside the writers' batches (the sweep, a
/// cancel, a purge): counted out of their queues, and whoever waits for
/// their results told at commit.
pub(crate) async fn tasks_ended(
    inner: &Inner,
    transaction: &Transaction<'_>,
    finished: &BTreeMap<String, Vec<Uuid>>,
) -> Result<(), PgError> {
    if finished.is_empty() {
        return Ok(());
    }
    subtract_finished(inner, transaction, finished).await?;
    for (queue, ids) in finished {
        notify_finished(inner, transaction, queue, ids, false).await?;
    }
    Ok(())
}

/// Counts tasks finished in this transaction out of their queues, in a
/// finish shard picked at random (see the schema's `queue_counts`).
pub(crate) async fn subtract_finished(
    inner: &Inner,
    transaction: &Transaction<'_>,
    finished: &BTreeMap<String, Vec<Uuid>>,
) -> Result<(), PgError> {
    let names: Vec<&str> = finished.keys().map(String::as_str).collect();
    let counts: Vec<i64> = finished
        .values()
        .map(|ids| i64::try_from(ids.len()).unwrap_or(i64::MAX))
        .collect();
    transaction
        .execute(
            &transaction
                .prepare_cached(&inner.sql.subtract_unfinished)
                .await?,
            &[&names, &counts, &finish_shard()],
        )
        .await?;
    Ok(())
}

/// One of the finish shards, 1 to 15: spread well enough by the clock's
/// nanoseconds (no random generator needed for this).
fn finish_shard() -> i16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    i16::try_from(nanos % 15).unwrap_or(0) + 1
}

/// Hands results just finished in this transaction to this server's
/// result streams of `queue` with room, in completion order, claiming them
/// in the same transaction.
fn hand_results(
    inner: &Inner,
    queue: &str,
    ids: &[Uuid],
    results: &mut HashMap<Uuid, TaskResult>,
    handoffs: &mut Handoffs,
) -> usize {
    if *inner.closed.borrow() {
        return 0;
    }
    let Some(dispatch) = lock(&inner.result_dispatch).get(queue).cloned() else {
        return 0;
    };
    let streams = lock(&dispatch.streams).clone();
    let got = places(&streams, &dispatch.turn, ids.len(), ResultShared::reserve);
    let handed = got.len();
    for (stream, id) in got.into_iter().zip(ids) {
        match results.remove(id) {
            Some(result) => handoffs.results.push((stream, result)),
            None => handoffs.result_places.push(stream),
        }
    }
    handed
}

/// Why a report changed nothing, from the task's row: a repeat of the
/// report that set its state answers that state; otherwise the lease is
/// stale or the result conflicts.
fn explain(
    row: &tokio_postgres::Row,
    lease: LeaseId,
    outcome: &Outcome,
) -> Result<TaskState, BrokerError> {
    let state = state_of(row.get::<_, i16>(1));
    let lease_seq: i32 = row.get(2);
    let by_lease: Option<i32> = row.get(3);
    let output: Option<Vec<u8>> = row.get(4);
    let error: Option<String> = row.get(5);
    let retry_seq: Option<i32> = row.get(6);
    let retry_error: Option<String> = row.get(7);
    let seq = i32::try_from(lease.seq).unwrap_or(i32::MAX);
    // In the memory store's order: no lease of a cancelled task counts;
    // a repeat of the last retried failure gets the task's state, whatever
    // came after it; a repeat of the report that finished the task gets
    // its state; any other report on a finished task conflicts.
    if state == TaskState::Cancelled {
        return Err(BrokerError::Cancelled(lease.task));
    }
    if let Outcome::Failure {
        message,
        retry: true,
        ..
    } = outcome
        && retry_seq == Some(seq)
        && retry_error.as_deref() == Some(message.as_str())
    {
        return Ok(state);
    }
    let by_this = by_lease == Some(seq);
    let repeat = match outcome {
        Outcome::Failure { message, .. } => {
            by_this && state == TaskState::Failed && error.as_deref() == Some(message.as_str())
        }
        Outcome::Success(given) => {
            by_this && state == TaskState::Succeeded && output.as_deref() == Some(&given[..])
        }
    };
    if repeat {
        return Ok(state);
    }
    let finished = matches!(state, TaskState::Succeeded | TaskState::Failed);
    if !finished || seq == 0 || seq > lease_seq {
        return Err(BrokerError::stale(lease));
    }
    Err(BrokerError::ResultConflict(lease.task))
}
