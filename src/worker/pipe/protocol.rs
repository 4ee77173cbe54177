//! The line protocol between the worker and a long-lived program, as
//! bytes: a task written as one JSON line, an answer read back from one.
//! What the lines hold is documented in the `pipe` module.

use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Map, Value};

use crate::pb;
use crate::worker::handler::{HandlerResult, TaskFailure};

/// A task as the line its program reads, newline included.
pub(crate) fn task_line(task: &pb::Task) -> Vec<u8> {
    let mut fields = Map::new();
    fields.insert("id".into(), task.id.as_str().into());
    fields.insert("queue".into(), task.queue.as_str().into());
    fields.insert("attempt".into(), task.attempt.into());
    fields.insert("max_attempts".into(), task.max_attempts.into());
    match std::str::from_utf8(&task.payload) {
        Ok(text) => fields.insert("payload".into(), text.into()),
        Err(_) => fields.insert("payload_base64".into(), BASE64.encode(&task.payload).into()),
    };
    if !task.headers.is_empty() {
        let headers = task
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), Value::from(value.as_str())))
            .collect();
        fields.insert("headers".into(), Value::Object(headers));
    }
    if let Some(at) = task.expires_at.and_then(|t| SystemTime::try_from(t).ok()) {
        let at = humantime::format_rfc3339_millis(at).to_string();
        fields.insert("expires_at".into(), at.into());
    }
    // JSON escapes every control character in strings, so the only
    // newline is the one that ends the line.
    let mut line = Value::Object(fields).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// A program's answer for one task.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The task it answers.
    pub(crate) id: String,
    /// Its output, or its failure.
    pub(crate) result: HandlerResult,
}

/// Why a line is not an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AnswerError {
    /// Not JSON at all.
    #[error("not JSON ({0})")]
    NotJson(#[source] serde_json::Error),
    /// JSON, but not an object.
    #[error("not a JSON object")]
    NotAnObject,
    /// No `id`, or one that is not a string.
    #[error("no \"id\" string")]
    NoId,
    /// A field that must be a string is something else.
    #[error("\"{0}\" is not a string")]
    NotAString(&'static str),
    /// `retry` is not a boolean.
    #[error("\"retry\" is not true or false")]
    RetryNotABool,
    /// `retry_after` is not a number of seconds from 0 to a year.
    #[error("\"retry_after\" is not a number of seconds from 0 to 31622400")]
    BadRetryAfter,
    /// None of `output`, `output_base64`, `error`.
    #[error("none of \"output\", \"output_base64\" or \"error\"")]
    NoOutcome,
    /// More than one of them.
    #[error("more than one of \"output\", \"output_base64\" and \"error\"")]
    TwoOutcomes,
    /// `output_base64` does not decode.
    #[error("\"output_base64\" is not base64 ({0})")]
    NotBase64(#[source] base64::DecodeError),
}

/// Reads one answer line (without its newline).
///
/// # Errors
/// [`AnswerError`] saying what about the line is wrong.
pub(crate) fn parse_answer(line: &[u8]) -> Result<Answer, AnswerError> {
    let value: Value = serde_json::from_slice(line).map_err(AnswerError::NotJson)?;
    let Value::Object(mut fields) = value else {
        return Err(AnswerError::NotAnObject);
    };
    let Some(Value::String(id)) = fields.remove("id") else {
        return Err(AnswerError::NoId);
    };
    let output = text(&mut fields, "output")?;
    let output_base64 = text(&mut fields, "output_base64")?;
    let error = text(&mut fields, "error")?;
    let retry = match fields.remove("retry") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(retry)) => retry,
        Some(_) => return Err(AnswerError::RetryNotABool),
    };
    let retry_after = match fields.remove("retry_after") {
        None | Some(Value::Null) => None,
        Some(Value::Number(secs)) => Some(
            secs.as_f64()
                .filter(|s| (0.0..=31_622_400.0).contains(s))
                .map(std::time::Duration::from_secs_f64)
                .ok_or(AnswerError::BadRetryAfter)?,
        ),
        Some(_) => return Err(AnswerError::BadRetryAfter),
    };
    let result = match (output, output_base64, error) {
        (Some(text), None, None) => Ok(Bytes::from(text)),
        (None, Some(encoded), None) => Ok(Bytes::from(
            BASE64.decode(encoded).map_err(AnswerError::NotBase64)?,
        )),
        (None, None, Some(message)) => Err(TaskFailure {
            message,
            retry,
            retry_after,
        }),
        (None, None, None) => return Err(AnswerError::NoOutcome),
        _ => return Err(AnswerError::TwoOutcomes),
    };
    Ok(Answer { id, result })
}

