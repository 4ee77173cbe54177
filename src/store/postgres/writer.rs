//! Group commit: puts and results that arrive together share one
//! transaction. Calls hand their work to a bounded queue; each of a few
//! writer tasks takes everything queued when it is free, writes it with
//! multi-row statements (`unnest` of arrays), commits once, and answers
//! every caller. While one writer waits for its commit to reach the disk,
//! the next gathers the following batch, so the commits overlap and no
//! call pays one commit of its own under load.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use deadpool_postgres::GenericClient;
use tokio::sync::{Mutex as AsyncMutex, mpsc};
use uuid::Uuid;

use super::counters::Tally;
use super::error::PgError;
use super::inner::Inner;
use super::jobs::{Job, Prepared};
use super::notify::{finished_payloads, notify_results};
use super::pipeline::WriteTransaction;
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
        // The turn to gather stays with this writer until its transaction
        // sends its COMMIT: the next one gathers what arrived meanwhile (a
        // larger batch) and runs while this commit reaches the disk.
        let mut turn = jobs.clone().lock_owned().await;
        let batch = {
            let jobs = &mut *turn;
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
        write(&inner, batch, Box::new(turn)).await;
    }
}

/// Writes one batch and answers its callers; on a database error every
/// caller hears UNAVAILABLE and nothing of the batch is kept.
pub(super) async fn write(inner: &Inner, batch: Vec<Job>, turn: Box<dyn Send>) {
    let mut turn = Some(turn);
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
        match write_once(inner, &puts, &completes, &mut turn).await {
            Err(error) if again(&error, &mut tries) => {}
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

/// One transaction of a batch: its results, then its puts. Counter rows
/// are taken in one order by every transaction (one finish shard, queues
/// in name order, then the put shards in name order), so transactions
/// queue up rather than deadlock.
type Written = (
    Vec<Result<PutOutcome, BrokerError>>,
    Vec<Result<TaskState, BrokerError>>,
    Handoffs,
);

/// `turn`: the writers' turn to gather, passed on when the COMMIT is sent
/// (kept by the first try only).
async fn write_once(
    inner: &Inner,
    puts: &[Prepared],
    completes: &[(LeaseId, Outcome)],
    turn: &mut Option<Box<dyn Send>>,
) -> Result<Written, PgError> {
    let mut handoffs = Handoffs::default();
    match write_transaction(inner, puts, completes, turn.take(), &mut handoffs).await {
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
    /// Results claimed for this server's result streams without a place
    /// (never expected): given back after the commit.
    unplaced: Vec<TaskResult>,
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
        let mut back = self.unplaced;
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
    turn: Option<Box<dyn Send>>,
    handoffs: &mut Handoffs,
) -> Result<
    (
        Vec<Result<PutOutcome, BrokerError>>,
        Vec<Result<TaskState, BrokerError>>,
    ),
    PgError,
> {
    let tx = WriteTransaction::open(&inner.pool).await?;
    if let Some(turn) = turn {
        tx.hold_until_commit(turn);
    }
    // Results first, then puts: a put holds its queues' put shards from
    // its insert to the COMMIT, so that puts to a queue take turns; with
    // the puts last, the results' updates are not part of that turn.
    let complete_results = if completes.is_empty() {
        Vec::new()
    } else {
        complete_in_rounds(inner, &tx, completes, puts.is_empty(), handoffs).await?
    };
    let first = completes.is_empty();
    let put_results = if puts.is_empty() {
        Vec::new()
    } else if let Some(results) = put_tasks(inner, &tx, puts, first, Assume::Room, handoffs).await?
    {
        results
    } else {
        // The puts did not fit as assumed: nothing of them was inserted,
        // and the transaction committed with the results before them.
        // Those results' hand-overs go out now, whatever becomes of the
        // puts, which go again in a transaction of their own.
        tx.committed();
        let back = std::mem::take(handoffs).deliver(inner);
        unclaim(inner, back).await;
        return Ok((put_again(inner, puts, handoffs).await, complete_results));
    };
    tx.committed();
    Ok((put_results, complete_results))
}

/// Puts that did not fit as assumed, again in a transaction of their own
/// after reading the counts (again when the database broke a deadlock).
/// On an error each is answered with it: the results committed before
/// them stand.
async fn put_again(
    inner: &Inner,
    puts: &[Prepared],
    handoffs: &mut Handoffs,
) -> Vec<Result<PutOutcome, BrokerError>> {
    let mut tries = 0;
    loop {
        let attempt = async {
            let tx = WriteTransaction::open(&inner.pool).await?;
            let results = put_tasks(inner, &tx, puts, true, Assume::Nothing, handoffs)
                .await?
                .unwrap_or_default();
            tx.committed();
            Ok::<_, PgError>(results)
        }
        .await;
        match attempt {
            Ok(results) => return results,
            Err(error) => {
                std::mem::take(handoffs).undo();
                if again(&error, &mut tries) {
                    continue;
                }
                tracing::warn!(%error, "postgres store: a write transaction of puts failed");
                let error = BrokerError::from(error);
                return vec![Err(error); puts.len()];
            }
        }
    }
}

/// Whether a write transaction that failed with `error` runs again: when
/// the database failed it for a reason that running it again may mend
/// (`PgError::is_retryable`: a deadlock broken, a key taken meanwhile;
/// nothing of it was kept), at most three more times; `tries` counts them.
fn again(error: &PgError, tries: &mut u32) -> bool {
    let again = error.is_retryable() && *tries < 3;
    *tries += u32::from(again);
    again
}

/// What a writer assumes of the database before it inserts puts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Assume {
    /// That the puts fit: room for all, no key held, nothing older waiting
    /// where they are handed over; the insert (`put_one_queue` or
    /// `put_tasks`) checks it, and inserts nothing otherwise. One round trip with the
    /// COMMIT, when it holds, as it nearly always does.
    Room,
    /// Nothing: the counts, keys and waiting tasks are read first.
    Nothing,
}

/// What the database says before a batch of puts is inserted, read in one
/// round trip under the locks of the queues' put shards.
#[derive(Default)]
struct BeforePut {
    /// Unfinished tasks per queue, across all servers.
    unfinished: HashMap<String, i64>,
    /// Queues where older tasks wait for a claim (or paused): their new
    /// tasks are not handed over in the insert.
    waiting: std::collections::HashSet<String>,
    /// Idempotency keys already held.
    keys_held: HashMap<(String, String), Uuid>,
}

/// Locks the put shard of each queue (in name order, so no two puts pass
/// the capacity check together), then reads the counts, which queues have
/// older tasks waiting (of `handing`, the queues with room in this
/// server's worker streams) and the keys held: one round trip, with BEGIN
/// when it is the transaction's first. Sent together, the database runs
/// them in order: each statement after the lock sees every put committed
/// before the lock was granted, so no other server adds a key or a task
/// meanwhile.
async fn before_put(
    inner: &Inner,
    tx: &WriteTransaction,
    names: &[String],
    handing: &[String],
    tasks: &[Prepared],
) -> Result<BeforePut, PgError> {
    let sql = &inner.sql;
    let client = tx.client();
    let (key_queues, keys) = keys_of(tasks.iter());
    let lock = client.prepare_cached(&sql.lock_queues).await?;
    let count = client.prepare_cached(&sql.count_unfinished).await?;
    let waiting = client.prepare_cached(&sql.waiting_queues).await?;
    let find_keys = client.prepare_cached(&sql.find_keys).await?;
    let ensure = client.prepare_cached(&sql.ensure_queues).await?;
    // Every queue's put shard exists once it was admitted (`queues.rs`);
    // should one be missing, it is made and the reads run again.
    let making: [Param<'_>; 1] = [&names];
    let mut made = false;
    loop {
        let reading_waiting = async {
            if handing.is_empty() {
                return Ok(Vec::new());
            }
            client.query(&waiting, &[&handing]).await
        };
        let reading_keys = async {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            client.query(&find_keys, &[&key_queues, &keys]).await
        };
        let (_, (), locked, counts, waiting, held) = tokio::try_join!(
            tx.begin(),
            execute_if(client, made, &ensure, &making),
            async { client.query(&lock, &[&names]).await.map_err(PgError::from) },
            async { client.query(&count, &[&names]).await.map_err(PgError::from) },
            async { reading_waiting.await.map_err(PgError::from) },
            async { reading_keys.await.map_err(PgError::from) },
        )?;
        if locked.len() < names.len() && !made {
            made = true;
            continue;
        }
        return Ok(BeforePut {
            unfinished: counts.iter().map(|row| (row.get(0), row.get(1))).collect(),
            waiting: waiting.iter().map(|row| row.get(0)).collect(),
            keys_held: held
                .iter()
                .map(|row| ((row.get(0), row.get(1)), row.get(2)))
                .collect(),
        });
    }
}

/// Inserts tasks: room checked per queue across all servers (the queue's
/// put shard, locked first), duplicates by idempotency key answered with
/// the first task's id. The puts are the transaction's last statement:
/// the COMMIT goes with the insert. `first`: nothing was sent in this
/// transaction before. `None`: the puts did not fit as assumed, and
/// nothing of them was inserted.
async fn put_tasks(
    inner: &Inner,
    tx: &WriteTransaction,
    tasks: &[Prepared],
    first: bool,
    assume: Assume,
    handoffs: &mut Handoffs,
) -> Result<Option<Vec<Result<PutOutcome, BrokerError>>>, PgError> {
    let sql = &inner.sql;
    let client = tx.client();
    let mut names: Vec<String> = tasks.iter().map(|t| t.queue.as_str().to_owned()).collect();
    names.sort_unstable();
    names.dedup();
    // Queues with room in this server's worker streams now: whether older
    // tasks wait there is read with the counts or, when assumed, checked
    // by the insert (assumed only where the streams' last claim found
    // none, so that a backlog does not make every such put go twice).
    let handing: Vec<String> = if *inner.closed.borrow() {
        Vec::new()
    } else {
        let dispatches = lock(&inner.task_dispatch);
        names
            .iter()
            .filter(|name| {
                dispatches.get(name.as_str()).is_some_and(|d| {
                    (assume == Assume::Nothing || d.drained.load(Ordering::Acquire))
                        && lock(&d.streams).iter().any(|s| s.room() > 0)
                })
            })
            .cloned()
            .collect()
    };
    let before = match assume {
        Assume::Room => BeforePut::default(),
        Assume::Nothing => before_put(inner, tx, &names, &handing, tasks).await?,
    };
    let capacity = i64::try_from(inner.broker.queue_capacity).unwrap_or(i64::MAX);
    let mut room: HashMap<&str, i64> = names
        .iter()
        .map(|name| {
            let held = before.unfinished.get(name).copied().unwrap_or(0);
            (name.as_str(), capacity - held)
        })
        .collect();
    // Keys first, as the memory store checks them: a put whose key is
    // held (or taken by an earlier task of this batch) is a duplicate and
    // takes no room.
    let mut keys_held = before.keys_held;
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
        let left = room.entry(task.queue.as_str()).or_insert(0);
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
    for (queue, n) in &accepted {
        if !handing.iter().any(|q| q == queue) || before.waiting.contains(*queue) {
            continue;
        }
        let Some(dispatch) = lock(&inner.task_dispatch).get(*queue).cloned() else {
            continue;
        };
        let streams = lock(&dispatch.streams).clone();
        let got = places(&streams, &dispatch.turn, *n, StreamShared::reserve);
        handoffs.task_places.extend(got.iter().cloned());
        places_of.insert(*queue, got.into());
    }
    let mut rows = Rows::default();
    let mut handed: HashMap<Uuid, Arc<StreamShared>> = HashMap::new();
    // Queues where some new task waits for a claim: their notification.
    let mut ready: std::collections::BTreeSet<String> = Default::default();
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
        match place {
            Some(stream) => {
                handed.insert(task.id.as_uuid(), stream);
            }
            None if !task.is_delayed() => {
                ready.insert(task.queue.as_str().to_owned());
            }
            None => {}
        }
        rows.push(task, lease)?;
    }
    let by_id: HashMap<Uuid, &Prepared> = if handed.is_empty() {
        HashMap::new()
    } else {
        tasks.iter().map(|t| (t.id.as_uuid(), t)).collect()
    };
    // Lock, insert (which counts its rows into their queues) and notify
    // in one statement, with BEGIN when it is the transaction's first and
    // the COMMIT, or alone, as its own transaction: one round trip. A
    // batch of one queue assumed to fit (nearly every batch) takes the
    // plain statement, the others the function.
    let check = assume == Assume::Room;
    let one_queue = match names.as_slice() {
        [queue] if check => Some(queue),
        _ => None,
    };
    let put = client
        .prepare_cached(if one_queue.is_some() {
            &sql.put_one_queue
        } else {
            &sql.put_tasks
        })
        .await?;
    let handed_queues: Vec<&str> = places_of.keys().copied().collect();
    let ready: Vec<String> = ready.into_iter().collect();
    // The put shards to lock: read first (`before_put`), they are locked
    // already.
    let locking: &[String] = if check { &names } else { &[] };
    let now = tokio::time::Instant::now();
    if first && check && !rows.ids.is_empty() {
        // Nothing was sent in this transaction before, nor follows.
        tx.alone();
    }
    let params: [Param<'_>; 17] = [
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
        &capacity,
        &handed_queues,
        &check,
        &locking,
        &inner.channels.0,
        &ready,
    ];
    let inserting = async {
        if rows.ids.is_empty() {
            // Every task was answered already (full, or a duplicate).
            return Ok(Vec::new());
        }
        match one_queue {
            Some(queue) => {
                let params: [Param<'_>; 16] = [
                    params[0], params[1], params[2], params[3], params[4], params[5], params[6],
                    params[7], params[8], params[9], params[10], params[11], params[12], queue,
                    params[15], params[16],
                ];
                client.query(&put, &params).await
            }
            None => client.query(&put, &params).await,
        }
        .map_err(PgError::from)
    };
    let (_, inserted_rows, ()) = tokio::try_join!(tx.begin(), inserting, tx.commit_if(true))?;
    if inserted_rows.is_empty() && !rows.ids.is_empty() && assume == Assume::Room {
        // They did not fit: the places reserved go back.
        for stream in handoffs.task_places.drain(..) {
            stream.unreserve(1);
        }
        return Ok(None);
    }
    let mut inserted: std::collections::HashSet<Uuid> = Default::default();
    for row in inserted_rows {
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
    // A task sent to the insert and not inserted met an idempotency key
    // held (a safety net: keys were looked up under the queue's lock
    // before the insert, so this finds none and sends no statement).
    let duplicates = held_keys(
        inner,
        client,
        tasks
            .iter()
            .zip(&answers)
            .filter(|(t, answer)| answer.is_none() && !inserted.contains(&t.id.as_uuid()))
            .map(|(t, _)| t),
    )
    .await?;
    let mut results = Vec::with_capacity(tasks.len());
    for (task, answer) in tasks.iter().zip(answers) {
        if let Some(answer) = answer {
            results.push(answer);
            continue;
        }
        if inserted.contains(&task.id.as_uuid()) {
            handoffs.tally.queue(task.queue.as_str()).enqueued += 1;
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
    Ok(Some(results))
}

/// The (queue, key) pairs of the tasks that have an idempotency key.
fn keys_of<'a>(tasks: impl Iterator<Item = &'a Prepared>) -> (Vec<String>, Vec<String>) {
    tasks
        .filter_map(|t| {
            t.task
                .idempotency_key
                .clone()
                .map(|key| (t.queue.as_str().to_owned(), key))
        })
        .unzip()
}

/// The idempotency keys of `tasks` already held: (queue, key) → the
/// task holding it. No statement when no task has a key.
async fn held_keys<'a>(
    inner: &Inner,
    client: &impl GenericClient,
    tasks: impl Iterator<Item = &'a Prepared>,
) -> Result<HashMap<(String, String), Uuid>, PgError> {
    let (queues, keys) = keys_of(tasks);
    let mut held = HashMap::new();
    if queues.is_empty() {
        return Ok(held);
    }
    let statement = client.prepare_cached(&inner.sql.find_keys).await?;
    for row in client.query(&statement, &[&queues, &keys]).await? {
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
/// `only`: the transaction holds nothing else, so its last round sends the
/// COMMIT (otherwise the puts after the reports do).
async fn complete_in_rounds(
    inner: &Inner,
    tx: &WriteTransaction,
    results: &[(LeaseId, Outcome)],
    only: bool,
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
        let round = if only {
            Round::Last { alone: true }
        } else {
            Round::Before
        };
        return complete(inner, tx, results, round, handoffs).await;
    }
    let mut answers: Vec<Option<Result<TaskState, BrokerError>>> = vec![None; results.len()];
    for round in 0..rounds {
        let (at, batch): (Vec<usize>, Vec<(LeaseId, Outcome)>) = results
            .iter()
            .enumerate()
            .filter(|(i, _)| round_of[*i] == round)
            .map(|(i, report)| (i, report.clone()))
            .unzip();
        let round = if round + 1 == rounds && only {
            Round::Last { alone: false }
        } else {
            Round::Before
        };
        let got = complete(inner, tx, &batch, round, handoffs).await?;
        for (i, answer) in at.into_iter().zip(got) {
            answers[i] = Some(answer);
        }
    }
    Ok(answers
        .into_iter()
        .map(|answer| answer.unwrap_or(Err(BrokerError::ShuttingDown)))
        .collect())
}

/// Which round of a batch's reports `complete` runs.
#[derive(Clone, Copy)]
enum Round {
    /// A round with more after it.
    Before,
    /// The last round; `alone`: the transaction's only one (no puts).
    Last { alone: bool },
}

/// One round of reports: the updates, which also count what they finish
/// and send the notifications, with BEGIN when they are the transaction's
/// first statements and, in the last round, the COMMIT: one round trip
/// (one statement alone, its own transaction, when the transaction holds
/// nothing else). Then a look, only when some reports changed nothing, at
/// their rows.
async fn complete(
    inner: &Inner,
    tx: &WriteTransaction,
    results: &[(LeaseId, Outcome)],
    round: Round,
    handoffs: &mut Handoffs,
) -> Result<Vec<Result<TaskState, BrokerError>>, PgError> {
    let last = matches!(round, Round::Last { .. });
    let sql = &inner.sql;
    let client = tx.client();
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
    let mut places = ResultPlaces::reserve(inner, &ok.0, &ok.1);
    // The updates also count the tasks they finish out of their queues and
    // send the notifications, so that the last round and the COMMIT are
    // one round trip.
    let complete_ok = client.prepare_cached(&sql.complete_ok).await?;
    let complete_failed = client.prepare_cached(&sql.complete_failed).await?;
    let backoff = inner.broker.retry_backoff;
    let (base, max) = (backoff.base.as_secs_f64(), backoff.max.as_secs_f64());
    let shard = finish_shard();
    let told: [Param<'_>; 3] = [&shard, &inner.channels.1, &inner.channels.0];
    let finishing_ok = async {
        if ok.0.is_empty() {
            return Ok(Vec::new());
        }
        let params: [Param<'_>; 7] = [
            &ok.0,
            &ok.1,
            &ok.2,
            &places.claim,
            told[0],
            told[1],
            told[2],
        ];
        client
            .query(&complete_ok, &params)
            .await
            .map_err(PgError::from)
    };
    let finishing_failed = async {
        if failed.0.is_empty() {
            return Ok(Vec::new());
        }
        let params: [Param<'_>; 10] = [
            &failed.0, &failed.1, &failed.2, &failed.3, &failed.4, &base, &max, told[0], told[1],
            told[2],
        ];
        client
            .query(&complete_failed, &params)
            .await
            .map_err(PgError::from)
    };
    if matches!(round, Round::Last { alone: true }) && (ok.0.is_empty() || failed.0.is_empty()) {
        tx.alone();
    }
    let updated = tokio::try_join!(
        tx.begin(),
        finishing_ok,
        finishing_failed,
        tx.commit_if(last)
    );
    let (_, ok_rows, failed_rows, ()) = match updated {
        Ok(rows) => rows,
        Err(error) => {
            places.give_back(handoffs);
            return Err(error);
        }
    };
    // What each statement changed: task → state now. A result claimed in
    // the update goes to its place; the others (reported outside this
    // server's worker streams, failed, or past the places reserved) reach
    // the result streams' claimers through the notification.
    let mut changed: HashMap<Uuid, i16> = HashMap::new();
    for row in ok_rows.iter().chain(&failed_rows) {
        let id: Uuid = row.get(0);
        count_report(&mut handoffs.tally, row);
        if row.get::<_, bool>(11)
            && let Some(result) = result_row(row)
        {
            places.hand(id, result, handoffs);
        }
        changed.insert(id, row.get(2));
    }
    places.give_back(handoffs);
    // The rest: look at the rows (as this transaction left them, or, after
    // the last round's COMMIT, as they are now: a report that changed
    // nothing is answered from a task that only moved on since).
    let unexplained: Vec<Uuid> = checked
        .iter()
        .flatten()
        .filter(|(lease, _)| !changed.contains_key(&lease.task.as_uuid()))
        .map(|(lease, _)| lease.task.as_uuid())
        .collect();
    let mut rows: HashMap<Uuid, tokio_postgres::Row> = HashMap::new();
    if !unexplained.is_empty() {
        let view = client.prepare_cached(&sql.report_view).await?;
        for row in client.query(&view, &[&unexplained]).await? {
            rows.insert(row.get(0), row);
        }
    }
    let mut out = Vec::with_capacity(answers.len());
    for (answer, checked) in answers.into_iter().zip(checked) {
        if let Some(answer) = answer {
            out.push(answer);
            continue;
        }
        let (lease, outcome) = checked.expect("checked when not answered");
        let id = lease.task.as_uuid();
        if let Some(state) = changed.get(&id) {
            out.push(Ok(state_of(*state)));
            continue;
        }
        out.push(match rows.get(&id) {
            None => Err(BrokerError::TaskNotFound(lease.task.to_string())),
            Some(row) => explain(row, lease, &outcome),
        });
    }
    Ok(out)
}

/// A statement's parameter.
type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

/// Runs `statement` (prepared) when `when`: a statement of a pipeline that
/// has nothing to do for some batches. Sent at its first poll.
async fn execute_if(
    client: &deadpool_postgres::Object,
    when: bool,
    statement: &tokio_postgres::Statement,
    params: &[Param<'_>],
) -> Result<(), PgError> {
    if when {
        client.execute(statement, params).await?;
    }
    Ok(())
}

/// Places reserved in this server's result streams before a round of
/// reports, for successes reported through this server's worker streams
/// (whose queue is known before the update): the update that finishes such
/// a task claims its result for the place (`complete_ok`'s `claim`).
struct ResultPlaces {
    /// Per success report, in order: whether it has a place.
    claim: Vec<bool>,
    places: HashMap<Uuid, Arc<ResultShared>>,
}

impl ResultPlaces {
    /// Places for the success reports `ids` (leases `seqs`), in report
    /// order, in the result streams of their queues with room; none while
    /// the server drains.
    fn reserve(inner: &Inner, ids: &[Uuid], seqs: &[i32]) -> Self {
        let mut this = Self {
            claim: vec![false; ids.len()],
            places: HashMap::new(),
        };
        if ids.is_empty() || *inner.closed.borrow() {
            return this;
        }
        // Reports by queue, where a worker stream of this server holds the
        // lease.
        let mut by_queue: HashMap<String, Vec<usize>> = HashMap::new();
        {
            let leases = lock(&inner.stream_leases);
            if leases.is_empty() {
                return this;
            }
            for (i, (id, seq)) in ids.iter().zip(seqs).enumerate() {
                if let Some((held, stream)) = leases.get(&TaskId::from_uuid(*id))
                    && i64::from(*held) == i64::from(*seq)
                {
                    by_queue
                        .entry(stream.queue.as_str().to_owned())
                        .or_default()
                        .push(i);
                }
            }
        }
        for (queue, reports) in by_queue {
            let Some(dispatch) = lock(&inner.result_dispatch).get(&queue).cloned() else {
                continue;
            };
            let streams = lock(&dispatch.streams).clone();
            let got = places(
                &streams,
                &dispatch.turn,
                reports.len(),
                ResultShared::reserve,
            );
            for (stream, i) in got.into_iter().zip(reports) {
                this.claim[i] = true;
                this.places.insert(ids[i], stream);
            }
        }
        this
    }

    /// The result of a report with a place, claimed in the update, goes to
    /// that place. (Every claimed result has one; should one be missing,
    /// the result is given back after the commit.)
    fn hand(&mut self, id: Uuid, result: TaskResult, handoffs: &mut Handoffs) {
        match self.places.remove(&id) {
            Some(stream) => handoffs.results.push((stream, result)),
            None => handoffs.unplaced.push(result),
        }
    }

    /// Places not filled (their reports changed nothing) go back to their
    /// streams when the transaction ends either way.
    fn give_back(&mut self, handoffs: &mut Handoffs) {
        handoffs
            .result_places
            .extend(self.places.drain().map(|(_, stream)| stream));
    }
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
    client: &impl GenericClient,
    finished: &BTreeMap<String, Vec<Uuid>>,
) -> Result<(), PgError> {
    if finished.is_empty() {
        return Ok(());
    }
    let (names, counts) = finished_counts(finished);
    let subtract = client
        .prepare_cached(&inner.sql.subtract_unfinished)
        .await?;
    client
        .execute(&subtract, &[&names, &counts, &finish_shard()])
        .await?;
    let mut payloads = Vec::new();
    for (queue, ids) in finished {
        finished_payloads(queue, ids, false, &mut payloads);
    }
    notify_results(inner, client, &payloads).await
}

/// Tasks finished, counted per queue (in name order, the order counter
/// rows are taken in): the arrays of `subtract_unfinished`, subtracted
/// in a finish shard picked at random (see the schema's `queue_counts`).
fn finished_counts(finished: &BTreeMap<String, Vec<Uuid>>) -> (Vec<&str>, Vec<i64>) {
    finished
        .iter()
        .map(|(queue, ids)| (queue.as_str(), i64::try_from(ids.len()).unwrap_or(i64::MAX)))
        .unzip()
}

/// One of the finish shards, 1 to 15: spread well enough by the clock's
/// nanoseconds (no random generator needed for this).
fn finish_shard() -> i16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    i16::try_from(nanos % 15).unwrap_or(0) + 1
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
