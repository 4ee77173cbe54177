//! A program and its arguments, as a worker runs them: split into words
//! as a shell would split them, but never run through a shell, so nothing
//! in a task can change what runs. Both ways of running a program use it:
//! one process per task (`exec`) and long-lived programs (`pipe`).

use std::process::Stdio;

use tokio::process::Command;

/// A program and its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandLine {
    program: String,
    args: Vec<String>,
}

/// Why a command line cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CommandLineError {
    /// The words do not split as a shell would split them.
    #[error("cannot split {0:?} into words (unbalanced quotes?)")]
    Split(String),
    /// No program given.
    #[error("no program given: pass --exec 'PROGRAM ARGS...' or -- PROGRAM ARGS...")]
    Empty,
}

impl CommandLine {
    /// A command line split into words as a shell would split it (quotes,
    /// escapes).
    ///
    /// # Errors
    /// [`CommandLineError`] for unbalanced quotes or no words at all.
    pub fn parse(line: &str) -> Result<Self, CommandLineError> {
        let words = shlex::split(line).ok_or_else(|| CommandLineError::Split(line.into()))?;
        Self::from_words(words)
    }

    /// A program and its arguments, already in words.
    ///
    /// # Errors
    /// [`CommandLineError::Empty`] when `words` is empty.
    pub fn from_words(words: Vec<String>) -> Result<Self, CommandLineError> {
        let mut words = words.into_iter();
        let program = words.next().ok_or(CommandLineError::Empty)?;
        Ok(Self {
            program,
            args: words.collect(),
        })
    }

    /// The program that runs.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// Its arguments.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The process to start: stdin, stdout and stderr piped to the worker,
    /// killed if the worker lets go of it.
    pub(crate) fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_split_like_a_shell_without_one() {
        let line = CommandLine::parse(r#"python3 -c "print(1)""#).unwrap();
        assert_eq!(line.program(), "python3");
        assert_eq!(line.args(), ["-c", "print(1)"]);
        assert!(CommandLine::parse("echo 'open").is_err());
        assert!(CommandLine::parse("  ").is_err());
        assert!(CommandLine::from_words(Vec::new()).is_err());
    }
}
