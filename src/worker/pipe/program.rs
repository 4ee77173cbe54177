//! One long-lived program: started with its stdin and stdout piped to the
//! worker, asked one line at a time, its stderr sent to the log line by
//! line. Dropping a `Program` kills it (`kill_on_drop`), so a handler
//! dropped mid-task (its lease lost, the shutdown grace over) takes its
//! program down with it, as a program per task would be.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::worker::command::CommandLine;

/// Longest answer line read from a program; a longer one is not read to
/// its end (the program is killed): it bounds the memory of each slot.
pub const MAX_ANSWER_LINE: usize = 64 << 20;

/// Longest piece of a stderr line logged as one event; the rest of the
/// line follows in further events.
const STDERR_LINE: usize = 8 << 10;

/// A buffer for answers kept between tasks up to this size; a larger one
/// (after a large answer) is let go.
const KEPT_BUFFER: usize = 1 << 20;

/// How long a program whose stdout closed gets to exit before it is
/// killed; and how long the last of its stderr gets to reach the log.
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// A running program and its pipes.
#[derive(Debug)]
pub(crate) struct Program {
    child: Child,
    pid: Option<u32>,
    /// `None` once closed, the sign for the program to exit.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: StderrLog,
    /// The last answer line read (its buffer is kept for the next).
    line: Vec<u8>,
}

/// Why a program could not be asked.
#[derive(Debug)]
pub(crate) enum Broken {
    /// Its stdin or stdout closed (it exited, most likely), or failed.
    Closed(Option<io::Error>),
    /// It wrote a line longer than [`MAX_ANSWER_LINE`].
    TooLong,
}

impl Program {
    /// Starts `command` for slot `slot`.
    ///
    /// # Errors
    /// Why the process could not be started.
    pub(crate) fn start(command: &CommandLine, slot: usize) -> io::Result<Self> {
        let mut process = command.command();
        // A process group of its own: Ctrl-C at a terminal reaches the
        // worker alone, which drains, and then closes the program's stdin;
        // the program is not interrupted with a task in hand.
        #[cfg(unix)]
        process.process_group(0);
        let mut child = process.spawn()?;
        let pid = child.id();
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(io::Error::other("the program's pipes were not set up"));
        };
        tracing::info!(
            slot,
            pid,
            program = command.program(),
            "handler program started"
        );
        Ok(Self {
            child,
            pid,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            stderr: StderrLog(tokio::spawn(log_stderr(stderr, slot, pid))),
            line: Vec::new(),
        })
    }

    /// The program's process id (while it runs).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Whether the program has exited (it was not asked anything).
    pub(crate) fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Writes `line` to the program and reads one line back (without its
    /// newline).
    ///
    /// # Errors
    /// [`Broken`] when a pipe closed or the answer is too long.
    pub(crate) async fn ask(&mut self, line: &[u8]) -> Result<&[u8], Broken> {
        let stdin = self.stdin.as_mut().ok_or(Broken::Closed(None))?;
        stdin
            .write_all(line)
            .await
            .map_err(|e| Broken::Closed(Some(e)))?;
        if self.line.capacity() > KEPT_BUFFER {
            self.line = Vec::new();
        }
        self.line.clear();
        (&mut self.stdout)
            .take(MAX_ANSWER_LINE as u64 + 1)
            .read_until(b'\n', &mut self.line)
            .await
            .map_err(|e| Broken::Closed(Some(e)))?;
        match self.line.last() {
            Some(b'\n') => {
                self.line.pop();
                Ok(&self.line)
            }
            _ if self.line.len() > MAX_ANSWER_LINE => Err(Broken::TooLong),
            // The end of stdout, perhaps after part of a line.
            _ => Err(Broken::Closed(None)),
        }
    }

    /// Ends a program whose pipe closed: waits a moment for it to exit
    /// (then kills it) and for the last of its stderr to reach the log.
    /// Returns how it ended, for messages.
    pub(crate) async fn end(mut self) -> String {
        self.stdin = None;
        let ended = match tokio::time::timeout(EXIT_WAIT, self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(error)) => format!("exit status unknown: {error}"),
            Err(_) => {
                let _ = self.child.kill().await;
                "its stdout closed, so it was killed".into()
            }
        };
        self.stderr.finish(EXIT_WAIT).await;
        ended
    }

    /// Kills the program (it broke the protocol or ran out of time), and
    /// lets the last of its stderr reach the log.
    pub(crate) async fn kill(mut self) {
        let _ = self.child.kill().await;
        self.stderr.finish(EXIT_WAIT).await;
    }

    /// Closes the program's stdin: the sign that no more tasks come.
    pub(crate) fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits until `until` for the program to exit, and kills it then.
    /// True when it exited by itself.
    pub(crate) async fn exit_by(mut self, until: Instant) -> bool {
        let exited = tokio::time::timeout_at(until, self.child.wait())
            .await
            .is_ok();
        if !exited {
            let _ = self.child.kill().await;
        }
        self.stderr.finish(EXIT_WAIT).await;
        exited
    }
}

/// The task that sends a program's stderr to the log; stopped when
/// dropped.
#[derive(Debug)]
struct StderrLog(JoinHandle<()>);

impl StderrLog {
    /// Waits up to `wait` for the rest of the program's stderr (it ends
    /// when the program and everything it started have closed it).
    async fn finish(&mut self, wait: Duration) {
        let _ = tokio::time::timeout(wait, &mut self.0).await;
    }
}

impl Drop for StderrLog {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Logs each line of a program's stderr, with its slot and pid, until
/// stderr closes.
async fn log_stderr(stderr: ChildStderr, slot: usize, pid: Option<u32>) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(STDERR_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                tracing::info!(slot, pid, "{}", text.trim_end());
            }
        }
    }
}
