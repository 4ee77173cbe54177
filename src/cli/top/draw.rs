//! The dashboard's picture: [`draw`] is a function of a [`Dashboard`]
//! alone (no clock, no terminal, no I/O), so tests draw it on ratatui's
//! `TestBackend` and read the cells.
//!
//! From the top: where the numbers come from; the server's health and
//! throughput; the queues; the workers; what went wrong, when something
//! did; the keys.

use std::time::Duration;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, Wrap};

use crate::cli::stats::short;
use crate::cli::top::report::{QueueLine, Report, WorkerLine};

/// Everything the dashboard shows.
#[derive(Clone, Debug, Default)]
pub struct Dashboard {
    /// Where the reports come from.
    pub source: String,
    /// Time between refreshes.
    pub interval: Duration,
    /// The last report read; `None` until the first arrives.
    pub report: Option<Report>,
    /// Why the last refresh failed, with what to do; `None` when it
    /// worked. The report above is then the last one read.
    pub problem: Option<String>,
}

/// Draws `dashboard` on the whole frame.
pub fn draw(frame: &mut Frame, dashboard: &Dashboard) {
    let area = frame.area();
    let problem_height = match &dashboard.problem {
        // The message, wrapped, and the block's two borders.
        Some(problem) => {
            let lines = wrapped_lines(problem, area.width.saturating_sub(2));
            u16::try_from(lines + 2).unwrap_or(u16::MAX).min(6)
        }
        None => 0,
    };
    let (queues, workers) = dashboard
        .report
        .as_ref()
        .map_or((0, 0), |r| (r.queues.len(), r.workers.len()));
    // Title, summary (two lines), help and the problem are fixed; the
    // tables share the rest, each getting what it needs when both fit.
    let tables = area.height.saturating_sub(4 + problem_height);
    let (queue_height, worker_height) = share(tables, table_height(queues), table_height(workers));
    let [title, summary, queue_area, worker_area, problem_area, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(2),
        Constraint::Length(queue_height),
        Constraint::Length(worker_height),
        Constraint::Length(problem_height),
        Constraint::Length(1),
    ])
    .areas(area);

    frame.render_widget(title_line(dashboard), title);
    frame.render_widget(summary_line(dashboard), summary);
    match &dashboard.report {
        Some(report) => {
            frame.render_widget(queue_table(report, queue_area.width), queue_area);
            frame.render_widget(worker_table(report, worker_area.width), worker_area);
        }
        None => {
            frame.render_widget(Block::bordered().title(" Queues "), queue_area);
            frame.render_widget(Block::bordered().title(" Workers "), worker_area);
        }
    }
    if let Some(problem) = &dashboard.problem {
        draw_problem(frame, problem, problem_area);
    }
    frame.render_widget(
        Paragraph::new(" q, Esc or Ctrl-C: quit").style(Style::new().fg(Color::DarkGray)),
        help,
    );
}

/// The lines `text` takes wrapped at word boundaries to `width` columns
/// (words longer than a line broken), as the problem's paragraph wraps.
fn wrapped_lines(text: &str, width: u16) -> usize {
    let width = usize::from(width.max(1));
    let mut lines = 1;
    let mut used = 0;
    for word in text.split_whitespace() {
        let length = word.chars().count();
        if used == 0 {
            used = length;
        } else if used + 1 + length <= width {
            used += 1 + length;
        } else {
            lines += 1;
            used = length;
        }
        while used > width {
            lines += 1;
            used -= width;
        }
    }
    lines
}

/// A table's height for `rows` (an empty table has one, saying so):
/// its borders and header too.
fn table_height(rows: usize) -> u16 {
    u16::try_from(rows.max(1))
        .unwrap_or(u16::MAX)
        .saturating_add(3)
}

/// Splits `space` between the queue table and the worker table: each its
/// whole need when both fit; otherwise the workers keep at most half and
/// the queues (what `top` is for) take the rest.
fn share(space: u16, queues: u16, workers: u16) -> (u16, u16) {
    if queues.saturating_add(workers) <= space {
        return (queues, space - queues);
    }
    let workers = workers.min(space / 2);
    let queues = queues.min(space - workers);
    (queues, space - queues)
}

fn title_line(dashboard: &Dashboard) -> Paragraph<'static> {
    Paragraph::new(Line::from(vec![
        Span::styled(" taskq top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "  {}  every {}",
            dashboard.source,
            humantime::format_duration(dashboard.interval)
        )),
    ]))
}

