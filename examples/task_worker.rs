//! The seed's `task_worker.py` in taskq's terms: take tasks from the queue,
//! square each number, and put the result back.
//!
//! ```sh
//! cargo run --example task_worker
//! ```
//!
//! It stops after ten tasks, like the seed's loop, or on Ctrl-C. Unlike
//! the seed, a task it takes and never finishes is not lost: its lease runs
//! out and another worker gets it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use taskq::client::{Client, ClientOptions, DEFAULT_SERVER};
use taskq::worker::{TaskFailure, Worker};
use tokio::sync::Notify;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::var("TASKQ_SERVER").unwrap_or_else(|_| DEFAULT_SERVER.into());
    let options = ClientOptions {
        token: std::env::var("TASKQ_TOKEN").ok(),
        ..ClientOptions::default()
    };
    println!("Connect to server {server}...");
    let client = Client::connect_lazy(&server, options)?;

    let done = Arc::new(AtomicUsize::new(0));
    let ten_done = Arc::new(Notify::new());
    let (counter, finished) = (done.clone(), ten_done.clone());
    let report = Worker::builder(client)
        .queue("squares")
        .run_until(
            move |task| {
                let (counter, finished) = (counter.clone(), finished.clone());
                async move {
                    let text = String::from_utf8_lossy(&task.payload).trim().to_string();
                    let n: i64 = text
                        .parse()
                        .map_err(|_| TaskFailure::fatal(format!("{text:?} is not a number")))?;
                    println!("run task {n} * {n}...");
                    if counter.fetch_add(1, Ordering::SeqCst) + 1 == 10 {
                        finished.notify_one();
                    }
                    Ok(Bytes::from((n * n).to_string()))
                }
            },
            async move {
                tokio::select! {
                    () = ten_done.notified() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            },
        )
        .await?;
    println!("worker exit: {} tasks done.", report.succeeded);
    Ok(())
}
