//! What becomes of the tasks a `taskq map` run put and stops waiting for
//! (Ctrl-C, `--halt-on-error`, a fatal error): the one place where they
//! will be cancelled once `taskq.v1` can cancel a task.

use crate::client::Client;

/// Deals with the tasks `ids` this run put on `queue` that are not
/// finished.
///
/// `taskq.v1` has no call to cancel a task yet, so for now this says
/// plainly on stderr how many there are and that they stay on the queue,
/// where workers will still run them; it cancels nothing. The client is
/// the one the cancellation will go through.
pub(crate) async fn cancel_unfinished(_client: &Client, queue: &str, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let (n, are) = match ids.len() {
        1 => ("1 task".to_string(), "is"),
        n => (format!("{n} tasks"), "are"),
    };
    eprintln!(
        "taskq map: {n} put by this run {are} not finished and stay on queue {queue:?}, \
         where workers will still run them (this version of taskq cannot cancel tasks)"
    );
}
