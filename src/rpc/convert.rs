//! Wire types to engine types and back. The only place that knows both.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use tonic::Status;

use crate::broker::{
    BrokerError, LeaseId, LeasedTask, NewTask, Outcome, QueueName, QueueStats, Stats, TaskId,
    TaskResult, TaskState, WorkerInfo,
};
use crate::pb;

pub fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(at)
}

/// An optional wire duration; `None` when unset. Negative is invalid.
pub fn duration(
    field: &str,
    value: Option<prost_types::Duration>,
) -> Result<Option<Duration>, Status> {
    value
        .map(|d| {
            // By hand, not `Duration::try_from`: prost-types negates the
            // seconds of a negative duration, which overflows (a panic in
            // debug builds) for i64::MIN.
            let seconds = u64::try_from(d.seconds).ok();
            let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000);
            match (seconds, nanos) {
                (Some(seconds), Some(nanos)) => Ok(Duration::new(seconds, nanos)),
                _ => Err(Status::invalid_argument(format!(
                    "{field} must be a non-negative duration with nanos below 1e9"
                ))),
            }
        })
        .transpose()
}

pub fn proto_duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(value).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    })
}

pub fn queue(name: &str) -> Result<QueueName, Status> {
    Ok(QueueName::parse(name)?)
}

/// A task id from the wire. Empty is a malformed request; anything that is
/// not one of our ids names no task.
pub fn task_id(text: &str) -> Result<TaskId, Status> {
    if text.is_empty() {
        return Err(Status::invalid_argument("task_id is required"));
    }
    TaskId::parse(text).ok_or_else(|| BrokerError::TaskNotFound(text.into()).into())
}

/// A lease id from the wire. One that is malformed or names another task
/// becomes sequence 0, which is never issued: the broker then answers
/// NOT_FOUND, FAILED_PRECONDITION or ALREADY_EXISTS for the task as it
/// would for any lease, and ABORTED otherwise.
pub fn lease_id(task: TaskId, text: &str) -> Result<LeaseId, Status> {
    if text.is_empty() {
        return Err(Status::invalid_argument(
            "lease_id is required: pass the lease_id of the task as GetTask returned it",
        ));
    }
    Ok(LeaseId::parse(text)
        .filter(|lease| lease.task == task)
        .unwrap_or(LeaseId { task, seq: 0 }))
}

/// Payloads up to this size are copied out of the request buffer when
/// stored.
const COMPACT_BELOW: usize = 64 * 1024;

/// A decoded `bytes` field is a view into the HTTP/2 receive buffer, which
/// can be many times its size; stored as is, a 64-byte payload would keep
/// kilobytes alive for as long as the task is held. Small ones get their
/// own allocation; large ones (about the size of their buffer anyway) are
/// kept without a copy.
fn compact(bytes: Bytes) -> Bytes {
    if bytes.len() < COMPACT_BELOW {
        Bytes::copy_from_slice(&bytes)
    } else {
        bytes
    }
}

pub fn new_task(request: pb::PutTaskRequest) -> Result<NewTask, Status> {
    new_task_in_batch(request, &mut None)
}

/// [`new_task`] for one task of a batch: `last` is the queue of the task
/// before, reused when this one names the same queue, so a batch for one
/// queue makes its name once rather than once per task.
pub fn new_task_in_batch(
    request: pb::PutTaskRequest,
    last: &mut Option<QueueName>,
) -> Result<NewTask, Status> {
    let queue = match last {
        Some(q) if q.is_parsed_from(&request.queue) => q.clone(),
        _ => {
            let q = queue(&request.queue)?;
            *last = Some(q.clone());
            q
        }
    };
    Ok(NewTask {
        queue: Some(queue),
        payload: compact(request.payload),
        idempotency_key: Some(request.idempotency_key).filter(|k| !k.is_empty()),
        max_attempts: request.max_attempts,
        headers: request.headers,
        ttl: duration("ttl", request.ttl)?,
        priority: request.priority,
        delay: duration("delay", request.delay)?,
    })
}

pub fn outcome(outcome: Option<pb::put_result_request::Outcome>) -> Result<Outcome, Status> {
    use pb::put_result_request::Outcome as Wire;
    match outcome {
        Some(Wire::Output(output)) => Ok(Outcome::Success(compact(output))),
        Some(Wire::Failure(failure)) => Ok(Outcome::Failure {
            message: failure.message,
            retry: failure.retry,
            retry_after: duration("failure.retry_after", failure.retry_after)?,
        }),
        None => Err(Status::invalid_argument(
            "set exactly one outcome: output (success) or failure",
        )),
    }
}

pub fn task(task: LeasedTask) -> pb::Task {
    let id = task.id.to_text();
    let lease_id = task.lease_id.to_text_after(&id);
    pb::Task {
        id,
        queue: task.queue.as_str().to_owned(),
        payload: task.payload,
        headers: task.headers,
        attempt: task.attempt,
        max_attempts: task.max_attempts,
        lease_id,
        lease_expires_at: Some(timestamp(task.lease_expires_at)),
        created_at: Some(timestamp(task.created_at)),
        expires_at: task.expires_at.map(timestamp),
    }
}

