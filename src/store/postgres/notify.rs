//! The notifications a transaction sends, delivered at its commit.

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::error::PgError;
use super::inner::Inner;

/// The payloads telling of finished tasks, in payloads under PostgreSQL's
/// 8,000 bytes, added to `payloads`. `claimed`: their results were already
/// handed out by queue (in this transaction), so readers by queue have
/// nothing to look for; the payload says so with a `!` before the queue
/// name (which no queue name holds), and only waiters by task id wake.
pub(crate) fn finished_payloads(
    queue: &str,
    ids: &[Uuid],
    claimed: bool,
    payloads: &mut Vec<String>,
) {
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
        payloads.push(payload);
    }
}

/// Sends `payloads` on the results channel, in one statement (nothing when
/// there are none).
pub(crate) async fn notify_results(
    inner: &Inner,
    client: &impl GenericClient,
    payloads: &[String],
) -> Result<(), PgError> {
    if payloads.is_empty() {
        return Ok(());
    }
    let statement = client.prepare_cached(&inner.sql.notify_each).await?;
    client
        .execute(&statement, &[&inner.channels.1, &payloads])
        .await?;
    Ok(())
}
