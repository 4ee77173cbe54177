//! `taskq top` as someone at a terminal sees it: the real binary on a
//! pseudo-terminal (`pty-process`: a session of its own with the pty as
//! its controlling terminal, as over SSH), against a real server on
//! loopback with its HTTP listener. The test reads what the program
//! writes into a small screen model until the queue's row shows, types a
//! quit key, and checks the exit status and that the main screen came
//! back. Off a terminal, the command refuses with exit 2.

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{AuthClient, TestServer, token_file};
use pty_process::Size;
use pty_process::blocking::Pty;
use taskq::pb;
use taskq::server::{ServerConfig, Tokens};

const MONITOR: &str = "monitor-token";
const ADMIN: &str = "admin-token";

/// The pty's size: a common terminal.
const ROWS: u16 = 30;
const COLUMNS: u16 = 120;

/// Longest wait for the dashboard to show what the test looks for.
const SHOW_WITHIN: Duration = Duration::from_secs(30);

/// Longest wait for the exit after a quit key.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// A screen model just big enough for what ratatui's crossterm backend
/// writes: text placed at the cursor, which `CSI row;col H` moves;
/// `CSI 2J` clears; other escape sequences (colours, modes, the
/// alternate screen) are read and skipped.
struct Screen {
    cells: Vec<Vec<char>>,
    row: usize,
    col: usize,
    state: Parse,
    undecoded: Vec<u8>,
}

enum Parse {
    Text,
    Escape,
    /// A control sequence's parameters so far.
    Control(String),
    /// An operating system command, up to BEL or ESC \.
    Command,
    /// The one character after `ESC (` or `ESC )`.
    Charset,
}

impl Screen {
    fn new() -> Self {
        Self {
            cells: vec![vec![' '; usize::from(COLUMNS)]; usize::from(ROWS)],
            row: 0,
            col: 0,
            state: Parse::Text,
            undecoded: Vec::new(),
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.undecoded.extend_from_slice(bytes);
        let (text, rest) = match std::str::from_utf8(&self.undecoded) {
            Ok(text) => (text.to_string(), Vec::new()),
            Err(error) => {
                let (valid, rest) = self.undecoded.split_at(error.valid_up_to());
                let text = String::from_utf8_lossy(valid).into_owned();
                match error.error_len() {
                    // A character cut between two reads: keep its start.
                    None => (text, rest.to_vec()),
                    Some(bad) => (text + "\u{fffd}", rest[bad..].to_vec()),
                }
            }
        };
        self.undecoded = rest;
        for c in text.chars() {
            self.step(c);
        }
    }

    fn step(&mut self, c: char) {
        self.state = match std::mem::replace(&mut self.state, Parse::Text) {
            Parse::Text => match c {
                '\x1b' => Parse::Escape,
                '\r' => {
                    self.col = 0;
                    Parse::Text
                }
                '\n' => {
                    self.row += 1;
                    Parse::Text
                }
                c if c.is_control() => Parse::Text,
                c => {
                    if let Some(cell) = self
                        .cells
                        .get_mut(self.row)
                        .and_then(|r| r.get_mut(self.col))
                    {
                        *cell = c;
                    }
                    self.col += 1;
                    Parse::Text
                }
            },
            Parse::Escape => match c {
                '[' => Parse::Control(String::new()),
                ']' => Parse::Command,
                '(' | ')' => Parse::Charset,
                _ => Parse::Text,
            },
            Parse::Control(mut params) => {
                if ('\x40'..='\x7e').contains(&c) {
                    self.control(&params, c);
                    Parse::Text
                } else {
                    params.push(c);
                    Parse::Control(params)
                }
            }
            Parse::Command => match c {
                '\x07' => Parse::Text,
                '\x1b' => Parse::Escape,
                _ => Parse::Command,
            },
            Parse::Charset => Parse::Text,
        };
    }

    fn control(&mut self, params: &str, command: char) {
        match command {
            'H' | 'f' => {
                let mut numbers = params
                    .split(';')
                    .map(|n| n.parse::<usize>().unwrap_or(1).max(1));
                self.row = numbers.next().unwrap_or(1) - 1;
                self.col = numbers.next().unwrap_or(1) - 1;
            }
            'J' if params == "2" => {
                for row in &mut self.cells {
                    row.fill(' ');
                }
            }
            _ => {}
        }
    }

    fn lines(&self) -> Vec<String> {
        self.cells.iter().map(|row| row.iter().collect()).collect()
    }

    /// The words of the first line whose first word is `first`, table
    /// borders dropped.
    fn row(&self, first: &str) -> Option<Vec<String>> {
        self.lines().iter().find_map(|line| {
            let words: Vec<String> = line
                .split(['│', ' '])
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect();
            (words.first().map(String::as_str) == Some(first)).then_some(words)
        })
    }
}

/// `taskq top` running on a pty, killed if the test ends before it does.
struct Top {
    child: Child,
    pty: Arc<Pty>,
    output: mpsc::Receiver<Vec<u8>>,
    /// Everything it wrote, as it came.
    written: Vec<u8>,
    screen: Screen,
}

impl Drop for Top {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Top {
    fn start(args: &[&str], token: Option<&str>) -> Self {
        let (pty, pts) = pty_process::blocking::open().expect("a pseudo-terminal");
        pty.resize(Size::new(ROWS, COLUMNS)).unwrap();
        let mut command = pty_process::blocking::Command::new(env!("CARGO_BIN_EXE_taskq"))
            .arg("top")
            .args(args)
            .env("TERM", "xterm-256color");
        for name in [
            "TASKQ_TOKEN",
            "TASKQ_TOKEN_FILE",
            "TASKQ_SERVER",
            "TASKQ_HTTP",
            "TASKQ_LOG",
            "RUST_LOG",
        ] {
            command = command.env_remove(name);
        }
        if let Some(token) = token {
            command = command.env("TASKQ_TOKEN", token);
        }
        let child = command.spawn(pts).expect("taskq top starts");
        let pty = Arc::new(pty);
        let (send, output) = mpsc::channel();
        let reader = pty.clone();
        // Reads until the pty's other side is closed (the process ended).
        std::thread::spawn(move || {
            let mut buffer = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = (&*reader).read(&mut buffer) {
                if send.send(buffer[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            pty,
            output,
            written: Vec::new(),
            screen: Screen::new(),
        }
    }

    /// Reads the screen until `shows` holds; panics with the screen after
    /// [`SHOW_WITHIN`].
    fn until(&mut self, what: &str, shows: impl Fn(&Screen) -> bool) {
        let deadline = Instant::now() + SHOW_WITHIN;
        while !shows(&self.screen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(bytes) => {
                    self.written.extend_from_slice(&bytes);
                    self.screen.feed(&bytes);
                }
                Err(_) => panic!(
                    "the dashboard did not show {what} within {SHOW_WITHIN:?}; it shows:\n{}",
                    self.screen.lines().join("\n")
                ),
            }
        }
    }

    fn type_keys(&self, keys: &[u8]) {
        (&*self.pty).write_all(keys).unwrap();
        (&*self.pty).flush().unwrap();
    }

    /// Waits for the exit, bounded, and returns its code with everything
    /// written up to it.
    fn exit_code(mut self) -> (Option<i32>, Vec<u8>) {
        let deadline = Instant::now() + EXIT_WITHIN;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "taskq top still runs {EXIT_WITHIN:?} after the quit key"
            );
            // Drain meanwhile, so a full pty never blocks its writes.
            if let Ok(bytes) = self.output.recv_timeout(Duration::from_millis(20)) {
                self.written.extend_from_slice(&bytes);
            }
        };
        // What it wrote last (the terminal given back) is read before the
        // reader sees the pty close.
        while let Ok(bytes) = self.output.recv_timeout(EXIT_WITHIN) {
            self.written.extend_from_slice(&bytes);
        }
        (status.code(), std::mem::take(&mut self.written))
    }
}

async fn server(name: &str) -> TestServer {
    let tokens = token_file(
        name,
        &[&format!("{ADMIN} admin"), &format!("{MONITOR} monitor")],
    );
    let config = ServerConfig {
        tokens: Tokens::from_file(&tokens).unwrap(),
        ..ServerConfig::default()
    };
    TestServer::with_http(config).await
}

async fn put(client: &mut AuthClient, queue: &str, n: usize) {
    for _ in 0..n {
        let request = pb::PutTaskRequest {
            queue: queue.into(),
            payload: b"x".to_vec().into(),
            ..Default::default()
        };
        client.put_task(request).await.unwrap();
    }
}

/// The tty is driven from blocking threads; the server runs on the test's
/// runtime meanwhile.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_draws_the_queue_and_exits_0_on_q() {
    let server = server("top-draws").await;
    let mut admin = server.client_with_token(ADMIN).await;
    put(&mut admin, "thumbnails", 3).await;
    let http = format!("http://{}", server.http.unwrap());
    let grpc = server.url();