/// A string field taken out of `fields`; absent or `null` is `None`.
fn text(
    fields: &mut Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, AnswerError> {
    match fields.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(AnswerError::NotAString(name)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn read(line: &[u8]) -> Value {
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line");
        serde_json::from_slice(line).unwrap()
    }

    #[test]
    fn a_text_payload_goes_as_text() {
        let task = pb::Task {
            id: "t1".into(),
            queue: "q".into(),
            payload: Bytes::from_static("line one\nline \"two\" é".as_bytes()),
            attempt: 2,
            max_attempts: 3,
            ..Default::default()
        };
        let line = read(&task_line(&task));
        assert_eq!(
            line,
            serde_json::json!({
                "id": "t1", "queue": "q", "attempt": 2, "max_attempts": 3,
                "payload": "line one\nline \"two\" é",
            })
        );
    }

    #[test]
    fn a_binary_payload_goes_as_base64_with_headers_and_expiry() {
        let expires = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let task = pb::Task {
            id: "t2".into(),
            payload: Bytes::from_static(b"\x00\xff\xfe"),
            headers: [("trace-id".to_string(), "abc".to_string())].into(),
            expires_at: Some(expires.into()),
            ..Default::default()
        };
        let line = read(&task_line(&task));
        assert_eq!(line["payload_base64"], "AP/+");
        assert!(line.get("payload").is_none());
        assert_eq!(line["headers"], serde_json::json!({"trace-id": "abc"}));
        assert_eq!(line["expires_at"], "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn answers_carry_an_output_or_a_failure() {
        let answer = |line: &str| parse_answer(line.as_bytes()).unwrap();
        assert_eq!(
            answer(r#"{"id": "t1", "output": "49"}"#),
            Answer {
                id: "t1".into(),
                result: Ok(Bytes::from_static(b"49")),
            }
        );
        assert_eq!(
            answer(r#"{"id": "t1", "output_base64": "AP/+", "error": null}"#).result,
            Ok(Bytes::from_static(b"\x00\xff\xfe"))
        );
        assert_eq!(
            answer(r#"{"id": "t1", "error": "bad input", "retry": false}"#).result,
            Err(TaskFailure::fatal("bad input"))
        );
        assert_eq!(
            answer("{\"id\": \"t1\", \"error\": \"flaky\", \"extra\": 1}\r").result,
            Err(TaskFailure::retryable("flaky")),
            "retry by default; unknown fields and a carriage return are ignored"
        );
        assert_eq!(
            answer(r#"{"id": "t1", "error": "busy", "retry_after": 2.5}"#).result,
            Err(TaskFailure {
                retry_after: Some(std::time::Duration::from_millis(2500)),
                ..TaskFailure::retryable("busy")
            })
        );
    }

    #[test]
    fn lines_that_are_not_answers_say_why() {
        let why = |line: &str| parse_answer(line.as_bytes()).unwrap_err().to_string();
        assert!(why("49").contains("not a JSON object"));
        assert!(why("hello").contains("not JSON"));
        assert!(why(r#"{"output": "49"}"#).contains("\"id\""));
        assert!(why(r#"{"id": 7, "output": "49"}"#).contains("\"id\""));
        assert!(why(r#"{"id": "t1"}"#).contains("none of"));
        assert!(why(r#"{"id": "t1", "output": "a", "error": "b"}"#).contains("more than one"));
        assert!(why(r#"{"id": "t1", "output": 49}"#).contains("\"output\" is not a string"));
        assert!(why(r#"{"id": "t1", "error": "e", "retry": "yes"}"#).contains("retry"));
        assert!(why(r#"{"id": "t1", "output_base64": "!!"}"#).contains("base64"));
        assert!(why(r#"{"id": "t1", "error": "e", "retry_after": -1}"#).contains("retry_after"));
        assert!(why(r#"{"id": "t1", "error": "e", "retry_after": "1s"}"#).contains("retry_after"));
    }
}
