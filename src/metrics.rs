//! The Prometheus metrics of `/metrics`: their names, labels and help,
//! built at scrape time from one [`Snapshot`] of the engine and the
//! server's own counters, and written in the Prometheus text format or in
//! OpenMetrics.
//!
//! Nothing is recorded per task here: the engine keeps its counters as
//! tasks move (`broker::queue`), and a scrape reads them under one short
//! lock. The `queue` label is bounded: the first `--metrics-max-queues`
//! queues seen keep their own label for the life of the process (so their
//! series never jump), the others are summed into `queue="_other"` and
//! counted in `taskq_metrics_queues_folded`. No task id, worker id, token
//! or error text is ever a label.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::broker::{
    DurationHistogram, QueueStats, Snapshot, TASK_DURATION_BUCKETS, TaskDurations,
};
use crate::grpc_metrics::{BUCKETS, CODES, MethodNumbers};

/// Default of `--metrics-max-queues`.
pub const DEFAULT_METRICS_MAX_QUEUES: usize = 100;

/// The `queue` label of the queues past `--metrics-max-queues`.
pub const OTHER_QUEUES: &str = "_other";

/// The numbers of the transport, beside the engine's.
#[derive(Clone, Copy, Debug, Default)]
pub struct TransportNumbers {
    /// Connections open now.
    pub connections: u64,
    /// Calls shed at `--max-calls` since start.
    pub calls_shed: u64,
}

/// The two formats a scrape may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// it, the Prometheus text format otherwise.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The queues that keep their own label, chosen as they are first seen.
#[derive(Debug)]
pub struct QueueLabels {
    max: usize,
    /// Only a scrape takes this lock; no call of the task queue does.
    labelled: Mutex<HashSet<String>>,
}

impl QueueLabels {
    /// At most `max` queues with their own label.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            labelled: Mutex::new(HashSet::new()),
        }
    }

    /// The label of each queue, in the order given (sorted by name, as
    /// the snapshot is). A queue not yet labelled gets its own label while
    /// there is room.
    fn assign<'a>(&self, queues: &'a [QueueStats]) -> Vec<&'a str> {
        let mut labelled = self.labelled.lock().unwrap_or_else(PoisonError::into_inner);
        queues
            .iter()
            .map(|q| {
                if labelled.contains(&q.queue) {
                    q.queue.as_str()
                } else if labelled.len() < self.max {
                    labelled.insert(q.queue.clone());
                    q.queue.as_str()
                } else {
                    OTHER_QUEUES
                }
            })
            .collect()
    }
}

