//! The gRPC call metrics of `/metrics`: a tower layer in front of every
//! gRPC service that counts each call by method and status and times it,
//! under the names go-grpc-prometheus uses (`grpc_server_handled_total`,
//! `grpc_server_handling_seconds`), so existing dashboards work.
//!
//! A call is counted once, when it ends: when its status is known (the
//! `grpc-status` of a trailers-only answer, or of the trailers after the
//! last message of a unary call or a stream), or when it is dropped before
//! that (the client went away: `Canceled`). It knows no store and no
//! message: only the path and the status.
//!
//! The labels are bounded: the methods are a fixed table (the task queue,
//! health and reflection), any other path is folded into `_other`, and
//! codes are the 17 of gRPC. Health checks are counted like any call
//! (they are the probes' view of the server, and cheap to count).
//! Recording is a few relaxed atomic additions into that fixed table: no
//! lock, no allocation, no map.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;
use tower::{Layer, Service};

/// The kind of a method, go-grpc-prometheus's `grpc_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallType {
    /// One request, one answer.
    Unary,
    /// One request, a stream of answers.
    ServerStream,
    /// Streams both ways.
    BidiStream,
    /// A path that names no method served here.
    Unknown,
}

impl CallType {
    /// The `grpc_type` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unary => "unary",
            Self::ServerStream => "server_stream",
            Self::BidiStream => "bidi_stream",
            Self::Unknown => "unknown",
        }
    }
}

/// The label of the service and method of a path served by no method.
pub const OTHER_METHOD: &str = "_other";

/// Every method served, by service: the fixed set of `grpc_service` and
/// `grpc_method` labels. The last row stands for every other path.
pub const METHODS: [(&str, &str, CallType); 19] = [
    ("taskq.v1.TaskQueue", "PutTask", CallType::Unary),
    ("taskq.v1.TaskQueue", "CancelTask", CallType::Unary),
    ("taskq.v1.TaskQueue", "PauseQueue", CallType::Unary),
    ("taskq.v1.TaskQueue", "ResumeQueue", CallType::Unary),
    ("taskq.v1.TaskQueue", "PurgeQueue", CallType::Unary),
    ("taskq.v1.TaskQueue", "PutTasks", CallType::Unary),
    ("taskq.v1.TaskQueue", "GetTask", CallType::Unary),
    ("taskq.v1.TaskQueue", "ExtendLease", CallType::Unary),
    ("taskq.v1.TaskQueue", "PutResult", CallType::Unary),
    ("taskq.v1.TaskQueue", "GetResult", CallType::Unary),
    ("taskq.v1.TaskQueue", "GetStats", CallType::Unary),
    ("taskq.v1.TaskQueue", "StreamTasks", CallType::BidiStream),
    ("taskq.v1.TaskQueue", "WatchResults", CallType::ServerStream),
    (
        "taskq.v1.TaskQueue",
        "WatchResultBatches",
        CallType::ServerStream,
    ),
    ("grpc.health.v1.Health", "Check", CallType::Unary),
    ("grpc.health.v1.Health", "Watch", CallType::ServerStream),
    (
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
        CallType::BidiStream,
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
        CallType::BidiStream,
    ),
    (OTHER_METHOD, OTHER_METHOD, CallType::Unknown),
];

/// The row of [`METHODS`] a path is counted under.
fn method_of(path: &str) -> usize {
    let other = METHODS.len() - 1;
    let Some((service, method)) = path.strip_prefix('/').and_then(|rest| rest.split_once('/'))
    else {
        return other;
    };
    METHODS
        .iter()
        .position(|(s, m, _)| *m == method && *s == service)
        .unwrap_or(other)
}

/// The names of the gRPC status codes as go-grpc-prometheus writes them
/// (`codes.Code.String()`), by number.
pub const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// The code of a `grpc-status` value; an unreadable one is `Unknown`.
fn code_of(value: &http::HeaderValue) -> usize {
    std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|text| text.parse::<usize>().ok())
        .filter(|code| *code < CODES.len())
        .unwrap_or(UNKNOWN)
}

