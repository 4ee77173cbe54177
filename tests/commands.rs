//! The operator commands, the demo and the examples, run as processes
//! against a real server: their output and exit codes.

mod common;

use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::TestServer;
use taskq::pb;
use taskq::worker::{HandlerResult, TaskFailure, Worker};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

fn taskq() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_taskq"));
    command
        .env_remove("TASKQ_TOKENS")
        .env_remove("TASKQ_TOKEN")
        .env_remove("TASKQ_SERVER")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    command
}

async fn run(server: &TestServer, args: &[&str]) -> Output {
    let mut command = taskq();
    command.args(args).env("TASKQ_SERVER", server.url());
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the command finishes within 60s")
        .unwrap()
}

/// The next task of queue "q", if one is ready now.
async fn next_task(client: &taskq::client::Client) -> Option<pb::Task> {
    let request = pb::GetTaskRequest {
        queue: "q".into(),
        ..Default::default()
    };
    client.get_task(request, Duration::ZERO).await.unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A `taskq worker` process on a queue.
fn worker(server: &TestServer, queue: &str, handler: &[&str]) -> Child {
    taskq()
        .args(["worker", "--server", &server.url(), "--queue", queue])
        .args(handler)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// SIGTERM, then the exit status and stderr.
async fn terminate(child: Child) -> (Option<i32>, String) {
    let pid = child.id().unwrap().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the worker exits within 30s of SIGTERM")
        .unwrap();
    (output.status.code(), stderr(&output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_then_result_prints_the_output() {
    let server = TestServer::spawn().await;
    let put = run(
        &server,
        &["put", "--queue", "q", "--data", "12", "--header", "k=v"],
    )
    .await;
    assert_eq!(put.status.code(), Some(0), "{}", stderr(&put));
    let id = stdout(&put).trim().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");

    let client = server.taskq_client().await;
    let task = next_task(&client).await.expect("a task is ready");
    assert_eq!(
        (&task.payload[..], task.headers["k"].as_str()),
        (&b"12"[..], "v")
    );

    let unfinished = run(&server, &["result", &id]).await;
    assert_eq!(unfinished.status.code(), Some(1));
    assert!(
        stderr(&unfinished).contains("not finished"),
        "{}",
        stderr(&unfinished)
    );

    client
        .put_result(&task, pb::put_result_request::Outcome::Output("144".into()))
        .await
        .unwrap();
    let result = run(&server, &["result", &id]).await;
    assert_eq!(
        (result.status.code(), stdout(&result).as_str()),
        (Some(0), "144\n")
    );
    let json = run(&server, &["result", &id, "--json"]).await;
    let value: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(
        (value["state"].as_str(), value["output"].as_str()),
        (Some("SUCCEEDED"), Some("144"))
    );

    let unknown = run(&server, &["result", "01890a5d-ac96-774b-bcce-b302099a8057"]).await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stderr(&unknown).contains("NOT_FOUND"),
        "{}",
        stderr(&unknown)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_exits_1_with_its_error() {
    let server = TestServer::spawn().await;
    let put = run(
        &server,
        &["put", "--queue", "q", "--data", "x", "--max-attempts", "1"],
    )
    .await;
    let id = stdout(&put).trim().to_string();
    let client = server.taskq_client().await;
    let task = next_task(&client).await.expect("a task is ready");
    let failure = pb::Failure {
        message: "disk full".into(),
        retry: false,
        retry_after: None,
    };
    client
        .put_result(&task, pb::put_result_request::Outcome::Failure(failure))
        .await
        .unwrap();
    let result = run(&server, &["result", &id]).await;
    assert_eq!(result.status.code(), Some(1));
    assert!(stderr(&result).contains("disk full"), "{}", stderr(&result));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_reads_stdin_and_files() {
    let server = TestServer::spawn().await;
    let mut child = taskq()
        .args(["put", "--queue", "q"])
        .env("TASKQ_SERVER", server.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"from stdin").await.unwrap();
    drop(stdin);
    assert!(child.wait_with_output().await.unwrap().status.success());
    let path = std::env::temp_dir().join(format!("taskq-put-{}", std::process::id()));
    std::fs::write(&path, b"from a file").unwrap();
    let put = run(
        &server,
        &["put", "--queue", "q", "--file", path.to_str().unwrap()],
    )
    .await;
    assert!(put.status.success());
    std::fs::remove_file(&path).unwrap();
    let client = server.taskq_client().await;
    for expected in [&b"from stdin"[..], b"from a file"] {
        let task = next_task(&client).await.expect("a task is ready");
        assert_eq!(&task.payload[..], expected);
    }
    server.shutdown().await;
}

/// `put --priority` and `--delay` reach the server: the delayed task is
/// counted apart and not handed out, the urgent one goes first, and
/// `stats` shows the DELAYED column.
#[tokio::test]
async fn put_takes_a_priority_and_a_delay() {
    let server = TestServer::spawn().await;
    for args in [
        &["put", "--queue", "q", "--data", "plain"][..],
        &["put", "--queue", "q", "--data", "later", "--delay", "1h"],
        &["put", "--queue", "q", "--data", "urgent", "--priority", "5"],
        &["put", "--queue", "q", "--data", "last", "--priority", "-1"],
    ] {
        let put = run(&server, args).await;
        assert!(put.status.success(), "{args:?}: {}", stderr(&put));
    }
    let bad = run(
        &server,
        &[
            "put", "--queue", "q", "--data", "x", "--delay", "1h", "--ttl", "1m",
        ],
    )
    .await;
    assert_eq!(bad.status.code(), Some(1), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("ttl"), "{}", stderr(&bad));
    let stats = run(&server, &["stats", "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&stdout(&stats)).unwrap();
    assert_eq!(json["queues"][0]["pending"], 3);
    assert_eq!(json["queues"][0]["delayed"], 1);
    let table = stdout(&run(&server, &["stats"]).await);
    assert!(table.contains("DELAYED"), "{table}");
    let client = server.taskq_client().await;
    let mut order = Vec::new();
    while let Some(task) = next_task(&client).await {
        order.push(String::from_utf8(task.payload.to_vec()).unwrap());
    }
    assert_eq!(order, ["urgent", "plain", "last"]);
    server.shutdown().await;
}

/// `put --wait` with a builtin worker process, then `results` and `stats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builtin_worker_answers_put_wait_and_stops_on_sigterm() {
    let server = TestServer::spawn().await;
    let squares = worker(
        &server,
        "squares",
        &["--builtin", "square", "--worker-id", "sq-1"],
    );
    let put = run(
        &server,
        &["put", "--queue", "squares", "--data", "12", "--wait", "20s"],
    )
    .await;
    assert_eq!(put.status.code(), Some(0), "{}", stderr(&put));
    assert_eq!(stdout(&put), "144\n");

    for n in [2, 3] {
        run(
            &server,
            &[
                "put",
                "--queue",
                "squares",
                "--data",
                &n.to_string(),
                "--wait",
                "20s",
            ],
        )
        .await;
    }
    let results = run(
        &server,
        &[
            "results", "--queue", "squares", "--count", "3", "--wait", "5s",
        ],
    )
    .await;
    assert_eq!(results.status.code(), Some(0), "{}", stderr(&results));
    let outputs: Vec<String> = stdout(&results)
        .lines()
        .map(|l| l.split('\t').skip(1).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(outputs, ["SUCCEEDED 144", "SUCCEEDED 4", "SUCCEEDED 9"]);
    let none_left = run(
        &server,
        &["results", "--queue", "squares", "--wait", "300ms"],
    )
    .await;
    assert_eq!(none_left.status.code(), Some(1));

    let table = run(&server, &["stats"]).await;
    assert!(table.status.success());
    let table = stdout(&table);
    assert!(
        table.contains("QUEUE") && table.contains("squares") && table.contains("sq-1"),
        "{table}"
    );
    let json = run(&server, &["stats", "--json"]).await;
    let value: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(value["queues"][0]["succeeded"], 3);
    assert_eq!(value["workers"][0]["worker_id"], "sq-1");

    let (code, log) = terminate(squares).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("worker stopped"), "{log}");
    server.shutdown().await;
}

/// `taskq worker -- python3 -c ...`: a Python one-liner as a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_one_liner_is_a_worker() {
    let server = TestServer::spawn().await;
    let python = worker(
        &server,
        "py",
        &[
            "--",
            "python3",
            "-c",
            "import sys; print(int(sys.stdin.read()) ** 2, end='')",
        ],
    );
    let put = run(
        &server,
        &["put", "--queue", "py", "--data", "99", "--wait", "30s"],
    )
    .await;
    assert_eq!(put.status.code(), Some(0), "{}", stderr(&put));
    assert_eq!(stdout(&put), "9801\n");
    let (code, log) = terminate(python).await;
    assert_eq!(code, Some(0), "{log}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_a_runnable_program_exits_2() {
    let server = TestServer::spawn().await;
    let missing = run(
        &server,
        &["worker", "--exec", "no-such-program-taskq --flag"],
    )
    .await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("no-such-program-taskq"),
        "{}",
        stderr(&missing)
    );
    let nothing = run(&server, &["worker"]).await;
    assert_eq!(nothing.status.code(), Some(2));
    assert!(
        stderr(&nothing).contains("--builtin"),
        "{}",
        stderr(&nothing)
    );
    let unbalanced = run(&server, &["worker", "--exec", "echo 'open"]).await;
    assert_eq!(unbalanced.status.code(), Some(2));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_when_serving_and_1_when_unreachable() {
    let server = TestServer::spawn().await;
    let healthy = run(&server, &["health"]).await;
    assert_eq!(
        (healthy.status.code(), stdout(&healthy).as_str()),
        (Some(0), "SERVING\n")
    );
    let addr = server.url();
    server.shutdown().await;
    let output = taskq()
        .args(["health", "--server", &addr, "--connect-timeout", "2s"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("cannot connect"),
        "{}",
        stderr(&output)
    );
}

/// `taskq demo` runs the seed's scenario and prints 10 right squares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_prints_ten_right_squares() {
    let output = tokio::time::timeout(Duration::from_secs(60), taskq().arg("demo").output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    let mut right = 0;
    for line in text.lines().filter(|l| l.starts_with("Result: ")) {
        // "Result: n * n = square  (by worker-k)"
        let words: Vec<&str> = line.split_whitespace().collect();
        let n: u64 = words[1].parse().unwrap();
        let square: u64 = words[5].parse().unwrap();
        assert_eq!(square, n * n, "{line}");
        right += 1;
    }
    assert_eq!(right, 10, "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("Put task ")).count(),
        10
    );
}

/// The seed's two programs, as examples in the library's terms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_examples_run_against_a_server() {
    let server = TestServer::spawn().await;
    let examples = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples");
    let example = |name: &str| {
        let mut command = Command::new(examples.join(name));
        command
            .env("TASKQ_SERVER", server.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    };
    let worker = example("task_worker")
        .spawn()
        .expect("examples are built by cargo test");
    let master = tokio::time::timeout(Duration::from_secs(60), example("task_master").output())
        .await
        .unwrap()
        .unwrap();
    assert!(master.status.success(), "{}", stderr(&master));
    let text = stdout(&master);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("Result: ")).count(),
        10,
        "{text}"
    );
    assert!(text.contains("master exit."));
    let worker = tokio::time::timeout(Duration::from_secs(30), worker.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(worker.status.success(), "{}", stderr(&worker));
    assert!(
        stdout(&worker).contains("worker exit: 10 tasks done."),
        "{}",
        stdout(&worker)
    );
    server.shutdown().await;
}

/// `put --lines` batches a file's lines with PutTasks; a unary-mode worker
/// runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_lines_batches_and_a_unary_worker_runs_them() {
    let server = TestServer::spawn().await;
    let path = std::env::temp_dir().join(format!("taskq-lines-{}", std::process::id()));
    std::fs::write(&path, b"1\n2\n\n3\r\n").unwrap();
    let put = run(
        &server,
        &[
            "put",
            "--queue",
            "lines",
            "--lines",
            "--file",
            path.to_str().unwrap(),
        ],
    )
    .await;
    std::fs::remove_file(&path).unwrap();
    assert_eq!(put.status.code(), Some(0), "{}", stderr(&put));
    assert_eq!(stdout(&put).lines().count(), 3, "one id per non-empty line");
    let unary = worker(
        &server,
        "lines",
        &["--builtin", "square", "--mode", "unary"],
    );
    let results = run(
        &server,
        &[
            "results", "--queue", "lines", "--count", "3", "--wait", "10s",
        ],
    )
    .await;
    assert_eq!(results.status.code(), Some(0), "{}", stderr(&results));
    let mut squares: Vec<String> = stdout(&results)
        .lines()
        .map(|l| l.rsplit('\t').next().unwrap().to_string())
        .collect();
    squares.sort();
    assert_eq!(squares, ["1", "4", "9"]);
    let (code, log) = terminate(unary).await;
    assert_eq!(code, Some(0), "{log}");
    server.shutdown().await;
}

/// `taskq bench` runs in both modes (stream with either way of reading
/// results) and its counts add up. Its speed is not checked here: figures
/// are for bench/README.md, not for assertions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_and_its_counts_add_up() {
    for (mode, results) in [("stream", "queue"), ("stream", "ids"), ("unary", "queue")] {
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            taskq()
                .args([
                    "bench",
                    "--mode",
                    mode,
                    "--results",
                    results,
                    "--tasks",
                    "200",
                    "--producers",
                    "2",
                ])
                .args([
                    "--workers",
                    "1",
                    "--concurrency",
                    "4",
                    "--batch",
                    "16",
                    "--fill",
                    "100",
                    "--json",
                ])
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(output.status.code(), Some(0), "{mode}: {}", stderr(&output));
        let report: serde_json::Value = serde_json::from_str(stdout(&output).trim()).unwrap();
        assert_eq!(report["round_trip"]["count"], 200, "{mode}: {report}");
        assert_eq!(report["round_trip"]["errors"], 0, "{mode}: {report}");
        for fault in ["lost", "duplicated", "wrong", "failed"] {
            assert_eq!(report["round_trip"][fault], 0, "{mode}: {report}");
        }
        assert_eq!(report["held_tasks_measured"], 100, "{mode}: {report}");
        assert!(report["baseline_unary"]["count"].as_u64().unwrap() > 0);
        // Every task reached the worker and every result a producer, in
        // messages of one (unary) or of up to the batch (stream).
        let messages = &report["round_trip"]["messages"];
        assert_eq!(messages["tasks_received"], 200, "{mode}: {report}");
        assert_eq!(messages["results_read"], 200, "{mode}: {report}");
        for (leg, mean) in [("task", "tasks"), ("result", "results")] {
            let sent = messages[format!("{leg}_messages")].as_u64().unwrap();
            assert!((1..=200).contains(&sent), "{mode}: {report}");
            let per_message = report["round_trip"][format!("{mean}_per_message")].as_f64();
            // Within a rounding of the decimal in the JSON.
            let off = (per_message.unwrap() - 200.0 / sent as f64).abs();
            assert!(off < 1e-9, "{mode}: {report}");
            if mode == "unary" {
                assert_eq!(sent, 200, "one per GetTask or GetResult: {report}");
            }
        }
        let both = report["round_trip"]["items_per_message"].as_f64().unwrap();
        assert!(both >= 1.0, "{mode}: {report}");
    }
}

/// A worker of the library's on `queue`, 16 tasks at once, whose
/// `answer(n, task)` answers the `n`th task it takes (from 0), or never
/// when `None`. The sender stops it; a task never answered is given up
/// 100 ms later.
fn answering_worker<F>(
    client: taskq::client::Client,
    queue: &str,
    answer: F,
) -> (oneshot::Sender<()>, JoinHandle<()>)
where
    F: Fn(u64, &pb::Task) -> Option<HandlerResult> + Send + Sync + 'static,
{
    let taken = AtomicU64::new(0);
    let handler = move |task: pb::Task| {
        let answer = answer(taken.fetch_add(1, Ordering::Relaxed), &task);
        async move {
            match answer {
                Some(answer) => answer,
                None => std::future::pending().await,
            }
        }
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = Worker::builder(client)
        .queue(queue)
        .concurrency(16)
        .shutdown_grace(Duration::from_millis(100))
        .run_until(handler, async {
            let _ = stopped.await;
        });
    let worker = tokio::spawn(async move {
        worker.await.expect("the worker ran");
    });
    (stop, worker)
}

/// Stops a worker from [`answering_worker`] and joins it.
async fn stop_worker((stop, worker): (oneshot::Sender<()>, JoinHandle<()>)) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("the worker stops within 30s")
        .unwrap();
}

/// `taskq bench` with its own workers off (`--workers 0`), loading
/// `queue` on `server`; its exit code, stdout and stderr.
async fn bench_on(
    server: &TestServer,
    queue: &str,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        taskq()
            .args(["bench", "--server", &server.url(), "--workers", "0"])
            .args(["--queue", queue, "--tasks", "100", "--producers", "2"])
            .args(["--batch", "8", "--fill", "0"])
            .args(args)
            .output(),
    )
    .await
    .expect("the bench finishes within 120s")
    .unwrap();
    (output.status.code(), stdout(&output), stderr(&output))
}

/// The number after `label` in the bench's human output.
fn count_after(text: &str, label: &str) -> u64 {
    let rest = &text[text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {text}"))
        + label.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no count after {label:?} in {text}"))
}

/// The bench used to count results without looking at them: a FAILED
/// result counted as done in unary mode, and a wrong output anywhere. Now
/// a worker on the queue that answers some tasks with the wrong output
/// and fails others makes every mode exit 1, with each kind counted apart
/// (the counts are the worker's own) and a message that says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_wrong_and_failed_results_apart_and_exits_1() {
    let server = TestServer::spawn().await;
    for (mode, results) in [("stream", "queue"), ("stream", "ids"), ("unary", "queue")] {
        let queue = format!("bad-{mode}-{results}");
        let (wrong, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (wrong_given, failed_given) = (wrong.clone(), failed.clone());
        let worker = answering_worker(server.taskq_client().await, &queue, move |n, task| {
            Some(match n % 5 {
                1 => {
                    wrong_given.fetch_add(1, Ordering::Relaxed);
                    let mut output = task.payload.to_vec();
                    output[0] ^= 1;
                    Ok(Bytes::from(output))
                }
                3 => {
                    failed_given.fetch_add(1, Ordering::Relaxed);
                    Err(TaskFailure::fatal("refused on purpose"))
                }
                _ => Ok(task.payload.clone()),
            })
        });
        let args = ["--mode", mode, "--results", results, "--json"];
        let (code, out, err) = bench_on(&server, &queue, &args).await;
        stop_worker(worker).await;
        assert_eq!(code, Some(1), "{mode}/{results}: {out}\n{err}");
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let round_trip = &report["round_trip"];
        let (wrong, failed) = (
            wrong.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        );
        assert!(
            wrong > 0 && failed > 0,
            "the worker answered wrongly: {report}"
        );
        assert_eq!(round_trip["wrong"], wrong, "{mode}/{results}: {report}");
        assert_eq!(round_trip["failed"], failed, "{mode}/{results}: {report}");
        assert_eq!(round_trip["lost"], 0, "{mode}/{results}: {report}");
        assert_eq!(round_trip["duplicated"], 0, "{mode}/{results}: {report}");
        assert_eq!(round_trip["count"], 100 - wrong - failed, "{report}");
        for kind in ["wrong", "failed"] {
            assert!(round_trip["first_faults"][kind].is_string(), "{report}");
        }
        let says = [
            format!("wrong {wrong}: "),
            format!("failed {failed}: "),
            "--builtin echo".into(),
            "refused on purpose".into(),
        ];
        for says in says {
            assert!(
                err.contains(&says),
                "{mode}/{results}: no {says:?} in {err}"
            );
        }
    }

    // The human output counts them too.
    let worker = answering_worker(server.taskq_client().await, "bad-text", |n, _| {
        Some(match n % 2 {
            0 => Ok(Bytes::from_static(b"not the payload")),
            _ => Err(TaskFailure::fatal("refused on purpose")),
        })
    });
    let (code, out, err) = bench_on(&server, "bad-text", &[]).await;
    stop_worker(worker).await;
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert_eq!(count_after(&out, "results checked: "), 0, "{out}");
    assert_eq!(
        count_after(&out, "wrong ") + count_after(&out, "failed "),
        100,
        "{out}"
    );
    assert!(
        count_after(&out, "wrong ") > 0 && count_after(&out, "failed ") > 0,
        "{out}"
    );
    server.shutdown().await;
}

/// With `--workers 0` the bench uses the workers already on the queue: a
/// right one (echo) passes every check and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_with_workers_0_uses_the_queues_workers() {
    let server = TestServer::spawn().await;
    for mode in ["stream", "unary"] {
        let queue = format!("echo-{mode}");
        let worker = answering_worker(server.taskq_client().await, &queue, |_, task| {
            Some(Ok(task.payload.clone()))
        });
        let (code, out, err) = bench_on(&server, &queue, &["--mode", mode, "--json"]).await;
        stop_worker(worker).await;
        assert_eq!(code, Some(0), "{mode}: {out}\n{err}");
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let round_trip = &report["round_trip"];
        assert_eq!(round_trip["count"], 100, "{mode}: {report}");
        for fault in ["errors", "lost", "duplicated", "wrong", "failed"] {
            assert_eq!(round_trip[fault], 0, "{mode}: {report}");
        }
        assert_eq!(round_trip["timed_out"], false, "{mode}: {report}");
        assert_eq!(report["workers"], 0);
        // The workers are not the bench's: what they received is unknown.
        assert_eq!(round_trip["tasks_per_message"], serde_json::Value::Null);
        assert_eq!(
            round_trip["messages"]["results_read"], 100,
            "{mode}: {report}"
        );
    }
    server.shutdown().await;
}

/// A task whose result never comes is lost when `--timeout` ends the run:
/// counted, and the run exits 1 saying so. (The timeout is what is tested
/// here, not a wait for something else.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_a_task_never_answered_as_lost_at_the_timeout() {
    let server = TestServer::spawn().await;
    let worker = answering_worker(server.taskq_client().await, "silent", |n, task| {
        (n != 7).then(|| Ok(task.payload.clone()))
    });
    let (code, out, err) = bench_on(&server, "silent", &["--timeout", "3s", "--json"]).await;
    stop_worker(worker).await;
    assert_eq!(code, Some(1), "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let round_trip = &report["round_trip"];
    assert_eq!(round_trip["lost"], 1, "{report}");
    assert_eq!(round_trip["count"], 99, "{report}");
    assert_eq!(round_trip["timed_out"], true, "{report}");
    assert!(
        err.contains("lost 1: ") && err.contains("--timeout"),
        "{err}"
    );
    server.shutdown().await;
}