fn summary_line(dashboard: &Dashboard) -> Paragraph<'static> {
    let Some(report) = &dashboard.report else {
        let waiting = if dashboard.problem.is_some() {
            " no report yet"
        } else {
            " waiting for the first report…"
        };
        return Paragraph::new(waiting);
    };
    let health = if report.health == "serving" {
        Style::new().fg(Color::Green)
    } else {
        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
    };
    let mut first = vec![Span::raw(" "), Span::styled(report.health.clone(), health)];
    if dashboard.problem.is_some() {
        first.push(Span::styled(
            " (not current)",
            Style::new().fg(Color::Yellow),
        ));
    }
    first.push(Span::raw(format!(
        "  up {}  v{}  {} store  held {} of {}",
        short(report.uptime),
        report.version,
        report.store,
        bytes(report.held_bytes),
        bytes(report.held_bytes_limit),
    )));
    let second = format!(
        " put {}/s  finished {}/s (over {})  workers alive {}",
        rate(report.enqueued_per_second),
        rate(report.finished_per_second),
        short(report.rate_interval),
        report.workers_alive,
    );
    Paragraph::new(vec![Line::from(first), Line::from(second)])
}

/// The one row of an empty table.
fn none(text: &'static str) -> Row<'static> {
    Row::new([Cell::from(text)]).style(Style::new().fg(Color::DarkGray))
}

/// A right-aligned number cell.
fn number(text: String) -> Cell<'static> {
    Cell::from(Line::from(text).right_aligned())
}

/// A bold header row: the first `names` columns left-aligned (names),
/// the rest right-aligned (numbers).
fn header<'a>(columns: impl Iterator<Item = &'a str>, names: usize) -> Row<'static> {
    Row::new(columns.enumerate().map(|(i, column)| {
        let line = Line::from(column.to_string());
        Cell::from(if i < names {
            line
        } else {
            line.right_aligned()
        })
    }))
    .style(Style::new().add_modifier(Modifier::BOLD))
}

/// The width of a name column: its longest name within `min..=max`, so
/// the numbers stay beside the names on a wide terminal.
fn name_width<'a>(names: impl Iterator<Item = &'a str>, min: u16, max: u16) -> u16 {
    let longest = names.map(|name| name.chars().count()).max().unwrap_or(0);
    u16::try_from(longest).unwrap_or(max).clamp(min, max)
}

/// A number column of the queue table.
struct QueueColumn {
    title: &'static str,
    width: u16,
    value: fn(&QueueLine) -> String,
}

/// The queue table's number columns, the most telling first: on a narrow
/// terminal the last ones are left out.
const QUEUE_COLUMNS: [QueueColumn; 11] = [
    QueueColumn {
        title: "READY",
        width: 7,
        value: |q| q.ready.to_string(),
    },
    QueueColumn {
        title: "LEASED",
        width: 7,
        value: |q| q.leased.to_string(),
    },
    QueueColumn {
        title: "OLDEST",
        width: 7,
        value: |q| {
            if q.ready == 0 {
                "-".into()
            } else {
                short(q.oldest_ready_age)
            }
        },
    },
    QueueColumn {
        title: "PUT/S",
        width: 7,
        value: |q| rate(q.enqueued_per_second),
    },
    QueueColumn {
        title: "DONE/S",
        width: 7,
        value: |q| rate(q.finished_per_second),
    },
    QueueColumn {
        title: "FAIL",
        width: 5,
        value: |q| {
            q.failure_ratio
                .map_or_else(|| "-".into(), |ratio| format!("{:.0}%", ratio * 100.0))
        },
    },
    QueueColumn {
        title: "STREAMS",
        width: 7,
        value: |q| q.worker_streams.to_string(),
    },
    QueueColumn {
        title: "SUCCEEDED",
        width: 9,
        value: |q| q.succeeded.to_string(),
    },
    QueueColumn {
        title: "FAILED",
        width: 7,
        value: |q| q.failed.to_string(),
    },
    QueueColumn {
        title: "RETRIED",
        width: 7,
        value: |q| q.retried.to_string(),
    },
    QueueColumn {
        title: "EXPIRED",
        width: 7,
        value: |q| q.expired.to_string(),
    },
];

/// The number columns always kept: ready to finished per second.
const QUEUE_COLUMNS_KEPT: usize = 5;

/// The queue table for a table `width` columns wide (borders included).
fn queue_table(report: &Report, width: u16) -> Table<'static> {
    let inner = width.saturating_sub(2);
    let column = |c: &QueueColumn| c.width + 1;
    let kept: u16 = QUEUE_COLUMNS[..QUEUE_COLUMNS_KEPT].iter().map(column).sum();
    let name = name_width(report.queues.iter().map(|q| q.queue.as_str()), 10, 40)
        .min(inner.saturating_sub(kept).max(10));
    let mut used = name;
    let columns: Vec<&QueueColumn> = QUEUE_COLUMNS
        .iter()
        .enumerate()
        .take_while(|(i, c)| {
            used += column(c);
            *i < QUEUE_COLUMNS_KEPT || used <= inner
        })
        .map(|(_, c)| c)
        .collect();
    let rows = report.queues.iter().map(|q| {
        let numbers = columns.iter().map(|c| number((c.value)(q)));
        Row::new(std::iter::once(Cell::from(q.queue.clone())).chain(numbers))
    });
    let rows = rows.chain(report.queues.is_empty().then(|| none("(none yet)")));
    let widths = std::iter::once(name)
        .chain(columns.iter().map(|c| c.width))
        .map(Constraint::Length);
    let titles = std::iter::once("QUEUE").chain(columns.iter().map(|c| c.title));
    Table::new(rows, widths)
        .header(header(titles, 1))
        .block(Block::bordered().title(format!(" Queues ({}) ", report.queues.len())))
}

