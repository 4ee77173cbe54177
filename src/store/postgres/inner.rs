//! What every handle of the store shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, watch};

use super::counters::Counters;
use super::jobs::Job;
use super::limits::{KnownQueues, Waiters};
use super::registry::{ResultDispatch, StreamShared, TaskDispatch};
use super::sql::Sql;
use super::wake::Wakeups;
use crate::broker::{BrokerConfig, IdMaker, TaskId};

/// Everything the store's handles share.
pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) sql: Sql,
    pub(crate) broker: BrokerConfig,
    pub(crate) schema: String,
    /// (tasks channel, results channel).
    pub(crate) channels: (String, String),
    pub(crate) wakeups: Arc<Wakeups>,
    pub(crate) jobs: mpsc::Sender<Job>,
    pub(crate) closed: watch::Sender<bool>,
    /// Leases held by this server's worker streams: task → (lease
    /// sequence, the stream's shared record). A report of one frees its
    /// stream's window.
    pub(crate) stream_leases: Mutex<HashMap<TaskId, (u32, Arc<StreamShared>)>>,
    /// Per queue: the one claimer of this server's worker streams.
    pub(crate) task_dispatch: Mutex<HashMap<String, Arc<TaskDispatch>>>,
    /// Per queue: the one claimer of this server's result streams.
    pub(crate) result_dispatch: Mutex<HashMap<String, Arc<ResultDispatch>>>,
    /// Task ids: UUIDv7, unique across servers by their random start.
    pub(crate) ids: Mutex<IdMaker>,
    /// Workers that called this server: id → (queue, last seen).
    pub(crate) workers: Mutex<HashMap<String, (String, SystemTime)>>,
    /// What this server did since it started, for monitoring.
    pub(crate) counters: Counters,
    /// Queues known to exist (`--max-queues`).
    pub(crate) known_queues: KnownQueues,
    /// This server's waiting calls and streams (`--max-waiters`).
    pub(crate) waiters: Waiters,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// A lease in seconds: the one asked for, or the default, within the
    /// maximum.
    pub(crate) fn lease_secs(&self, requested: Option<Duration>) -> f64 {
        requested
            .unwrap_or(self.broker.default_lease)
            .min(self.broker.max_lease)
            .as_secs_f64()
    }
}
