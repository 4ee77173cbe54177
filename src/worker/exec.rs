//! Runs a program per task: the payload on its stdin, its stdout as the
//! output. The program is spawned directly, never through a shell, so
//! nothing in a task can change what runs.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::pb;
use crate::worker::command::{CommandLine, CommandLineError};
use crate::worker::deadline::{self, Deadline};
use crate::worker::handler::{HandlerResult, TaskFailure};

/// How much of a failed program's stderr goes into the failure message.
const STDERR_TAIL: usize = 2048;

/// The exit code by which a program asks for its task to be retried later
/// (`EX_TEMPFAIL` in BSD's `sysexits.h`, "temporary failure; the user is
/// invited to retry"). A wait it prints on stdout (`30s`, `1m 30s`, or a
/// number of seconds) is the exact wait before the retry; without one the
/// server's backoff applies.
pub const EXIT_RETRY_LATER: i32 = 75;

/// A program to run for each task.
#[derive(Clone, Debug)]
pub struct ExecHandler {
    command: CommandLine,
    timeout: Option<Duration>,
}

impl ExecHandler {
    /// A handler that runs `command` for each task, killed after
    /// `timeout` if one is given.
    pub fn new(command: CommandLine, timeout: Option<Duration>) -> Self {
        Self { command, timeout }
    }

    /// A handler for a command line split into words as a shell would
    /// split it (quotes, escapes), but never run through a shell.
    ///
    /// # Errors
    /// [`CommandLineError`] for unbalanced quotes or an empty command.
    pub fn from_command_line(
        line: &str,
        timeout: Option<Duration>,
    ) -> Result<Self, CommandLineError> {
        Ok(Self::new(CommandLine::parse(line)?, timeout))
    }

    /// A handler for a program and its arguments.
    ///
    /// # Errors
    /// [`CommandLineError::Empty`] when `words` is empty.
    pub fn from_words(
        words: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<Self, CommandLineError> {
        Ok(Self::new(CommandLine::from_words(words)?, timeout))
    }

    /// The program that runs.
    pub fn program(&self) -> &str {
        self.command.program()
    }

    /// Runs the program for `task`.
    ///
    /// The environment gets `TASKQ_TASK_ID`, `TASKQ_ATTEMPT`,
    /// `TASKQ_MAX_ATTEMPTS`, `TASKQ_QUEUE`, `TASKQ_EXPIRES_AT` (RFC 3339,
    /// when the task has a ttl) and `TASKQ_HEADER_<NAME>` per header (name
    /// upper-cased, other characters than letters and digits as `_`).
    ///
    /// # Errors
    /// A failure (retryable) for a non-zero exit, with the tail of stderr;
    /// for [`EXIT_RETRY_LATER`], with the wait the program printed, if any.
    /// A timeout or the task's expiry kills the program and fails the task.
    pub async fn run(&self, task: pb::Task) -> HandlerResult {
        let program = self.program();
        let mut command = self.command.command();
        command
            .env("TASKQ_TASK_ID", &task.id)
            .env("TASKQ_ATTEMPT", task.attempt.to_string())
            .env("TASKQ_MAX_ATTEMPTS", task.max_attempts.to_string())
            .env("TASKQ_QUEUE", &task.queue);
        if let Some(at) = task.expires_at.and_then(|t| SystemTime::try_from(t).ok()) {
            command.env(
                "TASKQ_EXPIRES_AT",
                humantime::format_rfc3339_millis(at).to_string(),
            );
        }
        for (name, value) in &task.headers {
            command.env(format!("TASKQ_HEADER_{}", env_name(name)), value);
        }
        let mut child = command
            .spawn()
            .map_err(|e| TaskFailure::retryable(format!("cannot start {program}: {e}")))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let payload = task.payload.clone();
        // Written alongside the reads: a program that answers before it
        // has read all its input must not deadlock against us.
        let feeder = tokio::spawn(async move {
            // A program that exits without reading its input is not an error.
            let _ = stdin.write_all(&payload).await;
        });
        let deadline = Deadline::of(&task, self.timeout);
        let output = match deadline::within(deadline, child.wait_with_output()).await {
            Ok(output) => output,
            Err(passed) => {
                feeder.abort();
                // Dropping the child's future killed it (kill_on_drop).
                return Err(passed.failure(program));
            }
        };
        feeder.abort();
        let output =
            output.map_err(|e| TaskFailure::retryable(format!("{program} failed to run: {e}")))?;
        if output.status.success() {
            return Ok(Bytes::from(output.stdout));
        }
        let tail_start = output.stderr.len().saturating_sub(STDERR_TAIL);
        let tail = String::from_utf8_lossy(&output.stderr[tail_start..]);
        if output.status.code() == Some(EXIT_RETRY_LATER) {
            let retry_after = wait_printed(&output.stdout);
            let wait = retry_after.map_or_else(
                || "the server's backoff".to_owned(),
                |after| humantime::format_duration(after).to_string(),
            );
            return Err(TaskFailure {
                message: format!(
                    "{program} asked to retry later (exit {EXIT_RETRY_LATER}), after {wait}: {}",
                    tail.trim()
                ),
                retry: true,
                retry_after,
            });
        }
        Err(TaskFailure::retryable(format!(
            "{program} exited with {}: {}",
            output.status,
            tail.trim()
        )))
    }
}

/// The wait a program that asked to retry later printed: a humantime
/// duration or a number of seconds, alone on its output. Anything else is
/// no wait (the server's backoff applies).
fn wait_printed(stdout: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(stdout).ok()?.trim();
    let wait = match text.parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs).ok()?,
        Err(_) => humantime::parse_duration(text).ok()?,
    };
    // The server's limit for a retry's wait is a year.
    (wait <= Duration::from_secs(366 * 24 * 3600)).then_some(wait)
}

