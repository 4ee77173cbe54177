//! The PostgreSQL store's errors, and what a client sees of them.

use crate::broker::BrokerError;

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
