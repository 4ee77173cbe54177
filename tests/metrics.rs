//! The HTTP listener with a real server: `/metrics` after a known
//! workload, its tokens, the probes during a drain, and a real Prometheus
//! server scraping it (Debian's `prometheus`, which `scripts/test`
//! installs).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    AuthClient, TestServer, eventually, http_get, store_under_test, token_file, with_deadline,
};
use taskq::pb;
use taskq::server::{ServerConfig, Tokens};

const ADMIN: &str = "admin-token";
const MONITOR: &str = "monitor-token";
const PRODUCER: &str = "producer-token";

async fn server(name: &str) -> TestServer {
    let tokens = token_file(
        name,
        &[
            &format!("{ADMIN} admin"),
            &format!("{MONITOR} monitor"),
            &format!("{PRODUCER} producer"),
        ],
    );
    let config = ServerConfig {
        tokens: Tokens::from_file(&tokens).unwrap(),
        ..ServerConfig::default()
    };
    TestServer::with_http(config).await
}

fn put(queue: &str, max_attempts: u32, ttl: Option<Duration>) -> pb::PutTaskRequest {
    pb::PutTaskRequest {
        queue: queue.into(),
        payload: b"x".to_vec().into(),
        max_attempts,
        ttl: ttl.map(|ttl| ttl.try_into().unwrap()),
        ..Default::default()
    }
}

async fn lease(client: &mut AuthClient, queue: &str, lease: Duration) -> pb::Task {
    let request = pb::GetTaskRequest {
        queue: queue.into(),
        worker_id: "w1".into(),
        lease: Some(lease.try_into().unwrap()),
        max_wait: Some(Duration::from_secs(5).try_into().unwrap()),
    };
    client
        .get_task(with_deadline(request, Duration::from_secs(10)))
        .await
        .unwrap()
        .into_inner()
        .task
        .expect("a task within 5s")
}

async fn report(client: &mut AuthClient, task: &pb::Task, failure: Option<pb::Failure>) {
    let outcome = match failure {
        Some(failure) => pb::put_result_request::Outcome::Failure(failure),
        None => pb::put_result_request::Outcome::Output(b"ok".to_vec().into()),
    };
    client
        .put_result(pb::PutResultRequest {
            task_id: task.id.clone(),
            lease_id: task.lease_id.clone(),
            outcome: Some(outcome),
        })
        .await
        .unwrap();
}

/// The known workload: on `jobs`, 6 tasks: 4 succeed at once, one fails
/// with retry then succeeds, one's lease runs out then it succeeds; one
/// more fails for good (max_attempts 1). On `late`, one task's ttl runs
/// out. On `waiting`, one task stays ready. Returns when all that is
/// done.
async fn workload(client: &mut AuthClient) {
    for _ in 0..6 {
        client.put_task(put("jobs", 3, None)).await.unwrap();
    }
    client.put_task(put("doomed", 1, None)).await.unwrap();
    client
        .put_task(put("late", 1, Some(Duration::from_millis(200))))
        .await
        .unwrap();
    client.put_task(put("waiting", 1, None)).await.unwrap();

    // The lease of the first runs out; the second fails with retry.
    let lapsed = lease(client, "jobs", Duration::from_millis(300)).await;
    let retried = lease(client, "jobs", Duration::from_secs(60)).await;
    let failure = pb::Failure {
        message: "flaky".into(),
        retry: true,
        retry_after: None,
    };
    report(client, &retried, Some(failure)).await;
    // The retried one comes back first (the head), then the other four,
    // then the lapsed one after its lease ran out.
    for _ in 0..6 {
        let task = lease(client, "jobs", Duration::from_secs(60)).await;
        report(client, &task, None).await;
    }
    assert_ne!(lapsed.id, retried.id);
    let doomed = lease(client, "doomed", Duration::from_secs(60)).await;
    let failure = pb::Failure {
        message: "broken".into(),
        retry: false,
        retry_after: None,
    };
    report(client, &doomed, Some(failure)).await;
}