/// The worker table for a table `width` columns wide (borders included).
fn worker_table(report: &Report, width: u16) -> Table<'static> {
    let rows = report.workers.iter().map(|w: &WorkerLine| {
        let row = Row::new([
            Cell::from(w.worker.clone()),
            Cell::from(w.queue.clone().unwrap_or_else(|| "-".into())),
            number(w.in_flight.to_string()),
            number(format!("{} ago", short(w.last_seen))),
            number(if w.alive { "yes" } else { "no" }.to_string()),
        ]);
        if w.alive {
            row
        } else {
            row.style(Style::new().fg(Color::DarkGray))
        }
    });
    let rows = rows.chain(report.workers.is_empty().then(|| none("(none seen)")));
    // The numbers: in flight, last seen, alive, each with its gap.
    let numbers = [9, 10, 5];
    let queue = name_width(
        report.workers.iter().filter_map(|w| w.queue.as_deref()),
        5,
        40,
    );
    let room = width
        .saturating_sub(2)
        .saturating_sub(queue + 1)
        .saturating_sub(numbers.iter().map(|n| n + 1).sum());
    let worker =
        name_width(report.workers.iter().map(|w| w.worker.as_str()), 16, 48).min(room.max(16));
    let widths = [worker, queue]
        .into_iter()
        .chain(numbers)
        .map(Constraint::Length);
    let listed = if report.workers_known > report.workers.len() as u64 {
        format!(
            " Workers ({} of {}, the most recently seen) ",
            report.workers.len(),
            report.workers_known
        )
    } else {
        format!(" Workers ({}) ", report.workers.len())
    };
    let titles = ["WORKER", "QUEUE", "IN FLIGHT", "LAST SEEN", "ALIVE"];
    Table::new(rows, widths)
        .header(header(titles.into_iter(), 2))
        .block(Block::bordered().title(listed))
}

fn draw_problem(frame: &mut Frame, problem: &str, area: Rect) {
    let style = Style::new().fg(Color::Red);
    frame.render_widget(
        Paragraph::new(problem.to_string())
            .style(style)
            .wrap(Wrap { trim: true })
            .block(
                Block::bordered()
                    .title(" Problem (retrying) ")
                    .border_style(style),
            ),
        area,
    );
}

/// A rate as people read it: one decimal below 10 a second.
fn rate(per_second: f64) -> String {
    if per_second == 0.0 {
        "0".into()
    } else if per_second < 10.0 {
        format!("{per_second:.1}")
    } else {
        format!("{per_second:.0}")
    }
}

