//! The PostgreSQL store: tasks and results in a database that several
//! servers share, durable once acknowledged.
//!
//! - Puts and results go through group commit (`writer`): an OK means the
//!   transaction committed (`synchronous_commit` as the database sets it).
//! - Claims take ready tasks with `FOR UPDATE SKIP LOCKED`, so servers
//!   never block on each other's rows and a task is leased once per
//!   attempt. Every lease change is fenced by the lease's sequence number in
//!   its `WHERE`, and every time is the database's `now()`: clock skew
//!   between servers changes nothing.
//! - Waits are woken by LISTEN/NOTIFY (`wake`), never by polling per call.
//! - Lease expiry, ttl and retention are swept by every server (`sweep`);
//!   `SKIP LOCKED` and the state in each `WHERE` make each change happen
//!   once.
//! - Worker streams, result streams and watches (`streams`) claim on
//!   demand and give back what they held when they end.

mod api;
mod config;
mod counters;
mod error;
mod handle;
/// The tests' own PostgreSQL (tests/common/postgres.rs).
#[cfg(test)]
#[allow(dead_code, clippy::all)]
#[path = "../../../tests/common/postgres.rs"]
mod harness;
mod inner;
mod jobs;
mod limits;
#[cfg(test)]
mod model_tests;
mod notify;
mod pipeline;
mod queues;
mod registry;
mod rows;
mod schema;
mod sql;
mod streams;
mod sweep;
mod tls;
mod wake;
mod writer;
#[cfg(test)]
mod writer_tests;

pub use config::{
    DEFAULT_MAX_PENDING, DEFAULT_POOL_SIZE, DEFAULT_SCHEMA, DEFAULT_STATEMENT_TIMEOUT,
    PostgresConfig,
};
pub use error::PgError;
pub use handle::{PgStore, migrate};
