//! New queues within `--max-queues`, across all servers: made under an
//! advisory lock that counts the database's queues. Queues are never
//! removed, so a queue this server has seen costs no statement.

use std::collections::HashSet;

use super::error::PgError;
use super::handle::PgStore;
use super::registry::lock;
use crate::broker::{BrokerError, QueueName};

impl PgStore {
    /// Makes `queue` if it is new, within `--max-queues`.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] naming `--max-queues`, with nothing
    /// made; UNAVAILABLE when the database cannot say.
    pub(crate) async fn admit_queue(&self, queue: &QueueName) -> Result<(), BrokerError> {
        if self.admit_queues(&[queue]).await?.is_empty() {
            Ok(())
        } else {
            Err(BrokerError::queues_full(self.inner.broker.max_queues))
        }
    }

    /// Makes the new queues of `queues`, in name order, while they fit
    /// within `--max-queues`; returns those refused.
    ///
    /// # Errors
    /// UNAVAILABLE when the database cannot say; nothing is made then.
    pub(crate) async fn admit_queues(
        &self,
        queues: &[&QueueName],
    ) -> Result<HashSet<String>, BrokerError> {
        let unknown: Vec<&str> = {
            let known = lock(&self.inner.known_queues.0);
            let mut unknown: Vec<&str> = queues
                .iter()
                .map(|q| q.as_str())
                .filter(|q| !known.contains(*q))
                .collect();
            unknown.sort_unstable();
            unknown.dedup();
            unknown
        };
        if unknown.is_empty() {
            return Ok(HashSet::new());
        }
        let (admitted, refused) = self.make_queues(&unknown).await?;
        lock(&self.inner.known_queues.0).extend(admitted);
        Ok(refused)
    }

    /// One transaction under the queue list's advisory lock: which of
    /// `names` exist, how many queues there are, and the new ones that fit
    /// made. Returns (existing or made, refused).
    async fn make_queues(&self, names: &[&str]) -> Result<(Vec<String>, HashSet<String>), PgError> {
        let sql = &self.inner.sql;
        let mut client = self.inner.pool.get().await?;
        let transaction = client.transaction().await?;
        let lock = transaction.prepare_cached(&sql.lock_queue_list).await?;
        transaction.execute(&lock, &[]).await?;
        let existing = transaction.prepare_cached(&sql.existing_queues).await?;
        let existing: HashSet<String> = transaction
            .query(&existing, &[&names])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let total = transaction.prepare_cached(&sql.queue_total).await?;
        let total: i64 = transaction.query_one(&total, &[]).await?.get(0);
        let mut room = usize::try_from(total).ok().map_or(0, |total| {
            self.inner.broker.max_queues.saturating_sub(total)
        });
        let mut known = Vec::with_capacity(names.len());
        let mut made = Vec::new();
        let mut refused = HashSet::new();
        for name in names {
            if existing.contains(*name) {
                known.push((*name).to_owned());
            } else if room > 0 {
                room -= 1;
                made.push(*name);
                known.push((*name).to_owned());
            } else {
                refused.insert((*name).to_owned());
            }
        }
        if !made.is_empty() {
            let ensure = transaction.prepare_cached(&sql.ensure_queues).await?;
            transaction.execute(&ensure, &[&made]).await?;
        }
        transaction.commit().await?;
        Ok((known, refused))
    }
}