/// A size in bytes, KiB, MiB or GiB.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn report() -> Report {
        Report {
            version: "0.1.0".into(),
            health: "serving".into(),
            store: "memory".into(),
            uptime: Duration::from_secs(3725),
            enqueued_per_second: 2.5,
            finished_per_second: 2.0,
            rate_interval: Duration::from_secs(10),
            workers_alive: 1,
            workers_known: 1,
            held_bytes: 2048,
            held_bytes_limit: 256 << 20,
            queues: vec![QueueLine {
                queue: "emails".into(),
                ready: 7,
                leased: 2,
                oldest_ready_age: Duration::from_secs(95),
                enqueued_per_second: 2.5,
                finished_per_second: 12.25,
                succeeded: 30,
                failed: 1,
                expired: 0,
                retried: 3,
                failure_ratio: Some(0.25),
                worker_streams: 1,
            }],
            workers: vec![WorkerLine {
                worker: "mailer-1".into(),
                queue: Some("emails".into()),
                in_flight: 2,
                last_seen: Duration::from_secs(1),
                alive: true,
            }],
        }
    }

    /// The screen's lines, as text.
    fn screen(dashboard: &Dashboard, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| draw(frame, dashboard)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| (0..width).map(|x| buffer[(x, y)].symbol()).collect())
            .collect()
    }

    /// The words of the first line that holds `word`, borders dropped.
    fn row_of(lines: &[String], word: &str) -> Vec<String> {
        let line = lines
            .iter()
            .find(|line| line.split(['│', ' ']).any(|w| w == word))
            .unwrap_or_else(|| panic!("no line with {word:?}:\n{}", lines.join("\n")));
        line.split(['│', ' '])
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_queue_and_its_counts_are_on_screen() {
        let dashboard = Dashboard {
            source: "http://127.0.0.1:50052/status".into(),
            interval: Duration::from_secs(1),
            report: Some(report()),
            problem: None,
        };
        let lines = screen(&dashboard, 120, 20);
        assert_eq!(
            row_of(&lines, "emails"),
            [
                "emails", "7", "2", "1m35s", "2.5", "12", "25%", "1", "30", "1", "3", "0"
            ],
            "{}",
            lines.join("\n")
        );
        assert_eq!(
            row_of(&lines, "mailer-1"),
            ["mailer-1", "emails", "2", "1s", "ago", "yes"]
        );
        let text = lines.join("\n");
        assert!(text.contains("http://127.0.0.1:50052/status"), "{text}");
        assert!(text.contains("serving"), "{text}");
        assert!(text.contains("held 2.0 KiB of 256.0 MiB"), "{text}");
        assert!(text.contains("q, Esc or Ctrl-C: quit"), "{text}");
        assert!(!text.contains("Problem"), "{text}");
    }

    /// A failed refresh shows why and what to do, and keeps the last
    /// numbers, marked as not current.
    #[test]
    fn a_problem_is_shown_with_the_last_numbers() {
        let dashboard = Dashboard {
            source: "http://127.0.0.1:50052/status".into(),
            interval: Duration::from_secs(1),
            report: Some(report()),
            problem: Some("cannot reach http://127.0.0.1:50052/status: refused".into()),
        };
        let text = screen(&dashboard, 100, 20).join("\n");
        assert!(text.contains("Problem"), "{text}");
        assert!(
            text.contains("cannot reach http://127.0.0.1:50052/status"),
            "{text}"
        );
        assert!(text.contains("(not current)"), "{text}");
        assert!(text.contains("emails"), "{text}");
    }

    #[test]
    fn before_the_first_report_it_says_so() {
        let dashboard = Dashboard {
            source: "http://127.0.0.1:50052/status".into(),
            interval: Duration::from_secs(1),
            report: None,
            problem: None,
        };
        let text = screen(&dashboard, 80, 12).join("\n");
        assert!(text.contains("waiting for the first report"), "{text}");
    }

    /// A tiny or crowded terminal clips, never panics; the queues keep
    /// the room the workers do not need.
    #[test]
    fn small_terminals_and_long_lists_clip() {
        let mut crowded = report();
        crowded.queues = (0..50)
            .map(|i| QueueLine {
                queue: format!("queue-{i}"),
                ..QueueLine::default()
            })
            .collect();
        crowded.workers = vec![WorkerLine::default(); 500];
        let dashboard = Dashboard {
            report: Some(crowded),
            problem: Some("x".repeat(1000)),
            ..Dashboard::default()
        };
        for (width, height) in [(1, 1), (10, 3), (40, 8), (80, 24), (200, 60)] {
            let lines = screen(&dashboard, width, height);
            assert_eq!(lines.len(), usize::from(height));
        }
        let text = screen(&dashboard, 80, 40).join("\n");
        assert!(text.contains("queue-0"), "{text}");
        // 80 columns: the counts that matter most, whole, the totals
        // left out.
        let lines = screen(
            &Dashboard {
                report: Some(report()),
                ..Dashboard::default()
            },
            80,
            24,
        );
        assert_eq!(
            row_of(&lines, "emails"),
            ["emails", "7", "2", "1m35s", "2.5", "12", "25%", "1", "30"],
            "{}",
            lines.join("\n")
        );
        assert_eq!(share(20, 53, 503), (10, 10));
        assert_eq!(share(20, 4, 503), (4, 16));
        assert_eq!(share(20, 4, 5), (4, 16));
    }

    #[test]
    fn a_problem_gets_the_lines_it_wraps_to() {
        assert_eq!(wrapped_lines("", 10), 1);
        assert_eq!(wrapped_lines("cannot reach", 12), 1);
        assert_eq!(wrapped_lines("cannot reach", 11), 2);
        assert_eq!(wrapped_lines("aaaa bbbb cccc", 9), 2);
        assert_eq!(wrapped_lines(&"x".repeat(25), 10), 3);
        assert_eq!(wrapped_lines("x", 0), 1);
    }

    #[test]
    fn rates_and_sizes_read_as_people_write_them() {
        assert_eq!(rate(0.0), "0");
        assert_eq!(rate(0.25), "0.2");
        assert_eq!(rate(9.96), "10.0");
        assert_eq!(rate(1234.4), "1234");
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(256 << 20), "256.0 MiB");
        assert_eq!(bytes(u64::MAX), "17179869184.0 GiB");
    }
}
