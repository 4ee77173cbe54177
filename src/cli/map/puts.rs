//! Putting a batch of `taskq map`'s inputs with one PutTasks call, again
//! and again while the server is unreachable or the queue full.
//!
//! Each input's task carries an idempotency key of the run and the
//! input's number, so a batch sent again after an answer that never came
//! stores each task once: the server answers with the first one's id.

use std::time::Duration;

use tokio::sync::watch;
use tonic::Code;

use crate::client::{Client, ClientError, StatusClass};
use crate::pb;
use crate::worker::Backoff;

/// What became of one input of a batch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Placed {
    /// Stored as this task.
    Stored {
        /// The input's number.
        number: u64,
        /// Its task.
        task_id: String,
    },
    /// Refused by the server for a reason retrying will not fix; not
    /// stored.
    Refused {
        /// The input's number.
        number: u64,
        /// Why, with the status code's name.
        error: String,
    },
    /// Not put because the run stopped first.
    Unsent {
        /// The input's number.
        number: u64,
        /// True when an attempt's answer never came: the task may be
        /// stored all the same.
        maybe_stored: bool,
    },
}

/// Puts `batch` (input numbers with their tasks): retries the whole call
/// while the server is unreachable, and the tasks the queue had no room
/// for, with backoff, until `stop` turns true.
///
/// # Errors
/// The call's error when the server refuses it as such (a token, a role,
/// a batch over its `--max-batch`): no later batch would fare better.
pub(crate) async fn put_batch(
    client: Client,
    batch: Vec<(u64, pb::PutTaskRequest)>,
    mut stop: watch::Receiver<bool>,
) -> Result<Vec<Placed>, ClientError> {
    let mut placed = Vec::with_capacity(batch.len());
    let mut waiting = batch;
    let mut backoff = Backoff::default();
    let mut warned = false;
    loop {
        let tasks = waiting.iter().map(|(_, task)| task.clone()).collect();
        // Whether the tasks still waiting may have been stored.
        let maybe_stored;
        match client.put_tasks(tasks).await {
            Ok(outcomes) => {
                let mut again = Vec::new();
                // A short answer leaves no task without an outcome.
                let outcomes = outcomes
                    .into_iter()
                    .map(Some)
                    .chain(std::iter::repeat(None));
                for ((number, task), outcome) in waiting.into_iter().zip(outcomes) {
                    match outcome.and_then(|o| o.outcome) {
                        Some(pb::put_task_outcome::Outcome::Ok(ok)) => {
                            placed.push(Placed::Stored {
                                number,
                                task_id: ok.task_id,
                            })
                        }
                        Some(pb::put_task_outcome::Outcome::Error(error))
                            if StatusClass::of(Code::from(error.code))
                                == StatusClass::Transient =>
                        {
                            again.push((number, task));
                        }
                        Some(pb::put_task_outcome::Outcome::Error(error)) => {
                            placed.push(Placed::Refused {
                                number,
                                error: item_error(&error),
                            });
                        }
                        None => placed.push(Placed::Refused {
                            number,
                            error: "the server's answer has no outcome for it".into(),
                        }),
                    }
                }
                if again.is_empty() {
                    return Ok(placed);
                }
                waiting = again;
                maybe_stored = false;
                backoff.reset();
            }
            Err(error) if error.is_transient() => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(%error, "cannot put; retrying with backoff");
                }
                maybe_stored = true;
            }
            Err(error) if error.class() == StatusClass::Refused => return Err(error),
            Err(error) => {
                let error = error.to_string();
                placed.extend(waiting.into_iter().map(|(number, _)| Placed::Refused {
                    number,
                    error: error.clone(),
                }));
                return Ok(placed);
            }
        }
        if !wait(backoff.next_delay(), &mut stop).await {
            placed.extend(waiting.into_iter().map(|(number, _)| Placed::Unsent {
                number,
                maybe_stored,
            }));
            return Ok(placed);
        }
    }
}

/// Waits `delay`; `false` when `stop` turned true first (or before).
async fn wait(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    let stopped = tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.wait_for(|stop| *stop) => true,
    };
    !stopped && !*stop.borrow()
}

/// An item's error as the client library writes a status.
fn item_error(error: &pb::ItemError) -> String {
    ClientError::from(tonic::Status::new(
        Code::from(error.code),
        error.message.clone(),
    ))
    .to_string()
}
