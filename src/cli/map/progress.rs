//! `taskq map`'s progress line on stderr, only when stderr is a terminal:
//! done (of the total, once known), failed, the rate, and the time left.
//!
//! Drawn by hand, one line rewritten after a carriage return, by the
//! caller at most 10 times a second: a progress crate (indicatif) would
//! bring its own terminal layer and draw thread for what is one `format!`
//! here. The line is cut to the terminal's width so that it never wraps,
//! and cleared before any other line goes to stderr.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// The figures the line shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Inputs that succeeded.
    pub(crate) done: u64,
    /// Inputs that failed.
    pub(crate) failed: u64,
    /// All the inputs, once known.
    pub(crate) total: Option<u64>,
}

/// The progress line.
#[derive(Debug)]
pub(crate) struct Progress {
    started: Instant,
    /// Whether a line is on the screen (to be cleared).
    shown: bool,
}

/// Width of the bar between brackets.
const BAR: u64 = 20;

/// Width assumed when the terminal does not say.
const DEFAULT_COLUMNS: usize = 80;

impl Progress {
    /// A progress line when stderr is a terminal; `None` otherwise (never
    /// into a file or a pipe).
    pub(crate) fn on_terminal() -> Option<Self> {
        std::io::stderr().is_terminal().then(|| Self {
            started: Instant::now(),
            shown: false,
        })
    }

    /// Draws the line again with `counts`.
    pub(crate) fn draw(&mut self, counts: Counts) {
        // The controlling terminal's width (a pty may not say: 0).
        let columns = ratatui::crossterm::terminal::size()
            .map(|(columns, _)| usize::from(columns))
            .ok()
            .filter(|columns| *columns > 0)
            .unwrap_or(DEFAULT_COLUMNS);
        let text = line(counts, self.started.elapsed(), columns);
        let mut stderr = std::io::stderr().lock();
        // A terminal that cannot be written to has no one to show it to.
        let _ = write!(stderr, "\r{text}\x1b[K");
        let _ = stderr.flush();
        self.shown = true;
    }

    /// Takes the line off the screen, before another line goes to stderr
    /// (the next [`Progress::draw`] puts it back).
    pub(crate) fn clear(&mut self) {
        if std::mem::take(&mut self.shown) {
            let mut stderr = std::io::stderr().lock();
            let _ = write!(stderr, "\r\x1b[K");
            let _ = stderr.flush();
        }
    }
}

/// The line for `counts` after `elapsed`, at most `columns - 1` wide:
/// `[#####...] 4120/10000 done  3 failed  812/s  7s left`, or without a
/// total yet `4120 done  3 failed  812/s`.
fn line(counts: Counts, elapsed: Duration, columns: usize) -> String {
    let finished = counts.done + counts.failed;
    let rate = match elapsed.as_secs_f64() {
        secs if secs >= 0.5 => Some(finished as f64 / secs),
        _ => None,
    };
    let mut text = match counts.total {
        Some(total) => {
            let filled = (finished.min(total) * BAR)
                .checked_div(total)
                .unwrap_or(BAR);
            let bar: String = (0..BAR)
                .map(|i| if i < filled { '#' } else { '.' })
                .collect();
            format!("[{bar}] {}/{total} done", counts.done)
        }
        None => format!("{} done", counts.done),
    };
    text += &format!("  {} failed", counts.failed);
    match rate {
        Some(rate) => text += &format!("  {rate:.0}/s"),
        None => text += "  -/s",
    }
    let left = counts.total.map(|total| total.saturating_sub(finished));
    if let (Some(left), Some(rate)) = (left, rate.filter(|r| *r > 0.0)) {
        text += &format!("  {} left", short_duration(left as f64 / rate));
    }
    text.truncate(columns.saturating_sub(1));
    text
}

/// `7s`, `4m05s`, `2h10m`.
fn short_duration(secs: f64) -> String {
    let secs = secs.ceil() as u64;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_done_failed_rate_and_time_left() {
        let counts = Counts {
            done: 4_000,
            failed: 1_000,
            total: Some(10_000),
        };
        assert_eq!(
            line(counts, Duration::from_secs(10), 100),
            "[##########..........] 4000/10000 done  1000 failed  500/s  10s left"
        );
        let unknown = Counts {
            total: None,
            ..counts
        };
        assert_eq!(
            line(unknown, Duration::from_secs(10), 100),
            "4000 done  1000 failed  500/s"
        );
        assert_eq!(
            line(Counts::default(), Duration::ZERO, 100),
            "0 done  0 failed  -/s"
        );
        let all = Counts {
            done: 0,
            failed: 0,
            total: Some(0),
        };
        assert!(line(all, Duration::from_secs(1), 100).starts_with("[####################] 0/0"));
    }

    #[test]
    fn the_line_never_wraps() {
        let counts = Counts {
            done: 1,
            failed: 0,
            total: Some(3),
        };
        assert_eq!(line(counts, Duration::from_secs(1), 10), "[######..");
        assert_eq!(line(counts, Duration::from_secs(1), 0), "");
    }

    #[test]
    fn time_left_reads_short() {
        assert_eq!(short_duration(6.2), "7s");
        assert_eq!(short_duration(245.0), "4m05s");
        assert_eq!(short_duration(7_800.0), "2h10m");
    }
}
