//! `taskq worker --pipe` against a real server, with a Python handler that
//! starts once per slot: ten thousand tasks right, a handler killed
//! mid-run losing nothing, broken answers retried on a fresh program, and
//! the handler's stderr in the worker's log. (How much faster than a
//! program per task: bench/pipe.sh.)

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::TestServer;
use taskq::client::Client;
use taskq::pb;
use taskq::worker::command::CommandLine;
use taskq::worker::pipe::{DEFAULT_EXIT_WAIT, PipeHandler};
use taskq::worker::{Mode, Worker, WorkerReport};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Longest wait for a run's results: generous, never a figure.
const WAIT: Duration = Duration::from_secs(120);

/// The handler: the square of the number that ends each payload. A payload
/// `ACTION N` makes it act up on the task's first delivery only (a flag
/// file per task id, in the folder given as its argument): `kill` SIGKILLs
/// itself, `garble` answers with a line that is not JSON, `stranger`
/// answers for another task id. Each start leaves a `start-PID` file.
const HANDLER: &str = r#"
import json, os, signal, sys
flags = sys.argv[1]
open(os.path.join(flags, "start-%d" % os.getpid()), "w").close()
for line in sys.stdin:
    task = json.loads(line)
    action, _, n = task["payload"].rpartition(" ")
    flag = os.path.join(flags, task["id"])
    first = action != "" and not os.path.exists(flag)
    if first: open(flag, "w").close()
    if first and action == "kill": os.kill(os.getpid(), signal.SIGKILL)
    if first and action == "garble": print("{not json", flush=True); continue
    answered = "someone-else" if first and action == "stranger" else task["id"]
    print(json.dumps({"id": answered, "output": str(int(n) ** 2)}), flush=True)
"#;

/// A fresh, empty folder for a test's flag files.
fn flag_folder(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("taskq-pipe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How many times the handler started.
fn starts(flags: &Path) -> usize {
    std::fs::read_dir(flags)
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("start-"))
        })
        .count()
}

/// A pipe worker running [`HANDLER`] with `slots` programs until `stop`
/// is sent; its report once its programs have exited at the end of their
/// input.
fn spawn_pipe_worker(
    mode: Mode,
    client: Client,
    queue: &str,
    slots: usize,
    flags: &Path,
) -> (oneshot::Sender<()>, JoinHandle<WorkerReport>) {
    let words = ["python3", "-c", HANDLER, &flags.to_string_lossy()];
    let command = CommandLine::from_words(words.map(String::from).to_vec()).unwrap();
    let pipe = PipeHandler::new(command, slots, None);
    let handler = pipe.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let run = Worker::builder(client)
        .mode(mode)
        .queue(queue)
        .concurrency(slots)
        .worker_id("pipe-worker")
        .poll_wait(Duration::from_millis(500))
        .shutdown_grace(Duration::from_secs(10))
        .run_until(
            move |task| {
                let pipe = handler.clone();
                async move { pipe.run(task).await }
            },
            async {
                let _ = stopped.await;
            },
        );
    let handle = tokio::spawn(async move {
        let report = run.await.expect("the worker ran without error");
        assert_eq!(
            pipe.close(DEFAULT_EXIT_WAIT).await,
            0,
            "none had to be killed"
        );
        report
    });
    (stop, handle)
}

/// Puts `payloads` in batches; their ids, in order.
async fn put_all(client: &Client, queue: &str, payloads: &[String]) -> Vec<String> {
    let mut ids = Vec::with_capacity(payloads.len());
    for batch in payloads.chunks(500) {
        let tasks = batch
            .iter()
            .map(|payload| pb::PutTaskRequest {
                queue: queue.into(),
                payload: Bytes::from(payload.clone()),
                max_attempts: 3,
                ..Default::default()
            })
            .collect();
        for outcome in client.put_tasks(tasks).await.unwrap() {
            match outcome.outcome {
                Some(pb::put_task_outcome::Outcome::Ok(put)) => ids.push(put.task_id),
                other => panic!("a put failed: {other:?}"),
            }
        }
    }
    ids
}

/// Reads `count` results of `queue` (each handed out once), by task id;
/// fails on a result read twice, or if they do not all come within
/// [`WAIT`].
async fn results_of(client: &Client, queue: &str, count: usize) -> HashMap<String, pb::Result> {
    let target = pb::watch_results_request::Target::Queue(queue.into());
    let mut stream = client.watch_result_batches(target).await.unwrap();
    let mut results = HashMap::with_capacity(count);
    let read = async {
        while results.len() < count {
            let batch = stream
                .message()
                .await
                .unwrap()
                .expect("the stream stays open");
            for result in batch.results {
                let id = result.task_id.clone();
                assert!(results.insert(id, result).is_none(), "a result read twice");
            }
        }
    };
    if tokio::time::timeout(WAIT, read).await.is_err() {
        panic!("{} of {count} results within {WAIT:?}", results.len());
    }
    results
}

/// Every task SUCCEEDED with the square of its number, after one delivery
/// or, for those marked in `retried`, two.
fn check(
    ids: &[String],
    payloads: &[String],
    results: &HashMap<String, pb::Result>,
    retried: impl Fn(&str) -> bool,
) {
    assert_eq!(results.len(), ids.len());
    for (id, payload) in ids.iter().zip(payloads) {
        let result = &results[id];
        let n: u64 = payload.rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(
            result.state(),
            pb::TaskState::Succeeded,
            "{payload}: {}",
            result.error
        );
        assert_eq!(result.output, (n * n).to_string().as_bytes(), "{payload}");
        let attempts = if retried(payload) { 2 } else { 1 };
        assert_eq!(result.attempts, attempts, "{payload}");
    }
}

