//! The status page in a real browser: headless Chromium (Debian's
//! `chromium`, which `scripts/test` installs) signs in with a token, and
//! the test reads the DOM as tasks run: the queue row and its counts, the
//! numbers changing without a reload, the sparklines filling, a task
//! found by id; a wrong or producer token refused. A screenshot goes to
//! `target/status-page.png`. The page's JSON and its path prefix are
//! checked over plain HTTP.
//!
//! Chromium is driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: JSON messages ending in a NUL byte on file
//! descriptors 3 and 4), so no WebSocket client is needed.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{AuthClient, TestServer, http_get, token_file};
use serde_json::{Value, json};
use taskq::pb;
use taskq::server::{ServerConfig, Tokens};

const MONITOR: &str = "monitor-token";
const PRODUCER: &str = "producer-token";
const ADMIN: &str = "admin-token";

/// A headless Chromium on the DevTools pipe, killed when dropped.
struct Browser {
    child: Child,
    commands: ChildStdin,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    _profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn start(name: &str) -> Self {
        assert!(
            Command::new("chromium")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "`chromium` is not on PATH: run scripts/test (it installs Debian's chromium \
             package as root) or `apt-get install chromium`"
        );
        let profile =
            std::env::temp_dir().join(format!("taskq-chromium-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let log = std::fs::File::create(profile.join("chromium.log")).unwrap();
        // The pipe is fds 3 (commands in) and 4 (answers out): the shell
        // moves our stdin and stdout there. As root, Chromium runs only
        // without its sandbox.
        let script = format!(
            "exec chromium --headless --no-sandbox --disable-gpu --no-first-run \
             --disable-dev-shm-usage --window-size=1400,1000 --remote-debugging-pipe \
             --user-data-dir={} 3<&0 4>&1 </dev/null >/dev/null",
            profile.display()
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("chromium starts");
        let commands = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut message = Vec::new();
            while out.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                message.pop();
                if let Ok(value) = serde_json::from_slice::<Value>(&message)
                    && tx.send(value).is_err()
                {
                    return;
                }
                message.clear();
            }
        });
        Self {
            child,
            commands,
            answers,
            next_id: 0,
            session: None,
            _profile: profile,
        }
    }

    /// Sends a command (to the page once one is open) and returns its
    /// result; events are skipped.
    fn call(&mut self, method: &str, params: Value) -> Value {
        match self.try_call(method, params) {
            Ok(result) => result,
            Err(answer) => panic!("{method}: {answer}"),
        }
    }

