//! What `taskq map` says about each input: its outcome, the bytes on
//! stdout (the output as the worker returned it, nothing added; or one
//! JSON object per input with `--json`), and the line on stderr when it
//! failed.

use std::io::Write;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::cli::map::input::Position;
use crate::pb;

/// How an input ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Its task succeeded with this output.
    Succeeded(Bytes),
    /// Its task failed (or it was never put, or its result could not be
    /// read), with this error.
    Failed(String),
}

/// One input's outcome.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Where the input came from.
    pub(crate) position: Position,
    /// The input, kept for `--json` (not for whole files).
    pub(crate) input: Option<Bytes>,
    /// Its task, when it was put.
    pub(crate) task_id: Option<String>,
    /// How it ended.
    pub(crate) ending: Ending,
    /// Deliveries of its task (0 when never put).
    pub(crate) attempts: u32,
    /// The worker whose result it is ("" when none).
    pub(crate) worker: String,
}

impl Outcome {
    /// The outcome of an input whose task has a result.
    pub(crate) fn of_result(position: Position, input: Option<Bytes>, result: pb::Result) -> Self {
        let ending = match result.state() {
            pb::TaskState::Succeeded => Ending::Succeeded(result.output),
            pb::TaskState::Failed => Ending::Failed(result.error),
            other => Ending::Failed(format!(
                "the server answered with a result in state {}",
                other.as_str_name()
            )),
        };
        Self {
            position,
            input,
            task_id: Some(result.task_id),
            ending,
            attempts: result.attempts,
            worker: result.worker_id,
        }
    }

    /// The outcome of an input that failed without a result: not read,
    /// not put, or its result not readable.
    pub(crate) fn failed(
        position: Position,
        input: Option<Bytes>,
        task_id: Option<String>,
        error: String,
    ) -> Self {
        Self {
            position,
            input,
            task_id,
            ending: Ending::Failed(error),
            attempts: 0,
            worker: String::new(),
        }
    }

    /// Whether the input succeeded.
    pub(crate) fn succeeded(&self) -> bool {
        matches!(self.ending, Ending::Succeeded(_))
    }

    /// The line for stderr when the input failed: `taskq map: input line
    /// 17 failed after 3 attempts: <error>`.
    pub(crate) fn failure(&self) -> Option<String> {
        let Ending::Failed(error) = &self.ending else {
            return None;
        };
        let after = match self.attempts {
            0 => String::new(),
            1 => " after 1 attempt".into(),
            n => format!(" after {n} attempts"),
        };
        Some(format!(
            "taskq map: input {} failed{after}: {error}",
            self.position
        ))
    }

    /// The `--json` object: `line`, `file` (for an input from a file),
    /// `input` (or `input_base64` when not UTF-8; absent for whole files),
    /// `task_id`, `state`, `output` (or `output_base64`), `error`,
    /// `attempts`, `worker`.
    pub(crate) fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("line".into(), json!(self.position.number()));
        if let Some(file) = self.position.file() {
            object.insert("file".into(), json!(file));
        }
        if let Some(input) = &self.input {
            insert_bytes(&mut object, "input", input);
        }
        object.insert("task_id".into(), json!(self.task_id));
        let (state, error) = match &self.ending {
            Ending::Succeeded(output) => {
                insert_bytes(&mut object, "output", output);
                ("succeeded", None)
            }
            Ending::Failed(error) => {
                object.insert("output".into(), Value::Null);
                ("failed", Some(error))
            }
        };
        object.insert("state".into(), json!(state));
        object.insert("error".into(), json!(error));
        object.insert("attempts".into(), json!(self.attempts));
        object.insert("worker".into(), json!(self.worker));
        Value::Object(object)
    }
}

/// `name` as text when the bytes are UTF-8, else `name_base64`.
fn insert_bytes(object: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => object.insert(name.into(), json!(text)),
        Err(_) => object.insert(format!("{name}_base64"), json!(BASE64.encode(bytes))),
    };
}

/// Writes outcomes to stdout (or any writer): the output's bytes of each
/// input that succeeded, or with `json` one object per input and line.
#[derive(Debug)]
pub(crate) struct Printer<W: Write> {
    out: W,
    json: bool,
}

impl<W: Write> Printer<W> {
    /// A printer onto `out`.
    pub(crate) fn new(out: W, json: bool) -> Self {
        Self { out, json }
    }

