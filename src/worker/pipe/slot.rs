//! One concurrency slot of a pipe handler: its program, started when the
//! slot first needs it and restarted with backoff after it breaks, and the
//! exchange of one task for one answer.

use std::time::Duration;

use tokio::time::Instant;

use crate::pb;
use crate::worker::backoff::Backoff;
use crate::worker::command::CommandLine;
use crate::worker::deadline::{self, Deadline};
use crate::worker::handler::{HandlerResult, TaskFailure};
use crate::worker::pipe::program::{Broken, MAX_ANSWER_LINE, Program};
use crate::worker::pipe::protocol::{self, Answer, AnswerError};

/// How much of a line that is not an answer goes into the log.
const EXCERPT: usize = 200;

/// A slot and its program.
#[derive(Debug)]
pub(crate) struct Slot {
    index: usize,
    /// `None` before the first task, and after the program broke or was
    /// dropped with a task in hand.
    program: Option<Program>,
    backoff: Backoff,
    /// After the program broke: not restarted before this.
    restart_at: Option<Instant>,
}

/// What came back for a task, owned (the answer line is the program's
/// buffer).
enum Heard {
    Answer(Answer),
    NotAnAnswer(AnswerError, String),
    Broken(Broken),
}

impl Slot {
    /// Slot number `index`, its program not started yet.
    pub(crate) fn new(index: usize) -> Self {
        Self {
            index,
            program: None,
            backoff: Backoff::default(),
            restart_at: None,
        }
    }

    /// Runs `task` on the slot's program: writes its line, reads the
    /// answer. A program that breaks (exits, answers another task, writes
    /// something that is not an answer, runs out of time) fails the task
    /// (retryable, but for an answer too long and an expired task) and is
    /// killed; the slot's next task starts it again after a backoff.
    /// Dropping this future mid-task kills the program.
    pub(crate) async fn run(
        &mut self,
        command: &CommandLine,
        timeout: Option<Duration>,
        task: pb::Task,
    ) -> HandlerResult {
        let mut program = self.ready(command).await?;
        let slot = self.index;
        let pid = program.pid();
        let line = protocol::task_line(&task);
        let deadline = Deadline::of(&task, timeout);
        let heard = match deadline::within(deadline, program.ask(&line)).await {
            Ok(Ok(line)) => match protocol::parse_answer(line) {
                Ok(answer) => Heard::Answer(answer),
                Err(error) => Heard::NotAnAnswer(error, excerpt(line)),
            },
            Ok(Err(broken)) => Heard::Broken(broken),
            Err(passed) => {
                tracing::warn!(slot, pid, task_id = %task.id, "the program ran out of time on a task; killing it");
                program.kill().await;
                self.broke();
                return Err(passed.failure(&self.name(command)));
            }
        };
        let failure = match heard {
            Heard::Answer(answer) if answer.id == task.id => {
                self.program = Some(program);
                self.backoff.reset();
                return answer.result;
            }
            Heard::Answer(answer) => {
                tracing::error!(slot, pid, task_id = %task.id, answered = %answer.id, "the program answered for another task; restarting it");
                program.kill().await;
                TaskFailure::retryable(format!(
                    "{} answered for task {:?} instead; restarting it",
                    self.name(command),
                    answer.id
                ))
            }
            Heard::NotAnAnswer(error, line) => {
                tracing::error!(slot, pid, task_id = %task.id, %error, line, "the program wrote a line that is not an answer; restarting it");
                program.kill().await;
                TaskFailure::retryable(format!(
                    "{} wrote a line that is not an answer ({error}); restarting it",
                    self.name(command)
                ))
            }
            Heard::Broken(Broken::TooLong) => {
                tracing::error!(slot, pid, task_id = %task.id, limit = MAX_ANSWER_LINE, "the program's answer is too long; restarting it");
                program.kill().await;
                // No other attempt makes the output shorter.
                TaskFailure::fatal(format!(
                    "{} wrote an answer longer than {MAX_ANSWER_LINE} bytes",
                    self.name(command)
                ))
            }
            Heard::Broken(Broken::Closed(error)) => {
                let ended = program.end().await;
                let error = error.map(|e| e.to_string());
                tracing::error!(slot, pid, task_id = %task.id, ended, error, "the program ended with a task in hand; restarting it");
                TaskFailure::retryable(format!(
                    "{} ended with the task in hand ({ended}); restarting it",
                    self.name(command)
                ))
            }
        };
        self.broke();
        Err(failure)
    }

    /// The slot's program, started (after the backoff, if it broke) when
    /// there is none or it exited since its last task.
    async fn ready(&mut self, command: &CommandLine) -> Result<Program, TaskFailure> {
        if let Some(mut program) = self.program.take() {
            if !program.has_exited() {
                return Ok(program);
            }
            let pid = program.pid();
            let ended = program.end().await;
            tracing::warn!(
                slot = self.index,
                pid,
                ended,
                "the program exited between tasks; restarting it"
            );
            self.broke();
        }
        if let Some(at) = self.restart_at {
            tokio::time::sleep_until(at).await;
            self.restart_at = None;
        }
        Program::start(command, self.index).map_err(|error| {
            tracing::error!(slot = self.index, %error, program = command.program(), "cannot start the program");
            self.broke();
            TaskFailure::retryable(format!("cannot start {}: {error}", command.program()))
        })
    }

    /// The program broke: the next start waits for the backoff.
    fn broke(&mut self) {
        self.restart_at = Some(Instant::now() + self.backoff.next_delay());
    }

    /// The program and its slot, for messages.
    fn name(&self, command: &CommandLine) -> String {
        format!("{} (slot {})", command.program(), self.index)
    }

    /// The slot's number.
    #[cfg(test)]
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// The pid of the slot's program, if it runs one.
    #[cfg(test)]
    pub(crate) fn pid(&self) -> Option<u32> {
        self.program.as_ref().and_then(Program::pid)
    }

    /// Whether the slot's program has exited (or there is none).
    #[cfg(test)]
    pub(crate) fn program_exited(&mut self) -> bool {
        self.program.as_mut().is_none_or(Program::has_exited)
    }

    /// The slot's program, if it runs one.
    pub(crate) fn into_program(self) -> Option<Program> {
        self.program
    }
}

/// The start of a line, for the log.
fn excerpt(line: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(&line[..line.len().min(EXCERPT)]).into_owned();
    if line.len() > EXCERPT {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_cut() {
        assert_eq!(excerpt(b"short"), "short");
        let long = excerpt(&[b'x'; 1000]);
        assert_eq!(long.chars().count(), EXCERPT + 1);
        assert!(long.ends_with('…'));
    }
}
