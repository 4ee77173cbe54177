//! The limits and defaults of a broker.

use std::time::Duration;

use super::RetryBackoff;

/// Limits and defaults of a broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Most unfinished (pending and leased) tasks per queue.
    pub queue_capacity: usize,
    /// Largest payload, in bytes.
    pub max_payload: usize,
    /// Largest result output or failure message, in bytes.
    pub max_result: usize,
    /// Lease length when a request gives none.
    pub default_lease: Duration,
    /// Longest lease or extension granted.
    pub max_lease: Duration,
    /// Deliveries allowed when a task asks for 0.
    pub default_max_attempts: u32,
    /// How long finished results are held.
    pub result_ttl: Duration,
    /// Most finished results held; beyond it the oldest are dropped.
    pub max_results: usize,
    /// Silence after which a worker is reported not alive.
    pub worker_timeout: Duration,
    /// Most queues.
    pub max_queues: usize,
    /// Most calls waiting at once (for tasks or results).
    pub max_waiters: usize,
    /// Most workers tracked; silent idle ones are forgotten first.
    pub max_workers: usize,
    /// Most bytes of payloads (of unfinished tasks) and outputs (of
    /// results) held in all; a put past it is refused.
    pub max_held_bytes: usize,
    /// How long a retried failure waits before its next attempt, unless
    /// the worker names the wait.
    pub retry_backoff: RetryBackoff,
}

/// Default of [`BrokerConfig::queue_capacity`] (`--queue-capacity`).
pub const DEFAULT_QUEUE_CAPACITY: usize = 100_000;
/// Default of [`BrokerConfig::max_payload`] (`--max-payload`): 4 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 4 << 20;
/// Default of [`BrokerConfig::max_result`] (`--max-result`): 4 MiB.
pub const DEFAULT_MAX_RESULT: usize = 4 << 20;
/// Default of [`BrokerConfig::default_lease`] (`--default-lease`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default of [`BrokerConfig::max_lease`] (`--max-lease`): an hour.
pub const DEFAULT_MAX_LEASE: Duration = Duration::from_secs(3600);
/// Default of [`BrokerConfig::default_max_attempts`]
/// (`--default-max-attempts`).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default of [`BrokerConfig::result_ttl`] (`--result-ttl`): an hour.
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(3600);
/// Default of [`BrokerConfig::max_results`] (`--max-results`).
pub const DEFAULT_MAX_RESULTS: usize = 100_000;
/// Default of [`BrokerConfig::worker_timeout`] (`--worker-timeout`).
pub const DEFAULT_WORKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`BrokerConfig::max_queues`] (`--max-queues`).
pub const DEFAULT_MAX_QUEUES: usize = 10_000;
/// Default of [`BrokerConfig::max_waiters`] (`--max-waiters`).
pub const DEFAULT_MAX_WAITERS: usize = 100_000;
/// Default of [`BrokerConfig::max_workers`] (no flag).
pub const DEFAULT_MAX_WORKERS: usize = 10_000;
/// Default of [`BrokerConfig::max_held_bytes`] (`--max-held-bytes`): 1 GiB.
pub const DEFAULT_MAX_HELD_BYTES: usize = 1 << 30;

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_result: DEFAULT_MAX_RESULT,
            default_lease: DEFAULT_LEASE,
            max_lease: DEFAULT_MAX_LEASE,
            default_max_attempts: DEFAULT_MAX_ATTEMPTS,
            result_ttl: DEFAULT_RESULT_TTL,
            max_results: DEFAULT_MAX_RESULTS,
            worker_timeout: DEFAULT_WORKER_TIMEOUT,
            max_queues: DEFAULT_MAX_QUEUES,
            max_waiters: DEFAULT_MAX_WAITERS,
            max_workers: DEFAULT_MAX_WORKERS,
            max_held_bytes: DEFAULT_MAX_HELD_BYTES,
            retry_backoff: RetryBackoff::default(),
        }
    }
}
