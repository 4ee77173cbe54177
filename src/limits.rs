//! What the server puts in front of the gRPC services so that no client, or
//! crowd of clients, can exhaust it, and no bug in a handler takes the
//! process or a connection down:
//!
//! - [`Connections`]: a cap on open connections (a connection past it is
//!   closed at once), and a handshake timeout (a connection that sends
//!   nothing is closed), so idle sockets (a slow-loris) cannot pile up;
//! - [`GuardLayer`]: a cap on calls in progress across all connections,
//!   past which a call is shed with RESOURCE_EXHAUSTED before it does any
//!   work (health checks are exempt, so probes keep telling the truth), and
//!   a panic in a handler answered as INTERNAL instead of a broken stream;
//! - [`CatchUnwind`]: the same panic catching for the tasks that serve
//!   open streams.

use std::any::Any;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::{Layer, Service};

/// Bytes a client must send within the handshake timeout: the HTTP/2
/// client preface is 24 bytes (a TLS ClientHello is longer), so one byte
/// at a time cannot hold a slot.
const HANDSHAKE_BYTES: usize = 24;

/// Calls to these paths are never shed: a probe must reach health even when
/// the server is full of work.
const EXEMPT_PREFIX: &str = "/grpc.health.v1.Health/";

/// Admits connections up to a cap.
#[derive(Clone, Debug)]
pub struct Connections {
    open: Arc<Semaphore>,
    max: usize,
    handshake_timeout: Duration,
    refused: Arc<AtomicU64>,
}

impl Connections {
    /// At most `max` connections open at once; each must send its first
    /// bytes within `handshake_timeout`.
    pub fn new(max: usize, handshake_timeout: Duration) -> Self {
        Self {
            open: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
            handshake_timeout,
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max
            .min(Semaphore::MAX_PERMITS)
            .saturating_sub(self.open.available_permits())
    }

    /// Takes a slot for `stream`, or `None` when all are taken: the caller
    /// drops the stream, which closes it. The first refusal and every
    /// 1,000th after it are logged, so a flood cannot flood the log.
    pub fn admit(&self, stream: TcpStream) -> Option<LimitedStream> {
        match self.open.clone().try_acquire_owned() {
            Ok(permit) => Some(LimitedStream {
                inner: stream,
                _slot: permit,
                handshake: Some(Box::pin(tokio::time::sleep(self.handshake_timeout))),
                received: 0,
            }),
            Err(_) => {
                let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if refused % 1000 == 1 {
                    tracing::warn!(
                        max_connections = self.max,
                        refused_so_far = refused,
                        peer = ?stream.peer_addr().ok(),
                        "connection refused: the server has --max-connections open; \
                         raise it or find the client that opens so many"
                    );
                }
                None
            }
        }
    }
}

/// A TCP connection holding one of the server's connection slots until it
/// is dropped.
#[derive(Debug)]
pub struct LimitedStream {
    inner: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Running until the peer's first [`HANDSHAKE_BYTES`] arrive; then
    /// `None`.
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes received while the handshake timer runs.
    received: usize,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.handshake.is_some() {
            self.received += buf.filled().len() - before;
            if self.received >= HANDSHAKE_BYTES {
                self.handshake = None;
                return read;
            }
            if read.is_pending()
                && let Some(timer) = self.handshake.as_mut()
                && timer.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not start a handshake within the handshake timeout",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;

    /// The TCP addresses, as for a bare `TcpStream`, so handlers still see
    /// the peer's address.
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

/// Polls a future, turning a panic inside it into an `Err` with the panic's
/// message, so one bad call or stream cannot take others with it.
pub struct CatchUnwind<F> {
    inner: Pin<Box<F>>,
}

impl<F: Future> CatchUnwind<F> {
    /// Wraps `future`.
    pub fn new(future: F) -> Self {
        Self {
            inner: Box::pin(future),
        }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.inner.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic_message(panic.as_ref()))),
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The status a call gets when its handler panicked. The panic's message is
/// logged, not sent: it is an internal detail.
pub fn panicked() -> Status {
    Status::internal(
        "the server hit a bug while handling this call; nothing was changed by the \
         part that failed, the error is logged: retry, and report it if it repeats",
    )
}

/// Sheds calls past a cap on calls in progress and catches handler panics.
#[derive(Clone, Debug)]
pub struct GuardLayer {
    calls: Arc<AtomicUsize>,
    max_calls: usize,
    /// Calls shed since start; touched only when one is.
    shed: Arc<AtomicU64>,
}

impl GuardLayer {
    /// At most `max_calls` calls in progress across all connections.
    pub fn new(max_calls: usize) -> Self {
        Self {
            calls: Arc::new(AtomicUsize::new(0)),
            max_calls,
            shed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Calls shed since start.
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }
}

/// A call's slot among `--max-calls`, given back when dropped. A counter,
/// not a semaphore: calls never wait for a slot, and a semaphore's
/// release takes its waiters' lock on every call.
#[derive(Debug)]
pub struct CallSlot(Arc<AtomicUsize>);

impl CallSlot {
    fn take(calls: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        calls
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(calls.clone()))
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            calls: self.calls.clone(),
            max_calls: self.max_calls,
            shed: self.shed.clone(),
        }
    }
}

/// The service [`GuardLayer`] makes.
#[derive(Clone, Debug)]
pub struct Guard<S> {
    inner: S,
    calls: Arc<AtomicUsize>,
    max_calls: usize,
    shed: Arc<AtomicU64>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Guard<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Unpin,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Guarded<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let slot = if request.uri().path().starts_with(EXEMPT_PREFIX) {
            None
        } else {
            match CallSlot::take(&self.calls, self.max_calls) {
                Some(slot) => Some(slot),
                None => {
                    self.shed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(max_calls = self.max_calls, "call shed");
                    return Guarded::Answered(Some(
                        Status::resource_exhausted(format!(
                            "the server has {} calls in progress, its limit (--max-calls): \
                             retry with backoff",
                            self.max_calls
                        ))
                        .into_http(),
                    ));
                }
            }
        };
        // A clone of the URI shares its bytes: no copy on the hot path.
        let uri = request.uri().clone();
        Guarded::Running {
            call: CatchUnwind::new(self.inner.call(request)),
            uri,
            _slot: slot,
        }
    }
}

/// The future of a guarded call.
pub enum Guarded<F, B> {
    /// Answered without calling the service (shed).
    Answered(Option<http::Response<B>>),
    /// Running, holding its call slot until its response is ready.
    Running {
        /// The call.
        call: CatchUnwind<F>,
        /// Its method, for the log if it panics.
        uri: http::Uri,
        /// Its slot among `--max-calls`.
        _slot: Option<CallSlot>,
    },
}

impl<F, B, E> Future for Guarded<F, B>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: Default + Unpin,
{
    type Output = Result<http::Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Both variants are Unpin: the call is boxed inside CatchUnwind.
        match self.get_mut() {
            Guarded::Answered(response) => Poll::Ready(Ok(response
                .take()
                .unwrap_or_else(|| panicked().into_http()))),
            Guarded::Running { call, uri, .. } => match Pin::new(call).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(answer)) => Poll::Ready(answer),
                Poll::Ready(Err(panic)) => {
                    tracing::error!(method = uri.path(), panic = %panic, "handler panicked; answered INTERNAL");
                    Poll::Ready(Ok(panicked().into_http()))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that panics on `/boom`, waits forever on `/hang`, and
    /// answers everything else at once.
    #[derive(Clone)]
    struct Test;

    impl Service<http::Request<()>> for Test {
        type Response = http::Response<String>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<()>) -> Self::Future {
            let path = request.uri().path().to_string();
            Box::pin(async move {
                match path.as_str() {
                    "/boom" => panic!("handler bug"),
                    "/hang" => std::future::pending().await,
                    _ => Ok(http::Response::new("ok".to_string())),
                }
            })
        }
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    fn grpc_status(response: &http::Response<String>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap())
    }

