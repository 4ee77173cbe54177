//! `taskq top`: a live dashboard of the server in the terminal, for SSH
//! sessions: the queues (ready, leased, oldest ready age, rates), the
//! workers and the server's health, refreshed every `--interval`.
//!
//! It reads the status page's report (`report.rs`) from the server's HTTP
//! listener (`source.rs`), so it shows what the page shows, rates
//! included (the server samples them; a client could only guess them from
//! two snapshots), and draws it with ratatui (`draw.rs`, a function of the
//! data alone). This file holds the flags and the loop: the terminal, the
//! keys, the refreshes.
//!
//! The terminal is always given back as it was (raw mode off, the main
//! screen back), on quitting, on an error and on a panic.

mod draw;
mod report;
mod source;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread::JoinHandle;
use std::time::Duration;

use clap::Args;
use ratatui::DefaultTerminal;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use tokio::sync::mpsc;

use crate::cli::connect::load_token;
use crate::cli::exit::{EXIT_CONFIG, EXIT_FAILURE, config_error};
use crate::client::DEFAULT_SERVER;
use crate::config::{ConfigError, DEFAULT_HTTP_LISTEN};
use crate::units::{parse_duration, positive_duration};
use draw::Dashboard;
use source::{FetchError, StatusSource, StatusUrl};

/// Default of `--interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// How often the key reader looks whether the dashboard has ended.
const KEY_POLL: Duration = Duration::from_millis(100);

/// `taskq top` flags.
#[derive(Debug, Args)]
#[command(after_help = "\
Reads the status page's report (GET /status, Accept: application/json) from
the server's HTTP listener, which serves plain HTTP on 127.0.0.1:50052 by
default (taskq serve --http-listen). With tokens configured it needs a
monitor or admin token without a queue list. For output to a file or a
pipe, use `taskq stats` (or `taskq stats --json`).

Keys: q, Esc or Ctrl-C quit. A refresh that fails is shown on the screen,
with what to do, and tried again at the next one.")]
pub struct TopArgs {
    /// The server's gRPC address, as for the other commands: `top` reads
    /// from the HTTP listener on the same host, port 50052 (the default of
    /// `taskq serve --http-listen`), unless --http says where.
    #[arg(long, env = "TASKQ_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,

    /// The server's HTTP listener, e.g. http://127.0.0.1:50052, with the
    /// server's --http-path-prefix if it has one (http://host:port/taskq).
    #[arg(long, env = "TASKQ_HTTP", value_name = "URL")]
    pub http: Option<String>,

    /// File holding the bearer token: the first word of its first line that
    /// is not blank or a # comment, so the server's token file format works.
    /// The token can also come from TASKQ_TOKEN.
    #[arg(long, env = "TASKQ_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Time between refreshes.
    #[arg(long, env = "TASKQ_TOP_INTERVAL", default_value = "1s", value_parser = positive_duration)]
    pub interval: Duration,

    /// Longest time to connect.
    #[arg(long, env = "TASKQ_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Longest time for one refresh, connecting included.
    #[arg(long, env = "TASKQ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl TopArgs {
    /// Where the reports come from, with the token.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the flag to fix.
    fn source(&self) -> Result<StatusSource, ConfigError> {
        let url = match &self.http {
            Some(http) => StatusUrl::parse(http).map_err(|message| ConfigError {
                flag: "--http (TASKQ_HTTP)",
                message,
            })?,
            None => StatusUrl::beside(&self.server, default_http_port()).map_err(|message| {
                ConfigError {
                    flag: "--server (TASKQ_SERVER)",
                    message,
                }
            })?,
        };
        let token = load_token(self.token_file.as_deref())?;
        StatusSource::new(url, token.as_deref(), self.connect_timeout, self.timeout).map_err(
            |message| ConfigError {
                flag: "--token-file (TASKQ_TOKEN_FILE) or TASKQ_TOKEN",
                message,
            },
        )
    }
}

/// The port of `taskq serve --http-listen`'s default.
fn default_http_port() -> u16 {
    DEFAULT_HTTP_LISTEN
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(50052)
}

