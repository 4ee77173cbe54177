//! The sweep every server runs: leases that ran out go back to pending (or
//! fail on their last attempt), tasks whose ttl ran out fail, and finished
//! rows past the result ttl or the result count are dropped, in small
//! batches. Each change takes its rows with `FOR UPDATE SKIP LOCKED` and
//! checks the state in its `WHERE`, so servers sweeping together never
//! change a task twice and never wait on each other.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Duration;

use uuid::Uuid;

use super::counters::Tally;
use super::error::PgError;
use super::inner::Inner;
use super::writer::tasks_ended;

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
        if last_retention.elapsed() >= RETAIN_EVERY {
            last_retention = tokio::time::Instant::now();
            if let Err(error) = retain(&inner).await {
                tracing::debug!(%error, "postgres store: retention failed; next in a moment");
            }
        }
    }
}

/// One pass over expired leases and ttl, each change in its own short
/// transaction with the notifications it owes.
async fn sweep(inner: &Inner) -> Result<(), PgError> {
    // The ttl sweep's failures are expiries.
    for (statement, ttl) in [
        (&inner.sql.sweep_leases, false),
        (&inner.sql.sweep_ttl, true),
    ] {
        loop {
            let mut client = inner.pool.get().await?;
            let transaction = client.transaction().await?;
            let rows = transaction.query(statement.as_str(), &[]).await?;
            if rows.is_empty() {
                break;
            }
            let mut finished: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
            let mut ready: Vec<String> = Vec::new();
            let mut tally = Tally::default();
            for row in &rows {
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
            tasks_ended(inner, &transaction, &finished).await?;
            if !ready.is_empty() {
                ready.sort_unstable();
                ready.dedup();
                transaction
                    .execute(
                        &transaction.prepare_cached(&inner.sql.notify_tasks).await?,
                        &[&inner.channels.0, &ready],
                    )
                    .await?;
            }
            transaction.commit().await?;
            inner.counters.add(tally);
            if rows.len() < 500 {
                break;
            }
        }
    }
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
