//! Handlers built into `taskq worker --builtin`.

use std::time::Duration;

use bytes::Bytes;

use crate::pb;
use crate::worker::handler::{HandlerResult, TaskFailure};

/// The seed's computation: the square of a decimal integer payload.
///
/// # Errors
/// A non-retryable failure when the payload is not an integer or the
/// square does not fit in 128 bits.
pub fn square(payload: &[u8]) -> HandlerResult {
    let text = std::str::from_utf8(payload)
        .map_err(|_| TaskFailure::fatal("payload is not UTF-8 text"))?
        .trim();
    let n: i128 = text
        .parse()
        .map_err(|_| TaskFailure::fatal(format!("payload {text:?} is not a decimal integer")))?;
    let square = n
        .checked_mul(n)
        .ok_or_else(|| TaskFailure::fatal(format!("{n} squared does not fit in 128 bits")))?;
    Ok(Bytes::from(square.to_string()))
}

/// Returns the payload unchanged.
pub fn echo(task: &pb::Task) -> HandlerResult {
    Ok(task.payload.clone())
}

/// Sleeps for the duration in the payload (`250ms`, `2s`; a bare number is
/// milliseconds), then returns the payload.
///
/// # Errors
/// A non-retryable failure when the payload is not a duration.
pub async fn sleep(task: pb::Task) -> HandlerResult {
    let text = String::from_utf8_lossy(&task.payload).trim().to_string();
    let duration = match text.parse::<u64>() {
        Ok(ms) => Duration::from_millis(ms),
        Err(_) => humantime::parse_duration(&text)
            .map_err(|e| TaskFailure::fatal(format!("payload {text:?} is not a duration: {e}")))?,
    };
    tokio::time::sleep(duration).await;
    Ok(task.payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squares_integers_and_refuses_the_rest() {
        assert_eq!(square(b"12").unwrap(), "144");
        assert_eq!(square(b" -3\n").unwrap(), "9");
        assert!(!square(b"twelve").unwrap_err().retry);
        assert!(square(&[0xff]).is_err());
        assert!(square(i128::MAX.to_string().as_bytes()).is_err());
    }
}
