//! Rows to engine types.

use std::time::{Duration, SystemTime};

use crate::broker::{
    LeaseId, LeaseView, LeasedTask, QueueName, TaskId, TaskResult, TaskState, TaskView, WorkerId,
};

/// The task state a row's `state` column holds.
pub(crate) fn state_of(state: i16) -> TaskState {
    match state {
        // -1: delayed, which clients see as pending.
        -1 | 0 => TaskState::Pending,
        1 => TaskState::Leased,
        2 => TaskState::Succeeded,
        4 => TaskState::Cancelled,
        _ => TaskState::Failed,
    }
}

/// Milliseconds since the Unix epoch, for a new task id.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A claimed row as a leased task.
pub(crate) fn leased_task(
    row: &tokio_postgres::Row,
    queue: &QueueName,
    now: tokio::time::Instant,
) -> LeasedTask {
    let id = TaskId::from_uuid(row.get(0));
    let payload: Vec<u8> = row.get(1);
    let headers: Option<String> = row.get(2);
    let seq: i32 = row.get(5);
    let left: f64 = row.get(9);
    LeasedTask {
        id,
        queue: queue.clone(),
        payload: payload.into(),
        headers: headers
            .and_then(|h| serde_json::from_str(&h).ok())
            .unwrap_or_default(),
        attempt: u32::try_from(row.get::<_, i32>(3)).unwrap_or(0),
        max_attempts: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
        lease_id: LeaseId {
            task: id,
            seq: u32::try_from(seq).unwrap_or(0),
        },
        lease_expires_at: row.get(6),
        lease_deadline: now + Duration::from_secs_f64(left.max(0.0)),
        created_at: row.get(7),
        expires_at: row.get(8),
    }
}

/// A row as a result, when it is finished.
pub(crate) fn result_row(row: &tokio_postgres::Row) -> Option<TaskResult> {
    let state = state_of(row.get::<_, i16>(2));
    if !matches!(
        state,
        TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
    ) {
        return None;
    }
    let queue: String = row.get(1);
    let output: Option<Vec<u8>> = row.get(3);
    let error: Option<String> = row.get(4);
    let worker: Option<String> = row.get(6);
    Some(TaskResult {
        task_id: TaskId::from_uuid(row.get(0)),
        queue: QueueName::parse(&queue).ok()?,
        state,
        output: output.unwrap_or_default().into(),
        error: if state == TaskState::Succeeded {
            String::new()
        } else {
            error.unwrap_or_default()
        },
        attempts: u32::try_from(row.get::<_, i32>(5)).unwrap_or(0),
        worker: worker.and_then(|w| WorkerId::new(&w).ok()),
        created_at: row.get(7),
        finished_at: row
            .get::<_, Option<SystemTime>>(8)
            .unwrap_or(SystemTime::UNIX_EPOCH),
    })
}

/// An unfinished task's row as a [`TaskView`] (`sql.describe`'s columns).
pub(crate) fn task_view(row: &tokio_postgres::Row) -> Option<TaskView> {
    let queue: String = row.get(0);
    let state = state_of(row.get::<_, i16>(1));
    let worker: Option<String> = row.get(7);
    let lease_until: Option<SystemTime> = row.get(8);
    let lease = match (state, worker, lease_until) {
        (TaskState::Leased, Some(worker), Some(expires_at)) => Some(LeaseView {
            worker: WorkerId::new(&worker).ok()?,
            expires_at,
        }),
        _ => None,
    };
    Some(TaskView {
        queue: QueueName::parse(&queue).ok()?,
        state,
        attempts: u32::try_from(row.get::<_, i32>(2)).unwrap_or(0),
        max_attempts: u32::try_from(row.get::<_, i32>(3)).unwrap_or(0),
        created_at: row.get(4),
        expires_at: row.get(5),
        payload_bytes: u64::try_from(row.get::<_, i64>(6)).unwrap_or(0),
        lease,
    })
}