    #[tokio::test]
    async fn a_panic_becomes_internal_and_the_service_goes_on() {
        let mut guard = GuardLayer::new(10).layer(Test);
        let answer = guard.call(request("/boom")).await.unwrap();
        assert_eq!(grpc_status(&answer), Some("13"), "INTERNAL");
        let answer = guard.call(request("/fine")).await.unwrap();
        assert_eq!(answer.body(), "ok");
        // The panicked call gave its slot back.
        assert_eq!(guard.calls.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn calls_past_the_cap_are_shed_but_health_is_not() {
        let layer = GuardLayer::new(2);
        let mut guard = layer.layer(Test);
        let first = guard.call(request("/hang"));
        let second = guard.call(request("/hang"));
        let shed = guard.call(request("/fine")).await.unwrap();
        assert_eq!(grpc_status(&shed), Some("8"), "RESOURCE_EXHAUSTED");
        let health = guard
            .call(request("/grpc.health.v1.Health/Check"))
            .await
            .unwrap();
        assert_eq!(health.body(), "ok");
        // A call that ends (here: is dropped) frees its slot, once.
        drop(first);
        let fine = guard.call(request("/fine")).await.unwrap();
        assert_eq!(fine.body(), "ok");
        let third = guard.call(request("/hang"));
        let shed = guard.call(request("/fine")).await.unwrap();
        assert_eq!(grpc_status(&shed), Some("8"), "full again");
        drop((second, third));
        assert_eq!(guard.calls.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn catch_unwind_reports_the_message() {
        let caught = CatchUnwind::new(async { panic!("stream bug {}", 7) }).await;
        assert_eq!(caught.unwrap_err(), "stream bug 7");
        assert_eq!(CatchUnwind::new(async { 5 }).await, Ok(5));
    }
}
