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
/// not only "db error"; otherwise the error with its causes ("error
/// performing TLS handshake: invalid peer certificate: UnknownIssuer"),
/// which tokio-postgres keeps out of its own text.
fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(error) = cause {
        let next = error.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = error.source();
    }
    text
}

impl PgError {
    /// Whether running the transaction again may succeed: a deadlock or a
    /// serialization failure, which PostgreSQL resolves by failing one side,
    /// or a unique key taken by a transaction that committed meanwhile (a
    /// put assumed to fit met another put of the same idempotency key,
    /// through any server: the next try sees that key and answers a
    /// duplicate).
    pub(crate) fn is_retryable(&self) -> bool {
        use tokio_postgres::error::SqlState;
        matches!(self, PgError::Db(e) if e.code().is_some_and(|code| {
            *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::UNIQUE_VIOLATION
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
