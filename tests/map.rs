//! `taskq map` as a user runs it: the real binary against a real server on
//! loopback, with real `taskq worker` processes running a shell program,
//! its output compared with a local `xargs` run of the same program.
//!
//! Every process a test starts is killed when the test ends, passed or
//! failed (`kill_on_drop`, and a guard for the one on a pseudo-terminal).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// The program the workers run per task, and `xargs` per line: the input
/// twice. `IFS= read -r` keeps the line as it is (spaces, backslashes);
/// `read` fails at the end of an input without a newline, after reading it.
const TWICE: &str = r#"IFS= read -r x; printf '%s-%s\n' "$x" "$x""#;

/// [`TWICE`], refusing the input `bad` with a message on stderr and exit 3.
const TWICE_BUT_BAD: &str = r#"IFS= read -r x; if [ "$x" = bad ]; then echo "no good: $x" >&2; exit 3; fi; printf '%s-%s\n' "$x" "$x""#;

/// Longest a `taskq map` run or a local `xargs` run may take.
const RUN_WITHIN: Duration = Duration::from_secs(600);

fn taskq() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_taskq"));
    command
        .env_remove("TASKQ_TOKENS")
        .env_remove("TASKQ_TOKEN")
        .env_remove("TASKQ_SERVER")
        .env_remove("TASKQ_QUEUE")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    command
}

