//! What `taskq top` shows: the status page's report (`GET /status` with
//! `Accept: application/json`, built by the server's `status` module),
//! read into plain types. Fields a server does not send read as zero or
//! empty, so a dashboard of another version still draws what it can.

use std::time::Duration;

use serde_json::Value;

/// One report of the server: the numbers the status page shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// The server's version.
    pub version: String,
    /// `serving`, or `draining` once its shutdown began.
    pub health: String,
    /// The store's kind: `memory` or `postgres`.
    pub store: String,
    /// Time since the server started.
    pub uptime: Duration,
    /// Tasks put per second, all queues, over the last sampling interval.
    pub enqueued_per_second: f64,
    /// Tasks finished per second, all queues, over the same interval.
    pub finished_per_second: f64,
    /// The sampling interval the rates are taken over.
    pub rate_interval: Duration,
    /// Workers seen within the server's `--worker-timeout`.
    pub workers_alive: u64,
    /// Workers the server knows, alive or not (more than `workers` holds
    /// when the server lists only the most recently seen).
    pub workers_known: u64,
    /// Bytes of payloads and results held.
    pub held_bytes: u64,
    /// The cap on `held_bytes`.
    pub held_bytes_limit: u64,
    /// The queues, in the server's order.
    pub queues: Vec<QueueLine>,
    /// The workers, the most recently seen first.
    pub workers: Vec<WorkerLine>,
}

/// One queue of a [`Report`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueLine {
    /// The queue's name.
    pub queue: String,
    /// Tasks waiting for a worker (pending).
    pub ready: u64,
    /// Tasks leased to a worker.
    pub leased: u64,
    /// How long the oldest ready task has waited.
    pub oldest_ready_age: Duration,
    /// Tasks put per second over the last sampling interval.
    pub enqueued_per_second: f64,
    /// Tasks finished per second over the last sampling interval.
    pub finished_per_second: f64,
    /// Tasks finished with success since the server started.
    pub succeeded: u64,
    /// Tasks failed since the server started (their ttl running out apart).
    pub failed: u64,
    /// Tasks whose ttl ran out.
    pub expired: u64,
    /// Tasks handed out again after an error or an expired lease.
    pub retried: u64,
    /// Share of finished tasks that failed over the server's history (an
    /// hour); `None` while none finished.
    pub failure_ratio: Option<f64>,
    /// Worker streams open on the queue.
    pub worker_streams: u64,
}

/// One worker of a [`Report`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerLine {
    /// The worker's id.
    pub worker: String,
    /// The queue it last worked on.
    pub queue: Option<String>,
    /// Tasks it holds.
    pub in_flight: u64,
    /// Time since the server last heard from it.
    pub last_seen: Duration,
    /// Seen within the server's `--worker-timeout`.
    pub alive: bool,
}

/// The answer was JSON but not a status report.
#[derive(Debug, thiserror::Error)]
#[error("the answer is not taskq's status report (no \"queues\" list)")]
pub struct NotAReport;

impl Report {
    /// Reads the status JSON.
    ///
    /// # Errors
    /// [`NotAReport`] when `json` has no `queues` list: some other
    /// service answered.
    pub fn from_json(json: &Value) -> Result<Self, NotAReport> {
        let queues = json["queues"].as_array().ok_or(NotAReport)?;
        let workers = json["workers"].as_array().map_or(&[][..], Vec::as_slice);
        Ok(Self {
            version: text(&json["version"]),
            health: text(&json["health"]),
            store: text(&json["store"]),
            uptime: seconds(&json["uptime_seconds"]),
            enqueued_per_second: rate(&json["enqueued_per_second"]),
            finished_per_second: rate(&json["finished_per_second"]),
            rate_interval: seconds(&json["history_interval_seconds"]),
            workers_alive: count(&json["workers_alive"]),
            workers_known: count(&json["workers_known"]),
            held_bytes: count(&json["held_bytes"]),
            held_bytes_limit: count(&json["held_bytes_limit"]),
            queues: queues.iter().map(QueueLine::from_json).collect(),
            workers: workers.iter().map(WorkerLine::from_json).collect(),
        })
    }
}