/// The upper bounds of the duration buckets, in seconds: Prometheus's
/// default buckets (as go-grpc-prometheus uses), with a millisecond below
/// and long polls and streams above.
pub const BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];

/// [`BUCKETS`] in nanoseconds, for the hot path.
const BUCKET_NANOS: [u64; 16] = {
    let mut nanos = [0; 16];
    let mut i = 0;
    while i < BUCKETS.len() {
        // Exact: every bound is a whole number of microseconds.
        nanos[i] = (BUCKETS[i] * 1e6) as u64 * 1000;
        i += 1;
    }
    nanos
};

/// One method's numbers, all atomics: recording takes no lock.
#[derive(Debug, Default)]
struct MethodCells {
    handled: [AtomicU64; CODES.len()],
    /// Per bucket (not cumulative), the last one past every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    nanos: AtomicU64,
}

/// The counts of every call since start; shared by the layer's services
/// and read by a scrape.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    cells: Arc<[MethodCells; METHODS.len()]>,
}

impl Default for GrpcMetricsLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcMetricsLayer {
    /// Counts from zero.
    pub fn new() -> Self {
        Self {
            cells: Arc::new(std::array::from_fn(|_| MethodCells::default())),
        }
    }

    /// The numbers so far, one entry per row of [`METHODS`].
    pub fn numbers(&self) -> Vec<MethodNumbers> {
        self.cells
            .iter()
            .zip(METHODS)
            .map(|(cells, (service, method, kind))| MethodNumbers {
                service,
                method,
                kind,
                handled: std::array::from_fn(|i| cells.handled[i].load(Ordering::Relaxed)),
                buckets: std::array::from_fn(|i| cells.buckets[i].load(Ordering::Relaxed)),
                seconds: Duration::from_nanos(cells.nanos.load(Ordering::Relaxed)).as_secs_f64(),
            })
            .collect()
    }
}

/// One method's numbers at a scrape.
#[derive(Clone, Debug, PartialEq)]
pub struct MethodNumbers {
    /// `grpc_service`.
    pub service: &'static str,
    /// `grpc_method`.
    pub method: &'static str,
    /// `grpc_type`.
    pub kind: CallType,
    /// Calls ended, by code (the index into [`CODES`]).
    pub handled: [u64; CODES.len()],
    /// Calls by duration bucket ([`BUCKETS`], then past the last), not
    /// cumulative.
    pub buckets: [u64; BUCKETS.len() + 1],
    /// The sum of the calls' durations.
    pub seconds: f64,
}

/// A call being counted; counted as `Canceled` if dropped before its
/// status is known.
#[derive(Debug)]
struct Call {
    cells: Arc<[MethodCells; METHODS.len()]>,
    method: usize,
    start: Instant,
    counted: bool,
}

impl Call {
    fn end(&mut self, code: usize) {
        if std::mem::replace(&mut self.counted, true) {
            return;
        }
        let cells = &self.cells[self.method];
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKET_NANOS
            .iter()
            .position(|bound| nanos <= *bound)
            .unwrap_or(BUCKETS.len());
        cells.handled[code].fetch_add(1, Ordering::Relaxed);
        cells.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        cells.nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.end(CANCELED);
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            cells: self.cells.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] makes.
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
    cells: Arc<[MethodCells; METHODS.len()]>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Unpin,
{
    type Response = http::Response<Counted<ResBody>>;
    type Error = S::Error;
    type Future = Counting<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = Call {
            cells: self.cells.clone(),
            method: method_of(request.uri().path()),
            start: Instant::now(),
            counted: false,
        };
        Counting {
            inner: self.inner.call(request),
            call: Some(call),
        }
    }
}

/// The future of a counted call: its answer's headers.
#[derive(Debug)]
pub struct Counting<F> {
    inner: F,
    call: Option<Call>,
}

