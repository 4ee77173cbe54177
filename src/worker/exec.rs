//! Runs a program per task: the payload on its stdin, its stdout as the
//! output. The program is spawned directly, never through a shell, so
//! nothing in a task can change what runs.

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::pb;
use crate::worker::handler::{HandlerResult, TaskFailure};

/// How much of a failed program's stderr goes into the failure message.
const STDERR_TAIL: usize = 2048;

/// A program to run for each task.
#[derive(Clone, Debug)]
pub struct ExecHandler {
    program: String,
    args: Vec<String>,
    timeout: Option<Duration>,
}

/// Why a command line cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The words do not split as a shell would split them.
    #[error("cannot split {0:?} into words (unbalanced quotes?)")]
    Split(String),
    /// No program given.
    #[error("no program given: pass --exec 'PROGRAM ARGS...' or -- PROGRAM ARGS...")]
    Empty,
}

impl ExecHandler {
    /// A handler for a command line split into words as a shell would
    /// split it (quotes, escapes), but never run through a shell.
    ///
    /// # Errors
    /// [`ExecError`] for unbalanced quotes or an empty command.
    pub fn from_command_line(line: &str, timeout: Option<Duration>) -> Result<Self, ExecError> {
        let words = shlex::split(line).ok_or_else(|| ExecError::Split(line.into()))?;
        Self::from_words(words, timeout)
    }

    /// A handler for a program and its arguments.
    ///
    /// # Errors
    /// [`ExecError::Empty`] when `words` is empty.
    pub fn from_words(words: Vec<String>, timeout: Option<Duration>) -> Result<Self, ExecError> {
        let mut words = words.into_iter();
        let program = words.next().ok_or(ExecError::Empty)?;
        Ok(Self {
            program,
            args: words.collect(),
            timeout,
        })
    }

    /// The program that runs.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// Runs the program for `task`.
    ///
    /// The environment gets `TASKQ_TASK_ID`, `TASKQ_ATTEMPT`,
    /// `TASKQ_MAX_ATTEMPTS`, `TASKQ_QUEUE`, `TASKQ_EXPIRES_AT` (RFC 3339,
    /// when the task has a ttl) and `TASKQ_HEADER_<NAME>` per header (name
    /// upper-cased, other characters than letters and digits as `_`).
    ///
    /// # Errors
    /// A failure (retryable) for a non-zero exit, with the tail of stderr; a
    /// timeout or the task's expiry kills the program and fails the task.
    pub async fn run(&self, task: pb::Task) -> HandlerResult {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env("TASKQ_TASK_ID", &task.id)
            .env("TASKQ_ATTEMPT", task.attempt.to_string())
            .env("TASKQ_MAX_ATTEMPTS", task.max_attempts.to_string())
            .env("TASKQ_QUEUE", &task.queue);
        let expires_at = task.expires_at.and_then(|t| SystemTime::try_from(t).ok());
        if let Some(at) = expires_at {
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
            .map_err(|e| TaskFailure::retryable(format!("cannot start {}: {e}", self.program)))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let payload = task.payload.clone();
        // Written alongside the reads: a program that answers before it
        // has read all its input must not deadlock against us.
        let feeder = tokio::spawn(async move {
            // A program that exits without reading its input is not an error.
            let _ = stdin.write_all(&payload).await;
        });

        let until_expiry = expires_at.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        let (limit, why) = match (self.timeout, until_expiry) {
            (Some(t), Some(e)) if e < t => (Some(e), "the task expired"),
            (Some(t), _) => (Some(t), "timed out"),
            (None, Some(e)) => (Some(e), "the task expired"),
            (None, None) => (None, ""),
        };
        let output = child.wait_with_output();
        let output = match limit {
            Some(limit) => match tokio::time::timeout(limit, output).await {
                Ok(output) => output,
                Err(_) => {
                    feeder.abort();
                    // Dropping the child's future killed it (kill_on_drop).
                    let message = format!(
                        "{why} after {}: {} was killed",
                        humantime::format_duration(limit),
                        self.program
                    );
                    return Err(TaskFailure {
                        message,
                        retry: why == "timed out",
                    });
                }
            },
            None => output.await,
        };
        feeder.abort();
        let output = output
            .map_err(|e| TaskFailure::retryable(format!("{} failed to run: {e}", self.program)))?;
        if output.status.success() {
            return Ok(Bytes::from(output.stdout));
        }
        let tail_start = output.stderr.len().saturating_sub(STDERR_TAIL);
        let tail = String::from_utf8_lossy(&output.stderr[tail_start..]);
        Err(TaskFailure::retryable(format!(
            "{} exited with {}: {}",
            self.program,
            output.status,
            tail.trim()
        )))
    }
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

    #[test]
    fn command_lines_split_like_a_shell_without_one() {
        let handler = ExecHandler::from_command_line(r#"python3 -c "print(1)""#, None).unwrap();
        assert_eq!(handler.program(), "python3");
        assert_eq!(handler.args, ["-c", "print(1)"]);
        assert!(ExecHandler::from_command_line("echo 'open", None).is_err());
        assert!(ExecHandler::from_command_line("  ", None).is_err());
    }
}
