//! How long a blocking call may wait: until a little before the caller's
//! gRPC deadline, so that the empty answer reaches the caller in time.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// The caller's deadline from the `grpc-timeout` header, if it sent one.
///
/// The header is 1 to 8 digits and a unit: `H`ours, `M`inutes, `S`econds,
/// `m`illis, `u`micros or `n`anos. A malformed header counts as none.
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// How long before the deadline to stop waiting and answer: a tenth of the
/// time given, at most 200 ms. Enough for the answer to cross a network;
/// small enough that short deadlines still get most of their wait.
pub fn answer_margin(timeout: Duration) -> Duration {
    (timeout / 10).min(Duration::from_millis(200))
}

/// The wait for a call: until the margin before its deadline, or
/// `max_wait` when it has none.
pub fn wait_for(metadata: &MetadataMap, max_wait: Duration) -> Duration {
    match grpc_timeout(metadata) {
        Some(timeout) => timeout - answer_margin(timeout),
        None => max_wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        metadata
    }

    #[test]
    fn parses_every_unit() {
        let cases = [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("99999999u", Duration::from_micros(99_999_999)),
            ("10n", Duration::from_nanos(10)),
        ];
        for (header, expected) in cases {
            assert_eq!(
                grpc_timeout(&with_timeout(header)),
                Some(expected),
                "{header}"
            );
        }
    }

    #[test]
    fn malformed_headers_count_as_none() {
        for header in ["", "S", "5", "123456789S", "5s", "-5S", "5 S"] {
            assert_eq!(grpc_timeout(&with_timeout(header)), None, "{header:?}");
        }
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }

    #[test]
    fn waits_end_before_the_deadline() {
        let max = Duration::from_secs(20);
        assert_eq!(wait_for(&MetadataMap::new(), max), max);
        assert_eq!(
            wait_for(&with_timeout("1S"), max),
            Duration::from_millis(900)
        );
        assert_eq!(
            wait_for(&with_timeout("60S"), max),
            Duration::from_millis(59_800)
        );
        assert_eq!(wait_for(&with_timeout("0m"), max), Duration::ZERO);
    }
}