    /// `call`, with Chromium's error answer as the error.
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            command["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&command).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).unwrap();
        self.commands.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self
                .answers
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("chromium answers {method} within 30s"));
            if answer["id"] == json!(id) {
                if !answer["error"].is_null() {
                    return Err(answer);
                }
                return Ok(answer["result"].clone());
            }
        }
    }

    /// Opens a page on `url` and attaches to it.
    fn open(&mut self, url: &str) {
        self.session = None;
        let target = self.call("Target.createTarget", json!({ "url": url }));
        let attached = self.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        self.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let answer = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        answer["result"]["value"].clone()
    }

    /// Waits up to 20 s for `expression` to be true in the page. An
    /// evaluation cut short by a navigation (a form just submitted) counts
    /// as not yet: the next one runs in the new document.
    fn until(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let answer = self.try_call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            );
            match answer {
                Ok(result) if result["result"]["value"] == json!(true) => return,
                Ok(_) => {}
                Err(error) if error.to_string().contains("navigated or closed") => {}
                Err(error) => panic!("Runtime.evaluate: {error}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let body = self.eval("document.body ? document.body.innerText : '(no body)'");
        panic!("within 20s: {what} ({expression}); the page says:\n{body}");
    }

    fn screenshot(&mut self, path: &Path) {
        let shot = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        );
        std::fs::write(path, decode_base64(shot["data"].as_str().unwrap())).unwrap();
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let digits: Vec<u8> = text.bytes().filter(|c| *c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | (u32::from(*d) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

async fn server(name: &str, prefix: &str) -> TestServer {
    let tokens = token_file(
        name,
        &[
            &format!("{ADMIN} admin"),
            &format!("{MONITOR} monitor"),
            &format!("{PRODUCER} producer"),
        ],
    );
    let mut config = ServerConfig {
        tokens: Tokens::from_file(&tokens).unwrap(),
        ..ServerConfig::default()
    };
    // Samples every 200 ms, so the sparklines fill within the test.
    config.http.status_sample_every = Duration::from_millis(200);
    config.http.path_prefix = prefix.into();
    TestServer::with_http(config).await
}

async fn put(client: &mut AuthClient, queue: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let request = pb::PutTaskRequest {
            queue: queue.into(),
            payload: b"x".to_vec().into(),
            ..Default::default()
        };
        ids.push(client.put_task(request).await.unwrap().into_inner().task_id);
    }
    ids
}

/// Leases and finishes `n` tasks of `queue` with `output`.
async fn run(client: &mut AuthClient, queue: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let request = pb::GetTaskRequest {
            queue: queue.into(),
            worker_id: "browser-test-worker".into(),
            max_wait: Some(Duration::from_secs(5).try_into().unwrap()),
            ..Default::default()
        };
        let task = client
            .get_task(request)
            .await
            .unwrap()
            .into_inner()
            .task
            .expect("a task");
        client
            .put_result(pb::PutResultRequest {
                task_id: task.id.clone(),
                lease_id: task.lease_id.clone(),
                outcome: Some(pb::put_result_request::Outcome::Output(
                    b"hello".to_vec().into(),
                )),
            })
            .await
            .unwrap();
        ids.push(task.id);
    }
    ids
}

/// Leases one task of `queue` and fails it for good with `message`;
/// returns its id.
async fn fail_one(client: &mut AuthClient, queue: &str, message: &str) -> String {
    let task = lease_one(client, queue).await;
    client
        .put_result(pb::PutResultRequest {
            task_id: task.id.clone(),
            lease_id: task.lease_id.clone(),
            outcome: Some(pb::put_result_request::Outcome::Failure(pb::Failure {
                message: message.into(),
                retry: false,
                retry_after: None,
            })),
        })
        .await
        .unwrap();
    task.id
}

async fn lease_one(client: &mut AuthClient, queue: &str) -> pb::Task {
    let request = pb::GetTaskRequest {
        queue: queue.into(),
        worker_id: "browser-test-worker".into(),
        max_wait: Some(Duration::from_secs(5).try_into().unwrap()),
        ..Default::default()
    };
    client
        .get_task(request)
        .await
        .unwrap()
        .into_inner()
        .task
        .expect("a task")
}

/// Sign-in with `token` on the page open in `browser`.
fn sign_in(browser: &mut Browser, token: &str) {
    browser.until(
        "the sign-in form",
        "document.readyState === 'complete' && !!document.getElementById('token')",
    );
    browser.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('sign-in').submit(); true",
        json!(token)
    ));
}

