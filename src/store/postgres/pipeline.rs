//! A write transaction that spends no round trip of its own: its BEGIN
//! goes to the database with its first statements and its COMMIT with its
//! last. tokio-postgres sends the requests of futures polled together in
//! the order they are first polled, and the database runs them in that
//! order, so `try_join!(tx.begin(), a, b)` is one round trip that begins
//! the transaction and runs `a` then `b` in it.
//!
//! Every statement of a pipeline must be prepared before it (cached by
//! `prepare_cached`): a query given as text is prepared at its first poll,
//! a round trip, and would be sent after the requests polled after it
//! (after the COMMIT, outside the transaction).
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
        let commit = client.prepare_cached("COMMIT").await?;
        Ok(Self {
            client: Some(client),
            begin,
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

    /// The transaction is one statement, sent next: no BEGIN, no COMMIT.
    pub(crate) fn alone(&self) {
        self.alone.store(true, Ordering::Relaxed);
        self.begun.store(true, Ordering::Relaxed);
    }

    /// BEGIN, the first time this is called (nothing after): poll it
    /// together with, and before, the transaction's first statements.
    pub(crate) async fn begin(&self) -> Result<(), PgError> {
        if !self.begun.swap(true, Ordering::Relaxed) {
            self.client().execute(&self.begin, &[]).await?;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::harness::TestDatabase;
    use super::*;

    async fn rows(pool: &Pool) -> Vec<i32> {
        let client = pool.get().await.unwrap();
        client
            .query("SELECT n FROM pipelined ORDER BY n", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// The insert, prepared (cached per connection): each transaction
    /// below asks for it before its pipeline, as the writers do.
    async fn prepared_insert(tx: &WriteTransaction) -> tokio_postgres::Statement {
        tx.client()
            .prepare_cached("INSERT INTO pipelined VALUES ($1)")
            .await
            .unwrap()
    }

    async fn insert(
        tx: &WriteTransaction,
        statement: &tokio_postgres::Statement,
        n: i32,
    ) -> Result<(), PgError> {
        tx.client().execute(statement, &[&n]).await?;
        Ok(())
    }

    /// Guards the pipelined transaction: a COMMIT sent with the statements
    /// keeps them (and passes the baton as it is sent); a transaction
    /// dropped before its COMMIT, or whose statement failed, keeps nothing;
    /// and neither leaves its connection in the pool inside a transaction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_a_commit_sent_with_its_statements_keeps_them() {
        let database = TestDatabase::start().await;
        let config: tokio_postgres::Config = database.url().parse().unwrap();
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        let pool = Pool::builder(manager).max_size(1).build().unwrap();
        pool.get()
            .await
            .unwrap()
            .batch_execute("CREATE TABLE pipelined (n int)")
            .await
            .unwrap();
        let tx = WriteTransaction::open(&pool).await.unwrap();
        let baton = Arc::new(());
        tx.hold_until_commit(Box::new(baton.clone()));
        let statement = prepared_insert(&tx).await;
        insert(&tx, &statement, 0).await.unwrap();
        tokio::try_join!(tx.begin(), insert(&tx, &statement, 1), tx.commit_if(true)).unwrap();
        assert_eq!(
            Arc::strong_count(&baton),
            1,
            "the COMMIT passed the baton on"
        );
        tx.committed();
        // The first insert ran before BEGIN, in a transaction of its own.
        assert_eq!(rows(&pool).await, [0, 1]);

        let tx = WriteTransaction::open(&pool).await.unwrap();
        let statement = prepared_insert(&tx).await;
        tokio::try_join!(tx.begin(), insert(&tx, &statement, 2)).unwrap();
        drop(tx);
        assert_eq!(rows(&pool).await, [0, 1], "dropped before its COMMIT");

        let tx = WriteTransaction::open(&pool).await.unwrap();
        // Prepared first: a query given as text is prepared at its first
        // poll (a round trip), so it would run after the COMMIT.
        let statement = prepared_insert(&tx).await;
        let divide = tx.client().prepare("SELECT 1 / $1::int4").await.unwrap();
        let failing = async {
            tx.client().execute(&divide, &[&0]).await?;
            Ok::<_, PgError>(())
        };
        let failed = tokio::try_join!(
            tx.begin(),
            insert(&tx, &statement, 3),
            failing,
            tx.commit_if(true)
        );
        assert!(failed.is_err(), "the failed statement is the answer");
        drop(tx);
        assert_eq!(
            rows(&pool).await,
            [0, 1],
            "a failed statement rolls all back"
        );

        // The pool's connection answers outside any transaction: each
        // statement's transaction starts with it.
        let client = pool.get().await.unwrap();
        // One message (the simple protocol): the statement's own
        // transaction starts with it, unless one was open before.
        let answer = client
            .simple_query("SELECT now() = statement_timestamp()")
            .await
            .unwrap();
        let fresh = answer.iter().any(|message| {
            matches!(message, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("t"))
        });
        assert!(fresh, "no connection went back to the pool mid-transaction");
    }
}