type Labels = Vec<(&'static str, String)>;

fn queue_label(queue: &str) -> Labels {
    vec![("queue", queue.to_string())]
}

fn queue_and(queue: &str, key: &'static str, value: &str) -> Labels {
    vec![("queue", queue.to_string()), (key, value.to_string())]
}

/// The metric families, registered once per scrape.
struct Families {
    tasks: Family<Labels, Gauge>,
    oldest_ready_age: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    enqueued: Family<Labels, Counter>,
    leased: Family<Labels, Counter>,
    finished: Family<Labels, Counter>,
    retried: Family<Labels, Counter>,
    worker_streams: Family<Labels, Gauge>,
}

impl Families {
    fn register(registry: &mut Registry) -> Self {
        let families = Self {
            tasks: Family::default(),
            oldest_ready_age: Family::default(),
            enqueued: Family::default(),
            leased: Family::default(),
            finished: Family::default(),
            retried: Family::default(),
            worker_streams: Family::default(),
        };
        registry.register(
            "taskq_tasks",
            "Unfinished tasks by state: ready (waiting to be handed out), delayed (waiting out a \
             delay or a retry's backoff) or leased",
            families.tasks.clone(),
        );
        registry.register(
            "taskq_queue_oldest_ready_age_seconds",
            "How long the oldest ready task has waited; 0 when none is ready",
            families.oldest_ready_age.clone(),
        );
        registry.register(
            "taskq_tasks_enqueued",
            "Tasks stored since start",
            families.enqueued.clone(),
        );
        registry.register(
            "taskq_tasks_leased",
            "Tasks handed out since start, every delivery (redeliveries included)",
            families.leased.clone(),
        );
        registry.register(
            "taskq_tasks_finished",
            "Tasks finished since start, by outcome: succeeded, failed, expired (ttl ran out) or \
             cancelled (CancelTask)",
            families.finished.clone(),
        );
        registry.register(
            "taskq_tasks_retried",
            "Tasks sent back for another attempt, by reason: error (a retried failure) or \
             lease_expired",
            families.retried.clone(),
        );
        registry.register(
            "taskq_worker_streams",
            "Worker streams (StreamTasks) open on the queue",
            families.worker_streams.clone(),
        );
        families
    }

    /// Adds one queue's numbers under `queue` (several queues may share
    /// `_other`: counts add up, the oldest age is the largest).
    fn add(&self, queue: &str, q: &QueueStats) {
        let gauge = |family: &Family<Labels, Gauge>, labels: Labels, value: u64| {
            family
                .get_or_create(&labels)
                .inc_by(i64::try_from(value).unwrap_or(i64::MAX));
        };
        gauge(&self.tasks, queue_and(queue, "state", "ready"), q.pending);
        gauge(&self.tasks, queue_and(queue, "state", "leased"), q.leased);
        gauge(&self.tasks, queue_and(queue, "state", "delayed"), q.delayed);
        gauge(&self.worker_streams, queue_label(queue), q.worker_streams);
        let age = self.oldest_ready_age.get_or_create(&queue_label(queue));
        age.set(age.get().max(q.oldest_pending_age.as_secs_f64()));
        let count = |family: &Family<Labels, Counter>, labels: Labels, value: u64| {
            family.get_or_create(&labels).inc_by(value);
        };
        count(&self.enqueued, queue_label(queue), q.enqueued);
        count(&self.leased, queue_label(queue), q.delivered);
        let finished = |outcome, value| {
            count(&self.finished, queue_and(queue, "outcome", outcome), value);
        };
        finished("succeeded", q.succeeded);
        finished("failed", q.failed - q.expired);
        finished("expired", q.expired);
        finished("cancelled", q.cancelled);
        let retried =
            |reason, value| count(&self.retried, queue_and(queue, "reason", reason), value);
        retried("error", q.retried_after_error);
        retried("lease_expired", q.retried_after_lease_expiry);
    }
}

fn gauge_of(value: u64) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
    gauge
}

fn counter_of(value: u64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(value);
    counter
}

/// The gRPC call metrics, under go-grpc-prometheus's names and labels.
#[derive(Debug)]
struct GrpcCalls(Vec<MethodNumbers>);

