//! What becomes of the tasks a `taskq map` run put and stops waiting for
//! (Ctrl-C, `--halt-on-error`, a fatal error): they are cancelled, so no
//! worker runs them for nobody.

use crate::client::{Client, ClientError};

/// Cancels the tasks `ids` this run put on `queue` that are not finished,
/// and says on stderr how many it cancelled. A task that finished in the
/// meantime is left as it is; one that cannot be cancelled (the server is
/// gone, say) is counted and named in the message.
pub(crate) async fn cancel_unfinished(client: &Client, queue: &str, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let (mut cancelled, mut finished, mut failed) = (0usize, 0usize, Vec::new());
    for id in ids {
        match client.cancel_task(id).await {
            Ok(_) => cancelled += 1,
            Err(error) if finished_already(&error) => finished += 1,
            Err(error) => failed.push(format!("{id}: {error}")),
        }
    }
    eprintln!(
        "taskq map: cancelled {cancelled} unfinished task(s) of this run on queue {queue:?}\
         {}",
        if finished > 0 {
            format!(" ({finished} finished meanwhile)")
        } else {
            String::new()
        }
    );
    if !failed.is_empty() {
        eprintln!(
            "taskq map: {} task(s) could not be cancelled and may still run; cancel them with \
             `taskq cancel ID`: {}",
            failed.len(),
            failed.join("; ")
        );
    }
}

/// FAILED_PRECONDITION: the task finished before the cancel arrived.
fn finished_already(error: &ClientError) -> bool {
    error.code() == Some(tonic::Code::FailedPrecondition)
}
