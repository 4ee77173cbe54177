//! A write transaction that spends no round trip of its own: its BEGIN
//! goes to the database with its first statements and its COMMIT with its
//! last. tokio-postgres sends the requests of futures polled together in
//! the order they are first polled, and the database runs them in that
//! order, so `try_join!(tx.begin(), a, b)` is one round trip that begins
//! the transaction and runs `a` then `b` in it.
//!
//! Its statements run with generic plans (`plan_cache_mode`): the
//! planner would otherwise plan the ones that take arrays of queue names
//! again at every call (a plan for an array of unknown length looks dearer
//! than one for the array at hand), which cost more than running them.
//!
//! If a statement fails, the database rolls back at the COMMIT that
//! follows it (answered as ROLLBACK), and the failure is what the caller
//! returns. A transaction dropped before `committed` (an error, a
//! cancelled future) takes its connection out of the pool and closes it,
//! so no connection goes back to the pool inside a transaction.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::{Object, Pool};
use tokio_postgres::Statement;

use super::error::PgError;

/// An open write transaction on a connection of the pool.
pub(crate) struct WriteTransaction {
    /// `None` once committed (the connection went back to the pool).
    client: Option<Object>,
    begin: Statement,
    generic_plans: Statement,
    commit: Statement,
    /// Whether BEGIN was sent (or is not to be: `alone`).
    begun: AtomicBool,
    /// One statement alone: it is its own transaction (committed at its
    /// end, as durable as with COMMIT), with no BEGIN or COMMIT.
    alone: AtomicBool,
    /// Dropped when the COMMIT is sent (or the transaction ends): see
    /// `hold_until_commit`.
    baton: Mutex<Option<Box<dyn Send>>>,
}

impl WriteTransaction {
    /// Takes a connection; sends nothing yet (BEGIN goes with the first
    /// statements).
    pub(crate) async fn open(pool: &Pool) -> Result<Self, PgError> {
        let client = pool.get().await?;
        // Prepared once per connection, then cached.
        let begin = client.prepare_cached("BEGIN").await?;
        let generic_plans = client
            .prepare_cached("SET LOCAL plan_cache_mode = force_generic_plan")
            .await?;
        let commit = client.prepare_cached("COMMIT").await?;
        Ok(Self {
            client: Some(client),
            begin,
            generic_plans,
            commit,
            begun: AtomicBool::new(false),
            alone: AtomicBool::new(false),
            baton: Mutex::new(None),
        })
    }

    /// Keeps `baton` until this transaction's COMMIT is sent, or it ends
    /// otherwise. The writers pass their turn to gather work this way: the
    /// next transaction gathers what arrived while this one ran, and runs
    /// while this one's commit reaches the disk.
    pub(crate) fn hold_until_commit(&self, baton: Box<dyn Send>) {
        *self
            .baton
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(baton);
    }

    /// The connection, to send the transaction's statements on.
    pub(crate) fn client(&self) -> &Object {
        self.client
            .as_ref()
            .expect("the client is taken only by `committed`, which consumes the transaction")
    }

    /// The transaction is one statement, sent next: no BEGIN, no COMMIT
    /// (and no generic plans: its statement's plan needs none).
    pub(crate) fn alone(&self) {
        self.alone.store(true, Ordering::Relaxed);
        self.begun.store(true, Ordering::Relaxed);
    }

    /// BEGIN, the first time this is called (nothing after): poll it
    /// together with, and before, the transaction's first statements.
    pub(crate) async fn begin(&self) -> Result<(), PgError> {
        if !self.begun.swap(true, Ordering::Relaxed) {
            let client = self.client();
            tokio::try_join!(
                client.execute(&self.begin, &[]),
                client.execute(&self.generic_plans, &[]),
            )?;
        }
        Ok(())
    }

    /// COMMIT when `last` (nothing otherwise): poll it together with, and
    /// after, the transaction's last statements, then call `committed`
    /// once every one of them succeeded. A statement `alone` commits by
    /// itself: its baton goes on as this is polled, after it was sent.
    pub(crate) async fn commit_if(&self, last: bool) -> Result<(), PgError> {
        if !last {
            return Ok(());
        }
        if self.alone.load(Ordering::Relaxed) {
            self.pass_baton();
            return Ok(());
        }
        self.begin().await?;
        let committing = self.client().execute(&self.commit, &[]);
        // Sent at its first poll: the baton goes on at once.
        let mut committing = std::pin::pin!(committing);
        let polled = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match committing.as_mut().poll(cx) {
                std::task::Poll::Ready(done) => Some(done),
                std::task::Poll::Pending => None,
            })
        })
        .await;
        self.pass_baton();
        match polled {
            Some(done) => done?,
            None => committing.await?,
        };
        Ok(())
    }

    fn pass_baton(&self) {
        self.baton
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }

    /// The COMMIT and every statement before it succeeded: the connection
    /// goes back to the pool.
    pub(crate) fn committed(mut self) {
        self.client = None;
    }
}

impl Drop for WriteTransaction {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && self.begun.load(Ordering::Relaxed)
        {
            // Out of the pool and closed: the database rolls back whatever
            // is open on it.
            drop(Object::take(client));
        }
    }
}
