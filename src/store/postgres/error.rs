//! The PostgreSQL store's errors, and what a client sees of them.

use crate::broker::BrokerError;

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// A statement or the connection failed.
    #[error("{}", describe(.0))]
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

/// The database's own message when there is one (its SQLSTATE and text),
/// not only "db error".
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

impl PgError {
    /// Whether running the transaction again may succeed: a deadlock or a
    /// serialization failure, which PostgreSQL resolves by failing one side.
    pub(crate) fn is_retryable(&self) -> bool {
        use tokio_postgres::error::SqlState;
        matches!(self, PgError::Db(e) if e.code().is_some_and(|code| {
            *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE
        }))
    }
}

/// The error a client sees: UNAVAILABLE, naming the store.
impl From<PgError> for BrokerError {
    fn from(error: PgError) -> Self {
        BrokerError::StoreUnavailable {
            store: "postgres",
            reason: error.to_string(),
        }
    }
}