/// A `taskq worker` process running `sh -c script` per task, 4 at once;
/// a short lease, so that the tasks of a worker killed before its stream
/// closes come back soon too.
fn worker(server: &TestServer, queue: &str, id: &str, script: &str) -> Child {
    taskq()
        .args(["worker", "--server", &server.url(), "--queue", queue])
        .args(["--worker-id", id, "--concurrency", "4", "--lease", "2s"])
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `taskq map` on `server` with `args`, reading `input`, as a process.
fn map(server: &TestServer, input: &Path, args: &[&str]) -> Child {
    taskq()
        .args(["map", "--server", &server.url()])
        .args(args)
        .stdin(std::fs::File::open(input).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a process, bounded.
async fn finish(child: Child) -> Output {
    tokio::time::timeout(RUN_WITHIN, child.wait_with_output())
        .await
        .expect("the run finishes in time")
        .unwrap()
}

/// `script` run per line of `input` by GNU `xargs`, one after the other,
/// each line on the program's stdin as a worker gives it its payload: the
/// output a single machine gives.
async fn local_xargs(input: PathBuf, script: &'static str) -> Vec<u8> {
    let output = Command::new("xargs")
        .args([
            "-d",
            "\\n",
            "-n1",
            "sh",
            "-c",
            r#"printf %s "$1" | sh -c "$0""#,
            script,
        ])
        .stdin(std::fs::File::open(&input).unwrap())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(RUN_WITHIN, output)
        .await
        .expect("xargs finishes in time")
        .unwrap();
    assert!(output.status.success(), "xargs: {:?}", output.status);
    output.stdout
}

/// A file of `n` generated lines (numbered, with spaces, quotes,
/// backslashes, `$` and non-ASCII letters), line `bad_at` (from 1) being
/// `bad`.
fn lines_file(name: &str, n: usize, bad_at: Option<usize>) -> PathBuf {
    let mut text = String::new();
    for i in 1..=n {
        if Some(i) == bad_at {
            text.push_str("bad\n");
        } else {
            text.push_str(&format!("{i}  'q' \"dq\" \\b $HOME * αβ\n"));
        }
    }
    temp_file(name, text.as_bytes())
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("taskq-map-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// [`TWICE`] computed here, for the lines of `input` but `skip`.
fn twice(input: &Path, skip: Option<&str>) -> String {
    let text = std::fs::read_to_string(input).unwrap();
    text.lines()
        .filter(|line| Some(*line) != skip)
        .map(|line| format!("{line}-{line}\n"))
        .collect()
}

/// The first line where two outputs differ, for a readable failure.
fn first_difference(got: &[u8], expected: &[u8]) -> String {
    let (got, expected) = (
        String::from_utf8_lossy(got),
        String::from_utf8_lossy(expected),
    );
    let (got_lines, expected_lines) = (got.lines().count(), expected.lines().count());
    for (n, (a, b)) in got.lines().zip(expected.lines()).enumerate() {
        if a != b {
            return format!("line {}: got {a:?}, expected {b:?}", n + 1);
        }
    }
    format!("{got_lines} lines, expected {expected_lines}")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// SIGKILL, and the process reaped.
async fn kill(mut child: Child) {
    child.kill().await.unwrap();
}

/// The issue's test: 10,000 lines through three workers, one of them
/// killed with SIGKILL once results are coming (and another started in
/// its place), give byte for byte the output of a local `xargs` run of
/// the same program, in input order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_prints_what_a_local_xargs_prints_with_a_worker_killed_mid_run() {
    const LINES: usize = 10_000;
    let server = TestServer::spawn().await;
    let input = lines_file("ten-thousand", LINES, None);
    let expected = tokio::spawn(local_xargs(input.clone(), TWICE));
    let mut workers = vec![
        worker(&server, "twice", "w1", TWICE),
        worker(&server, "twice", "w2", TWICE),
        worker(&server, "twice", "w3", TWICE),
    ];
    let started = Instant::now();
    let mut run = map(&server, &input, &["--queue", "twice"]);

    // Read the outputs as they come; a fifth of the way in, kill w1.
    let mut stdout = run.stdout.take().unwrap();
    let mut got = Vec::new();
    let mut buffer = vec![0; 64 * 1024];
    let mut killed = false;
    loop {
        let read = tokio::time::timeout(RUN_WITHIN, stdout.read(&mut buffer))
            .await
            .expect("outputs keep coming")
            .unwrap();
        if read == 0 {
            break;
        }
        got.extend_from_slice(&buffer[..read]);
        let lines = got.iter().filter(|b| **b == b'\n').count();
        if !killed && lines >= LINES / 5 {
            kill(workers.remove(0)).await;
            workers.push(worker(&server, "twice", "w4", TWICE));
            killed = true;
        }
    }
    let output = finish(run).await;
    let took = started.elapsed();
    assert!(killed, "the run ended before a worker was killed");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stderr(&output),
        "",
        "nothing to say, and no progress line off a terminal"
    );

    let expected = expected.await.unwrap();
    assert_eq!(expected.iter().filter(|b| **b == b'\n').count(), LINES);
    assert!(
        got == expected,
        "taskq map differs from xargs: {}",
        first_difference(&got, &expected)
    );
    // The kill took tasks away from w1: they went back and ran elsewhere.
    let stats = server.taskq_client().await.stats("twice").await.unwrap();
    let queue = &stats.queues[0];
    assert!(queue.redelivered >= 1, "{queue:?}");
    assert_eq!(
        (queue.succeeded, queue.failed),
        (LINES as u64, 0),
        "{queue:?}"
    );
    eprintln!(
        "taskq map: {LINES} lines in {took:?}, {} redelivered",
        queue.redelivered
    );

    for worker in workers {
        kill(worker).await;
    }
    server.shutdown().await;
}

/// `--unordered` prints the same lines in completion order; `--json` one
/// object per input, in input order, with its line, input and result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_and_json_carry_every_input_once() {
    const LINES: usize = 300;
    let server = TestServer::spawn().await;
    let input = lines_file("three-hundred", LINES, None);
    let workers = [
        worker(&server, "json", "w1", TWICE),
        worker(&server, "json", "w2", TWICE),
    ];
    let expected = twice(&input, None);

    let unordered = finish(map(&server, &input, &["--queue", "json", "--unordered"])).await;
    assert_eq!(unordered.status.code(), Some(0), "{}", stderr(&unordered));
    let sorted = |text: &str| {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.sort();
        lines
    };
    assert_eq!(
        sorted(&String::from_utf8(unordered.stdout).unwrap()),
        sorted(&expected)
    );

    let json = finish(map(
        &server,
        &input,
        &["--queue", "json", "--json", "--batch", "7"],
    ))
    .await;
    assert_eq!(json.status.code(), Some(0), "{}", stderr(&json));
    let text = String::from_utf8(json.stdout).unwrap();
    let inputs: Vec<&str> = std::fs::read_to_string(&input)
        .unwrap()
        .leak()
        .lines()
        .collect();
    assert_eq!(text.lines().count(), LINES, "{text}");
    for (n, line) in text.lines().enumerate() {
        let object: serde_json::Value = serde_json::from_str(line).unwrap();
        let input = inputs[n];
        assert_eq!(object["line"], n as u64 + 1, "{object}");
        assert_eq!(object["input"], input, "{object}");
        assert_eq!(object["output"], format!("{input}-{input}\n"), "{object}");
        assert_eq!(object["state"], "succeeded", "{object}");
        assert_eq!(object["error"], serde_json::Value::Null, "{object}");
        assert_eq!(object["attempts"], 1, "{object}");
        assert!(object["file"].is_null(), "stdin: {object}");
        assert!(
            ["w1", "w2"].contains(&object["worker"].as_str().unwrap()),
            "{object}"
        );
        assert_eq!(object["task_id"].as_str().unwrap().len(), 36, "{object}");
    }
    for worker in workers {
        kill(worker).await;
    }
    server.shutdown().await;
}

/// A failed input is reported on stderr with its line (FILE:LINE from a
/// file) and the worker's error, the others are printed in order without
/// it, and the run exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_input_is_reported_with_its_line_and_the_run_exits_1() {
    let server = TestServer::spawn().await;
    let w1 = worker(&server, "picky", "w1", TWICE_BUT_BAD);
    let input = lines_file("forty", 40, Some(17));

    let run = finish(map(
        &server,
        &input,
        &["--queue", "picky", "--max-attempts", "1"],
    ))
    .await;
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(
        err.contains("taskq map: input line 17 failed after 1 attempt: ")
            && err.contains("no good: bad"),
        "{err}"
    );
    assert!(err.contains("taskq map: 1 of 40 inputs failed"), "{err}");
    assert_eq!(
        String::from_utf8(run.stdout).unwrap(),
        twice(&input, Some("bad"))
    );

    // From files: the file and its line; the failure in --json too.
    let first = lines_file("first", 3, None);
    let empty = temp_file("stdin-unused", b"");
    let from_files = finish(map(
        &server,
        &empty,
        &[
            "--queue",
            "picky",
            "--max-attempts",
            "1",
            "--json",
            first.to_str().unwrap(),
            input.to_str().unwrap(),
        ],
    ))
    .await;
    assert_eq!(from_files.status.code(), Some(1), "{}", stderr(&from_files));
    let err = stderr(&from_files);
    assert!(
        err.contains(&format!(
            "taskq map: input {}:17 failed after 1 attempt: ",
            input.display()
        )),
        "{err}"
    );
    let objects: Vec<serde_json::Value> = String::from_utf8(from_files.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(objects.len(), 43);
    let failed = &objects[3 + 16];
    assert_eq!(
        (&failed["file"], &failed["line"], &failed["state"]),
        (
            &input.display().to_string().into(),
            &17.into(),
            &"failed".into()
        ),
        "{failed}"
    );
    assert!(
        failed["error"].as_str().unwrap().contains("no good: bad"),
        "{failed}"
    );
    assert_eq!(
        (&objects[2]["file"], &objects[2]["line"]),
        (&first.display().to_string().into(), &3.into())
    );

    kill(w1).await;
    server.shutdown().await;
}

/// `--halt-on-error` stops at the first failure: it puts nothing more and
/// exits 1, saying how many of its tasks are left unfinished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_on_error_stops_putting_at_the_first_failure() {
    const LINES: usize = 10_000;
    let server = TestServer::spawn().await;
    // One task at a time: the tasks after the failed one are still there
    // when it fails.
    let w1 = taskq()
        .args(["worker", "--server", &server.url(), "--queue", "halt"])
        .args(["--", "sh", "-c", TWICE_BUT_BAD])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let input = lines_file("halt", LINES, Some(5));
    let args = [
        "--queue",
        "halt",
        "--max-attempts",
        "1",
        "--halt-on-error",
        "--window",
        "20",
    ];
    let run = finish(map(&server, &input, &args)).await;
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(
        err.contains("taskq map: input line 5 failed after 1 attempt: "),
        "{err}"
    );
    assert!(
        err.contains("unfinished task(s) of this run on queue \"halt\""),
        "{err}"
    );
    let printed = String::from_utf8(run.stdout).unwrap();
    assert_eq!(
        printed,
        twice(&input, None)
            .lines()
            .take(4)
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );

    // It stopped within its window: a few dozen tasks put, not 10,000.
    let stats = server.taskq_client().await.stats("halt").await.unwrap();
    let queue = &stats.queues[0];
    let put = queue.pending + queue.leased + queue.succeeded + queue.failed;
    assert!(put <= 5 + 20, "{put} tasks put: {queue:?}");
    kill(w1).await;
    server.shutdown().await;
}

/// Ctrl-C stops putting, cancels what this run put and is not done (all of
/// it here, with no worker on the queue), and exits 130: no task of its
/// own is left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_what_it_put_and_exits_130() {
    let server = TestServer::spawn().await;
    let input = lines_file("interrupted", 1000, None);
    let run = map(&server, &input, &["--queue", "nobody", "--window", "100"]);
    let client = server.taskq_client().await;
    let pending = || async {
        let stats = client.stats("nobody").await.unwrap();
        stats.queues.first().map_or(0, |q| q.pending)
    };
    common::eventually("a window of tasks put", || async { pending().await == 100 }).await;
    let pid = run.id().unwrap().to_string();
    let status = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let output = finish(run).await;
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("taskq map: cancelled 100 unfinished task(s) of this run"),
        "{}",
        stderr(&output)
    );
    assert!(output.stdout.is_empty());
    let stats = client.stats("nobody").await.unwrap();
    let queue = &stats.queues[0];
    assert_eq!(
        (queue.pending, queue.leased),
        (0, 0),
        "no task of its own left: {queue:?}"
    );
    server.shutdown().await;
}

