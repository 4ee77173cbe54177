//! The task calls, unary: PutTask, PutTasks, GetTask, ExtendLease and
//! PutResult. A worker stream's results and extensions go through the same
//! functions (`rpc::worker_stream`).

use std::time::{Duration, SystemTime};

use tonic::Status;

use super::access::{permit_new_task, permit_task};
use super::batch::in_place;
use super::convert;
use crate::auth::Access;
use crate::broker::{LeaseId, LeaseRequest, Outcome, QueueName, TaskState, WorkerId};
use crate::pb;
use crate::store::Store;

/// PutTask: convert, check the queue, store (waiting up to `wait` for room).
pub(super) async fn put_task<S: Store>(
    broker: &S,
    access: &Access,
    request: pb::PutTaskRequest,
    wait: Duration,
) -> Result<pb::PutTaskResponse, Status> {
    let task = convert::new_task(request)?;
    permit_new_task(access, &task)?;
    let outcome = broker.put(task, wait).await?;
    Ok(pb::PutTaskResponse {
        task_id: outcome.task_id.to_text(),
        duplicate: outcome.duplicate,
    })
}

/// PutTasks: every task validated and stored on its own, under one lock.
pub(super) async fn put_tasks<S: Store>(
    broker: &S,
    access: &Access,
    request: pb::PutTasksRequest,
    max_batch: usize,
) -> Result<pb::PutTasksResponse, Status> {
    if request.tasks.len() > max_batch {
        return Err(Status::invalid_argument(format!(
            "{} tasks in one PutTasks; the limit is {max_batch} (server flag --max-batch): split the batch",
            request.tasks.len()
        )));
    }
    // Tasks that fail conversion keep their place with their error.
    let mut slots = Vec::with_capacity(request.tasks.len());
    let mut valid = Vec::with_capacity(request.tasks.len());
    let mut last_queue = None;
    for task in request.tasks {
        let task = convert::new_task_in_batch(task, &mut last_queue)
            .and_then(|task| permit_new_task(access, &task).map(|()| task));
        match task {
            Ok(task) => {
                slots.push(None);
                valid.push(task);
            }
            Err(status) => slots.push(Some(status)),
        }
    }
    let stored = broker.put_many(valid).await;
    let outcomes = in_place(slots, stored)
        .map(|result| pb::PutTaskOutcome {
            outcome: Some(match result {
                Ok(put) => pb::put_task_outcome::Outcome::Ok(pb::PutTaskResponse {
                    task_id: put.task_id.to_text(),
                    duplicate: put.duplicate,
                }),
                Err(status) => pb::put_task_outcome::Outcome::Error(convert::item_error(&status)),
            }),
        })
        .collect();
    Ok(pb::PutTasksResponse { outcomes })
}

/// GetTask: lease the queue's next task to `worker`, waiting up to `wait`.
pub(super) async fn get_task<S: Store>(
    broker: &S,
    access: &Access,
    request: pb::GetTaskRequest,
    worker: WorkerId,
    wait: Duration,
) -> Result<pb::GetTaskResponse, Status> {
    let lease = LeaseRequest {
        queue: convert::queue(&request.queue)?,
        worker,
        lease_duration: convert::duration("lease", request.lease)?,
    };
    access.permit_queue(&lease.queue)?;
    let task = broker.lease(lease, wait).await?;
    Ok(pb::GetTaskResponse {
        task: task.map(convert::task),
    })
}

/// An ExtendLease, unary or on a worker stream: convert, then extend.
pub(super) async fn extend_lease<S: Store>(
    broker: &S,
    access: &Access,
    request: pb::ExtendLeaseRequest,
) -> Result<SystemTime, Status> {
    let task = convert::task_id(&request.task_id)?;
    permit_task(broker, access, task).await?;
    let lease_id = convert::lease_id(task, &request.lease_id)?;
    let extend_by = convert::duration("extend_by", request.extend_by)?;
    Ok(broker.extend(lease_id, extend_by).await?)
}

/// The queue an operator call names, checked against the token's queues.
pub(super) fn managed_queue(access: &Access, queue: &str) -> Result<QueueName, Status> {
    let queue = QueueName::parse(queue)?;
    access.permit_queue(&queue)?;
    Ok(queue)
}

/// A CancelTask: convert, check the task's queue, cancel. Returns the
/// state the task had.
pub(super) async fn cancel_task<S: Store>(
    broker: &S,
    access: &Access,
    request: pb::CancelTaskRequest,
) -> Result<TaskState, Status> {
    let task = convert::task_id(&request.task_id)?;
    permit_task(broker, access, task).await?;
    Ok(broker.cancel(task).await?)
}

/// A PutResult, unary or on a worker stream: convert, then complete.
pub(super) async fn put_result<S: Store>(
    broker: &S,
    access: &Access,
    request: pb::PutResultRequest,
) -> Result<TaskState, Status> {
    let (lease_id, outcome) = result_request(
        broker,
        access,
        &request.task_id,
        &request.lease_id,
        request.outcome,
    )
    .await?;
    Ok(broker.complete(lease_id, outcome).await?)
}

/// A result's lease and outcome from the wire, checked against `access`:
/// what PutResult, unary or on a stream, hands the broker.
pub(super) async fn result_request<S: Store>(
    broker: &S,
    access: &Access,
    task_id: &str,
    lease_id: &str,
    outcome: Option<pb::put_result_request::Outcome>,
) -> Result<(LeaseId, Outcome), Status> {
    if access.limits_queues() {
        permit_task(broker, access, convert::task_id(task_id)?).await?;
    }
    result_request_unlimited(task_id, lease_id, outcome)
}

/// [`result_request`] for a token not limited to some queues: nothing to
/// look up, so nothing to wait for (the stream path's results take this
/// way, one per result).
pub(super) fn result_request_unlimited(
    task_id: &str,
    lease_id: &str,
    outcome: Option<pb::put_result_request::Outcome>,
) -> Result<(LeaseId, Outcome), Status> {
    let task = convert::task_id(task_id)?;
    let lease_id = convert::lease_id(task, lease_id)?;
    Ok((lease_id, convert::outcome(outcome)?))
}
