//! The sweep every server runs: delayed tasks that are due become pending,
//! leases that ran out go back to pending (or fail on their last attempt), tasks whose ttl ran out fail, and finished
//! rows past the result ttl or the result count are dropped, in small
//! batches. Each change takes its rows with `FOR UPDATE SKIP LOCKED` and
//! checks the state in its `WHERE`, so servers sweeping together never
//! change a task twice and never wait on each other.

use std::collections::{BTreeMap, HashSet};
use std::sync::Weak;
use std::time::Duration;

use uuid::Uuid;

use super::counters::Tally;
use super::error::PgError;
use super::inner::Inner;
use super::registry::lock;
use super::writer::tasks_ended;
use crate::broker::TaskId;

/// How often leases and ttl are swept. Leases run out on the database's
/// clock; a lease is given back within this long after it ran out.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// How often retention drops old results.
const RETAIN_EVERY: Duration = Duration::from_secs(5);

/// Sweeps until the store is dropped.
pub(crate) async fn run(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_retention = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Err(error) = sweep(&inner).await {
            tracing::debug!(%error, "postgres store: sweep failed; next in a moment");
            continue;
        }
        if let Err(error) = free_ended_stream_leases(&inner).await {
            tracing::debug!(%error, "postgres store: could not look up worker streams' leases; next in a moment");
        }
        if last_retention.elapsed() >= RETAIN_EVERY {
            last_retention = tokio::time::Instant::now();
            if let Err(error) = retain(&inner).await {
                tracing::debug!(%error, "postgres store: retention failed; next in a moment");
            }
        }
    }
}

/// One pass over delays that ended, expired leases and ttl, each change in
/// its own short transaction with the notifications it owes.
async fn sweep(inner: &Inner) -> Result<(), PgError> {
    promote_delayed(inner).await?;
    // The ttl sweep's failures are expiries.
    for (statement, ttl) in [
        (&inner.sql.sweep_leases, false),
        (&inner.sql.sweep_ttl, true),
    ] {
        loop {
            let mut client = inner.pool.get().await?;
            let transaction = client.transaction().await?;
            let prepared = transaction.prepare_cached(statement).await?;
            let rows = transaction.query(&prepared, &[]).await?;
            if rows.is_empty() {
                break;
            }
            let tally = leases_ended(inner, &transaction, &rows, ttl).await?;
            transaction.commit().await?;
            inner.counters.add(tally);
            if rows.len() < 500 {
                break;
            }
        }
    }
    Ok(())
}

/// What a statement that ends leases or ttls returned (id, queue, state,
/// then the durations `counters` reads): the failed tasks counted out of
/// their queues and their waiters told, the claimers of the queues that
/// got a task back woken, all at `transaction`'s commit. Returns the
/// counts to add once it committed. `ttl`: the failures are expiries.
pub(crate) async fn leases_ended(
    inner: &Inner,
    transaction: &deadpool_postgres::Transaction<'_>,
    rows: &[tokio_postgres::Row],
    ttl: bool,
) -> Result<Tally, PgError> {
    let mut finished: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    let mut ready: Vec<String> = Vec::new();
    let mut tally = Tally::default();
    for row in rows {
        let queue: String = row.get(1);
        let counts = tally.queue(&queue);
        if row.get::<_, i16>(2) == 0 {
            counts.retried_after_lease_expiry += 1;
            ready.push(queue);
        } else {
            counts.failed += 1;
            counts.expired += u64::from(ttl);
            counts.finished(row.get(3), row.get(4));
            finished.entry(queue).or_default().push(row.get(0));
        }
    }
    tasks_ended(inner, transaction, &finished).await?;
    notify_ready(inner, transaction, ready).await?;
    Ok(tally)
}

/// Frees the places in this server's worker streams of leases that ended
/// where this server did not see it: run out (swept by any server), or
/// reported through another server. A stream counts a task as outstanding
/// until its lease ends (StreamTasks, point 2): without this, a stream
/// whose leases ran out would keep them in its window and starve. Within
/// [`SWEEP_EVERY`] of the end, as for the sweep.
async fn free_ended_stream_leases(inner: &Inner) -> Result<(), PgError> {
    let (ids, seqs): (Vec<Uuid>, Vec<i32>) = lock(&inner.stream_leases)
        .iter()
        .map(|(task, (seq, _))| (task.as_uuid(), i32::try_from(*seq).unwrap_or(i32::MAX)))
        .unzip();
    if ids.is_empty() {
        return Ok(());
    }
    let client = inner.pool.get().await?;
    let live: HashSet<Uuid> = client
        .query(&inner.sql.live_leases, &[&ids, &seqs])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut leases = lock(&inner.stream_leases);
    for (id, seq) in ids.into_iter().zip(seqs) {
        if live.contains(&id) {
            continue;
        }
        let task = TaskId::from_uuid(id);
        // Still the lease looked up: not reported or handed out again since.
        let same = leases
            .get(&task)
            .is_some_and(|(held, _)| i32::try_from(*held).unwrap_or(i32::MAX) == seq);
        if same {
            if let Some((held, stream)) = leases.remove(&task) {
                stream.ended(task, held);
            }
        }
    }
    Ok(())
}

/// Makes delayed tasks that are due pending, 500 per statement, and
/// wakes their queues' claimers on every server. A delayed task is thus
/// handed out within [`SWEEP_EVERY`] of when it is due.
async fn promote_delayed(inner: &Inner) -> Result<(), PgError> {
    loop {
        let mut client = inner.pool.get().await?;
        let transaction = client.transaction().await?;
        let rows = transaction
            .query(
                &transaction.prepare_cached(&inner.sql.sweep_delayed).await?,
                &[],
            )
            .await?;
        let ready: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        notify_ready(inner, &transaction, ready).await?;
        transaction.commit().await?;
        if rows.len() < 500 {
            return Ok(());
        }
    }
}

/// Wakes the claimers of every server for each queue in `ready` (at
/// commit), once per queue.
async fn notify_ready(
    inner: &Inner,
    transaction: &deadpool_postgres::Transaction<'_>,
    mut ready: Vec<String>,
) -> Result<(), PgError> {
    if ready.is_empty() {
        return Ok(());
    }
    ready.sort_unstable();
    ready.dedup();
    transaction
        .execute(
            &transaction.prepare_cached(&inner.sql.notify_each).await?,
            &[&inner.channels.0, &ready],
        )
        .await?;
    Ok(())
}

/// Drops finished rows past the result ttl, then past the result count,
/// 1,000 per statement.
async fn retain(inner: &Inner) -> Result<(), PgError> {
    let client = inner.pool.get().await?;
    let ttl = inner.broker.result_ttl.as_secs_f64();
    while client.execute(&inner.sql.drop_old, &[&ttl]).await? == 1000 {}
    let keep = i64::try_from(inner.broker.max_results).unwrap_or(i64::MAX);
    while client.execute(&inner.sql.drop_over, &[&keep]).await? == 1000 {}
    Ok(())
}