impl QueueLine {
    fn from_json(json: &Value) -> Self {
        Self {
            queue: text(&json["queue"]),
            ready: count(&json["ready"]),
            leased: count(&json["leased"]),
            oldest_ready_age: seconds(&json["oldest_ready_age_seconds"]),
            enqueued_per_second: rate(&json["enqueued_per_second"]),
            finished_per_second: rate(&json["finished_per_second"]),
            succeeded: count(&json["succeeded"]),
            failed: count(&json["failed"]),
            expired: count(&json["expired"]),
            retried: count(&json["retried"]),
            failure_ratio: json["failure_ratio"]
                .as_f64()
                .filter(|r| r.is_finite() && (0.0..=1.0).contains(r)),
            worker_streams: count(&json["worker_streams"]),
        }
    }
}

impl WorkerLine {
    fn from_json(json: &Value) -> Self {
        Self {
            worker: text(&json["worker"]),
            queue: json["queue"].as_str().map(str::to_string),
            in_flight: count(&json["in_flight"]),
            last_seen: seconds(&json["last_seen_seconds_ago"]),
            alive: json["alive"].as_bool().unwrap_or(false),
        }
    }
}

fn text(json: &Value) -> String {
    json.as_str().unwrap_or_default().to_string()
}

fn count(json: &Value) -> u64 {
    json.as_u64().unwrap_or(0)
}

/// A rate: finite and not negative, or 0.
fn rate(json: &Value) -> f64 {
    json.as_f64()
        .filter(|r| r.is_finite() && *r >= 0.0)
        .unwrap_or(0.0)
}

/// Seconds as a duration; anything odd (negative, not finite, beyond
/// what a `Duration` holds) reads as zero rather than panicking.
fn seconds(json: &Value) -> Duration {
    json.as_f64()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_status_report_reads_into_queues_and_workers() {
        let json = json!({
            "version": "0.1.0",
            "health": "serving",
            "store": "memory",
            "uptime_seconds": 3725,
            "enqueued_per_second": 2.5,
            "finished_per_second": 2.0,
            "history_interval_seconds": 10.0,
            "workers_alive": 1,
            "workers_known": 2,
            "held_bytes": 1024,
            "held_bytes_limit": 4096,
            "queues": [{
                "queue": "emails", "ready": 7, "leased": 2,
                "oldest_ready_age_seconds": 1.5, "enqueued": 40,
                "succeeded": 30, "failed": 1, "expired": 0, "retried": 3,
                "worker_streams": 1, "enqueued_per_second": 2.5,
                "finished_per_second": 2.0, "failure_ratio": 0.25,
                "history": { "enqueued_per_second": [], "finished_per_second": [] },
            }],
            "workers": [{
                "worker": "w-1", "queue": "emails", "in_flight": 2,
                "last_seen_seconds_ago": 0.5, "alive": true,
            }, {
                "worker": "w-0", "queue": null, "in_flight": 0,
                "last_seen_seconds_ago": 90.0, "alive": false,
            }],
        });
        let report = Report::from_json(&json).unwrap();
        assert_eq!(report.health, "serving");
        assert_eq!(report.uptime, Duration::from_secs(3725));
        assert_eq!(report.rate_interval, Duration::from_secs(10));
        assert_eq!(report.queues.len(), 1);
        let emails = &report.queues[0];
        assert_eq!(
            (emails.queue.as_str(), emails.ready, emails.leased),
            ("emails", 7, 2)
        );
        assert_eq!(emails.oldest_ready_age, Duration::from_millis(1500));
        assert_eq!(emails.failure_ratio, Some(0.25));
        assert_eq!(report.workers[0].queue.as_deref(), Some("emails"));
        assert_eq!(report.workers[1].queue, None);
        assert!(!report.workers[1].alive);
    }

    /// Another version's report, or a broken one, never panics: what is
    /// missing or out of range reads as zero.
    #[test]
    fn odd_values_read_as_zero_and_other_json_is_refused() {
        let json = json!({
            "queues": [{ "queue": "q", "ready": -1, "oldest_ready_age_seconds": -5.0,
                         "enqueued_per_second": "fast", "failure_ratio": 7.0 }],
            "uptime_seconds": 1e300,
        });
        let report = Report::from_json(&json).unwrap();
        assert_eq!(report.uptime, Duration::ZERO);
        assert_eq!(report.queues[0].ready, 0);
        assert_eq!(report.queues[0].oldest_ready_age, Duration::ZERO);
        assert_eq!(report.queues[0].enqueued_per_second, 0.0);
        assert_eq!(report.queues[0].failure_ratio, None);
        assert!(report.workers.is_empty());
        assert!(Report::from_json(&json!({ "error": "no" })).is_err());
        assert!(Report::from_json(&json!([1, 2])).is_err());
    }
}
