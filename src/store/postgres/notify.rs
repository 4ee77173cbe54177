//! The notifications a transaction sends, delivered at its commit.

use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::error::PgError;
use super::inner::Inner;

/// NOTIFY of finished tasks, in payloads under PostgreSQL's 8,000 bytes.
/// `claimed`: their results were already handed out by queue (in this
/// transaction), so readers by queue have nothing to look for; the payload
/// says so with a `!` before the queue name (which no queue name holds),
/// and only waiters by task id wake.
pub(crate) async fn notify_finished(
    inner: &Inner,
    transaction: &Transaction<'_>,
    queue: &str,
    ids: &[Uuid],
    claimed: bool,
) -> Result<(), PgError> {
    for chunk in ids.chunks(150) {
        let mut payload = String::with_capacity(queue.len() + 2 + chunk.len() * 37);
        if claimed {
            payload.push('!');
        }
        payload.push_str(queue);
        payload.push('\n');
        for (i, id) in chunk.iter().enumerate() {
            if i > 0 {
                payload.push(',');
            }
            payload.push_str(&id.to_string());
        }
        transaction
            .execute(
                &transaction.prepare_cached(&inner.sql.notify).await?,
                &[&inner.channels.1, &payload],
            )
            .await?;
    }
    Ok(())
}
