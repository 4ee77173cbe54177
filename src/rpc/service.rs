//! The `taskq.v1.TaskQueue` service: each handler checks the caller's
//! access, works out how long it may wait, and hands the request to its
//! call family (`tasks`, `worker_stream`, `results`, `stats`), which
//! converts, calls the broker and converts back.

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::access::{permit, worker_id};
use super::results::{ResultBatches, Results};
use super::worker_stream::ServerMessages;
use super::{convert, deadline, results, stats, tasks, worker_stream};
use crate::auth::Call;
use crate::pb::{self, task_queue_server::TaskQueue};
use crate::store::Store;

/// Default of `--max-batch`.
pub const DEFAULT_MAX_BATCH: usize = 1000;

/// The gRPC service in front of a [`Store`].
#[derive(Clone, Debug)]
pub struct TaskQueueService<S> {
    broker: S,
    max_wait: Duration,
    max_batch: usize,
}

impl<S: Store> TaskQueueService<S> {
    /// A service over `broker`; blocking calls without a deadline wait at
    /// most `max_wait`.
    pub fn new(broker: S, max_wait: Duration) -> Self {
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

#[tonic::async_trait]
impl<S: Store> TaskQueue for TaskQueueService<S> {
    async fn put_task(
        &self,
        request: Request<pb::PutTaskRequest>,
    ) -> Result<Response<pb::PutTaskResponse>, Status> {
        let access = permit(&request, Call::PutTask)?;
        let wait = self.wait(&request);
        let response = tasks::put_task(&self.broker, &access, request.into_inner(), wait).await?;
        Ok(Response::new(response))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let access = permit(&request, Call::GetTask)?;
        let wait = self.capped_wait(&request, request.get_ref().max_wait)?;
        let peer = request.remote_addr();
        let mut body = request.into_inner();
        let worker = worker_id(std::mem::take(&mut body.worker_id), peer)?;
        let response = tasks::get_task(&self.broker, &access, body, worker, wait).await?;
        Ok(Response::new(response))
    }

    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        let access = permit(&request, Call::ExtendLease)?;
        let expires_at = tasks::extend_lease(&self.broker, &access, request.into_inner()).await?;
        Ok(Response::new(pb::ExtendLeaseResponse {
            lease_expires_at: Some(convert::timestamp(expires_at)),
        }))
    }

    async fn put_result(
        &self,
        request: Request<pb::PutResultRequest>,
    ) -> Result<Response<pb::PutResultResponse>, Status> {
        let access = permit(&request, Call::PutResult)?;
        let state = tasks::put_result(&self.broker, &access, request.into_inner()).await?;
        Ok(Response::new(pb::PutResultResponse {
            state: convert::state(state).into(),
        }))
    }

    async fn get_result(
        &self,
        request: Request<pb::GetResultRequest>,
    ) -> Result<Response<pb::GetResultResponse>, Status> {
        let access = permit(&request, Call::GetResult)?;
        let wait = self.capped_wait(&request, request.get_ref().max_wait)?;
        let response =
            results::get_result(&self.broker, &access, request.into_inner(), wait).await?;
        Ok(Response::new(response))
    }

    async fn put_tasks(
        &self,
        request: Request<pb::PutTasksRequest>,
    ) -> Result<Response<pb::PutTasksResponse>, Status> {
        let access = permit(&request, Call::PutTasks)?;
        let response =
            tasks::put_tasks(&self.broker, &access, request.into_inner(), self.max_batch).await?;
        Ok(Response::new(response))
    }

    type StreamTasksStream = ServerMessages<S::WorkerStream>;

    async fn stream_tasks(
        &self,
        request: Request<tonic::Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::StreamTasksStream>, Status> {
        let access = permit(&request, Call::StreamTasks)?;
        let peer = request.remote_addr();
        let stream =
            worker_stream::stream_tasks(&self.broker, access, request.into_inner(), peer).await?;
        Ok(Response::new(stream))
    }

    type WatchResultsStream = Results<S::ResultStream>;

    async fn watch_results(
        &self,
        request: Request<pb::WatchResultsRequest>,
    ) -> Result<Response<Self::WatchResultsStream>, Status> {
        let access = permit(&request, Call::WatchResults)?;
        let stream =
            results::watch_results(&self.broker, &access, request.into_inner(), self.max_batch)
                .await?;
        Ok(Response::new(stream))
    }

    type WatchResultBatchesStream = ResultBatches<S::ResultStream>;

    async fn watch_result_batches(
        &self,
        request: Request<pb::WatchResultsRequest>,
    ) -> Result<Response<Self::WatchResultBatchesStream>, Status> {
        let access = permit(&request, Call::WatchResultBatches)?;
        let stream =
            results::watch_results(&self.broker, &access, request.into_inner(), self.max_batch)
                .await?;
        Ok(Response::new(ResultBatches::new(stream)))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let access = permit(&request, Call::CancelTask)?;
        let previous = tasks::cancel_task(&self.broker, &access, request.into_inner()).await?;
        Ok(Response::new(pb::CancelTaskResponse {
            previous_state: convert::state(previous).into(),
        }))
    }

    async fn pause_queue(
        &self,
        request: Request<pb::QueueRequest>,
    ) -> Result<Response<pb::PauseState>, Status> {
        let access = permit(&request, Call::ManageQueue)?;
        let queue = tasks::managed_queue(&access, &request.get_ref().queue)?;
        let was_paused = self.broker.set_paused(&queue, true).await?;
        Ok(Response::new(pb::PauseState { was_paused }))
    }

    async fn resume_queue(
        &self,
        request: Request<pb::QueueRequest>,
    ) -> Result<Response<pb::PauseState>, Status> {
        let access = permit(&request, Call::ManageQueue)?;
        let queue = tasks::managed_queue(&access, &request.get_ref().queue)?;
        let was_paused = self.broker.set_paused(&queue, false).await?;
        Ok(Response::new(pb::PauseState { was_paused }))
    }

    async fn purge_queue(
        &self,
        request: Request<pb::QueueRequest>,
    ) -> Result<Response<pb::PurgeQueueResponse>, Status> {
        let access = permit(&request, Call::ManageQueue)?;
        let queue = tasks::managed_queue(&access, &request.get_ref().queue)?;
        let purged = self.broker.purge(&queue).await?;
        Ok(Response::new(pb::PurgeQueueResponse { purged }))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let access = permit(&request, Call::GetStats)?;
        let response = stats::get_stats(&self.broker, &access, request.into_inner()).await?;
        Ok(Response::new(response))
    }
}
