//! How the PostgreSQL store is reached and sized (`--store postgres://…`).

use std::time::Duration;

/// Default of [`PostgresConfig::schema`] (`--store-schema`).
pub const DEFAULT_SCHEMA: &str = "taskq";
/// Default of [`PostgresConfig::pool_size`] (`--store-pool`).
pub const DEFAULT_POOL_SIZE: usize = 8;
/// Default of [`PostgresConfig::statement_timeout`]
/// (`--store-statement-timeout`).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`PostgresConfig::max_pending`] (`--store-max-pending`).
pub const DEFAULT_MAX_PENDING: usize = 10_000;

/// The PostgreSQL store's settings.
#[derive(Clone, Debug)]
pub struct PostgresConfig {
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?options]`.
    pub url: String,
    /// The schema holding taskq's tables.
    pub schema: String,
    /// Connections to the database, besides the one that listens for
    /// notifications.
    pub pool_size: usize,
    /// Longest a statement may run before the database cancels it.
    pub statement_timeout: Duration,
    /// Most puts and results waiting for their transaction; more wait for
    /// room, so a slow database cannot grow the server's memory.
    pub max_pending: usize,
}

impl PostgresConfig {
    /// A store at `url` with the default schema and sizes.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: DEFAULT_SCHEMA.into(),
            pool_size: DEFAULT_POOL_SIZE,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            max_pending: DEFAULT_MAX_PENDING,
        }
    }

    /// Whether `text` names a PostgreSQL store.
    pub fn is_url(text: &str) -> bool {
        text.starts_with("postgres://") || text.starts_with("postgresql://")
    }

    /// The URL's connection settings and the TLS connector its `sslmode`
    /// asks for (`super::tls`).
    ///
    /// # Errors
    /// What is wrong with the URL or the certificates it names.
    pub(crate) fn connection(
        &self,
    ) -> Result<(tokio_postgres::Config, super::tls::MakeRustlsConnect), String> {
        super::tls::connection(&self.url)
    }

    /// Checks the schema name, the URL and the certificates it names.
    ///
    /// # Errors
    /// What is wrong, to show beside the flag's name.
    pub fn validate(&self) -> Result<(), String> {
        let schema_ok = !self.schema.is_empty()
            && self.schema.len() <= 63
            && self
                .schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !self.schema.as_bytes()[0].is_ascii_digit();
        if !schema_ok {
            return Err(format!(
                "schema {:?}: use 1 to 63 of a-z 0-9 _, not starting with a digit",
                self.schema
            ));
        }
        if self.pool_size == 0 {
            return Err("the pool needs at least one connection".into());
        }
        self.connection()?;
        Ok(())
    }
}