    /// Writes one outcome (a failed one only with `--json`: its error goes
    /// to stderr, by the caller).
    pub(crate) fn print(&mut self, outcome: &Outcome) -> std::io::Result<()> {
        if self.json {
            serde_json::to_writer(&mut self.out, &outcome.to_json())?;
            return self.out.write_all(b"\n");
        }
        match &outcome.ending {
            Ending::Succeeded(output) => self.out.write_all(output),
            Ending::Failed(_) => Ok(()),
        }
    }

    /// Sends what was written on its way.
    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// The writer, for tests.
    #[cfg(test)]
    fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::map::input::{Origin, Split};

    fn line(n: u64) -> Position {
        test_position(Origin::Stdin, Some(n), Split::Lines)
    }

    fn test_position(origin: Origin, number: Option<u64>, split: Split) -> Position {
        Position::new(origin, number, split)
    }

    fn result(state: pb::TaskState, output: &[u8], error: &str, attempts: u32) -> pb::Result {
        pb::Result {
            task_id: "t1".into(),
            state: state as i32,
            output: Bytes::copy_from_slice(output),
            error: error.into(),
            attempts,
            worker_id: "w1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn outputs_go_out_as_the_worker_returned_them() {
        let mut printer = Printer::new(Vec::new(), false);
        let ok = |n, output: &[u8]| {
            Outcome::of_result(
                line(n),
                None,
                result(pb::TaskState::Succeeded, output, "", 1),
            )
        };
        printer.print(&ok(1, b"no newline")).unwrap();
        printer.print(&ok(2, b" and one\n")).unwrap();
        printer.print(&ok(3, b"")).unwrap();
        let failed = Outcome::of_result(line(4), None, result(pb::TaskState::Failed, b"", "x", 3));
        printer.print(&failed).unwrap();
        assert_eq!(printer.into_inner(), b"no newline and one\n");
    }

    #[test]
    fn a_failure_names_the_input_and_the_attempts() {
        let failed = Outcome::of_result(
            line(17),
            None,
            result(pb::TaskState::Failed, b"", "exit status 3: boom", 3),
        );
        assert_eq!(
            failed.failure().unwrap(),
            "taskq map: input line 17 failed after 3 attempts: exit status 3: boom"
        );
        let once = Outcome::of_result(line(2), None, result(pb::TaskState::Failed, b"", "x", 1));
        assert_eq!(
            once.failure().unwrap(),
            "taskq map: input line 2 failed after 1 attempt: x"
        );
        let file = test_position(Origin::File("a.txt".into()), Some(5), Split::Lines);
        let not_put = Outcome::failed(
            file,
            None,
            None,
            "not put: INVALID_ARGUMENT: too big".into(),
        );
        assert_eq!(
            not_put.failure().unwrap(),
            "taskq map: input a.txt:5 failed: not put: INVALID_ARGUMENT: too big"
        );
        let ok = Outcome::of_result(line(1), None, result(pb::TaskState::Succeeded, b"", "", 1));
        assert_eq!(ok.failure(), None);
    }

    #[test]
    fn json_carries_the_line_the_input_and_the_result() {
        let ok = Outcome::of_result(
            line(7),
            Some(Bytes::from_static(b"seven")),
            result(pb::TaskState::Succeeded, b"49\n", "", 2),
        );
        assert_eq!(
            ok.to_json(),
            json!({"line": 7, "input": "seven", "task_id": "t1", "state": "succeeded",
                   "output": "49\n", "error": null, "attempts": 2, "worker": "w1"})
        );
        let binary = Outcome::of_result(
            test_position(Origin::File("b.bin".into()), Some(1), Split::Nul),
            Some(Bytes::from_static(b"\xff")),
            result(pb::TaskState::Succeeded, b"\x00\xfe", "", 1),
        );
        let value = binary.to_json();
        assert_eq!(value["file"], "b.bin");
        assert_eq!(value["input_base64"], "/w==");
        assert_eq!(value["output_base64"], "AP4=");
        assert!(value.get("output").is_none() && value.get("input").is_none());
        let failed = Outcome::failed(
            test_position(Origin::File("c".into()), None, Split::WholeFiles),
            None,
            None,
            "cannot read: gone".into(),
        );
        assert_eq!(
            failed.to_json(),
            json!({"line": null, "file": "c", "task_id": null, "state": "failed",
                   "output": null, "error": "cannot read: gone", "attempts": 0, "worker": ""})
        );
        let mut printer = Printer::new(Vec::new(), true);
        printer.print(&failed).unwrap();
        printer.print(&ok).unwrap();
        let text = String::from_utf8(printer.into_inner()).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
    }
}
