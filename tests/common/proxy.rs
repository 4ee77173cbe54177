//! A TCP proxy on 127.0.0.1:0 that can stall or cut the connections through
//! it: network faults without leaving loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the proxy does with the bytes it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwards both ways.
    None,
    /// Holds what the server sends: the client's requests arrive, their
    /// answers (and the server's pings) never do.
    DropReplies,
    /// Holds everything both ways, sockets open: a partition.
    Partition,
    /// Closes every connection through it, and each new one at once.
    Cut,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

impl Fault {
    fn passes(self, direction: Direction) -> bool {
        match self {
            Fault::None => true,
            Fault::DropReplies => direction == Direction::ToServer,
            Fault::Partition | Fault::Cut => false,
        }
    }
}

/// The proxy; its connections end when it is dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    fault: watch::Sender<Fault>,
    accepted: Arc<AtomicUsize>,
    _tasks: JoinSet<()>,
}

impl Proxy {
    /// A proxy in front of `upstream`, forwarding until told otherwise.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (fault, faults) = watch::channel(Fault::None);
        let mut tasks = JoinSet::new();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                if *faults.borrow() == Fault::Cut {
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                client.set_nodelay(true).unwrap();
                server.set_nodelay(true).unwrap();
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                connections.spawn(pump(
                    client_read,
                    server_write,
                    faults.clone(),
                    Direction::ToServer,
                ));
                connections.spawn(pump(
                    server_read,
                    client_write,
                    faults.clone(),
                    Direction::ToClient,
                ));
            }
        });
        Self {
            addr,
            fault,
            accepted,
            _tasks: tasks,
        }
    }

    /// Applies `fault` to every connection from now on.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Copies one direction of a connection, holding bytes while the fault
/// says so and closing on a cut.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut faults: watch::Receiver<Fault>,
    direction: Direction,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = faults.wait_for(|f| *f == Fault::Cut) => return,
        };
        match faults
            .wait_for(|f| f.passes(direction) || *f == Fault::Cut)
            .await
        {
            Ok(fault) if *fault != Fault::Cut => {}
            _ => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
