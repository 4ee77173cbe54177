//! The transport ceiling for bench/compare.sh: a bench-only tonic echo
//! service on loopback, measured with unary calls and with one
//! bidirectional stream per connection, the same machine and the same
//! runtime set-up as `taskq bench`'s embedded server. Not part of taskq.
//!
//! ```sh
//! cargo run --release --example echo_ceiling -- 200000 16 1024
//! ```
//! Arguments: messages, connections (callers), messages in flight per
//! stream. Prints one JSON line.

use std::pin::Pin;
use std::time::Instant;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

mod echo {
    tonic::include_proto!("taskq.bench.v1");
}

use echo::Message;
use echo::echo_client::EchoClient;
use echo::echo_server::{Echo, EchoServer};

/// The allocator `taskq` itself runs on, so that the ceiling and taskq
/// are measured alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Default)]
struct Service;

#[tonic::async_trait]
impl Echo for Service {
    async fn unary(&self, request: Request<Message>) -> Result<Response<Message>, Status> {
        Ok(Response::new(request.into_inner()))
    }

    type BidiStream = Pin<Box<dyn Stream<Item = Result<Message, Status>> + Send>>;

    async fn bidi(
        &self,
        request: Request<Streaming<Message>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let inbound = request.into_inner();
        Ok(Response::new(Box::pin(inbound)))
    }
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let messages = *args.first().unwrap_or(&200_000);
    let callers = *args.get(1).unwrap_or(&16);
    let window = *args.get(2).unwrap_or(&1024) as usize;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(Service))
            .serve_with_incoming(incoming),
    );
    let url = format!("http://{addr}");
    let payload = Bytes::from_static(b"12345678");

    // Unary: `callers` connections, each calling one after another.
    let unary_calls = messages.min(100_000);
    let mut clients = Vec::new();
    for _ in 0..callers {
        clients.push(EchoClient::connect(url.clone()).await?);
    }
    let started = Instant::now();
    let mut handles = Vec::new();
    for mut client in clients.clone() {
        let payload = payload.clone();
        let n = unary_calls / callers;
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let t0 = Instant::now();
                client
                    .unary(Message {
                        payload: payload.clone(),
                    })
                    .await
                    .expect("echo");
                latencies.push(t0.elapsed().as_micros() as u64);
            }
            latencies
        }));
    }
    let mut unary = Vec::new();
    for h in handles {
        unary.extend(h.await?);
    }
    let unary_secs = started.elapsed().as_secs_f64();
    unary.sort_unstable();

    // Bidi: one stream per connection, `window` messages in flight each.
    let started = Instant::now();
    let mut handles = Vec::new();
    for mut client in clients {
        let payload = payload.clone();
        let n = messages / callers;
        handles.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<Message>(window);
            let mut replies = client
                .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .expect("bidi")
                .into_inner();
            let credit = std::sync::Arc::new(tokio::sync::Semaphore::new(window));
            let sender = {
                let credit = credit.clone();
                tokio::spawn(async move {
                    for _ in 0..n {
                        credit.acquire().await.expect("open").forget();
                        if tx
                            .send(Message {
                                payload: payload.clone(),
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                })
            };
            let mut got = 0;
            while got < n {
                match replies.next().await {
                    Some(Ok(_)) => {
                        got += 1;
                        credit.add_permits(1);
                    }
                    _ => break,
                }
            }
            let _ = sender.await;
            got
        }));
    }
    let mut bidi = 0;
    for h in handles {
        bidi += h.await?;
    }
    let bidi_secs = started.elapsed().as_secs_f64();

    println!(
        "{{\"unary_calls_per_second\": {:.0}, \"unary_p50_ms\": {:.3}, \"unary_p99_ms\": {:.3}, \"bidi_messages_per_second\": {:.0}, \"callers\": {callers}, \"window\": {window}}}",
        unary.len() as f64 / unary_secs,
        percentile(&unary, 0.50),
        percentile(&unary, 0.99),
        bidi as f64 / bidi_secs,
    );
    Ok(())
}