    let (code, written) = blocking(move || {
        let mut top = Top::start(
            &["--server", &grpc, "--http", &http, "--interval", "200ms"],
            Some(MONITOR),
        );
        // QUEUE READY LEASED ...: three ready, none leased.
        top.until("the queue with 3 ready and 0 leased", |screen| {
            screen
                .row("thumbnails")
                .is_some_and(|words| words[1..3] == ["3", "0"])
        });
        top.until("the server serving", |screen| {
            screen.lines()[1].contains("serving")
        });
        top.type_keys(b"q");
        top.exit_code()
    })
    .await;

    assert_eq!(code, Some(0));
    // The main screen is back: leaving the alternate screen is the last
    // thing it wrote that changes what the terminal shows.
    let written = String::from_utf8_lossy(&written);
    let left = written
        .rfind("\x1b[?1049l")
        .expect("the alternate screen is left");
    assert!(!written[left..].contains("thumbnails"));
    server.shutdown().await;
}

/// A token the server does not know: the dashboard says so and what to
/// do, keeps running, and Ctrl-C (a key in raw mode) quits with 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_shown_on_screen_and_ctrl_c_quits() {
    let server = server("top-wrong-token").await;
    let http = format!("http://{}", server.http.unwrap());

    let code = blocking(move || {
        let mut top = Top::start(&["--http", &http, "--interval", "200ms"], Some("no-such"));
        top.until("why the server refused, and what to do", |screen| {
            let text = screen.lines().join(" ");
            text.contains("refused") && text.contains("TASKQ_TOKEN")
        });
        top.type_keys(b"\x03");
        top.exit_code().0
    })
    .await;

    assert_eq!(code, Some(0));
    server.shutdown().await;
}

/// Off a terminal (a pipe, a file, cron) there is nothing to draw on:
/// exit 2, pointing at `taskq stats`.
#[test]
fn off_a_terminal_it_exits_2_pointing_at_taskq_stats() {
    let output = Command::new(env!("CARGO_BIN_EXE_taskq"))
        .args(["top", "--http", "http://127.0.0.1:1"])
        .env_remove("TASKQ_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("taskq stats"), "{stderr}");
}