/// The samples of a Prometheus text scrape, by name and labels as
/// written (`name{a="b"}`).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_a_known_workload() {
    let server = server("workload").await;
    let mut client = server.client_with_token(ADMIN).await;
    workload(&mut client).await;
    // The ttl of `late` runs out on the server's timer.
    let expired = r#"taskq_tasks_finished_total{queue="late",outcome="expired"}"#;
    eventually("the ttl of `late` ran out", || async {
        let (_, text) = server.http_get("/metrics", Some(MONITOR), None).await;
        samples(&text).get(expired) == Some(&1.0)
    })
    .await;

    let (status, text) = server.http_get("/metrics", Some(MONITOR), None).await;
    assert_eq!(status, 200, "{text}");
    let got = samples(&text);
    let value = |series: &str| {
        *got.get(series)
            .unwrap_or_else(|| panic!("{series} missing in:\n{text}"))
    };
    for (series, expected) in [
        (r#"taskq_tasks_enqueued_total{queue="jobs"}"#, 6.0),
        // 6 tasks, one redelivered after its error, one after its lease.
        (r#"taskq_tasks_leased_total{queue="jobs"}"#, 8.0),
        (
            r#"taskq_tasks_finished_total{queue="jobs",outcome="succeeded"}"#,
            6.0,
        ),
        (
            r#"taskq_tasks_finished_total{queue="jobs",outcome="failed"}"#,
            0.0,
        ),
        (
            r#"taskq_tasks_retried_total{queue="jobs",reason="error"}"#,
            1.0,
        ),
        (
            r#"taskq_tasks_retried_total{queue="jobs",reason="lease_expired"}"#,
            1.0,
        ),
        (
            r#"taskq_tasks_finished_total{queue="doomed",outcome="failed"}"#,
            1.0,
        ),
        (
            r#"taskq_tasks_finished_total{queue="late",outcome="expired"}"#,
            1.0,
        ),
        (
            r#"taskq_tasks_finished_total{queue="late",outcome="failed"}"#,
            0.0,
        ),
        // One wait per lease; one run per lease that finished its task;
        // one whole trip per finished task, the expired one included.
        (
            r#"taskq_task_wait_duration_seconds_count{queue="jobs"}"#,
            8.0,
        ),
        (
            r#"taskq_task_run_duration_seconds_count{queue="jobs"}"#,
            6.0,
        ),
        (
            r#"taskq_task_end_to_end_duration_seconds_count{queue="jobs"}"#,
            6.0,
        ),
        (
            r#"taskq_task_run_duration_seconds_count{queue="doomed"}"#,
            1.0,
        ),
        (
            r#"taskq_task_run_duration_seconds_count{queue="late"}"#,
            0.0,
        ),
        (
            r#"taskq_task_end_to_end_duration_seconds_count{queue="late"}"#,
            1.0,
        ),
        (
            r#"taskq_task_end_to_end_duration_seconds_bucket{le="+Inf",queue="late"}"#,
            1.0,
        ),
        (r#"taskq_tasks{queue="jobs",state="ready"}"#, 0.0),
        (r#"taskq_tasks{queue="jobs",state="leased"}"#, 0.0),
        (r#"taskq_tasks{queue="waiting",state="ready"}"#, 1.0),
        (r#"taskq_queue_oldest_ready_age_seconds{queue="jobs"}"#, 0.0),
        (r#"taskq_worker_streams{queue="jobs"}"#, 0.0),
        ("taskq_workers_connected", 1.0),
        ("taskq_calls_shed_total", 0.0),
        (
            &format!(
                r#"taskq_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        ),
    ] {
        assert_eq!(value(series), expected, "{series}");
    }
    assert!(value(r#"taskq_queue_oldest_ready_age_seconds{queue="waiting"}"#) > 0.0);
    assert!(value("taskq_connections") >= 1.0);
    // The memory store holds bytes within a cap; the PostgreSQL store
    // keeps them in the database, outside this server's memory.
    if store_under_test() == "memory" {
        assert!(value("taskq_held_bytes") > 0.0);
        assert_eq!(value("taskq_held_bytes_limit"), (1u64 << 30) as f64);
    }
    assert!(!text.contains("w1"), "no worker id is a label:\n{text}");

    // OpenMetrics when asked for.
    let (status, open) = server
        .http_get(
            "/metrics",
            Some(ADMIN),
            Some("application/openmetrics-text; version=1.0.0"),
        )
        .await;
    assert_eq!(status, 200);
    assert!(open.ends_with("# EOF\n"), "{open}");
    server.shutdown().await;
}

/// The series of a TaskQueue method in `grpc_server_handled_total`.
fn handled(method: &str, kind: &str, code: &str) -> String {
    format!(
        r#"grpc_server_handled_total{{grpc_service="taskq.v1.TaskQueue",grpc_method="{method}",grpc_type="{kind}",grpc_code="{code}"}}"#
    )
}

/// The calls of a TaskQueue method timed in `grpc_server_handling_seconds`.
fn timed(method: &str, kind: &str) -> String {
    format!(
        r#"grpc_server_handling_seconds_count{{grpc_service="taskq.v1.TaskQueue",grpc_method="{method}",grpc_type="{kind}"}}"#
    )
}

/// Every gRPC call of the workload is counted once, by method and status,
/// when it ends; refused calls under their code; streams when they end.
#[tokio::test]
async fn grpc_calls_are_counted_by_method_and_code() {
    let server = server("grpc-calls").await;
    let mut client = server.client_with_token(ADMIN).await;
    workload(&mut client).await;
    // Refused: NOT_FOUND, and PERMISSION_DENIED for a producer's GetStats.
    let unknown = client
        .get_result(pb::GetResultRequest {
            target: Some(pb::get_result_request::Target::TaskId(
                "0190c0de-0000-7000-8000-000000000000".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let mut producer = server.client_with_token(PRODUCER).await;
    let denied = producer
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    // A watch that ends with its last result (OK in the trailers), and a
    // worker stream the client leaves (Canceled).
    let put = client
        .put_task(put("watched", 1, None))
        .await
        .unwrap()
        .into_inner();
    let mut watch = client
        .watch_results(pb::WatchResultsRequest {
            target: Some(pb::watch_results_request::Target::TaskIds(pb::TaskIds {
                ids: vec![put.task_id.clone()],
            })),
        })
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(common::subscribe("watched", 1)).await.unwrap();
    let mut deliveries = client
        .stream_tasks(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let task = loop {
        let message = deliveries.message().await.unwrap().expect("a delivery");
        if let Some(pb::server_message::Msg::Task(task)) = message.msg {
            break task;
        }
    };
    tx.send(common::succeeded(&task, b"done")).await.unwrap();
    assert!(watch.message().await.unwrap().is_some(), "the result");
    assert!(watch.message().await.unwrap().is_none(), "then the end");
    let (_, text) = server.http_get("/metrics", Some(MONITOR), None).await;
    assert_eq!(
        samples(&text).get(&handled("StreamTasks", "bidi_stream", "OK")),
        Some(&0.0),
        "an open stream is not counted yet:\n{text}"
    );
    drop((tx, deliveries));
    let canceled = handled("StreamTasks", "bidi_stream", "Canceled");
    eventually("the stream the client left is counted", || async {
        let (_, text) = server.http_get("/metrics", Some(MONITOR), None).await;
        samples(&text).get(&canceled) == Some(&1.0)
    })
    .await;

    let (status, text) = server.http_get("/metrics", Some(MONITOR), None).await;
    assert_eq!(status, 200, "{text}");
    let got = samples(&text);
    let value = |series: &str| {
        *got.get(series)
            .unwrap_or_else(|| panic!("{series} missing in:\n{text}"))
    };
    // 9 puts in the workload, 1 more here; 9 leases; 8 reports.
    for (series, expected) in [
        (handled("PutTask", "unary", "OK"), 10.0),
        (timed("PutTask", "unary"), 10.0),
        (handled("GetTask", "unary", "OK"), 9.0),
        (handled("PutResult", "unary", "OK"), 8.0),
        (handled("GetResult", "unary", unknown_code(&unknown)), 1.0),
        (handled("GetStats", "unary", "PermissionDenied"), 1.0),
        (handled("WatchResults", "server_stream", "OK"), 1.0),
        (timed("WatchResults", "server_stream"), 1.0),
        (timed("StreamTasks", "bidi_stream"), 1.0),
        (handled("WatchResultBatches", "server_stream", "OK"), 0.0),
    ] {
        assert_eq!(value(&series), expected, "{series}");
    }
    assert!(
        !text.contains(r#"grpc_method="GetTask",grpc_type="unary",grpc_code="Canceled""#),
        "only codes that happened, besides OK:\n{text}"
    );
    server.shutdown().await;
}

/// The name of the code an unknown task id gets.
fn unknown_code(status: &tonic::Status) -> &'static str {
    match status.code() {
        tonic::Code::NotFound => "NotFound",
        other => panic!("an unknown task id: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_need_a_monitor_or_admin_token_and_probes_none() {
    let server = server("tokens").await;
    let (status, _) = server.http_get("/metrics", None, None).await;
    assert_eq!(status, 401, "no token");
    let (status, _) = server.http_get("/metrics", Some("wrong"), None).await;
    assert_eq!(status, 401, "an unknown token");
    let (status, body) = server.http_get("/metrics", Some(PRODUCER), None).await;
    assert_eq!(status, 403, "a producer token: {body}");
    assert_eq!(server.http_get("/metrics", Some(ADMIN), None).await.0, 200);
    assert_eq!(server.http_get("/healthz", None, None).await.0, 200);
    assert_eq!(server.http_get("/readyz", None, None).await.0, 200);
    // A monitor token may call GetStats over gRPC too.
    let mut monitor = server.client_with_token(MONITOR).await;
    monitor
        .get_stats(pb::GetStatsRequest::default())
        .await
        .expect("a monitor token reads stats");
    server.shutdown().await;
}

/// `/readyz` turns 503 when the drain starts, while the process still
/// serves (`/healthz` 200): a call in progress holds the drain open.
#[tokio::test]
async fn readyz_turns_503_during_a_drain() {
    let config = ServerConfig {
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    let mut server = TestServer::with_http(config).await;
    let http = server.http.unwrap();
    let mut client = server.client().await;
    client.put_task(put("held", 1, None)).await.unwrap();
    // A worker stream holding a task keeps the server in its grace period.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(common::subscribe("held", 1)).await.unwrap();
    let mut deliveries = client
        .stream_tasks(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), deliveries.message())
        .await
        .expect("a delivery within 10s")
        .unwrap();
    assert!(first.is_some(), "the stream got the task");
    server.signal_shutdown();
    eventually("readyz says 503", || async {
        http_get(http, "/readyz", None, None).await.0 == 503
    })
    .await;
    assert_eq!(http_get(http, "/healthz", None, None).await.0, 200);
    drop(tx);
    server.shutdown().await;
}

/// A Prometheus process on a free port, killed when dropped.
struct Prometheus {
    child: Child,
    api: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn start_prometheus(dir: &Path, target: SocketAddr) -> Prometheus {
    assert!(
        Command::new("prometheus")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "`prometheus` is not on PATH: run scripts/test (it installs Debian's prometheus \
         package as root) or `apt-get install prometheus`"
    );
    std::fs::write(dir.join("monitor.token"), MONITOR).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: taskq\n    \
         authorization:\n      credentials_file: {}\n    static_configs:\n      - targets: ['{target}']\n",
        dir.join("monitor.token").display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    // The port is free now; Prometheus binds it at once. A clash would
    // fail the wait below with Prometheus's own message in its log.
    let api = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={api}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus starts");
    Prometheus { child, api }
}

/// The single value of a PromQL instant query, if it has one.
async fn query(api: SocketAddr, promql: &str) -> Option<f64> {
    let path = format!("/api/v1/query?query={}", encode(promql));
    let (status, body) = http_get(api, &path, None, None).await;
    if status != 200 {
        return None;
    }
    let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = answer["data"]["result"].as_array()?;
    let [series] = result.as_slice() else {
        return None;
    };
    series["value"][1].as_str()?.parse().ok()
}

/// Percent-encoding for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls a PromQL query until `check` holds for its value; 60 s at most.
async fn until(api: SocketAddr, promql: &str, check: impl Fn(f64) -> bool, dir: &Path) {
    for _ in 0..300 {
        if query(api, promql).await.is_some_and(&check) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    panic!(
        "within 60s, `{promql}` was {:?}; Prometheus's log:\n{log}",
        query(api, promql).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_workload() {
    let server = server("prometheus").await;
    let dir = std::env::temp_dir().join(format!("taskq-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let prometheus = start_prometheus(&dir, server.http.unwrap());
    let api = prometheus.api;

    let mut client = server.client_with_token(ADMIN).await;
    workload(&mut client).await;
    until(api, r#"up{job="taskq"}"#, |up| up == 1.0, &dir).await;
    // 6 succeeded on `jobs`, 1 failed on `doomed`, 1 expired on `late`.
    until(
        api,
        "sum(taskq_tasks_finished_total)",
        |total| total == 8.0,
        &dir,
    )
    .await;
    until(
        api,
        r#"taskq_tasks_finished_total{queue="jobs",outcome="succeeded"}"#,
        |n| n == 6.0,
        &dir,
    )
    .await;
    // Every finished task's whole trip is in the histogram; the one whose
    // lease lapsed took 300 ms and more on its own.
    until(
        api,
        "sum(taskq_task_end_to_end_duration_seconds_count)",
        |n| n == 8.0,
        &dir,
    )
    .await;
    until(
        api,
        r#"taskq_task_end_to_end_duration_seconds_sum{queue="jobs"}"#,
        |seconds| seconds >= 0.3,
        &dir,
    )
    .await;
    until(
        api,
        r#"taskq_task_wait_duration_seconds_count{queue="jobs"}"#,
        |n| n == 8.0,
        &dir,
    )
    .await;
    // The gRPC call metrics under go-grpc-prometheus's names: 9 puts.
    until(
        api,
        r#"sum(grpc_server_handled_total{grpc_method="PutTask",grpc_code="OK"})"#,
        |n| n == 9.0,
        &dir,
    )
    .await;
    until(
        api,
        r#"histogram_quantile(0.5, sum by (le) (grpc_server_handling_seconds_bucket{grpc_method="PutTask"}))"#,
        |p50| p50 > 0.0 && p50 < 1.0,
        &dir,
    )
    .await;
    until(
        api,
        r#"taskq_queue_oldest_ready_age_seconds{queue="waiting"}"#,
        |age| age > 0.0,
        &dir,
    )
    .await;

    // promtool accepts the text format as scraped.
    let (status, text) = server.http_get("/metrics", Some(MONITOR), None).await;
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (from the prometheus package) runs");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    drop(prometheus);
    let _ = std::fs::remove_dir_all(&dir);
    server.shutdown().await;
}
