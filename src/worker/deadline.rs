//! How long a program may work on a task: the worker's `--task-timeout`
//! or the task's own expiry, whichever comes first, and the failure of a
//! task whose program was stopped there. One rule for a program per task
//! (`exec`) and for long-lived programs (`pipe`).

use std::future::Future;
use std::time::{Duration, SystemTime};

use crate::pb;
use crate::worker::handler::TaskFailure;

/// The time a program has for one task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deadline {
    after: Duration,
    /// The task's expiry comes first (else the timeout does).
    expiry: bool,
}

impl Deadline {
    /// The nearer of `timeout` and `task`'s expiry, from now; `None` when
    /// neither is set.
    pub(crate) fn of(task: &pb::Task, timeout: Option<Duration>) -> Option<Self> {
        let until_expiry = task
            .expires_at
            .and_then(|at| SystemTime::try_from(at).ok())
            .map(|at| {
                at.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            });
        match (timeout, until_expiry) {
            (Some(t), Some(e)) if e < t => Some(Self::expiry(e)),
            (Some(t), _) => Some(Self {
                after: t,
                expiry: false,
            }),
            (None, Some(e)) => Some(Self::expiry(e)),
            (None, None) => None,
        }
    }

    fn expiry(after: Duration) -> Self {
        Self {
            after,
            expiry: true,
        }
    }

    /// The failure of a task whose program (named `program`) was killed
    /// at this deadline: a timeout is worth another attempt, an expired
    /// task is not (its work is pointless now).
    pub(crate) fn failure(&self, program: &str) -> TaskFailure {
        let why = if self.expiry {
            "the task expired"
        } else {
            "timed out"
        };
        TaskFailure {
            message: format!(
                "{why} after {}: {program} was killed",
                humantime::format_duration(self.after)
            ),
            retry: !self.expiry,
            retry_after: None,
        }
    }
}

/// Runs `work` to its end, or until `deadline` when there is one: the
/// deadline back as the error when it came first (and `work` was dropped).
pub(crate) async fn within<T>(
    deadline: Option<Deadline>,
    work: impl Future<Output = T>,
) -> Result<T, Deadline> {
    match deadline {
        Some(deadline) => tokio::time::timeout(deadline.after, work)
            .await
            .map_err(|_| deadline),
        None => Ok(work.await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expiring_in(after: Duration) -> pb::Task {
        pb::Task {
            expires_at: Some((SystemTime::now() + after).into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_nearer_of_timeout_and_expiry_wins() {
        let second = Duration::from_secs(1);
        let hour = Duration::from_secs(3600);
        assert_eq!(Deadline::of(&pb::Task::default(), None), None);
        let timeout = Deadline::of(&pb::Task::default(), Some(second)).unwrap();
        assert!(!timeout.expiry && timeout.after == second);
        assert!(Deadline::of(&expiring_in(hour), Some(second)).is_some_and(|d| !d.expiry));
        assert!(Deadline::of(&expiring_in(second), Some(hour)).is_some_and(|d| d.expiry));
        assert!(Deadline::of(&expiring_in(second), None).is_some_and(|d| d.expiry));
    }

    #[test]
    fn a_timeout_is_retried_an_expiry_is_not() {
        let timeout = Deadline::of(&pb::Task::default(), Some(Duration::from_millis(200)));
        let failure = timeout.unwrap().failure("prog");
        assert_eq!(
            (failure.message.as_str(), failure.retry),
            ("timed out after 200ms: prog was killed", true)
        );
        let expired = Deadline::of(&expiring_in(Duration::ZERO), None).unwrap();
        assert!(!expired.failure("prog").retry);
    }
}