impl<F, B, E> Future for Counting<F>
where
    F: Future<Output = Result<http::Response<B>, E>> + Unpin,
{
    type Output = Result<http::Response<Counted<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answer = std::task::ready!(Pin::new(&mut self.inner).poll(cx));
        let mut call = self.call.take();
        Poll::Ready(match answer {
            Ok(response) => {
                // A trailers-only answer (an error before any message)
                // carries its status in the headers: the call ends here.
                if let Some(status) = response.headers().get("grpc-status")
                    && let Some(mut call) = call.take()
                {
                    call.end(code_of(status));
                }
                Ok(response.map(|inner| Counted { inner, call }))
            }
            Err(error) => {
                if let Some(mut call) = call {
                    call.end(UNKNOWN);
                }
                Err(error)
            }
        })
    }
}

/// An answer's body, which counts its call when the trailers go by (or
/// as `Canceled` when dropped before).
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    call: Option<Call>,
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(mut call) = self.call.take()
                {
                    let code = trailers.get("grpc-status").map_or(UNKNOWN, code_of);
                    call.end(code);
                }
            }
            // Ended without a status, or broken.
            None | Some(Err(_)) => {
                if let Some(mut call) = self.call.take() {
                    call.end(UNKNOWN);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio_stream::StreamExt;

    use super::*;

    type TestBody = Pin<Box<dyn Body<Data = Bytes, Error = Infallible> + Send>>;

    /// Answers `/taskq.v1.TaskQueue/GetTask` trailers-only NOT_FOUND,
    /// `/taskq.v1.TaskQueue/PutTask` with a message then trailers OK,
    /// `/taskq.v1.TaskQueue/StreamTasks` with a message and no end, and
    /// waits forever on `/taskq.v1.TaskQueue/GetResult`.
    #[derive(Clone)]
    struct Test;

    impl Service<http::Request<()>> for Test {
        type Response = http::Response<TestBody>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<()>) -> Self::Future {
            let path = request.uri().path().to_string();
            Box::pin(async move {
                let body: TestBody = match path.as_str() {
                    "/taskq.v1.TaskQueue/GetTask" => {
                        let mut response =
                            http::Response::new(Box::pin(Full::new(Bytes::new())) as TestBody);
                        response
                            .headers_mut()
                            .insert("grpc-status", "5".parse().unwrap());
                        return Ok(response);
                    }
                    "/taskq.v1.TaskQueue/PutTask" => {
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        Box::pin(StreamBody::new(tokio_stream::iter([
                            Ok(Frame::data(Bytes::from_static(b"message"))),
                            Ok(Frame::trailers(trailers)),
                        ])))
                    }
                    "/taskq.v1.TaskQueue/GetResult" => std::future::pending().await,
                    _ => Box::pin(StreamBody::new(
                        tokio_stream::iter([Ok(Frame::data(Bytes::from_static(b"task")))])
                            .chain(tokio_stream::pending()),
                    )),
                };
                Ok(http::Response::new(body))
            })
        }
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    fn handled(layer: &GrpcMetricsLayer, method: &str, code: &str) -> u64 {
        let code = CODES.iter().position(|c| *c == code).unwrap();
        layer
            .numbers()
            .iter()
            .find(|n| n.method == method)
            .unwrap()
            .handled[code]
    }

    fn calls(layer: &GrpcMetricsLayer, method: &str) -> u64 {
        let numbers = layer.numbers();
        let row = numbers.iter().find(|n| n.method == method).unwrap();
        row.buckets.iter().sum()
    }

    #[tokio::test]
    async fn a_status_in_the_headers_ends_the_call() {
        let layer = GrpcMetricsLayer::new();
        let mut service = layer.layer(Test);
        let response = service
            .call(request("/taskq.v1.TaskQueue/GetTask"))
            .await
            .unwrap();
        assert_eq!(handled(&layer, "GetTask", "NotFound"), 1);
        // Reading or dropping the body counts nothing more.
        drop(response);
        assert_eq!(calls(&layer, "GetTask"), 1);
        assert_eq!(handled(&layer, "GetTask", "Canceled"), 0);
    }

    #[tokio::test]
    async fn a_status_in_the_trailers_ends_the_call_when_they_go_by() {
        let layer = GrpcMetricsLayer::new();
        let mut service = layer.layer(Test);
        let response = service
            .call(request("/taskq.v1.TaskQueue/PutTask"))
            .await
            .unwrap();
        assert_eq!(calls(&layer, "PutTask"), 0, "not before its status");
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(handled(&layer, "PutTask", "OK"), 1);
        assert_eq!(calls(&layer, "PutTask"), 1);
    }

    /// A client that leaves a stream or a waiting call: the call is
    /// counted once, as Canceled, when the server drops it.
    #[tokio::test]
    async fn a_call_dropped_before_its_status_is_canceled() {
        let layer = GrpcMetricsLayer::new();
        let mut service = layer.layer(Test);
        let mut body = service
            .call(request("/taskq.v1.TaskQueue/StreamTasks"))
            .await
            .unwrap()
            .into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert_eq!(
            calls(&layer, "StreamTasks"),
            0,
            "open streams are not counted"
        );
        drop(body);
        assert_eq!(handled(&layer, "StreamTasks", "Canceled"), 1);

        let waiting = service.call(request("/taskq.v1.TaskQueue/GetResult"));
        let timeout = tokio::time::timeout(Duration::from_millis(10), waiting).await;
        assert!(timeout.is_err(), "still waiting");
        assert_eq!(handled(&layer, "GetResult", "Canceled"), 1);
        assert_eq!(calls(&layer, "GetResult"), 1);
    }

    /// Paths of no method served here share one row: a client probing
    /// random paths cannot grow the label set.
    #[tokio::test]
    async fn unknown_paths_fold_into_other() {
        let layer = GrpcMetricsLayer::new();
        let mut service = layer.layer(Test);
        for path in ["/x.Y/Z", "/taskq.v1.TaskQueue/Nope", "/", "nothing"] {
            drop(service.call(request(path)).await.unwrap());
        }
        assert_eq!(handled(&layer, OTHER_METHOD, "Canceled"), 4);
        assert_eq!(layer.numbers().len(), METHODS.len());
    }

    /// Every method of the contract has its own row, with its kind: a
    /// method added to the proto and not here would be counted under
    /// `_other`.
    #[test]
    fn the_table_names_every_method_of_the_contract() {
        use prost::Message;
        let mut methods = 0;
        let sets = [
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ];
        let files = sets.into_iter().flat_map(|set| {
            prost_types::FileDescriptorSet::decode(set)
                .unwrap()
                .file
                .into_iter()
        });
        for file in &files.collect::<Vec<_>>() {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let kind = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => CallType::Unary,
                        (false, true) => CallType::ServerStream,
                        (true, true) => CallType::BidiStream,
                        (true, false) => panic!("no client streams in the contract"),
                    };
                    let path = format!("/{name}/{}", method.name());
                    assert_eq!(
                        METHODS[method_of(&path)],
                        (name.as_str(), method.name(), kind)
                    );
                    methods += 1;
                }
            }
        }
        assert_eq!(methods, 16, "TaskQueue's 14 methods and Health's 2");
    }

    #[test]
    fn paths_find_their_method_and_codes_their_name() {
        assert_eq!(
            METHODS[method_of("/taskq.v1.TaskQueue/PutTasks")].1,
            "PutTasks"
        );
        assert_eq!(
            METHODS[method_of("/grpc.health.v1.Health/Check")].1,
            "Check"
        );
        assert_eq!(
            METHODS[method_of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")].0,
            "grpc.reflection.v1alpha.ServerReflection"
        );
        assert_eq!(
            method_of("/grpc.health.v1.Health/PutTask"),
            METHODS.len() - 1
        );
        assert_eq!(code_of(&"16".parse().unwrap()), 16);
        assert_eq!(code_of(&"17".parse().unwrap()), UNKNOWN);
        assert_eq!(code_of(&"x".parse().unwrap()), UNKNOWN);
        assert_eq!(BUCKET_NANOS[0], 1_000_000);
        assert_eq!(BUCKET_NANOS[15], 3_600_000_000_000);
    }
}
