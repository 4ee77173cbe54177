//! Value parsers for the command line: durations (`30s`, `1h 30m`), sizes
//! (`4MiB`, `512KB`) and counts, each with an error message clap shows
//! next to the flag. Shared by the server's flags and the subcommands'.

use std::time::Duration;

/// Parses a duration like `30s`, `1h 30m` or `250ms`.
///
/// # Errors
/// A message clap shows next to the flag.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write durations like 30s, 5m, 1h or 250ms"))
}

/// Parses a duration longer than zero.
///
/// # Errors
/// As [`parse_duration`], and for a zero duration.
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

/// Parses a whole number of at least 1; `_` may group digits (`100_000`).
///
/// # Errors
/// A message clap shows next to the flag.
pub fn positive_count(text: &str) -> Result<usize, String> {
    match text.trim().replace('_', "").parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}: write a whole number like 100000")),
    }
}

/// Parses a size like `4MiB`, `512KB`, `1048576` or `1 GiB`: decimal
/// (`KB`, `MB`, `GB`) and binary (`KiB`, `MiB`, `GiB`) units, any case.
///
/// # Errors
/// A message clap shows next to the flag.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: write sizes like 4MiB, 512KB or 1048576"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?}: use B, KB, KiB, MB, MiB, GB or GiB"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(parse_size("4MiB"), Ok(4 * 1024 * 1024));
        assert_eq!(parse_size("512KB"), Ok(512_000));
        assert_eq!(parse_size("1 gib"), Ok(1 << 30));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
