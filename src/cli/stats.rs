//! `taskq stats`: queues and workers as a table, or JSON for scripts.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use serde_json::json;

use crate::cli::connect::ClientArgs;
use crate::cli::exit::EXIT_FAILURE;
use crate::pb;

/// `taskq stats` flags.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only this queue (default: all).
    #[arg(long, default_value = "")]
    pub queue: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Prints the stats.
pub async fn run(args: StatsArgs) -> ExitCode {
    let client = match args.client.connect().await {
        Ok(client) => client,
        Err(code) => return code,
    };
    match client.stats(&args.queue).await {
        Ok(stats) if args.json => {
            println!("{}", to_json(&stats));
            ExitCode::SUCCESS
        }
        Ok(stats) => {
            print!("{}", table(&stats, SystemTime::now()));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("taskq: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// A non-negative wire duration; anything else (a server bug) reads as 0.
/// By hand: prost-types' conversion overflows on `i64::MIN` seconds.
fn age(duration: Option<prost_types::Duration>) -> Duration {
    duration
        .and_then(|d| {
            let seconds = u64::try_from(d.seconds).ok()?;
            let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
            Some(Duration::new(seconds, nanos))
        })
        .unwrap_or_default()
}

/// A duration in its largest units, for a table cell: `250ms`, `42s`,
/// `3m5s`, `2h10m`.
pub(crate) fn short(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => format!("{}ms", duration.as_millis()),
        1..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        _ => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
    }
}

/// The stats as a table people can read.
pub fn table(stats: &pb::GetStatsResponse, now: SystemTime) -> String {
    let mut out = format!(
        "{:<24} {:>9} {:>9} {:>9} {:>10} {:>9} {:>11} {:>9} {:>10}\n",
        "QUEUE",
        "PENDING",
        "DELAYED",
        "LEASED",
        "SUCCEEDED",
        "FAILED",
        "REDELIVERED",
        "OLDEST",
        "UNCLAIMED"
    );
    for q in &stats.queues {
        out += &format!(
            "{:<24} {:>9} {:>9} {:>9} {:>10} {:>9} {:>11} {:>9} {:>10}\n",
            q.queue,
            q.pending,
            q.delayed,
            q.leased,
            q.succeeded,
            q.failed,
            q.redelivered,
            short(age(q.oldest_pending_age)),
            q.results_unclaimed
        );
    }
    if stats.queues.is_empty() {
        out += "(no queues)\n";
    }
    out += &format!(
        "\n{:<32} {:<24} {:>9} {:>10} {:>6}\n",
        "WORKER", "QUEUE", "IN FLIGHT", "LAST SEEN", "ALIVE"
    );
    for w in &stats.workers {
        let seen = w
            .last_seen
            .and_then(|t| SystemTime::try_from(t).ok())
            .and_then(|t| now.duration_since(t).ok())
            .map_or_else(|| "-".to_string(), |d| format!("{} ago", short(d)));
        out += &format!(
            "{:<32} {:<24} {:>9} {:>10} {:>6}\n",
            w.worker_id,
            w.queue,
            w.in_flight,
            seen,
            if w.alive { "yes" } else { "no" }
        );
    }
    if stats.workers.is_empty() {
        out += "(no workers)\n";
    }
    out
}

/// The stats as one JSON object.
pub fn to_json(stats: &pb::GetStatsResponse) -> serde_json::Value {
    let queues: Vec<_> = stats
        .queues
        .iter()
        .map(|q| {
            json!({
                "queue": q.queue,
                "pending": q.pending,
                "delayed": q.delayed,
                "leased": q.leased,
                "succeeded": q.succeeded,
                "failed": q.failed,
                "redelivered": q.redelivered,
                "oldest_pending_age_ms": age(q.oldest_pending_age).as_millis() as u64,
                "results_unclaimed": q.results_unclaimed,
                "results_evicted": q.results_evicted,
                "waiting_workers": q.waiting_workers,
            })
        })
        .collect();
    let workers: Vec<_> = stats
        .workers
        .iter()
        .map(|w| {
            json!({
                "worker_id": w.worker_id,
                "queue": w.queue,
                "last_seen": w.last_seen
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .map(|t| humantime::format_rfc3339_millis(t).to_string()),
                "in_flight": w.in_flight,
                "alive": w.alive,
            })
        })
        .collect();
    json!({ "queues": queues, "workers": workers })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A regression: prost-types' own conversion panics (debug) on this.
    #[test]
    fn odd_ages_read_as_zero_without_a_panic() {
        let wire = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(age(wire(i64::MIN, 0)), Duration::ZERO);
        assert_eq!(age(wire(1, -1)), Duration::ZERO);
        assert_eq!(age(wire(1, 1_000_000_000)), Duration::ZERO);
        assert_eq!(age(wire(90, 5)), Duration::new(90, 5));
        assert_eq!(age(None), Duration::ZERO);
    }
}