impl Collector for GrpcCalls {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = |n: &MethodNumbers| {
            vec![
                ("grpc_service", n.service),
                ("grpc_method", n.method),
                ("grpc_type", n.kind.label()),
            ]
        };
        let mut handled = encoder.encode_descriptor(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure \
             (health checks included; a call the client left before its status is Canceled)",
            None,
            MetricType::Counter,
        )?;
        for n in &self.0 {
            for (code, count) in CODES.iter().zip(n.handled) {
                // Every method's OK is written, as go-grpc-prometheus
                // initializes them; other codes once they happen.
                if count == 0 && *code != "OK" {
                    continue;
                }
                let mut labels = labels(n);
                labels.push(("grpc_code", code));
                handled
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
            }
        }
        let mut seconds = encoder.encode_descriptor(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC calls handled by the server, from \
             the request's arrival to its status: for streams (StreamTasks, WatchResults, \
             WatchResultBatches, Health/Watch, reflection) the whole life of the stream",
            None,
            MetricType::Histogram,
        )?;
        for n in &self.0 {
            let buckets: Vec<(f64, u64)> = BUCKETS
                .iter()
                .copied()
                .chain([f64::MAX])
                .zip(n.buckets)
                .collect();
            let count = n.buckets.iter().sum();
            seconds
                .encode_family(&labels(n))?
                .encode_histogram::<NoLabelSet>(n.seconds, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// The task duration histograms, one series per queue label (queues
/// folded under `_other` add up).
#[derive(Debug, Default)]
struct TaskDurationFamilies(Vec<(String, TaskDurations)>);

impl TaskDurationFamilies {
    fn add(&mut self, queue: &str, durations: &TaskDurations) {
        match self.0.iter_mut().find(|(label, _)| label == queue) {
            Some((_, sum)) => sum.add(durations),
            None => self.0.push((queue.to_string(), *durations)),
        }
    }
}

impl Collector for TaskDurationFamilies {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Pick = fn(&TaskDurations) -> &DurationHistogram;
        let families: [(&str, &str, Pick); 3] = [
            (
                "taskq_task_wait_duration_seconds",
                "How long tasks waited to be handed out: from the put, or from going back to \
                 the queue for another attempt, to the lease",
                |d| &d.wait,
            ),
            (
                "taskq_task_run_duration_seconds",
                "How long the lease that finished a task had run: from the lease to the result",
                |d| &d.run,
            ),
            (
                "taskq_task_end_to_end_duration_seconds",
                "How long tasks took in all: from the put to finished, whatever the outcome",
                |d| &d.end_to_end,
            ),
        ];
        for (name, help, of) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (queue, durations) in &self.0 {
                let histogram = of(durations);
                let buckets: Vec<(f64, u64)> = TASK_DURATION_BUCKETS
                    .iter()
                    .copied()
                    .chain([f64::MAX])
                    .zip(histogram.buckets)
                    .collect();
                family
                    .encode_family(&queue_label(queue))?
                    .encode_histogram::<NoLabelSet>(
                        histogram.sum_seconds(),
                        histogram.count(),
                        &buckets,
                        None,
                    )?;
            }
        }
        Ok(())
    }
}

/// Every metric of a scrape, in `format`.
pub fn render(
    snapshot: &Snapshot,
    transport: TransportNumbers,
    calls: Vec<MethodNumbers>,
    labels: &QueueLabels,
    format: Format,
) -> String {
    let mut registry = Registry::default();
    let families = Families::register(&mut registry);
    let assigned = labels.assign(&snapshot.queues);
    let mut folded = 0;
    let mut durations = TaskDurationFamilies::default();
    for (queue, stats) in assigned.iter().zip(&snapshot.queues) {
        folded += u64::from(*queue == OTHER_QUEUES);
        families.add(queue, stats);
        durations.add(queue, &stats.durations);
    }
    let evicted = snapshot.queues.iter().map(|q| q.results_evicted).sum();
    registry.register(
        "taskq_metrics_queues_folded",
        "Queues past --metrics-max-queues, counted under queue=\"_other\"",
        gauge_of(folded),
    );
    registry.register(
        "taskq_workers_connected",
        "Workers seen within --worker-timeout",
        gauge_of(snapshot.workers_alive),
    );
    registry.register(
        "taskq_held_bytes",
        "Bytes of payloads and result outputs held",
        gauge_of(snapshot.held_bytes),
    );
    registry.register(
        "taskq_held_bytes_limit",
        "The cap on held bytes (--max-held-bytes)",
        gauge_of(snapshot.held_bytes_limit),
    );
    registry.register(
        "taskq_results_evicted",
        "Results dropped by retention (--result-ttl, --max-results) before anyone read them \
         by queue",
        counter_of(evicted),
    );
    registry.register(
        "taskq_connections",
        "gRPC connections open",
        gauge_of(transport.connections),
    );
    registry.register(
        "taskq_calls_shed",
        "gRPC calls refused at --max-calls since start",
        counter_of(transport.calls_shed),
    );
    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
        .set(1);
    registry.register("taskq_build_info", "The running version; always 1", build);
    registry.register_collector(Box::new(durations));
    registry.register_collector(Box::new(GrpcCalls(calls)));

    let mut openmetrics = String::new();
    // Writing to a String does not fail.
    let _ = encode(&mut openmetrics, &registry);
    match format {
        Format::OpenMetrics => openmetrics,
        Format::Prometheus => to_prometheus_text(&openmetrics),
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter
/// family's `# HELP` and `# TYPE` name its samples' `_total` name, and the
/// `# EOF` line goes. The samples themselves read the same in both.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let described = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match described {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                text.push_str(&format!("{prefix}{name}{total} {tail}\n"));
            }
            None => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn queue(name: &str, pending: u64) -> QueueStats {
        QueueStats {
            queue: name.into(),
            pending,
            enqueued: pending + 2,
            succeeded: 1,
            failed: 1,
            oldest_pending_age: Duration::from_millis(1500),
            ..QueueStats::default()
        }
    }

    fn snapshot(names: &[&str]) -> Snapshot {
        Snapshot {
            queues: names.iter().map(|n| queue(n, 3)).collect(),
            held_bytes: 10,
            held_bytes_limit: 100,
            workers_alive: 2,
            recent_failures: Vec::new(),
        }
    }

    #[test]
    fn the_text_format_names_counters_by_their_samples() {
        let text = render(
            &snapshot(&["a"]),
            TransportNumbers::default(),
            Vec::new(),
            &QueueLabels::new(10),
            Format::Prometheus,
        );
        assert!(
            text.contains("# TYPE taskq_tasks_enqueued_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("taskq_tasks_enqueued_total{queue=\"a\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("taskq_tasks{queue=\"a\",state=\"ready\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("taskq_queue_oldest_ready_age_seconds{queue=\"a\"} 1.5\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        let open = render(
            &snapshot(&["a"]),
            TransportNumbers::default(),
            Vec::new(),
            &QueueLabels::new(10),
            Format::OpenMetrics,
        );
        assert!(
            open.contains("# TYPE taskq_tasks_enqueued counter\n"),
            "{open}"
        );
        assert!(open.ends_with("# EOF\n"), "{open}");
    }

    #[test]
    fn task_durations_are_histograms_per_queue() {
        let mut snapshot = snapshot(&["a", "b"]);
        snapshot.queues[0]
            .durations
            .wait
            .observe(Duration::from_secs(2));
        snapshot.queues[1]
            .durations
            .end_to_end
            .observe(Duration::from_millis(20));
        let text = render(
            &snapshot,
            TransportNumbers::default(),
            Vec::new(),
            &QueueLabels::new(10),
            Format::Prometheus,
        );
        for expected in [
            "# TYPE taskq_task_wait_duration_seconds histogram\n",
            "taskq_task_wait_duration_seconds_bucket{le=\"1.0\",queue=\"a\"} 0\n",
            "taskq_task_wait_duration_seconds_bucket{le=\"2.5\",queue=\"a\"} 1\n",
            "taskq_task_wait_duration_seconds_bucket{le=\"+Inf\",queue=\"a\"} 1\n",
            "taskq_task_wait_duration_seconds_sum{queue=\"a\"} 2.0\n",
            "taskq_task_wait_duration_seconds_count{queue=\"b\"} 0\n",
            "taskq_task_end_to_end_duration_seconds_bucket{le=\"0.025\",queue=\"b\"} 1\n",
            "taskq_task_run_duration_seconds_count{queue=\"a\"} 0\n",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
    }

    /// Queues past the cap share one label, and keep it: a queue labelled
    /// once stays labelled, so its series never move to `_other`.
    #[test]
    fn queues_past_the_cap_fold_into_other() {
        let labels = QueueLabels::new(2);
        let text = render(
            &snapshot(&["b", "c", "d"]),
            TransportNumbers::default(),
            Vec::new(),
            &labels,
            Format::Prometheus,
        );
        assert!(
            text.contains("taskq_tasks{queue=\"_other\",state=\"ready\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("taskq_metrics_queues_folded 1\n"), "{text}");
        let text = render(
            &snapshot(&["a", "b", "c", "d"]),
            TransportNumbers::default(),
            Vec::new(),
            &labels,
            Format::Prometheus,
        );
        assert!(
            text.contains("taskq_tasks{queue=\"b\",state=\"ready\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("taskq_tasks{queue=\"_other\",state=\"ready\"} 6\n"),
            "{text}"
        );
        assert!(
            text.contains("taskq_tasks_finished_total{queue=\"_other\",outcome=\"failed\"} 2\n"),
            "{text}"
        );
        assert!(!text.contains("queue=\"a\""), "{text}");
    }
}
