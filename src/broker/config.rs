//! The limits and defaults of a broker.

use std::time::Duration;

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
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 100_000,
            max_payload: 4 * 1024 * 1024,
            max_result: 4 * 1024 * 1024,
            default_lease: Duration::from_secs(30),
            max_lease: Duration::from_secs(3600),
            default_max_attempts: 3,
            result_ttl: Duration::from_secs(3600),
            max_results: 100_000,
            worker_timeout: Duration::from_secs(60),
            max_queues: 10_000,
            max_waiters: 100_000,
            max_workers: 10_000,
            max_held_bytes: 1 << 30,
        }
    }
}