/// A header name as an environment variable suffix.
fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(payload: &[u8]) -> pb::Task {
        pb::Task {
            id: "t1".into(),
            queue: "q".into(),
            payload: Bytes::copy_from_slice(payload),
            attempt: 2,
            max_attempts: 3,
            headers: [("trace-id".to_string(), "abc".to_string())].into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_payload_reaches_the_program_byte_for_byte() {
        let handler = ExecHandler::from_command_line("cat", None).unwrap();
        let payload = b"$(rm -rf /); `id` | & ; \"' \\ \n\x00\xff end";
        assert_eq!(&handler.run(task(payload)).await.unwrap()[..], &payload[..]);
    }

    #[tokio::test]
    async fn the_task_reaches_the_environment() {
        let line = r#"sh -c 'printf "%s %s %s %s" "$TASKQ_TASK_ID" "$TASKQ_ATTEMPT" "$TASKQ_QUEUE" "$TASKQ_HEADER_TRACE_ID"'"#;
        let handler = ExecHandler::from_command_line(line, None).unwrap();
        assert_eq!(&handler.run(task(b"")).await.unwrap()[..], b"t1 2 q abc");
    }

    #[tokio::test]
    async fn a_failing_program_reports_its_stderr() {
        let handler =
            ExecHandler::from_command_line("sh -c 'echo doomed >&2; exit 3'", None).unwrap();
        let failure = handler.run(task(b"")).await.unwrap_err();
        assert!(failure.retry);
        assert!(
            failure.message.contains("doomed") && failure.message.contains('3'),
            "{}",
            failure.message
        );
    }

    #[tokio::test]
    async fn exit_75_asks_for_a_retry_after_the_wait_printed() {
        let handler = ExecHandler::from_command_line("sh -c 'echo 1m 30s; exit 75'", None).unwrap();
        let failure = handler.run(task(b"")).await.unwrap_err();
        assert!(failure.retry);
        assert_eq!(failure.retry_after, Some(Duration::from_secs(90)));
        // Without a wait printed, the server's backoff decides.
        let handler = ExecHandler::from_command_line("sh -c 'exit 75'", None).unwrap();
        let failure = handler.run(task(b"")).await.unwrap_err();
        assert!(
            failure.retry && failure.retry_after.is_none(),
            "{failure:?}"
        );
        assert!(
            failure.message.contains("retry later"),
            "{}",
            failure.message
        );
        // Any other failing exit leaves the wait to the server too.
        let handler = ExecHandler::from_command_line("sh -c 'echo 5; exit 1'", None).unwrap();
        assert_eq!(handler.run(task(b"")).await.unwrap_err().retry_after, None);
    }

    #[test]
    fn a_printed_wait_is_seconds_or_a_duration() {
        assert_eq!(wait_printed(b"2.5\n"), Some(Duration::from_millis(2500)));
        assert_eq!(wait_printed(b"10m"), Some(Duration::from_secs(600)));
        assert_eq!(wait_printed(b"soon"), None);
        assert_eq!(wait_printed(b"-3"), None);
        assert_eq!(wait_printed(b"400d"), None);
    }

    #[tokio::test]
    async fn a_slow_program_is_killed_at_the_timeout() {
        let handler =
            ExecHandler::from_command_line("sleep 30", Some(Duration::from_millis(100))).unwrap();
        let failure = handler.run(task(b"")).await.unwrap_err();
        assert!(failure.message.contains("timed out"), "{}", failure.message);
    }

    #[tokio::test]
    async fn a_program_still_running_at_the_tasks_expiry_is_stopped() {
        let handler = ExecHandler::from_command_line("sleep 30", None).unwrap();
        let expires = SystemTime::now() + Duration::from_millis(150);
        let task = pb::Task {
            expires_at: Some(prost_types::Timestamp::from(expires)),
            ..task(b"")
        };
        let failure = handler.run(task).await.unwrap_err();
        assert!(failure.message.contains("expired"), "{}", failure.message);
        assert!(
            !failure.retry,
            "an expired task is not worth another attempt"
        );
    }
}
