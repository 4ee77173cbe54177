//! The transport ceiling for bench/compare.sh: a bench-only tonic echo
//! service on loopback, measured with unary calls and with one
//! bidirectional stream per connection, the same machine and the same
//! runtime set-up as `taskq bench`'s embedded server. Not part of taskq.
//!
//! ```sh
//! cargo run --release --example echo_ceiling -- 200000 16 1024      # unary, and bidi one item per message
//! cargo run --release --example echo_ceiling -- 200000 16 1024 40   # bidi only, 40 items per message
//! ```
//! Arguments: items, connections (callers), items in flight per stream,
//! items per message (default 1). With one item per message it measures
//! unary calls and the `Bidi` stream; with more, only the `BidiBatches`
//! stream, whose messages carry that many items each (as taskq's
//! StreamTasks and WatchResultBatches messages carry many tasks or
//! results), with the same items in flight. Prints one JSON line.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

mod echo {
    tonic::include_proto!("taskq.bench.v1");
}

use echo::echo_client::EchoClient;
use echo::echo_server::{Echo, EchoServer};
use echo::{Batch, Message};

/// The allocator `taskq` itself runs on, so that the ceiling and taskq
/// are measured alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Default)]
struct Service;

/// A stream of echoes, as the service's streaming calls answer.
type Echoes<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// Answers a stream with itself: each message back as it came.
fn echo_back<M: Send + 'static>(request: Request<Streaming<M>>) -> Response<Echoes<M>> {
    Response::new(Box::pin(request.into_inner()))
}

#[tonic::async_trait]
impl Echo for Service {
    async fn unary(&self, request: Request<Message>) -> Result<Response<Message>, Status> {
        Ok(Response::new(request.into_inner()))
    }

    type BidiStream = Echoes<Message>;

    async fn bidi(
        &self,
        request: Request<Streaming<Message>>,
    ) -> Result<Response<Echoes<Message>>, Status> {
        Ok(echo_back(request))
    }

    type BidiBatchesStream = Echoes<Batch>;

    async fn bidi_batches(
        &self,
        request: Request<Streaming<Batch>>,
    ) -> Result<Response<Echoes<Batch>>, Status> {
        Ok(echo_back(request))
    }
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// One stream per client, all at once, each opened with `open`: `n`
/// copies of `message` sent on each with at most `window` of them
/// unanswered, the echoes read back. Returns the echoes per second.
async fn echo_streams<M, F, Fut>(
    clients: Vec<EchoClient<Channel>>,
    open: F,
    message: M,
    n: u64,
    window: usize,
) -> f64
where
    M: Clone + Send + 'static,
    F: Fn(EchoClient<Channel>, ReceiverStream<M>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<Streaming<M>>, Status>> + Send + 'static,
{
    let started = Instant::now();
    let mut handles = Vec::new();
    for client in clients {
        let (open, message) = (open.clone(), message.clone());
        let open = move |rx| open(client, rx);
        handles.push(tokio::spawn(echo_stream(open, message, n, window)));
    }
    let mut echoed = 0;
    for handle in handles {
        echoed += handle.await.expect("an echo stream panicked");
    }
    echoed as f64 / started.elapsed().as_secs_f64()
}

/// One stream, opened by `open`: see [`echo_streams`]. Returns how many
/// echoes came back.
async fn echo_stream<M, F, Fut>(open: F, message: M, n: u64, window: usize) -> u64
where
    M: Clone + Send + 'static,
    F: FnOnce(ReceiverStream<M>) -> Fut,
    Fut: Future<Output = Result<Response<Streaming<M>>, Status>>,
{
    let (tx, rx) = mpsc::channel::<M>(window);
    let mut replies = open(ReceiverStream::new(rx))
        .await
        .expect("open the echo stream")
        .into_inner();
    let credit = Arc::new(Semaphore::new(window));
    let sender = {
        let credit = credit.clone();
        tokio::spawn(async move {
            for _ in 0..n {
                credit.acquire().await.expect("open").forget();
                if tx.send(message.clone()).await.is_err() {
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
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let items = *args.first().unwrap_or(&200_000);
    let callers = (*args.get(1).unwrap_or(&16)).max(1);
    let window = (*args.get(2).unwrap_or(&1024)).max(1) as usize;
    let batch = (*args.get(3).unwrap_or(&1)).max(1);

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
    let mut clients = Vec::new();
    for _ in 0..callers {
        clients.push(EchoClient::connect(url.clone()).await?);
    }

    if batch > 1 {
        // The same items in flight per stream as one per message: fewer,
        // larger messages.
        let window = (window / batch as usize).max(1);
        let message = Batch {
            items: vec![Message { payload }; batch as usize],
        };
        let open =
            |mut client: EchoClient<Channel>, rx| async move { client.bidi_batches(rx).await };
        let rate = echo_streams(clients, open, message, items / callers / batch, window).await;
        let report = json!({
            "items_per_message": batch,
            "bidi_messages_per_second": rate.round(),
            "bidi_items_per_second": (rate * batch as f64).round(),
            "callers": callers,
            "window_items": window * batch as usize,
        });
        println!("{report}");
        return Ok(());
    }

    // Unary: `callers` connections, each calling one after another.
    let unary_calls = items.min(100_000);
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
    let open = |mut client: EchoClient<Channel>, rx| async move { client.bidi(rx).await };
    let message = Message { payload };
    let bidi_per_second = echo_streams(clients, open, message, items / callers, window)
        .await
        .round();
    let report = json!({
        "unary_calls_per_second": (unary.len() as f64 / unary_secs).round(),
        "unary_p50_ms": percentile(&unary, 0.50),
        "unary_p99_ms": percentile(&unary, 0.99),
        "items_per_message": 1,
        "bidi_messages_per_second": bidi_per_second,
        "bidi_items_per_second": bidi_per_second,
        "callers": callers,
        "window_items": window,
    });
    println!("{report}");
    Ok(())
}