/// Runs the dashboard until a quit key; exit 0 then.
pub async fn run(args: TopArgs) -> ExitCode {
    if !std::io::stdout().is_terminal() {
        eprintln!(
            "taskq: `taskq top` draws on a terminal, and its output is not one: \
             for a file or a pipe, use `taskq stats` (or `taskq stats --json`)"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let source = match args.source() {
        Ok(source) => source,
        Err(error) => return config_error(error),
    };
    let mut dashboard = Dashboard {
        source: source.url().to_string(),
        interval: args.interval,
        report: None,
        problem: None,
    };
    let mut screen = match Screen::enter() {
        Ok(screen) => screen,
        Err(error) => return terminal_failed(&error),
    };
    let mut keys = match Keys::start() {
        Ok(keys) => keys,
        Err(error) => {
            drop(screen);
            return terminal_failed(&error);
        }
    };
    let (reports, mut refreshed) = mpsc::channel(1);
    let _refresher = Refresher(tokio::spawn(refresh(source, args.interval, reports)));
    let stop = crate::shutdown::signal();
    tokio::pin!(stop);
    loop {
        if let Err(error) = screen.draw(&dashboard) {
            drop(screen);
            return terminal_failed(&error);
        }
        tokio::select! {
            answer = refreshed.recv() => match answer {
                Some(Ok(report)) => {
                    dashboard.report = Some(report);
                    dashboard.problem = None;
                }
                Some(Err(error)) => dashboard.problem = Some(error.to_string()),
                None => {
                    // Only a bug ends the refresh task early.
                    drop(screen);
                    eprintln!("taskq: the dashboard stopped refreshing (a bug: please report it)");
                    return ExitCode::from(EXIT_FAILURE);
                }
            },
            input = keys.next() => match input {
                Some(Ok(Input::Quit)) => return ExitCode::SUCCESS,
                Some(Ok(Input::Redraw)) => {}
                Some(Err(error)) => {
                    drop(screen);
                    return terminal_failed(&error);
                }
                None => {
                    drop(screen);
                    return terminal_failed(&std::io::Error::other("the key reader stopped"));
                }
            },
            // SIGTERM, or SIGINT sent by another process (a Ctrl-C typed
            // here arrives as a key in raw mode).
            () = &mut stop => return ExitCode::SUCCESS,
        }
    }
}

fn terminal_failed(error: &std::io::Error) -> ExitCode {
    eprintln!("taskq: the terminal failed: {error}");
    ExitCode::from(EXIT_FAILURE)
}

/// Reads a report every `interval` and hands it over, until the
/// dashboard is gone.
async fn refresh(
    mut source: StatusSource,
    interval: Duration,
    reports: mpsc::Sender<Result<report::Report, FetchError>>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let answer = source.fetch().await;
        if reports.send(answer).await.is_err() {
            return;
        }
    }
}

/// The refresh task, stopped when the dashboard ends.
struct Refresher(tokio::task::JoinHandle<()>);

impl Drop for Refresher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The terminal in raw mode on the alternate screen; given back on drop,
/// also when a panic unwinds through here (ratatui's panic hook gives it
/// back before the panic's message is printed, too).
struct Screen {
    terminal: DefaultTerminal,
}

impl Screen {
    fn enter() -> std::io::Result<Self> {
        match ratatui::try_init() {
            Ok(terminal) => Ok(Self { terminal }),
            Err(error) => {
                // Raw mode may be on already.
                ratatui::restore();
                Err(error)
            }
        }
    }

    fn draw(&mut self, dashboard: &Dashboard) -> std::io::Result<()> {
        self.terminal
            .draw(|frame| draw::draw(frame, dashboard))
            .map(drop)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = self.terminal.show_cursor();
        ratatui::restore();
    }
}

/// What a key (or the terminal) asks for.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    /// `q`, Esc or Ctrl-C.
    Quit,
    /// The terminal changed size.
    Redraw,
}

impl Input {
    fn of(event: &Event) -> Option<Self> {
        match event {
            Event::Key(key) if key.kind == KeyEventKind::Press && quits(key) => Some(Self::Quit),
            Event::Resize(..) => Some(Self::Redraw),
            _ => None,
        }
    }
}

fn quits(key: &KeyEvent) -> bool {
    match key.code {
        KeyCode::Char('q' | 'Q') | KeyCode::Esc => true,
        KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
        _ => false,
    }
}

/// The terminal's events, read on a thread of their own (crossterm's
/// reads block), which ends within [`KEY_POLL`] of this being dropped.
struct Keys {
    inputs: mpsc::Receiver<std::io::Result<Input>>,
    reader: Option<JoinHandle<()>>,
}

impl Keys {
    fn start() -> std::io::Result<Self> {
        let (send, inputs) = mpsc::channel(16);
        let reader = std::thread::Builder::new()
            .name("taskq-top-keys".into())
            .spawn(move || read_keys(&send))?;
        Ok(Self {
            inputs,
            reader: Some(reader),
        })
    }

    async fn next(&mut self) -> Option<std::io::Result<Input>> {
        self.inputs.recv().await
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.inputs.close();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn read_keys(send: &mpsc::Sender<std::io::Result<Input>>) {
    while !send.is_closed() {
        let input = match event::poll(KEY_POLL) {
            Ok(false) => continue,
            Ok(true) => match event::read() {
                Ok(event) => match Input::of(&event) {
                    Some(input) => Ok(input),
                    None => continue,
                },
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        let failed = input.is_err();
        if send.blocking_send(input).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_esc_and_ctrl_c_quit_and_other_keys_do_not() {
        let key = |code, modifiers| Event::Key(KeyEvent::new(code, modifiers));
        let none = KeyModifiers::NONE;
        assert_eq!(Input::of(&key(KeyCode::Char('q'), none)), Some(Input::Quit));
        assert_eq!(Input::of(&key(KeyCode::Esc, none)), Some(Input::Quit));
        assert_eq!(
            Input::of(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(Input::Quit)
        );
        assert_eq!(Input::of(&key(KeyCode::Char('c'), none)), None);
        assert_eq!(Input::of(&key(KeyCode::Enter, none)), None);
        assert_eq!(Input::of(&Event::Resize(80, 24)), Some(Input::Redraw));
    }

    #[test]
    fn the_default_http_address_is_beside_the_server() {
        assert_eq!(default_http_port(), 50052);
        let args = TopArgs {
            server: "http://10.1.2.3:50051".into(),
            http: None,
            token_file: None,
            interval: DEFAULT_INTERVAL,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        };
        assert_eq!(
            args.source().unwrap().url().to_string(),
            "http://10.1.2.3:50052/status"
        );
        let bad = TopArgs {
            http: Some("https://10.1.2.3".into()),
            ..args
        };
        let error = bad.source().err().unwrap().to_string();
        assert!(error.contains("--http"), "{error}");
    }
}