fn cell(queue: &str, class: &str) -> String {
    format!("document.querySelector('#queues tr[data-queue=\"{queue}\"] .{class}')?.textContent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_signs_in_and_watches_tasks_run() {
    let server = server("status-browser", "").await;
    let http = server.http.unwrap();
    let mut client = server.client_with_token(ADMIN).await;
    put(&mut client, "jobs", 3).await;
    let url = format!("http://{http}/status");

    let mut browser = tokio::task::block_in_place(|| Browser::start("status"));
    tokio::task::block_in_place(|| {
        browser.open(&url);
        // A wrong token, then a producer's: refused, no page.
        sign_in(&mut browser, "wrong-token");
        browser.until(
            "an unknown token is refused",
            "document.getElementById('message')?.textContent.includes('not known')",
        );
        sign_in(&mut browser, PRODUCER);
        browser.until(
            "a producer token is refused",
            "document.getElementById('message')?.textContent.includes('may not')",
        );
        assert_eq!(
            browser.eval("!!document.getElementById('queues')"),
            json!(false)
        );
        // The monitor's: the page, with the queue's row from the events.
        sign_in(&mut browser, MONITOR);
        browser.until(
            "the queue row",
            &format!("{} === '3'", cell("jobs", "ready")),
        );
        assert_eq!(browser.eval(&cell("jobs", "leased")), json!("0"));
        assert_eq!(
            browser.eval("document.getElementById('health').textContent"),
            json!("serving")
        );
        // Marks this document: a reload would lose the mark.
        browser.eval("window.taskqTestMark = 'same document'; true");
    });

    // Tasks run while the page is open; one of another queue fails.
    put(&mut client, "jobs", 2).await;
    let finished = run(&mut client, "jobs", 4).await;
    put(&mut client, "flaky", 1).await;
    let failed = fail_one(&mut client, "flaky", "disk <full> & gone").await;
    tokio::task::block_in_place(|| {
        browser.until(
            "the counts change without a reload",
            &format!(
                "{} === '1' && {} === '4'",
                cell("jobs", "ready"),
                cell("jobs", "succeeded")
            ),
        );
        assert_eq!(browser.eval("window.taskqTestMark"), json!("same document"));
        assert!(
            browser
                .eval("Number(document.body.dataset.updates)")
                .as_f64()
                > Some(1.0),
            "several updates"
        );
        browser.until(
            "the sparkline has samples",
            "Number(document.querySelector('#queues tr[data-queue=\"jobs\"] svg.spark')?.dataset.samples) >= 2",
        );
        browser.until(
            "the worker is listed",
            "document.querySelector('#workers tr[data-worker=\"browser-test-worker\"]') !== null",
        );
        // The failure is listed with its message, as text.
        browser.until(
            "the latest failure",
            &format!(
                "document.querySelector('#failures tr[data-task=\"{failed}\"] .error')?.textContent === 'disk <full> & gone'"
            ),
        );
        assert_eq!(
            browser.eval("document.getElementById('failures-empty').hidden"),
            json!(true)
        );
        // A task found by id.
        browser.eval(&format!(
            "document.getElementById('task-id').value = {}; \
             document.getElementById('lookup').requestSubmit(); true",
            json!(finished[0])
        ));
        browser.until(
            "the task's state",
            "document.querySelector('#task dd[data-field=\"state\"]')?.textContent === 'succeeded'",
        );
        assert_eq!(
            browser.eval(
                "document.querySelector('#task dd[data-field=\"result_bytes\"]').textContent"
            ),
            json!("5")
        );
        // The session cookie: HttpOnly (no script reads it), SameSite=Strict.
        assert_eq!(browser.eval("document.cookie"), json!(""));
        let cookies = browser.call("Network.getCookies", json!({}));
        let cookie = &cookies["cookies"][0];
        assert_eq!(cookie["name"], json!("taskq_session"), "{cookies}");
        assert_eq!(cookie["httpOnly"], json!(true), "{cookies}");
        assert_eq!(cookie["sameSite"], json!("Strict"), "{cookies}");
        assert!(!cookie["value"].as_str().unwrap().contains(MONITOR));

        let shot = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join("status-page.png");
        browser.screenshot(&shot);
        let png = std::fs::read(&shot).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG at {}", shot.display());
    });
    drop(browser);
    server.shutdown().await;
}

#[tokio::test]
async fn the_page_is_json_for_scripts_and_needs_a_token() {
    let server = server("status-json", "").await;
    let mut client = server.client_with_token(ADMIN).await;
    put(&mut client, "jobs", 2).await;
    run(&mut client, "jobs", 1).await;

    let (status, body) = server
        .http_get("/status", Some(MONITOR), Some("application/json"))
        .await;
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["health"], json!("serving"));
    assert_eq!(report["version"], json!(env!("CARGO_PKG_VERSION")));
    let jobs = &report["queues"][0];
    assert_eq!(jobs["queue"], json!("jobs"));
    assert_eq!(jobs["ready"], json!(1));
    assert_eq!(jobs["succeeded"], json!(1));
    assert_eq!(report["workers"][0]["worker"], json!("browser-test-worker"));
    assert_eq!(report["recent_failures"], json!([]));

    // An unfinished task's lookup: its lease and holder; then a failure,
    // listed newest first with its message.
    put(&mut client, "flaky", 3).await;
    let held = lease_one(&mut client, "flaky").await;
    let (status, body) = server
        .http_get(&format!("/status/task/{}", held.id), Some(MONITOR), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let view: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["state"], json!("leased"), "{view}");
    assert_eq!(view["queue"], json!("flaky"));
    assert_eq!(view["attempts"], json!(1));
    assert_eq!(view["worker"], json!("browser-test-worker"));
    assert_eq!(view["payload_bytes"], json!(1));
    // The worker's row names the lease, with the time it has left.
    let (_, body) = server
        .http_get("/status", Some(MONITOR), Some("application/json"))
        .await;
    let report: Value = serde_json::from_str(&body).unwrap();
    let leases = &report["workers"][0]["leases"];
    assert_eq!(leases[0]["task_id"], json!(held.id), "{body}");
    assert!(
        leases[0]["expires_in_seconds"].as_f64().unwrap() > 0.0,
        "{body}"
    );
    assert_eq!(report["workers"][0]["in_flight"], json!(1), "{body}");
    let lease_expires = view["lease_expires_at_unix"].as_f64().unwrap();
    let created = view["created_at_unix"].as_f64().unwrap();
    assert!(lease_expires > created, "{view}");
    let failed = fail_one(&mut client, "flaky", "first").await;
    let last = fail_one(&mut client, "flaky", &"é".repeat(2000)).await;
    let (_, body) = server
        .http_get("/status", Some(MONITOR), Some("application/json"))
        .await;
    let report: Value = serde_json::from_str(&body).unwrap();
    let failures = report["recent_failures"].as_array().unwrap();
    let ids: Vec<&str> = failures
        .iter()
        .map(|f| f["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [last.as_str(), failed.as_str()], "{body}");
    assert_eq!(failures[1]["error"], json!("first"));
    assert_eq!(failures[1]["queue"], json!("flaky"));
    assert_eq!(failures[1]["attempts"], json!(1));
    // A long message is cut at a character boundary; the result keeps it whole.
    let cut = failures[0]["error"].as_str().unwrap();
    assert!(
        cut.len() <= 1024 && cut.len() > 1000 && cut.chars().all(|c| c == 'é'),
        "{cut}"
    );

    for (token, expected) in [(None, 401), (Some("wrong"), 401), (Some(PRODUCER), 403)] {
        let (status, body) = server
            .http_get("/status", token, Some("application/json"))
            .await;
        assert_eq!(status, expected, "{token:?}: {body}");
        assert!(!body.contains("\"queues\""), "{body}");
    }
    // Without a token, the HTML answer is the sign-in form.
    let (status, body) = server.http_get("/status", None, None).await;
    assert_eq!(status, 401);
    assert!(body.contains("name=\"token\""), "{body}");
    let (status, _) = server
        .http_get("/status/task/not-an-id", Some(MONITOR), None)
        .await;
    assert_eq!(status, 400);
    server.shutdown().await;
}

/// Behind a reverse proxy's path: every route and every URL of the page
/// is under the prefix.
#[tokio::test]
async fn every_route_is_under_the_path_prefix() {
    let server = server("status-prefix", "/ops/taskq").await;
    let http = server.http.unwrap();
    let (status, page) = http_get(http, "/ops/taskq/status", Some(MONITOR), None).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("src=\"/ops/taskq/status/app.js\""), "{page}");
    assert!(page.contains("data-prefix=\"/ops/taskq\""), "{page}");
    let (status, _) = http_get(http, "/ops/taskq/status/app.js", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        http_get(http, "/ops/taskq/healthz", None, None).await.0,
        200
    );
    assert_eq!(http_get(http, "/status", Some(MONITOR), None).await.0, 404);
    assert_eq!(http_get(http, "/healthz", None, None).await.0, 404);
    server.shutdown().await;
}