/// How inputs are cut, numbered and printed: lines as `xargs -d '\n'`
/// (an empty line between others is an input, a final newline makes
/// none), `-0`, files numbered each from 1, whole files; outputs written
/// as the worker returned them (the echo worker adds no newline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_cut_and_numbered_like_xargs() {
    let server = TestServer::spawn().await;
    let echo = taskq()
        .args(["worker", "--server", &server.url(), "--queue", "echo"])
        .args(["--builtin", "echo", "--concurrency", "8"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let json_of = |output: &Output| -> Vec<serde_json::Value> {
        assert_eq!(output.status.code(), Some(0), "{}", stderr(output));
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let fields = |objects: &[serde_json::Value], name: &str| -> Vec<serde_json::Value> {
        objects.iter().map(|o| o[name].clone()).collect()
    };

    let stdin = temp_file("cut-lines", b"a\n\n b \r\n");
    let raw = finish(map(&server, &stdin, &["--queue", "echo"])).await;
    assert_eq!(
        (raw.status.code(), &raw.stdout[..]),
        (Some(0), &b"a b \r"[..])
    );
    let lines = json_of(&finish(map(&server, &stdin, &["--queue", "echo", "--json"])).await);
    assert_eq!(fields(&lines, "input"), ["a", "", " b \r"]);
    assert_eq!(fields(&lines, "line"), [1, 2, 3]);

    let nul = temp_file("cut-nul", b"x y\0z\n\0\xff\0");
    let items = json_of(&finish(map(&server, &nul, &["--queue", "echo", "--json", "-0"])).await);
    let (x_y, z) = (serde_json::json!("x y"), serde_json::json!("z\n"));
    assert_eq!(fields(&items, "input"), [x_y, z, serde_json::Value::Null]);
    assert_eq!(
        (&items[2]["input_base64"], &items[2]["output_base64"]),
        (&"/w==".into(), &"/w==".into())
    );

    let (a, b) = (temp_file("a", b"1\n2"), temp_file("b", b"3\n"));
    let (a_name, b_name) = (a.to_str().unwrap(), b.to_str().unwrap());
    let args = ["--queue", "echo", "--json", a_name, "-", b_name];
    let files = json_of(&finish(map(&server, &stdin, &args)).await);
    assert_eq!(fields(&files, "input"), ["1", "2", "a", "", " b \r", "3"]);
    assert_eq!(fields(&files, "line"), [1, 2, 1, 2, 3, 1]);
    let null = serde_json::Value::Null;
    assert_eq!(
        fields(&files, "file"),
        [
            a_name.into(),
            a_name.into(),
            null.clone(),
            null.clone(),
            null.clone(),
            b_name.into()
        ]
    );

    let args = [
        "--queue",
        "echo",
        "--json",
        "--file-per-task",
        a_name,
        b_name,
    ];
    let whole = json_of(&finish(map(&server, &stdin, &args)).await);
    assert_eq!(fields(&whole, "output"), ["1\n2", "3\n"]);
    assert_eq!(fields(&whole, "file"), [a_name, b_name]);
    assert_eq!(fields(&whole, "line"), [null.clone(), null]);
    assert!(whole.iter().all(|o| o.get("input").is_none()), "{whole:?}");

    let missing = format!("{a_name}-missing");
    let args = ["--queue", "echo", a_name, &missing];
    let unreadable = finish(map(&server, &stdin, &args)).await;
    assert_eq!(unreadable.status.code(), Some(1));
    assert_eq!(unreadable.stdout, b"12");
    assert!(
        stderr(&unreadable).contains(&format!("taskq map: input {missing} failed: cannot read: ")),
        "{}",
        stderr(&unreadable)
    );

    kill(echo).await;
    server.shutdown().await;
}

/// On a terminal, stderr shows the progress line (done of the total,
/// failed, rate), and takes it away at the end; stdout stays clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_line_shows_on_a_terminal_only() {
    use std::io::Read;

    /// The run on a pty, killed if the test ends first.
    struct OnTerminal(std::process::Child);
    impl Drop for OnTerminal {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let server = TestServer::spawn().await;
    // One task at a time, so that the run lasts a few redraws.
    let w1 = taskq()
        .args(["worker", "--server", &server.url(), "--queue", "bar"])
        .args(["--", "sh", "-c", TWICE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let input = lines_file("bar", 200, None);
    let url = server.url();
    let (stdout, terminal) = tokio::task::spawn_blocking(move || {
        let (pty, pts) = pty_process::blocking::open().unwrap();
        pty.resize(pty_process::Size::new(24, 100)).unwrap();
        let child = pty_process::blocking::Command::new(env!("CARGO_BIN_EXE_taskq"))
            .args(["map", "--server", &url, "--queue", "bar"])
            .env_remove("RUST_LOG")
            .stdin(std::fs::File::open(&input).unwrap())
            .stdout(Stdio::piped())
            .spawn(pts)
            .unwrap();
        let mut run = OnTerminal(child);
        let reader = std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut buffer = [0; 4096];
            while let Ok(n @ 1..) = (&pty).read(&mut buffer) {
                written.extend_from_slice(&buffer[..n]);
            }
            written
        });
        let mut stdout = Vec::new();
        run.0
            .stdout
            .take()
            .unwrap()
            .read_to_end(&mut stdout)
            .unwrap();
        let status = run.0.wait().unwrap();
        assert_eq!(status.code(), Some(0));
        (stdout, reader.join().unwrap())
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&terminal);
    assert!(text.contains("/200 done  0 failed"), "{text:?}");
    assert!(
        text.ends_with("\r\x1b[K"),
        "the line is taken away: {text:?}"
    );
    assert_eq!(
        String::from_utf8(stdout).unwrap(),
        twice(&lines_file("bar", 200, None), None)
    );
    kill(w1).await;
    server.shutdown().await;
}
