//! The worker runtime against a real server: exec handlers, retries,
//! timeouts, lease extension, crashes, server restarts and shutdown.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{TestServer, eventually};
use taskq::client::{Client, ClientOptions};
use taskq::pb;
use taskq::server::BrokerConfig;
use taskq::server::ServerConfig;
use taskq::worker::exec::ExecHandler;
use taskq::worker::{Mode, Worker, WorkerReport, builtin};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

/// Every behaviour holds on both paths of the worker runtime.
const MODES: [Mode; 2] = [Mode::Stream, Mode::Unary];

/// A worker running `handler` in the background until `stop` is sent.
fn spawn_worker<F, Fut>(
    mode: Mode,
    client: Client,
    queue: &str,
    lease: Duration,
    handler: F,
) -> (oneshot::Sender<()>, JoinHandle<WorkerReport>)
where
    F: Fn(pb::Task) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = taskq::worker::HandlerResult> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    let run = Worker::builder(client)
        .mode(mode)
        .queue(queue)
        .lease(lease)
        .worker_id("test-worker")
        .poll_wait(Duration::from_millis(500))
        .shutdown_grace(Duration::from_secs(10))
        .run_until(handler, async {
            let _ = stopped.await;
        });
    let handle = tokio::spawn(async move { run.await.expect("the worker ran without error") });
    (stop, handle)
}

fn exec(
    line: &str,
    timeout: Option<Duration>,
) -> impl Fn(
    pb::Task,
)
    -> std::pin::Pin<Box<dyn std::future::Future<Output = taskq::worker::HandlerResult> + Send>>
+ Send
+ Sync
+ 'static {
    let handler = std::sync::Arc::new(ExecHandler::from_command_line(line, timeout).unwrap());
    move |task| {
        let handler = handler.clone();
        Box::pin(async move { handler.run(task).await })
    }
}

async fn put(client: &Client, queue: &str, payload: &[u8], max_attempts: u32) -> String {
    client
        .put_task(pb::PutTaskRequest {
            queue: queue.into(),
            payload: Bytes::copy_from_slice(payload),
            max_attempts,
            ..Default::default()
        })
        .await
        .unwrap()
        .task_id
}