/// Ten thousand tasks through four Python programs: every result is there
/// once, and right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_come_back_right() {
    let server = TestServer::spawn().await;
    let client = server.taskq_client().await;
    let flags = flag_folder("many");
    let payloads: Vec<String> = (0..10_000).map(|n| n.to_string()).collect();
    let ids = put_all(&client, "q", &payloads).await;
    let (stop, worker) = spawn_pipe_worker(Mode::Stream, client.clone(), "q", 4, &flags);
    let results = results_of(&client, "q", ids.len()).await;
    check(&ids, &payloads, &results, |_| false);
    stop.send(()).unwrap();
    let report = worker.await.unwrap();
    assert_eq!((report.succeeded, report.failed), (10_000, 0));
    assert!(starts(&flags) <= 4, "each slot started its program once");
    let stats = client.stats("q").await.unwrap();
    assert_eq!(stats.queues[0].succeeded, 10_000);
    server.shutdown().await;
}

/// The handler SIGKILLs itself on a task now and then, mid-run: each such
/// task fails once as retryable, its program is started again, and every
/// task still ends SUCCEEDED exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_killed_mid_run_loses_nothing() {
    for mode in [Mode::Stream, Mode::Unary] {
        let server = TestServer::spawn().await;
        let client = server.taskq_client().await;
        let flags = flag_folder(&format!("killed-{mode:?}"));
        let payloads: Vec<String> = (0..1000)
            .map(|n| {
                if n % 100 == 50 {
                    format!("kill {n}")
                } else {
                    n.to_string()
                }
            })
            .collect();
        let ids = put_all(&client, "q", &payloads).await;
        let (stop, worker) = spawn_pipe_worker(mode, client.clone(), "q", 4, &flags);
        let results = results_of(&client, "q", ids.len()).await;
        check(&ids, &payloads, &results, |p| p.starts_with("kill"));
        stop.send(()).unwrap();
        let report = worker.await.unwrap();
        assert_eq!((report.succeeded, report.failed), (1000, 10), "{mode:?}");
        let first_starts = starts(&flags) - 10;
        assert!(
            (1..=4).contains(&first_starts),
            "{mode:?}: one start per slot used, and one after each kill"
        );
        let stats = client.stats("q").await.unwrap();
        assert_eq!(
            (stats.queues[0].succeeded, stats.queues[0].failed),
            (1000, 0)
        );
        server.shutdown().await;
    }
}

/// A line that is not JSON, and an answer for another task: each fails
/// its task as retryable, the program is killed and started again, and
/// the retry succeeds. One slot, so the starts are counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_answers_restart_the_program_and_the_task_is_retried() {
    for mode in [Mode::Stream, Mode::Unary] {
        let server = TestServer::spawn().await;
        let client = server.taskq_client().await;
        let flags = flag_folder(&format!("broken-{mode:?}"));
        let payloads: Vec<String> = ["1", "garble 2", "3", "stranger 4", "5"]
            .map(String::from)
            .to_vec();
        let ids = put_all(&client, "q", &payloads).await;
        let (stop, worker) = spawn_pipe_worker(mode, client.clone(), "q", 1, &flags);
        let results = results_of(&client, "q", ids.len()).await;
        check(&ids, &payloads, &results, |p| p.contains(' '));
        stop.send(()).unwrap();
        let report = worker.await.unwrap();
        assert_eq!((report.succeeded, report.failed), (5, 2), "{mode:?}");
        assert_eq!(
            starts(&flags),
            3,
            "{mode:?}: started once, again after each"
        );
        server.shutdown().await;
    }
}

/// `taskq worker --pipe` as a process: the handler's stderr is in the
/// worker's log with its slot; on SIGTERM its stdin closes, it says so on
/// stderr and exits, and the worker exits 0. Without a program, `--pipe`
/// exits 2 naming itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_logs_the_handlers_stderr_and_closes_its_stdin_on_sigterm() {
    let server = TestServer::spawn().await;
    let client = server.taskq_client().await;
    let handler = r#"
import json, sys
print("handler ready", file=sys.stderr, flush=True)
for line in sys.stdin:
    task = json.loads(line)
    print(json.dumps({"id": task["id"], "output": task["payload"].upper()}), flush=True)
print("stdin closed, handler leaving", file=sys.stderr, flush=True)
"#;
    let worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskq"))
        .args([
            "worker",
            "--server",
            &server.url(),
            "--queue",
            "q",
            "--pipe",
        ])
        .args(["--", "python3", "-c", handler])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let put = client.put("q", b"hello".to_vec()).await.unwrap();
    let result = client
        .result(&put.task_id, WAIT)
        .await
        .unwrap()
        .expect("a result");
    assert_eq!(&result.output[..], b"HELLO");

    let pid = worker.id().unwrap().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let output = tokio::time::timeout(WAIT, worker.wait_with_output())
        .await
        .expect("the worker exits after SIGTERM")
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{log}");
    for said in ["handler ready", "stdin closed, handler leaving"] {
        assert!(
            log.lines()
                .any(|l| l.contains(said) && l.contains("slot=0")),
            "{said:?} not logged with its slot: {log}"
        );
    }
    assert!(log.contains("handler programs stopped"), "{log}");
    assert!(!log.contains("killed"), "{log}");

    let bare = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskq"))
        .args(["worker", "--server", &server.url(), "--pipe"])
        .output()
        .await
        .unwrap();
    assert_eq!(bare.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bare.stderr).contains("--pipe"));
    server.shutdown().await;
}
