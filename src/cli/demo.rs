//! `taskq demo`: the seed's master and two workers, on one machine, in one
//! command. A server on a free loopback port, two `square` workers, and a
//! master that puts 10 random integers and prints the 10 results as they
//! arrive; then everything stops.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::broker::BrokerConfig;
use crate::cli::exit::EXIT_FAILURE;
use crate::client::{Client, ClientOptions};
use crate::server::{self, ServerConfig};
use crate::worker::{Worker, builtin};

/// `taskq demo` flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Tasks the master puts.
    #[arg(long, default_value = "10", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub tasks: u32,
    /// Workers started.
    #[arg(long, default_value = "2", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
}

const QUEUE: &str = "squares";

/// Runs the demo; exit 0 when every result is right.
pub async fn run(args: DemoArgs) -> ExitCode {
    match demo(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_FAILURE),
        Err(error) => {
            eprintln!("taskq demo: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn demo(args: DemoArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let config = ServerConfig::new(BrokerConfig::default());
    let server = tokio::spawn(server::run(config, listener, async {
        let _ = server_stopped.await;
    }));
    println!("Server listening on {addr}");
    let address = format!("http://{addr}");

    let mut workers = Vec::new();
    for i in 1..=args.workers {
        let client = Client::connect_lazy(&address, ClientOptions::default())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let worker = Worker::builder(client)
            .queue(QUEUE)
            .worker_id(format!("worker-{i}"))
            .poll_wait(Duration::from_millis(500))
            .run_until(
                |task| async move { builtin::square(&task.payload) },
                async {
                    let _ = stopped.await;
                },
            );
        workers.push((stop, tokio::spawn(worker)));
        println!("Worker worker-{i} started");
    }

    let master = Client::connect(&address, ClientOptions::default()).await?;
    let mut rng = seed();
    let mut inputs = HashMap::new();
    for _ in 0..args.tasks {
        let n = next_random(&mut rng) % 10_001;
        println!("Put task {n}...");
        let put = master.put(QUEUE, n.to_string()).await?;
        inputs.insert(put.task_id, n);
    }
    println!("Try get results...");
    let mut right = 0;
    for _ in 0..args.tasks {
        let Some(result) = master.next_result(QUEUE, Duration::from_secs(10)).await? else {
            println!("No result within 10s");
            break;
        };
        let n = inputs.get(&result.task_id).copied().unwrap_or_default();
        let output = String::from_utf8_lossy(&result.output);
        let correct = output == (u128::from(n) * u128::from(n)).to_string();
        right += u32::from(correct);
        println!(
            "Result: {n} * {n} = {output}  (by {}{})",
            result.worker_id,
            if correct { "" } else { ", WRONG" }
        );
    }

    for (stop, worker) in workers {
        let _ = stop.send(());
        worker.await??;
    }
    let _ = stop_server.send(());
    server.await??;
    println!("master exit: {right} of {} results right.", args.tasks);
    Ok(right == args.tasks)
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7);
    nanos | 1
}

/// xorshift64: the demo needs varied numbers, not secure ones.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