/// Room for a task's fixed fields on the wire: the two ids, the counters,
/// three timestamps, every field's key and length, and its own key and
/// length inside a batch. Generous: the real figure is under 180 bytes.
const TASK_FIXED_BYTES: usize = 256;
/// The same for a result (under 120 bytes).
const RESULT_FIXED_BYTES: usize = 192;

/// At least the size [`task`] gives `task` inside a batch message, found
/// without converting it: a batch can decide whether it fits first.
pub fn task_len_bound(task: &LeasedTask) -> usize {
    TASK_FIXED_BYTES
        + task.queue.as_str().len()
        + task.payload.len()
        + task
            .headers
            .iter()
            .map(|(name, value)| 16 + name.len() + value.len())
            .sum::<usize>()
}

/// At least the size [`result`] gives `result` inside a batch message.
pub fn result_len_bound(result: &TaskResult) -> usize {
    RESULT_FIXED_BYTES
        + result.queue.as_str().len()
        + result.output.len()
        + result.error.len()
        + result.worker.as_ref().map_or(0, |w| w.as_str().len())
}

pub fn state(state: TaskState) -> pb::TaskState {
    match state {
        TaskState::Pending => pb::TaskState::Pending,
        TaskState::Leased => pb::TaskState::Leased,
        TaskState::Succeeded => pb::TaskState::Succeeded,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Cancelled => pb::TaskState::Cancelled,
    }
}

pub fn result(result: TaskResult) -> pb::Result {
    pb::Result {
        task_id: result.task_id.to_text(),
        queue: result.queue.as_str().to_owned(),
        state: state(result.state).into(),
        output: result.output,
        error: result.error,
        attempts: result.attempts,
        worker_id: result
            .worker
            .map(|w| w.as_str().to_owned())
            .unwrap_or_default(),
        created_at: Some(timestamp(result.created_at)),
        finished_at: Some(timestamp(result.finished_at)),
    }
}

fn queue_stats(stats: QueueStats) -> pb::QueueStats {
    pb::QueueStats {
        queue: stats.queue,
        pending: stats.pending,
        delayed: stats.delayed,
        leased: stats.leased,
        succeeded: stats.succeeded,
        failed: stats.failed,
        redelivered: stats.redelivered,
        oldest_pending_age: Some(proto_duration(stats.oldest_pending_age)),
        results_unclaimed: stats.results_unclaimed,
        results_evicted: stats.results_evicted,
        waiting_workers: stats.waiting_workers,
        paused: stats.paused,
    }
}

fn worker_info(worker: WorkerInfo) -> pb::WorkerInfo {
    pb::WorkerInfo {
        worker_id: worker.worker.to_string(),
        queue: worker.queue.map(|q| q.to_string()).unwrap_or_default(),
        last_seen: Some(timestamp(worker.last_seen)),
        in_flight: worker.in_flight,
        alive: worker.alive,
    }
}

pub fn stats(stats: Stats) -> pb::GetStatsResponse {
    pb::GetStatsResponse {
        queues: stats.queues.into_iter().map(queue_stats).collect(),
        workers: stats.workers.into_iter().map(worker_info).collect(),
    }
}

/// A refused item of a batch (a put, a result, an extension), as its
/// outcome's error.
pub fn item_error(status: &Status) -> pb::ItemError {
    pb::ItemError {
        code: status.code() as i32,
        message: status.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: stored payloads kept their whole receive buffer alive
    /// (about 4.7 KB per held 64-byte task in `taskq bench`).
    #[test]
    fn small_payloads_do_not_keep_their_buffer() {
        let buffer = Bytes::from(vec![7u8; 16 * 1024]);
        let stored = compact(buffer.slice(100..164));
        assert!(stored.is_unique(), "a copy of its own");
        assert_eq!(&stored[..], &buffer[100..164]);
        let big_buffer = Bytes::from(vec![1u8; 2 * COMPACT_BELOW]);
        let large = compact(big_buffer.slice(..COMPACT_BELOW));
        assert!(!large.is_unique(), "large payloads are not copied");
    }

    /// A batch reuses the queue of the task before only when it is the
    /// same queue, the empty name counting as the default queue; a bad
    /// name is refused on its own task and does not disturb the next.
    #[test]
    fn batch_tasks_keep_their_own_queues() {
        let mut last = None;
        let names = ["a", "a", "", "default", "b", "bad/name", "b", "a"];
        let queues: Vec<_> = names
            .into_iter()
            .map(|name| {
                let request = pb::PutTaskRequest {
                    queue: name.into(),
                    ..Default::default()
                };
                new_task_in_batch(request, &mut last)
                    .map(|task| task.queue.expect("set").as_str().to_string())
                    .map_err(|status| status.code())
            })
            .collect();
        let ok = |name: &str| Ok(name.to_string());
        assert_eq!(
            queues,
            [
                ok("a"),
                ok("a"),
                ok("default"),
                ok("default"),
                ok("b"),
                Err(tonic::Code::InvalidArgument),
                ok("b"),
                ok("a"),
            ]
        );
    }
}
