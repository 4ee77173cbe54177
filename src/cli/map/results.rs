//! Reading the results of one batch of `taskq map`'s tasks: one
//! WatchResultBatches stream by task ids, which sends each result as soon
//! as it exists and ends after the last. Results read by id are not
//! consumed, so a stream cut (a restarting server, a broken connection)
//! is opened again, with backoff, for the tasks whose results it had not
//! yet sent.

use std::collections::HashSet;

use tokio::sync::mpsc;

use crate::client::{Client, ClientError};
use crate::pb;
use crate::worker::Backoff;

/// What the reader of a batch tells the run.
#[derive(Debug)]
pub(crate) enum Event {
    /// A task's result.
    Finished(pb::Result),
    /// These tasks' results cannot be read, for this reason (the server
    /// no longer knows them, or refuses the caller).
    Unreadable {
        /// The tasks.
        task_ids: Vec<String>,
        /// Why.
        error: String,
    },
}

/// Reads the results of `task_ids` into `events`, each once; returns when
/// all are sent, or when the receiver is gone.
pub(crate) async fn watch(client: Client, task_ids: Vec<String>, events: mpsc::Sender<Event>) {
    let mut left: HashSet<String> = task_ids.into_iter().collect();
    let mut backoff = Backoff::default();
    let mut warned = false;
    while !left.is_empty() {
        let error = match read(&client, &mut left, &events, &mut backoff).await {
            Ok(()) => continue,
            Err(Stop::ReceiverGone) => return,
            Err(Stop::Error(error)) => error,
        };
        if !error.is_transient() {
            let event = Event::Unreadable {
                task_ids: left.into_iter().collect(),
                error: error.to_string(),
            };
            let _ = events.send(event).await;
            return;
        }
        if !std::mem::replace(&mut warned, true) {
            tracing::warn!(%error, "cannot read results; retrying with backoff");
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Why one stream stopped before every result was sent.
enum Stop {
    /// The run no longer listens.
    ReceiverGone,
    /// The stream could not be opened, or broke.
    Error(ClientError),
}

/// One stream for the tasks `left`, sending each result and taking its
/// task off `left`.
async fn read(
    client: &Client,
    left: &mut HashSet<String>,
    events: &mpsc::Sender<Event>,
    backoff: &mut Backoff,
) -> Result<(), Stop> {
    let ids = pb::TaskIds {
        ids: left.iter().cloned().collect(),
    };
    let target = pb::watch_results_request::Target::TaskIds(ids);
    let mut stream = client
        .watch_result_batches(target)
        .await
        .map_err(Stop::Error)?;
    while let Some(batch) = stream
        .message()
        .await
        .map_err(|status| Stop::Error(status.into()))?
    {
        backoff.reset();
        for result in batch.results {
            if left.remove(&result.task_id) {
                events
                    .send(Event::Finished(result))
                    .await
                    .map_err(|_| Stop::ReceiverGone)?;
            }
        }
    }
    if left.is_empty() {
        return Ok(());
    }
    // The server ends the stream after the last result; an end before it
    // is a cut, to be tried again like one.
    Err(Stop::Error(ClientError::from(tonic::Status::unavailable(
        "the result stream ended before the last result",
    ))))
}
