//! The server's caps on this store, as on the memory store:
//! - `--max-waiters` holds per server: waiting calls and open streams are
//!   this server's memory and tasks ([`Waiters`]).
//! - `--max-queues` holds across all servers (`queues.rs`, with the
//!   [`KnownQueues`] kept here).
//! - Tracked workers (`PgStore::touch`): per server; past the cap, silent
//!   workers are forgotten first, and a new worker's calls go on untracked.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::broker::BrokerError;

/// This server's waiting calls and streams, within `--max-waiters`.
#[derive(Debug)]
pub(crate) struct Waiters {
    out: Arc<AtomicUsize>,
    limit: usize,
}

/// One place among the waiters, given back when dropped.
#[derive(Debug)]
pub(crate) struct WaiterSlot(Arc<AtomicUsize>);

impl Waiters {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            out: Arc::default(),
            limit,
        }
    }

    /// A place for one more waiting call or stream.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] naming `--max-waiters` when none is
    /// left; nothing is taken then.
    pub(crate) fn admit(&self) -> Result<WaiterSlot, BrokerError> {
        let taken = self
            .out
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |out| {
                (out < self.limit).then_some(out + 1)
            });
        match taken {
            Ok(_) => Ok(WaiterSlot(self.out.clone())),
            Err(_) => Err(BrokerError::waiters_full(self.limit)),
        }
    }
}

impl Drop for WaiterSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The queues this server knows exist in the database (`queues.rs`).
#[derive(Debug, Default)]
pub(crate) struct KnownQueues(pub(crate) Mutex<HashSet<String>>);
