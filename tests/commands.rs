//! The operator commands, the demo and the examples, run as processes
//! against a real server: their output and exit codes.

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use common::TestServer;
use taskq::pb;
use tokio::process::{Child, Command};

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
    let task = client
        .get_task(
            pb::GetTaskRequest {
                queue: "q".into(),
                ..Default::default()
            },
            Duration::ZERO,
        )
        .await
        .unwrap()
        .unwrap();
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
    let task = client
        .get_task(
            pb::GetTaskRequest {
                queue: "q".into(),
                ..Default::default()
            },
            Duration::ZERO,
        )
        .await
        .unwrap()
        .unwrap();
    let failure = pb::Failure {
        message: "disk full".into(),
        retry: false,
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
        let task = client
            .get_task(
                pb::GetTaskRequest {
                    queue: "q".into(),
                    ..Default::default()
                },
                Duration::ZERO,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&task.payload[..], expected);
    }
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
        assert_eq!(report["held_tasks_measured"], 100, "{mode}: {report}");
        assert!(report["baseline_unary"]["count"].as_u64().unwrap() > 0);
    }
}
