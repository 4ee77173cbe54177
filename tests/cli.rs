//! The `taskq` binary as an operator runs it: exit codes, messages, signals.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use taskq::pb::{self, task_queue_client::TaskQueueClient};

fn taskq() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_taskq"));
    command.env_remove("TASKQ_TOKENS").env_remove("RUST_LOG");
    // A free port for the HTTP listener: these servers run side by side.
    command.env("TASKQ_HTTP_LISTEN", "127.0.0.1:0");
    command
}

fn run_serve(args: &[&str]) -> (i32, String) {
    let output = taskq().arg("serve").args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_public_address_without_tokens_exits_2_naming_the_flag() {
    let (code, stderr) = run_serve(&["--listen", "0.0.0.0:0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--listen") && stderr.contains("--allow-unauthenticated"),
        "{stderr}"
    );
}

#[test]
fn bad_values_exit_2_naming_the_flag() {
    let (code, stderr) = run_serve(&["--default-lease", "soon"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--default-lease"), "{stderr}");
    let (code, stderr) = run_serve(&["--max-payload", "4 parsecs"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--max-payload"), "{stderr}");
    let (code, stderr) = run_serve(&["--token-file", "/nonexistent/taskq-tokens"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--token-file") && stderr.contains("/nonexistent/taskq-tokens"),
        "{stderr}"
    );
    let output = taskq()
        .args(["serve", "--log", "taskq=loud"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--log"));
}

#[test]
fn environment_twins_are_read() {
    let output = taskq()
        .args(["serve"])
        .env("TASKQ_DEFAULT_LEASE", "never")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--default-lease"));
}

/// `taskq bench --workers 0` loads the workers already on a server's
/// queue: without a server and a queue to name there is nothing to load,
/// so it exits 2 naming both and saying how to start a worker.
#[test]
fn bench_without_its_own_workers_needs_a_server_and_a_queue() {
    for args in [
        &["bench", "--workers", "0"][..],
        &["bench", "--workers", "0", "--server", "http://127.0.0.1:1"],
        &["bench", "--workers", "0", "--queue", "q"],
    ] {
        let output = taskq()
            .args(args)
            .env_remove("TASKQ_SERVER")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        for says in ["--workers 0", "--server", "--queue", "taskq worker"] {
            assert!(stderr.contains(says), "{args:?}: no {says:?} in {stderr}");
        }
    }
}

/// SIGTERM: the server drains, logs what it held, and exits 0.
#[test]
fn sigterm_drains_and_exits_0() {
    let mut child = taskq()
        .args(["serve", "--listen", "127.0.0.1:0", "--shutdown-grace", "5s"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let wait = Duration::from_secs(30);
    let serving = lines.recv_timeout(wait).expect("a start line");
    assert!(serving.contains("taskq serving"), "{serving}");
    let addr = serving
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .expect("the start line names the address")
        .to_string();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = TaskQueueClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client
            .put_task(pb::PutTaskRequest::default())
            .await
            .unwrap();
    });

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut rest = Vec::new();
    while let Ok(line) = lines.recv_timeout(wait) {
        rest.push(line);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest:#?}");
    let rest = rest.join("\n");
    assert!(rest.contains("draining"), "{rest}");
    assert!(
        rest.contains("taskq stopped") && rest.contains("tasks=1"),
        "{rest}"
    );
}

/// The in-memory contract, as documented: a server killed with SIGKILL
/// loses what it held; a new one on the same address starts empty and
/// answers NOT_FOUND for the old ids, rather than anything made up.
#[test]
fn a_killed_server_restarts_empty_as_documented() {
    let start = |listen: &str| {
        let mut child = taskq()
            .args(["serve", "--listen", listen])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let serving = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.contains("taskq serving"))
            .expect("a start line");
        let addr = serving
            .split_whitespace()
            .find_map(|f| f.strip_prefix("addr="))
            .unwrap()
            .to_string();
        // Keep reading so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        (child, addr)
    };
    let (mut first, addr) = start("127.0.0.1:0");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let id = runtime.block_on(async {
        let mut client = TaskQueueClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client
            .put_task(pb::PutTaskRequest::default())
            .await
            .unwrap()
            .into_inner()
            .task_id
    });
    first.kill().unwrap();
    first.wait().unwrap();
    let (mut second, _) = start(&addr);
    let code = runtime.block_on(async {
        let mut client = TaskQueueClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let request = pb::GetResultRequest {
            target: Some(pb::get_result_request::Target::TaskId(id)),
            max_wait: None,
        };
        client.get_result(request).await.unwrap_err().code()
    });
    assert_eq!(code, tonic::Code::NotFound);
    second.kill().unwrap();
    second.wait().unwrap();
}

/// The lines a child writes to stderr, read on a thread so it never
/// blocks on a full pipe, kept for a final check.
struct LogLines {
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl LogLines {
    fn follow(child: &mut std::process::Child) -> Self {
        let stderr = child.stderr.take().unwrap();
        let (lines_tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 30 s) for a line containing `text` and returns it.
    fn wait_for(&mut self, text: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no line with {text:?}"));
            self.seen.push(line.clone());
            if line.contains(text) {
                return line;
            }
        }
    }

    /// Every line up to the end of the stream.
    fn rest(mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(30)) {
            self.seen.push(line);
        }
        self.seen
    }
}

/// SIGHUP re-reads the token file: new tokens and roles take effect, old
/// ones stop working, a file that does not parse leaves the tokens in
/// force. Run at trace level, the whole log holds no token, accepted or
/// not.
#[test]
fn sighup_rotates_tokens_and_no_token_reaches_the_logs() {
    let dir = std::env::temp_dir().join(format!("taskq-sighup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, "first-secret-token admin\n").unwrap();
    let mut child = taskq()
        .args(["serve", "--listen", "127.0.0.1:0", "--log", "trace"])
        .arg("--token-file")
        .arg(&file)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut log = LogLines::follow(&mut child);
    let serving = log.wait_for("taskq serving");
    let addr = serving
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .expect("the start line names the address")
        .to_string();
    let hangup = |pid: u32| {
        let sent = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let call = |token: &'static str, put: bool| {
        runtime.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let header: tonic::metadata::MetadataValue<_> =
                format!("Bearer {token}").parse().unwrap();
            let mut client = TaskQueueClient::with_interceptor(
                channel,
                move |mut request: tonic::Request<()>| {
                    request
                        .metadata_mut()
                        .insert("authorization", header.clone());
                    Ok(request)
                },
            );
            let answer = if put {
                client
                    .put_task(pb::PutTaskRequest::default())
                    .await
                    .map(|_| ())
            } else {
                let request = pb::GetTaskRequest {
                    max_wait: Some(prost_types::Duration::default()),
                    ..Default::default()
                };
                client.get_task(request).await.map(|_| ())
            };
            answer.map_err(|status| status.code())
        })
    };
    use tonic::Code;
    assert_eq!(call("first-secret-token", true), Ok(()));
    assert_eq!(call("wrong-guess-token", true), Err(Code::Unauthenticated));

    std::fs::write(&file, "second-secret-token worker\n").unwrap();
    hangup(child.id());
    log.wait_for("token file reloaded");
    assert_eq!(call("first-secret-token", true), Err(Code::Unauthenticated));
    assert_eq!(
        call("second-secret-token", true),
        Err(Code::PermissionDenied)
    );
    assert_eq!(call("second-secret-token", false), Ok(()));

    // A broken file: reported, and the tokens in force stay.
    std::fs::write(&file, "third-secret-token reader\n").unwrap();
    hangup(child.id());
    let refused = log.wait_for("not reloaded");
    assert!(refused.contains("line 1"), "{refused}");
    assert_eq!(call("second-secret-token", false), Ok(()));
    assert_eq!(
        call("third-secret-token", false),
        Err(Code::Unauthenticated)
    );

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let lines = log.rest();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        lines.len() > 20,
        "trace level logs the calls: {} lines",
        lines.len()
    );
    for secret in [
        "first-secret",
        "second-secret",
        "third-secret",
        "wrong-guess",
    ] {
        let leaks: Vec<_> = lines.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret} in the log: {leaks:#?}");
    }
}