#[tokio::test]
async fn an_exec_worker_passes_payloads_byte_for_byte() {
    for mode in MODES {
        let server = TestServer::spawn().await;
        let client = server.taskq_client().await;
        let payload = b"$(touch /tmp/pwned) `id`; rm -rf / | cat && echo \"'\\ \n\x00\xfe";
        let id = put(&client, "q", payload, 0).await;
        let (stop, worker) = spawn_worker(
            mode,
            client.clone(),
            "q",
            Duration::from_secs(30),
            exec("cat", None),
        );
        let result = client.result(&id, WAIT).await.unwrap().expect("a result");
        assert_eq!(result.state(), pb::TaskState::Succeeded);
        assert_eq!(&result.output[..], &payload[..]);
        assert!(!std::path::Path::new("/tmp/pwned").exists());
        stop.send(()).unwrap();
        assert_eq!(worker.await.unwrap().succeeded, 1);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn a_failing_program_is_retried_then_succeeds() {
    for mode in MODES {
        let server = TestServer::spawn().await;
        let client = server.taskq_client().await;
        let id = put(&client, "q", b"7", 3).await;
        let line = r#"sh -c 'if [ "$TASKQ_ATTEMPT" = 1 ]; then echo first try fails >&2; exit 3; fi; cat'"#;
        let (stop, worker) = spawn_worker(
            mode,
            client.clone(),
            "q",
            Duration::from_secs(30),
            exec(line, None),
        );
        let result = client.result(&id, WAIT).await.unwrap().expect("a result");
        assert_eq!(
            (result.state(), result.attempts),
            (pb::TaskState::Succeeded, 2)
        );
        assert_eq!(&result.output[..], b"7");
        stop.send(()).unwrap();
        let report = worker.await.unwrap();
        assert_eq!((report.failed, report.succeeded), (1, 1));
        server.shutdown().await;
    }
}

#[tokio::test]
async fn a_program_over_its_timeout_is_killed_and_fails_the_task() {
    for mode in MODES {
        let server = TestServer::spawn().await;
        let client = server.taskq_client().await;
        let id = put(&client, "q", b"", 1).await;
        let handler = exec("sleep 30", Some(Duration::from_millis(200)));
        let (stop, worker) =
            spawn_worker(mode, client.clone(), "q", Duration::from_secs(30), handler);
        let result = client.result(&id, WAIT).await.unwrap().expect("a result");
        assert_eq!(result.state(), pb::TaskState::Failed);
        assert!(result.error.contains("timed out"), "{}", result.error);
        stop.send(()).unwrap();
        worker.await.unwrap();
        server.shutdown().await;
    }
}

/// A task that runs three times longer than its lease is not redelivered:
/// the worker extends the lease while it runs.
#[tokio::test]
async fn lease_extension_keeps_a_long_task() {
    for mode in MODES {
        let server = TestServer::spawn().await;
        let client = server.taskq_client().await;
        let id = put(&client, "q", b"900ms", 1).await;
        let (stop, worker) = spawn_worker(
            mode,
            client.clone(),
            "q",
            Duration::from_millis(300),
            builtin::sleep,
        );
        let result = client.result(&id, WAIT).await.unwrap().expect("a result");
        assert_eq!(
            (result.state(), result.attempts),
            (pb::TaskState::Succeeded, 1)
        );
        let stats = client.stats("q").await.unwrap();
        assert_eq!(stats.queues[0].redelivered, 0);
        stop.send(()).unwrap();
        worker.await.unwrap();
        server.shutdown().await;
    }
}

/// A worker process killed with SIGKILL mid-task: its task is handed to
/// another worker when the lease runs out, and finished there.
#[tokio::test]
async fn a_killed_workers_task_is_finished_elsewhere() {
    for mode in MODES {
        let server = TestServer::spawn().await;
        let client = server.taskq_client().await;
        let id = put(&client, "q", b"5", 3).await;
        let mut doomed = Command::new(env!("CARGO_BIN_EXE_taskq"))
            .args([
                "worker",
                "--server",
                &server.url(),
                "--queue",
                "q",
                "--lease",
                "500ms",
            ])
            .args(["--worker-id", "doomed", "--exec", "sleep 5"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        eventually("the doomed worker holds the task", || async {
            client.stats("q").await.unwrap().queues[0].leased == 1
        })
        .await;
        doomed.kill().unwrap();
        doomed.wait().unwrap();
        let (stop, worker) = spawn_worker(
            mode,
            client.clone(),
            "q",
            Duration::from_secs(30),
            |task| async move { builtin::square(&task.payload) },
        );
        let result = client.result(&id, WAIT).await.unwrap().expect("a result");
        assert_eq!(result.state(), pb::TaskState::Succeeded);
        assert_eq!((&result.output[..], result.attempts), (&b"25"[..], 2));
        assert_eq!(result.worker_id, "test-worker");
        stop.send(()).unwrap();
        worker.await.unwrap();
        server.shutdown().await;
    }
}

/// The server stops and starts again on the same address under a running
/// worker: the worker reconnects and goes on.
#[tokio::test]
async fn a_worker_survives_a_server_restart() {
    for mode in MODES {
        let server = TestServer::spawn().await;
        let addr = server.addr;
        let url = server.url();
        let worker_client = Client::connect_lazy(&url, ClientOptions::default()).unwrap();
        let (stop, worker) = spawn_worker(
            mode,
            worker_client,
            "q",
            Duration::from_secs(30),
            |task| async move { builtin::square(&task.payload) },
        );
        let client = server.taskq_client().await;
        let id = put(&client, "q", b"3", 0).await;
        assert_eq!(
            &client.result(&id, WAIT).await.unwrap().unwrap().output[..],
            b"9"
        );
        server.shutdown().await;

        let server = TestServer::at(addr, ServerConfig::new(BrokerConfig::default())).await;
        let client = server.taskq_client().await;
        let id = put(&client, "q", b"4", 0).await;
        let result = client
            .result(&id, WAIT)
            .await
            .unwrap()
            .expect("the worker came back");
        assert_eq!(&result.output[..], b"16");
        stop.send(()).unwrap();
        assert_eq!(worker.await.unwrap().succeeded, 2);
        server.shutdown().await;
    }
}

/// On shutdown a worker takes no new task, finishes the running one and
/// reports it.
#[tokio::test]
async fn a_stopping_worker_finishes_its_task() {
    for mode in MODES {
        let server = TestServer::spawn().await;
        let client = server.taskq_client().await;
        let id = put(&client, "q", b"400ms", 0).await;
        let later = put(&client, "q", b"1ms", 0).await;
        let (stop, worker) = spawn_worker(
            mode,
            client.clone(),
            "q",
            Duration::from_secs(30),
            builtin::sleep,
        );
        eventually("the worker holds the first task", || async {
            client.stats("q").await.unwrap().queues[0].leased == 1
        })
        .await;
        stop.send(()).unwrap();
        let report = worker.await.unwrap();
        assert_eq!(report.succeeded, 1);
        let result = client
            .result(&id, Duration::ZERO)
            .await
            .unwrap()
            .expect("reported before exit");
        assert_eq!(result.state(), pb::TaskState::Succeeded);
        assert!(
            client
                .result(&later, Duration::ZERO)
                .await
                .unwrap()
                .is_none(),
            "no new task taken"
        );
        server.shutdown().await;
    }
}

/// A task still running when the grace period ends goes back to the queue
/// at once, not after its lease.
#[tokio::test]
async fn a_task_past_the_grace_period_goes_back_at_once() {
    for mode in MODES {
        let server = TestServer::spawn().await;
        let client = server.taskq_client().await;
        let id = put(&client, "q", b"60s", 3).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let run = Worker::builder(client.clone())
            .mode(mode)
            .queue("q")
            .lease(Duration::from_secs(600))
            .shutdown_grace(Duration::from_millis(100))
            .run_until(builtin::sleep, async {
                let _ = stopped.await;
            });
        let worker = tokio::spawn(run);
        eventually("the worker holds the task", || async {
            client.stats("q").await.unwrap().queues[0].leased == 1
        })
        .await;
        stop.send(()).unwrap();
        let report = worker.await.unwrap().unwrap();
        assert_eq!(report.interrupted, 1, "{mode:?}");
        let stats = client.stats("q").await.unwrap();
        assert_eq!((stats.queues[0].pending, stats.queues[0].leased), (1, 0));
        let task = client
            .get_task(
                pb::GetTaskRequest {
                    queue: "q".into(),
                    ..Default::default()
                },
                WAIT,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!((task.id, task.attempt), (id, 2));
        server.shutdown().await;
    }
}

/// A wrong token stops the worker with an error instead of retrying forever.
#[tokio::test]
async fn a_refused_worker_stops_with_an_error() {
    let config = ServerConfig {
        tokens: taskq::server::Tokens::from_list("right-token", "test").unwrap(),
        ..ServerConfig::new(BrokerConfig::default())
    };
    let server = TestServer::with_config(config).await;
    let options = ClientOptions {
        token: Some("wrong-token".into()),
        ..ClientOptions::default()
    };
    let client = Client::connect(&server.url(), options).await.unwrap();
    let error = Worker::builder(client)
        .run_until(
            |task| async move { builtin::echo(&task) },
            std::future::pending(),
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("UNAUTHENTICATED"), "{error}");
    server.shutdown().await;
}

/// An output over the server's --max-result is turned into the task's
/// failure (in stream mode this came with the second review), rather than
/// left to run again until its attempts run out.
#[tokio::test]
async fn a_refused_output_becomes_the_tasks_failure() {
    for mode in MODES {
        let server = TestServer::with_broker(BrokerConfig {
            max_result: 64,
            ..BrokerConfig::default()
        })
        .await;
        let client = server.taskq_client().await;
        let id = put(&client, "q", &[b'x'; 100], 3).await;
        let (stop, worker) = spawn_worker(
            mode,
            client.clone(),
            "q",
            Duration::from_secs(30),
            |task| async move { builtin::echo(&task) },
        );
        let result = client.result(&id, WAIT).await.unwrap().expect("a result");
        assert_eq!(result.state(), pb::TaskState::Failed, "{mode:?}");
        assert!(
            result.error.contains("refused the output"),
            "{mode:?}: {}",
            result.error
        );
        assert_eq!(result.attempts, 1, "{mode:?}: not run again");
        stop.send(()).unwrap();
        worker.await.unwrap();
        server.shutdown().await;
    }
}

/// A handler that panics, at once (run inline on the stream path) or after
/// it first waits (run as a task of its own), fails its attempt as
/// retryable; the worker goes on and the retry succeeds.
#[tokio::test]
async fn a_panicking_handler_fails_its_attempt_and_the_worker_goes_on() {
    for mode in MODES {
        for waits_first in [false, true] {
            let server = TestServer::spawn().await;
            let client = server.taskq_client().await;
            let id = put(&client, "q", b"boom", 3).await;
            let (stop, worker) = spawn_worker(
                mode,
                client.clone(),
                "q",
                Duration::from_secs(30),
                move |task| async move {
                    if waits_first {
                        tokio::task::yield_now().await;
                    }
                    assert!(task.attempt > 1, "a bug on the first attempt");
                    builtin::echo(&task)
                },
            );
            let result = client.result(&id, WAIT).await.unwrap().expect("a result");
            let case = format!("{mode:?}, waits first: {waits_first}");
            assert_eq!(result.state(), pb::TaskState::Succeeded, "{case}");
            assert_eq!(result.attempts, 2, "{case}: the panic cost one attempt");
            stop.send(()).unwrap();
            let report = worker.await.unwrap();
            assert_eq!(report.succeeded, 1, "{case}");
            server.shutdown().await;
        }
    }
}

/// Whether process `pid` is gone, or only a zombie waiting to be reaped.
fn ended(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// CancelTask on a task an exec worker runs: the worker learns it (a
/// stream's `cancel` message, or a unary worker's next ExtendLease) and
/// kills the program; the task ends CANCELLED.
#[tokio::test]
async fn a_cancelled_tasks_program_is_killed() {
    for mode in MODES {
        let server = TestServer::spawn().await;
        let client = server.taskq_client().await;
        let dir =
            std::env::temp_dir().join(format!("taskq-cancel-{}-{mode:?}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("pid");
        let script = dir.join("run.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho $$ > {}.tmp && mv {0}.tmp {0}\nexec sleep 60\n",
                pid_file.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

        let id = put(&client, "q", b"", 3).await;
        let handler = exec(&script.display().to_string(), None);
        let (stop, worker) =
            spawn_worker(mode, client.clone(), "q", Duration::from_secs(2), handler);
        eventually("the program runs", || async { pid_file.exists() }).await;
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .to_owned();
        assert!(!ended(&pid), "{mode:?}: the program runs");
        assert_eq!(
            client.cancel_task(&id).await.unwrap(),
            pb::TaskState::Leased
        );
        eventually("the program is killed", || async { ended(&pid) }).await;
        let result = client.result(&id, WAIT).await.unwrap().expect("a result");
        assert_eq!(result.state(), pb::TaskState::Cancelled, "{mode:?}");
        stop.send(()).unwrap();
        let report = worker.await.unwrap();
        assert_eq!(report.succeeded + report.failed, 0, "{mode:?}: {report:?}");
        let _ = std::fs::remove_dir_all(&dir);
        server.shutdown().await;
    }
}
