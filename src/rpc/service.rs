//! The `taskq.v1.TaskQueue` handlers: validate and convert, call the
//! broker, convert back.

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{convert, deadline, streams};
use crate::auth::{Access, Call};
use crate::broker::{Broker, LeaseRequest, NewTask, QueueName, TaskId, WorkerId};
use crate::pb::{self, task_queue_server::TaskQueue};

/// The gRPC service in front of a [`Broker`].
#[derive(Clone, Debug)]
pub struct TaskQueueService {
    broker: Broker,
    max_wait: Duration,
    max_batch: usize,
}

impl TaskQueueService {
    /// A service over `broker`; blocking calls without a deadline wait at
    /// most `max_wait`.
    pub fn new(broker: Broker, max_wait: Duration) -> Self {
        Self {
            broker,
            max_wait,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }

    /// Sets the most tasks (or task ids) one PutTasks (or WatchResults)
    /// may carry.
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    fn wait<T>(&self, request: &Request<T>) -> Duration {
        deadline::wait_for(request.metadata(), self.max_wait)
    }

    /// The wait of a call that may cap it with a `max_wait` field.
    fn capped_wait<T>(
        &self,
        request: &Request<T>,
        cap: Option<prost_types::Duration>,
    ) -> Result<Duration, Status> {
        let wait = self.wait(request);
        Ok(match convert::duration("max_wait", cap)? {
            Some(cap) => wait.min(cap),
            None => wait,
        })
    }
}

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
pub(super) fn permit_task(broker: &Broker, access: &Access, task: TaskId) -> Result<(), Status> {
    if access.limits_queues() {
        access.permit_queue(&broker.task_queue(task)?)?;
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

/// An ExtendLease, unary or on a worker stream: convert, then extend.
pub(super) fn extend_lease(
    broker: &Broker,
    access: &Access,
    request: pb::ExtendLeaseRequest,
) -> Result<std::time::SystemTime, Status> {
    let task = convert::task_id(&request.task_id)?;
    permit_task(broker, access, task)?;
    let lease = convert::lease_id(task, &request.lease_id)?;
    let extend_by = convert::duration("extend_by", request.extend_by)?;
    Ok(broker.extend(lease, extend_by)?)
}

/// A PutResult, unary or on a worker stream: convert, then complete.
pub(super) fn put_result(
    broker: &Broker,
    access: &Access,
    request: pb::PutResultRequest,
) -> Result<crate::broker::TaskState, Status> {
    let (lease, outcome) = result_request(
        broker,
        access,
        &request.task_id,
        &request.lease_id,
        request.outcome,
    )?;
    Ok(broker.complete(lease, outcome)?)
}

/// A result's lease and outcome from the wire, checked against `access`:
/// what PutResult, unary or on a stream, hands the broker.
pub(super) fn result_request(
    broker: &Broker,
    access: &Access,
    task_id: &str,
    lease_id: &str,
    outcome: Option<pb::put_result_request::Outcome>,
) -> Result<(crate::broker::LeaseId, crate::broker::Outcome), Status> {
    let task = convert::task_id(task_id)?;
    permit_task(broker, access, task)?;
    let lease = convert::lease_id(task, lease_id)?;
    Ok((lease, convert::outcome(outcome)?))
}

/// Default of `--max-batch`.
pub const DEFAULT_MAX_BATCH: usize = 1000;

/// The worker id a request names, or one made from the peer's address.
fn worker_id<T>(request: &Request<T>, given: &str) -> Result<WorkerId, Status> {
    if !given.is_empty() {
        return Ok(WorkerId::new(given)?);
    }
    let peer = request
        .remote_addr()
        .map_or_else(|| "unknown".to_string(), |a| a.to_string());
    Ok(WorkerId::new(&format!("anonymous@{peer}"))?)
}

#[tonic::async_trait]
impl TaskQueue for TaskQueueService {
    async fn put_task(
        &self,
        request: Request<pb::PutTaskRequest>,
    ) -> Result<Response<pb::PutTaskResponse>, Status> {
        let access = permit(&request, Call::PutTask)?;
        let wait = self.wait(&request);
        let task = convert::new_task(request.into_inner())?;
        permit_new_task(&access, &task)?;
        let outcome = self.broker.put(task, wait).await?;
        Ok(Response::new(pb::PutTaskResponse {
            task_id: outcome.task_id.to_text(),
            duplicate: outcome.duplicate,
        }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let access = permit(&request, Call::GetTask)?;
        let wait = self.capped_wait(&request, request.get_ref().max_wait)?;
        let worker = worker_id(&request, &request.get_ref().worker_id)?;
        let body = request.into_inner();
        let lease = LeaseRequest {
            queue: convert::queue(&body.queue)?,
            worker,
            lease: convert::duration("lease", body.lease)?,
        };
        access.permit_queue(&lease.queue)?;
        let task = self.broker.lease(lease, wait).await?;
        Ok(Response::new(pb::GetTaskResponse {
            task: task.map(convert::task),
        }))
    }

    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        let access = permit(&request, Call::ExtendLease)?;
        let expires_at = extend_lease(&self.broker, &access, request.into_inner())?;
        Ok(Response::new(pb::ExtendLeaseResponse {
            lease_expires_at: Some(convert::timestamp(expires_at)),
        }))
    }

    async fn put_result(
        &self,
        request: Request<pb::PutResultRequest>,
    ) -> Result<Response<pb::PutResultResponse>, Status> {
        let access = permit(&request, Call::PutResult)?;
        let state = put_result(&self.broker, &access, request.into_inner())?;
        Ok(Response::new(pb::PutResultResponse {
            state: convert::state(state).into(),
        }))
    }

    async fn get_result(
        &self,
        request: Request<pb::GetResultRequest>,
    ) -> Result<Response<pb::GetResultResponse>, Status> {
        use pb::get_result_request::Target;
        let access = permit(&request, Call::GetResult)?;
        let wait = self.capped_wait(&request, request.get_ref().max_wait)?;
        let result = match request.into_inner().target {
            Some(Target::TaskId(id)) => {
                let task = convert::task_id(&id)?;
                permit_task(&self.broker, &access, task)?;
                self.broker.result(task, wait).await?
            }
            Some(Target::Queue(queue)) => {
                let queue = convert::queue(&queue)?;
                access.permit_queue(&queue)?;
                self.broker.next_result(queue, wait).await?
            }
            None => {
                return Err(Status::invalid_argument(
                    "set a target: task_id (that task's result) or queue (the next result)",
                ));
            }
        };
        Ok(Response::new(pb::GetResultResponse {
            result: result.map(convert::result),
        }))
    }

    async fn put_tasks(
        &self,
        request: Request<pb::PutTasksRequest>,
    ) -> Result<Response<pb::PutTasksResponse>, Status> {
        let access = permit(&request, Call::PutTasks)?;
        let response =
            streams::put_tasks(&self.broker, &access, request.into_inner(), self.max_batch)?;
        Ok(Response::new(response))
    }

    type StreamTasksStream = streams::ServerMessages;

    async fn stream_tasks(
        &self,
        request: Request<tonic::Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::StreamTasksStream>, Status> {
        let access = permit(&request, Call::StreamTasks)?;
        let peer = request.remote_addr();
        let default_worker = move || {
            format!(
                "anonymous@{}",
                peer.map_or_else(|| "unknown".into(), |a| a.to_string())
            )
        };
        let stream =
            streams::stream_tasks(&self.broker, access, request.into_inner(), default_worker)
                .await?;
        Ok(Response::new(stream))
    }

    type WatchResultsStream = streams::Results;

    async fn watch_results(
        &self,
        request: Request<pb::WatchResultsRequest>,
    ) -> Result<Response<Self::WatchResultsStream>, Status> {
        let access = permit(&request, Call::WatchResults)?;
        let stream =
            streams::watch_results(&self.broker, &access, request.into_inner(), self.max_batch)?;
        Ok(Response::new(stream))
    }

    type WatchResultBatchesStream = streams::ResultBatches;

    async fn watch_result_batches(
        &self,
        request: Request<pb::WatchResultsRequest>,
    ) -> Result<Response<Self::WatchResultBatchesStream>, Status> {
        let access = permit(&request, Call::WatchResultBatches)?;
        let stream =
            streams::watch_results(&self.broker, &access, request.into_inner(), self.max_batch)?;
        Ok(Response::new(streams::ResultBatches::new(stream)))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        permit(&request, Call::GetStats)?;
        let name = request.into_inner().queue;
        let queue = if name.is_empty() {
            None
        } else {
            Some(convert::queue(&name)?)
        };
        let stats = self.broker.stats(queue.as_ref());
        Ok(Response::new(convert::stats(stats)))
    }
}
