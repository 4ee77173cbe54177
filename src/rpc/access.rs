//! What a call may touch, checked before it acts, and what a request says
//! about its caller: shared by the unary handlers and the stream handlers.

use tonic::{Request, Status};

use crate::auth::{Access, Call};
use crate::broker::{NewTask, QueueName, TaskId, WorkerId};
use crate::store::Store;

/// What the caller may do, checked against `call`: the [`Access`] the
/// token interceptor attached.
///
/// # Errors
/// PERMISSION_DENIED when the role may not make the call, or when no
/// interceptor attached an access (the service was served without one:
/// refuse rather than open it to everyone).
pub(super) fn permit<T>(request: &Request<T>, call: Call) -> Result<Access, Status> {
    let access = request.extensions().get::<Access>().cloned().ok_or_else(|| {
        Status::permission_denied(
            "the server has no access rules for this call: serve TaskQueueService behind              taskq::auth::TokenAuth",
        )
    })?;
    access.permit(call)?;
    Ok(access)
}

/// Checks that `access` may touch the queue of `task`. Tokens limited to
/// some queues pay one look-up; others nothing.
///
/// # Errors
/// NOT_FOUND for an unknown task, PERMISSION_DENIED for a task of another
/// queue.
pub(super) async fn permit_task<S: Store>(
    store: &S,
    access: &Access,
    task: TaskId,
) -> Result<(), Status> {
    if access.limits_queues() {
        access.permit_queue(&store.task_queue(task).await?)?;
    }
    Ok(())
}

/// Checks that `access` may put `task` in its queue.
pub(super) fn permit_new_task(access: &Access, task: &NewTask) -> Result<(), Status> {
    match &task.queue {
        Some(queue) => access.permit_queue(queue),
        // The engine puts a task without a queue in the default one.
        None => access.permit_queue(&QueueName::parse("")?),
    }
}

/// The worker id a request names, or one made from the peer's address.
pub(super) fn worker_id(
    given: String,
    peer: Option<std::net::SocketAddr>,
) -> Result<WorkerId, Status> {
    if !given.is_empty() {
        return Ok(WorkerId::new(&given)?);
    }
    let peer = peer.map_or_else(|| "unknown".to_string(), |a| a.to_string());
    Ok(WorkerId::new(&format!("anonymous@{peer}"))?)
}
