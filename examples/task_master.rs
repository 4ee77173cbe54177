//! The seed's `task_master.py` in taskq's terms: put ten random numbers on
//! a task queue, then read ten results back from the result queue.
//!
//! Run a server (`taskq serve`) and some workers (`taskq worker --queue
//! squares --builtin square`, or `cargo run --example task_worker`), then:
//!
//! ```sh
//! cargo run --example task_master
//! ```
//!
//! `TASKQ_SERVER` and `TASKQ_TOKEN` say where the server is and how to get in.

use std::time::{Duration, SystemTime};

use taskq::client::{Client, ClientOptions, DEFAULT_SERVER};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::var("TASKQ_SERVER").unwrap_or_else(|_| DEFAULT_SERVER.into());
    let options = ClientOptions {
        token: std::env::var("TASKQ_TOKEN").ok(),
        ..ClientOptions::default()
    };
    // Where the seed registered two queues with a manager, one server holds
    // both: tasks go on the queue "squares", results come back by queue.
    let master = Client::connect(&server, options).await?;

    let mut seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    for _ in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = seed % 10_001;
        println!("Put task {n}...");
        master.put("squares", n.to_string()).await?;
    }

    println!("Try get results...");
    for _ in 0..10 {
        // The seed's `result.get(timeout=10)`: wait up to 10 s for the next one.
        match master
            .next_result("squares", Duration::from_secs(10))
            .await?
        {
            Some(result) => println!("Result: {}", String::from_utf8_lossy(&result.output)),
            None => return Err("no result within 10s: are workers running?".into()),
        }
    }
    println!("master exit.");
    Ok(())
}
